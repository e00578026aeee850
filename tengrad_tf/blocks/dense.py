"""Fisher block of `keras.layers.Dense`: y = a·W + b, kernel (D_in, D_out).

Per sample, uᵢ = âᵢ gᵢᵀ with â = [a, 1]. An input with extra axes (batch, t₁, …, features) has one
patch row per position t, and the per-sample gradient sums over them, exactly as Dense's kernel
gradient does.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf.blocks.base import FisherBlock


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
        return tf.reshape(inputs, [tf.shape(inputs)[0], -1, self.kernel_rows])

    def positions(self, inputs_shape) -> int:
        return math.prod(inputs_shape[1:-1])
