"""`keras.layers.Dense` and `keras.layers.EinsumDense`: a matrix product over positions.

Dense: y = a·W + b, kernel (D_in, D_out). Per sample, uᵢ = Σₜ âᵢₜ gᵢₜᵀ with â = [a, 1]: an input
with extra axes (batch, t₁, …, features) has one row per position t, and the per-sample gradient
sums over them, exactly as Dense's kernel gradient does.

EinsumDense: y = einsum(equation, x, W) + b. An equation "X,K->O" whose indices are each one of
  batch       the first index of X, in O, not in K;
  position    in X and O, not in K (summed over by the kernel gradient, like Dense's extra axes);
  contracted  in X and K, not in O (the kernel's input axes);
  output      in K and O, not in X (the kernel's output axes)
is a Dense layer over positions: Â = x with positions first and contracted axes last (in K's
order), G = ∂ℓ/∂y likewise with the output axes last, and the kernel as a (contracted, output)
matrix. That covers every projection MultiHeadAttention and GroupedQueryAttention build. Other
equations (an index in X, K and O: a kernel batched over an axis; an index only in X: summed over
before the kernel) and a bias over only part of the output axes get a first-order reason.
"""

from __future__ import annotations

import math
import string

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf.layers.base import Forward, KroneckerHelper, as_rows, static_positions


class DenseHelper(KroneckerHelper):
    layer_classes = (keras.layers.Dense,)
    kind = "Dense"

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        z = ops.matmul(inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return Forward(output=z, recorded=inputs, activation=layer.activation)

    def _input_rows(self, recorded):
        return as_rows(recorded, self.kernel_rows)

    def positions(self, recorded_shape):
        return static_positions(recorded_shape, range(1, len(recorded_shape) - 1))


class EinsumSpec:
    """An EinsumDense equation with its ellipsis spelled out, split into index roles."""

    def __init__(self, equation: str, input_rank: int):
        lhs, out = equation.split("->")
        x, k = lhs.split(",")
        if "..." in x:
            unused = [c for c in string.ascii_letters if c not in equation]
            elided = "".join(unused[: input_rank - (len(x) - 3)])
            x, out = x.replace("...", elided), out.replace("...", elided)
        self.equation = f"{x},{k}->{out}"
        self.x, self.k, self.out = x, k, out
        self.batch = x[0]
        self.positions = [c for c in x[1:] if c in out and c not in k]
        self.contracted = [c for c in k if c in x and c not in out]
        self.outputs = [c for c in k if c in out and c not in x]

    def problem(self) -> str | None:
        """Why the equation is not a Dense over positions (None if it is)."""
        if self.batch in self.k or self.batch not in self.out:
            return (f"equation '{self.equation}': its first input index '{self.batch}' is not a "
                    "batch index (in the output, not in the kernel)")
        shared = [c for c in self.x if c in self.k and c in self.out]
        if shared:
            return (f"equation '{self.equation}': index '{shared[0]}' is in the input, the kernel "
                    "and the output (a kernel batched over an axis), which has no exact block")
        summed = [c for c in self.x if c not in self.k and c not in self.out]
        if summed:
            return (f"equation '{self.equation}': input index '{summed[0]}' is summed over "
                    "without the kernel, which has no exact block")
        return None

    def permutation(self, spec: str, order: list[str]) -> list[int]:
        return [spec.index(c) for c in order]


class EinsumDenseHelper(KroneckerHelper):
    layer_classes = (keras.layers.EinsumDense,)
    kind = "EinsumDense"

    def __init__(self, layer):
        super().__init__(layer)
        self.spec = EinsumSpec(layer.equation, layer.input_spec.ndim)
        k_shape = dict(zip(self.spec.k, layer.kernel.shape))
        self._contracted_sizes = [int(k_shape[c]) for c in self.spec.contracted]
        self._output_sizes = [int(k_shape[c]) for c in self.spec.outputs]

    @classmethod
    def unsupported_reason(cls, layer):
        spec = EinsumSpec(layer.equation, layer.input_spec.ndim)
        problem = spec.problem()
        if problem:
            return problem
        bias_axes = getattr(layer, "bias_axes", None)
        if layer.bias is not None and set(bias_axes) != set(spec.outputs):
            return (f"bias_axes '{bias_axes}' are not exactly the kernel's output axes "
                    f"'{''.join(spec.outputs)}' of equation '{spec.equation}', which has no exact "
                    "block")
        return super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        z = ops.einsum(layer.equation, inputs, layer.kernel)
        if layer.bias is not None:
            z = ops.add(z, layer.bias)
        return Forward(output=z, recorded=inputs, activation=layer.activation)

    @property
    def kernel_rows(self) -> int:
        return int(math.prod(self._contracted_sizes))

    @property
    def d_out(self) -> int:
        return int(math.prod(self._output_sizes))

    def _kernel_as_matrix(self, kernel):
        spec = self.spec
        perm = spec.permutation(spec.k, spec.contracted + spec.outputs)
        return tf.reshape(tf.transpose(kernel, perm), [self.kernel_rows, self.d_out])

    def _kernel_from_matrix(self, matrix):
        spec = self.spec
        order = spec.contracted + spec.outputs
        unfolded = tf.reshape(matrix, self._contracted_sizes + self._output_sizes)
        return tf.transpose(unfolded, [order.index(c) for c in spec.k])

    # The bias spans the output from its first bias axis on, with 1 for the other axes; its
    # non-1 axes are the kernel's output axes (unsupported_reason), in the output's order.
    def _bias_order(self) -> list[str]:
        return [c for c in self.spec.out if c in self.spec.outputs]

    def _bias_as_row(self, bias):
        order = self._bias_order()
        sizes = dict(zip(self.spec.outputs, self._output_sizes))
        values = tf.reshape(bias, [sizes[c] for c in order])
        return tf.reshape(tf.transpose(values, [order.index(c) for c in self.spec.outputs]),
                          [1, self.d_out])

    def _bias_from_row(self, row):
        order = self._bias_order()
        values = tf.reshape(row, self._output_sizes)
        return tf.reshape(tf.transpose(values, [self.spec.outputs.index(c) for c in order]),
                          self.bias.shape)

    def _input_rows(self, recorded):
        spec = self.spec
        perm = spec.permutation(spec.x, [spec.batch] + spec.positions + spec.contracted)
        return as_rows(tf.transpose(recorded, perm), self.kernel_rows)

    def output_rows(self, output_grad):
        spec = self.spec
        perm = spec.permutation(spec.out, [spec.batch] + spec.positions + spec.outputs)
        return as_rows(tf.cast(tf.transpose(output_grad, perm), self.dtype), self.d_out)

    def positions(self, recorded_shape):
        axes = [self.spec.x.index(c) for c in self.spec.positions]
        return static_positions(recorded_shape, axes)
