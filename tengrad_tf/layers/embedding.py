"""`keras.layers.Embedding`: y = E[tok], table E (V, D).

Per sample, uᵢ = Σₜ e_{tokᵢₜ} gᵢₜᵀ: the rows of the tokens the sample uses, each the sum of the
output gradients at that token's positions. It is a Dense layer on one-hot inputs, which are never
formed: the blocks work from the token ids (blocks/tokens.py). With `mask_zero=True`, masked
positions carry the output gradient that the layers after them send back, which is zero when they
respect the mask (Keras's do), so they contribute nothing.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tengrad_tf.layers.base import Forward, TokensHelper, static_positions


class EmbeddingHelper(TokensHelper):
    layer_classes = (keras.layers.Embedding,)
    kind = "Embedding"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.input_dim > 2**24:
            return (f"a vocabulary of {layer.input_dim} tokens: the blocks keep token ids as "
                    "float32, exact only below 2²⁴")
        return super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        # The layer's own call (a gather); the token ids are all the blocks need besides.
        return Forward(output=original(layer, *args, **kwargs),
                       recorded=args[0] if args else kwargs["inputs"])

    @property
    def table(self):
        return self.layer.embeddings

    def tokens(self, recorded):
        ids = tf.cast(recorded, tf.int32)
        p = self.positions(recorded.shape)
        return tf.reshape(ids, [tf.shape(ids)[0], -1] if p is None else [-1, p])

    def positions(self, recorded_shape):
        return static_positions(recorded_shape, range(1, len(recorded_shape)))
