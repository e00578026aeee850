"""Fisher block of `keras.layers.Conv1D` and `Conv2D` (channels_last, groups = 1).

The patch rows Âᵢ are the receptive fields of each output position, unfolded in the order of the
Keras kernel (k_h, k_w, c_in), so that Jᵢ = Âᵢᵀ Gᵢ is the sample's kernel gradient reshaped to
(k_h·k_w·c_in, c_out). Padding ('valid', 'same', and Conv1D's 'causal'), strides and dilation follow
Keras's TensorFlow backend, which uses TF's own SAME/VALID rules; Conv1D is unfolded as a 1 × k
Conv2D.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf.blocks.base import FisherBlock, as_rows


class ConvBlock(FisherBlock):
    layer_classes = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    kind = "Conv"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.rank not in (1, 2):
            return f"Conv{layer.rank}D has no exact block yet (Conv1D and Conv2D do)"
        if layer.data_format != "channels_last":
            return "channels_first convolutions are not preconditioned (use channels_last)"
        if layer.groups != 1:
            return (f"grouped convolution (groups={layer.groups}): its per-group blocks are not "
                    "implemented")
        return super().unsupported_reason(layer)

    @staticmethod
    def _padded(layer, inputs):
        """Inputs after causal padding, and the TF padding mode that then applies."""
        if layer.padding == "causal":
            left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
            return ops.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "valid"
        return inputs, layer.padding

    @staticmethod
    def preactivation(layer, inputs):
        x, padding = ConvBlock._padded(layer, inputs)
        z = ops.conv(x, layer.kernel, strides=list(layer.strides), padding=padding,
                     dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        if layer.bias is not None:
            z = ops.add(z, ops.reshape(layer.bias, (1,) * (layer.rank + 1) + (layer.filters,)))
        return z

    def input_rows(self, inputs):
        layer = self.layer
        x, padding = self._padded(layer, inputs)
        size, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
        if layer.rank == 1:  # unfold as a 1 × k image
            x = x[:, None]
            size, strides, rates = (1, *size), (1, *strides), (1, *rates)
        patches = tf.image.extract_patches(
            x, sizes=[1, *size, 1], strides=[1, *strides, 1], rates=[1, *rates, 1],
            padding=padding.upper(),
        )
        # extract_patches puts (k_h, k_w, c_in) last, in the kernel's order: rows are the positions.
        return as_rows(patches, self.kernel_rows)

    def positions(self, inputs_shape) -> int:
        layer = self.layer
        return math.prod(layer.compute_output_shape(tuple(inputs_shape))[1:-1])
