"""What one kind of Keras layer is, for the curvature blocks: the base of the layer helpers.

A helper holds the facts about a layer that TENGraD's exact blocks (blocks/), K-FAC's Kronecker
blocks (kfac.py) and the capture (capture.py) need, and nothing about curvature:

  * which Keras classes it handles, and why a configuration is not supported (`unsupported_reason`);
  * how to run the layer so that the output whose gradient the blocks need can be tapped
    (`forward`: the output before the activation, computed exactly as the layer's own `call`, and
    the tensor to record for later: the layer input, its normalized input, the token ids);
  * the layer's variables and its gradient as one tensor (`to_matrix`/`from_matrix`);
  * the per-sample gradients, in one of three structures (`Structure`).

In the manner of kfac-pytorch's module helpers: a new layer kind is one helper and its tests.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
from typing import Any, Callable

import keras
import tensorflow as tf


class Structure(str, enum.Enum):
    """How a layer's per-sample gradient uᵢ is built (docs/DESIGN.md)."""

    # uᵢ = Σₜ âᵢₜ gᵢₜᵀ per group of channels: input rows Â (bias column included) and output rows
    # G. Dense, EinsumDense and convolutions (one group), depthwise and grouped convolutions.
    KRONECKER = "kronecker"
    # The same with one-hot input rows, given by token ids: Embedding. Never densified (V may be
    # 50k).
    TOKENS = "tokens"
    # uᵢ computed directly from the recorded tensor and the output gradient: normalization layers,
    # transposed and separable convolutions.
    EXPLICIT = "explicit"


@dataclasses.dataclass
class Forward:
    """A captured call: the tensor to tap, what to record, and how to finish the layer's output."""

    output: tf.Tensor  # its gradient ∂(loss)/∂output is what the blocks need (the pre-activation)
    recorded: tf.Tensor  # kept for the blocks; its leading axis is the sample axis
    activation: Callable[[tf.Tensor], tf.Tensor] | None = None


def as_rows(x: tf.Tensor, width: int) -> tf.Tensor:
    """(m, ..., w₁, …) → (m, P, width) for trailing axes w₁… of product `width`, keeping P static
    when the other axes are: the Dense fast paths (P = 1) and the cost model depend on it, and
    `[tf.shape(x)[0], -1, width]` would lose it whenever the batch size is dynamic."""
    rest = x.shape[1:]
    p = -1 if None in rest else int(math.prod(rest)) // width
    return tf.reshape(x, [-1 if p != -1 else tf.shape(x)[0], p, width])


def static_positions(shape, axes) -> int | None:
    """The product of `shape` over `axes` (None if any is dynamic)."""
    dims = [shape[a] for a in axes]
    return None if None in dims else int(math.prod(dims))


class LayerHelper:
    """The facts about one layer. Subclasses set `layer_classes`, `kind`, `structure` and
    implement `forward`, `variables`, `positions` and the methods of their structure."""

    #: Keras classes this helper handles (subclasses included if they keep the parent's `call`).
    layer_classes: tuple[type, ...] = ()
    #: Name of the kind in summaries ("Dense block of layer ...").
    kind: str = "layer"
    structure: Structure = Structure.EXPLICIT
    #: False for kinds that are only named (recurrent layers): capture does not patch them.
    captures: bool = True

    def __init__(self, layer: keras.layers.Layer):
        self.layer = layer

    # ---- capture --------------------------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        """Why this layer's configuration gets no exact block (None if it does). The summary puts
        the layer's class and name in front of it."""
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled layers are not preconditioned"
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer (mode {layer.quantization_mode!r})"
        return None

    @classmethod
    def forward(cls, layer, original: Callable, args: tuple, kwargs: dict) -> Forward | str:
        """Run the layer for a captured call: a `Forward`, or the reason why this particular call
        cannot be captured (the caller then runs `original` unchanged)."""
        raise NotImplementedError

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def variables(self) -> list:
        """The layer's trainable variables that form its block, in the order of `to_matrix`."""
        raise NotImplementedError

    @property
    def dtype(self) -> tf.DType:
        """float64 for float64 layers (exact tests), float32 otherwise (float16/bfloat16 included:
        the curvature of mixed-precision layers is kept in float32)."""
        return tf.float64 if self.variables[0].dtype == "float64" else tf.float32

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        """Shape of the block's gradient as one tensor (`to_matrix`)."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        """d, the number of parameters of the block."""
        return int(math.prod(self.matrix_shape))

    def to_matrix(self, grads: list[tf.Tensor]) -> tf.Tensor:
        """The variables' gradients (or directions) as one tensor of `matrix_shape`."""
        raise NotImplementedError

    def from_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `to_matrix`, in each variable's shape and dtype."""
        raise NotImplementedError

    def positions(self, recorded_shape) -> int | None:
        """P, the rows per sample of one call (None if not static)."""
        raise NotImplementedError

    def describe_parameters(self) -> str:
        """The block's parameters and dimensions, for `summary()`."""
        names = "+".join(v.name for v in self.variables)
        return f"{names}, d={self.size}"

    def per_sample_elements(self, recorded_shape) -> int:
        """Elements per sample of the largest intermediate when the blocks form per-sample gradients
        (for chunking over samples within the memory budget)."""
        return self.size


class ExplicitHelper(LayerHelper):
    """A layer whose per-sample gradient is computed directly: its matrix is the flattened
    gradients of its variables, concatenated in `variables` order."""

    structure = Structure.EXPLICIT

    def per_sample_gradients(self, recorded: tf.Tensor, output_grad: tf.Tensor) -> tf.Tensor:
        """uᵢ for every sample of one call: (m, d) in `dtype`."""
        raise NotImplementedError

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return (sum(int(math.prod(v.shape)) for v in self.variables),)

    def to_matrix(self, grads):
        return tf.concat([tf.reshape(tf.cast(g, self.dtype), [-1]) for g in grads], axis=0)

    def from_matrix(self, matrix):
        sizes = [int(math.prod(v.shape)) for v in self.variables]
        parts = tf.split(matrix, sizes, axis=0)
        return [tf.cast(tf.reshape(p, v.shape), v.dtype) for p, v in zip(parts, self.variables)]


class KroneckerHelper(LayerHelper):
    """A kernel (and optional bias) whose per-sample gradient is Σₜ âᵢₜ gᵢₜᵀ per group.

    The matrix is (D_in, D_out) for one group, (groups, D_in, D_out) for several, with the bias as
    the last input row (the patch rows carry a column of ones for it). Subclasses provide
    `kernel_rows` (D_in without the bias, per group), `_input_rows` and `positions`; grouped
    layers also `_kernel_as_matrix` and `_kernel_from_matrix`.
    """

    structure = Structure.KRONECKER
    groups: int = 1
    #: Route E forms J from the unfolded rows Â and G (blocks/per_sample.py). False: the helper
    #: forms J itself, cheaper, by `per_sample_gradients(recorded, output_grad)` (convolutions).
    per_sample_from_rows = True

    @property
    def kernel(self):
        return self.layer.kernel

    @property
    def bias(self):
        return getattr(self.layer, "bias", None)

    @property
    def has_bias(self) -> bool:
        return self.bias is not None

    @property
    def variables(self) -> list:
        return [self.kernel] + ([self.bias] if self.has_bias else [])

    @property
    def kernel_rows(self) -> int:
        return int(math.prod(self.kernel.shape[:-1]))

    @property
    def d_in(self) -> int:
        return self.kernel_rows + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return int(self.kernel.shape[-1]) // self.groups

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        if self.groups == 1:
            return (self.d_in, self.d_out)
        return (self.groups, self.d_in, self.d_out)

    def describe_parameters(self) -> str:
        groups = f", {self.groups} groups" if self.groups > 1 else ""
        return (f"kernel{'+bias' if self.has_bias else ''}, D_in={self.d_in}, "
                f"D_out={self.d_out}{groups}")

    # The kernel as rows × columns (per group); the default suits kernels whose last axis is the
    # output and all others the input (Dense, convolutions).
    def _kernel_as_matrix(self, kernel: tf.Tensor) -> tf.Tensor:
        return tf.reshape(kernel, [self.kernel_rows, self.d_out])

    def _kernel_from_matrix(self, matrix: tf.Tensor) -> tf.Tensor:
        return tf.reshape(matrix, self.kernel.shape)

    def _bias_as_row(self, bias: tf.Tensor) -> tf.Tensor:
        shape = [1, self.d_out] if self.groups == 1 else [self.groups, 1, self.d_out]
        return tf.reshape(bias, shape)

    def _bias_from_row(self, row: tf.Tensor) -> tf.Tensor:
        return tf.reshape(row, self.bias.shape)

    def to_matrix(self, grads):
        matrix = self._kernel_as_matrix(tf.cast(grads[0], self.dtype))
        if self.has_bias:
            matrix = tf.concat([matrix, self._bias_as_row(tf.cast(grads[1], self.dtype))], axis=-2)
        return matrix

    def from_matrix(self, matrix):
        rows = self.kernel_rows
        out = [tf.cast(self._kernel_from_matrix(matrix[..., :rows, :]), self.kernel.dtype)]
        if self.has_bias:
            out.append(tf.cast(self._bias_from_row(matrix[..., rows:, :]), self.bias.dtype))
        return out

    # ---- rows ----------------------------------------------------------------------------------
    def _input_rows(self, recorded: tf.Tensor) -> tf.Tensor:
        """Â without the bias column: (m, P, kernel_rows), or (m, P, groups, kernel_rows)."""
        raise NotImplementedError

    def input_rows(self, recorded: tf.Tensor) -> tf.Tensor:
        """Â in `dtype`, with a column of ones for the bias."""
        rows = tf.cast(self._input_rows(recorded), self.dtype)
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
        return rows

    def output_rows(self, output_grad: tf.Tensor) -> tf.Tensor:
        """G in `dtype`: (m, P, D_out), or (m, P, groups, D_out)."""
        g = as_rows(tf.cast(output_grad, self.dtype), self.groups * self.d_out)
        if self.groups == 1:
            return g
        return tf.reshape(g, tf.concat([tf.shape(g)[:2], [self.groups, self.d_out]], 0))

    def per_sample_elements(self, recorded_shape) -> int:
        p = self.positions(recorded_shape) or 1
        return max(p * self.groups * self.d_in, self.size)


class TokensHelper(LayerHelper):
    """A lookup table whose per-sample gradient is Σₜ e_{tokᵢₜ} gᵢₜᵀ (one-hot input rows).

    Subclasses provide `table` (the (V, D) variable), `tokens` and `positions`."""

    structure = Structure.TOKENS

    @property
    def table(self):
        raise NotImplementedError

    @property
    def variables(self) -> list:
        return [self.table]

    @property
    def vocabulary(self) -> int:
        return int(self.table.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.table.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return (self.vocabulary, self.d_out)

    def describe_parameters(self) -> str:
        return f"{self.table.name}, V={self.vocabulary}, D={self.d_out}"

    def to_matrix(self, grads):
        return tf.cast(grads[0], self.dtype)

    def from_matrix(self, matrix):
        return [tf.cast(matrix, self.table.dtype)]

    def tokens(self, recorded: tf.Tensor) -> tf.Tensor:
        """Token ids (m, P), int32."""
        raise NotImplementedError

    def output_rows(self, output_grad: tf.Tensor) -> tf.Tensor:
        return as_rows(tf.cast(output_grad, self.dtype), self.d_out)


def call_arguments(original: Callable, layer, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of a `call` by name (`inputs`, `training`, `mask`, ...), defaults applied."""
    bound = inspect.signature(original).bind(layer, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
