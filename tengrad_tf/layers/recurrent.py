"""Recurrent layers (SimpleRNN, GRU, LSTM, ConvLSTM, any `keras.layers.RNN`): first-order, by name.

Their weights are shared over the time steps, so per sample uᵢ = Σₜ (the cell's per-step gradient),
a sum like a shared layer's, and an exact block would need each step's cell inputs and output
gradients. Those exist only inside the RNN's `tf.while_loop` (or its fused cuDNN kernel): a tap
there records tensors of the loop body, which the optimizer cannot use outside the loop, and
unrolling the loop to reach them would change the model the user built. So these layers take a
first-order step, and the summary says so for each.
"""

from __future__ import annotations

import keras

from tengrad_tf.layers.base import LayerHelper


class RecurrentHelper(LayerHelper):
    layer_classes = (keras.layers.RNN,)
    kind = "Recurrent"
    captures = False

    @classmethod
    def unsupported_reason(cls, layer):
        return ("recurrent weights are shared over the time steps, and the per-step output "
                "gradients an exact block needs exist only inside the RNN's while loop, where "
                "capture cannot reach them")
