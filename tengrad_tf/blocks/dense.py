"""Fisher block of `keras.layers.Dense`: y = a·W + b, kernel (D_in, D_out).

Per sample, uᵢ = âᵢ gᵢᵀ with â = [a, 1]. An input with extra axes (batch, t₁, …, features) has one
patch row per position t, and the per-sample gradient sums over them, exactly as Dense's kernel
gradient does.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from tengrad_tf.blocks.base import FisherBlock, as_rows


class DenseBlock(FisherBlock):
    layer_classes = (keras.layers.Dense,)
    kind = "Dense"

    @staticmethod
    def preactivation(layer, inputs):
        z = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return z

    def input_rows(self, inputs):
        return as_rows(inputs, self.kernel_rows)

    def positions(self, inputs_shape) -> int | None:
        extra = list(inputs_shape[1:-1])
        return None if None in extra else math.prod(extra)
