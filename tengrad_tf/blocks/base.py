"""The layer-agnostic part of an exact Fisher block: Gram route, cache, and the damped solve.

A block covers one layer's kernel and bias together. Subclasses (one per layer kind) know only their
layer: which layers they accept, the pre-activation output, the patch rows Âᵢ (with the bias column),
the output-gradient rows Gᵢ, and how the kernel and bias gradients map to one D_in × D_out matrix.
Everything else (which Gram route, what to cache between curvature updates, chunking to stay within
the memory budget, the Woodbury solve) is here and the same for every kind.

Cache: a block keeps what it needs to precondition new gradients between curvature updates, in
tf.Variables whose leading (sample) dimension is dynamic, since the batch size is only known at run
time. It caches the factors (Â, G) or the explicit per-sample gradients J, whichever is smaller, plus
the float64 Cholesky factor of mλI + K.
"""

from __future__ import annotations

import abc
import enum
import math
import keras
import tensorflow as tf

from tengrad_tf import _tf_private, woodbury
from tengrad_tf.blocks import per_sample

_BYTES = 4  # float32; float64 models double it, which the budget check below ignores


def as_rows(x: tf.Tensor, width: int) -> tf.Tensor:
    """(m, ..., width) → (m, P, width), keeping P static when the middle axes are: the Dense fast
    paths (P = 1) and the cost model depend on it, and `[tf.shape(x)[0], -1, width]` would lose it
    whenever the batch size is dynamic."""
    middle = x.shape[1:-1]
    p = -1 if None in middle else int(math.prod(middle))
    return tf.reshape(x, [-1 if p != -1 else tf.shape(x)[0], p, width])


class XlaCacheError(RuntimeError):
    """Under XLA the curvature cache needs a batch size that is static when the step is traced."""


class CacheKind(str, enum.Enum):
    FACTORS = "factors"  # Â (m, P, D_in) and G (m, P, D_out)
    PER_SAMPLE = "per-sample gradients"  # J (m, D_in, D_out)


class FisherBlock(abc.ABC):
    """Exact (F + λI)⁻¹ for one layer, F = (1/m) Σᵢ vec(Jᵢ) vec(Jᵢ)ᵀ with Jᵢ = Âᵢᵀ Gᵢ."""

    #: Keras layer classes this block handles (exact type match is not required: subclasses that keep
    #: the parent's `call` are captured, because capture patches the parent's method).
    layer_classes: tuple[type, ...] = ()
    kind: str = "block"

    def __init__(self, layer: keras.layers.Layer, memory_budget: int = 256 * 2**20,
                 damping: float = 0.1, update_freq: int = 1, max_retries: int = 6):
        self.layer = layer
        self.memory_budget = int(memory_budget)
        self.damping = damping
        self.update_freq = update_freq
        self.max_retries = max_retries
        self.variables = [layer.kernel] + ([layer.bias] if self.has_bias else [])
        self._cache: dict[str, tf.Variable] | None = None
        self._capacity: int | None = None

    # ---- what a subclass provides ---------------------------------------------------------------
    @classmethod
    def unsupported_reason(cls, layer) -> str | None:
        """Why this layer cannot get an exact block (None if it can)."""
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled layers are not preconditioned"
        if getattr(layer, "quantization_mode", None):
            return f"quantized layer (mode {layer.quantization_mode!r})"
        return None

    @staticmethod
    @abc.abstractmethod
    def preactivation(layer, inputs) -> tf.Tensor:
        """The layer's output before its activation, computed exactly as the layer's own call."""

    @abc.abstractmethod
    def input_rows(self, inputs: tf.Tensor) -> tf.Tensor:
        """Â without the bias column: (m, P, D_in)."""

    @abc.abstractmethod
    def positions(self, inputs_shape) -> int | None:
        """P, the number of patch rows per sample (None if not static)."""

    @property
    def dtype(self) -> tf.DType:
        """float64 for float64 layers (exact tests), float32 otherwise (float16/bfloat16 included:
        the factors of mixed-precision layers are kept in float32)."""
        return tf.float64 if self.layer.kernel.dtype == "float64" else tf.float32

    @property
    def has_bias(self) -> bool:
        return getattr(self.layer, "bias", None) is not None

    @property
    def kernel_rows(self) -> int:
        return math.prod(self.layer.kernel.shape[:-1])

    @property
    def d_in(self) -> int:
        return self.kernel_rows + int(self.has_bias)

    @property
    def d_out(self) -> int:
        return int(self.layer.kernel.shape[-1])

    # ---- shared ------------------------------------------------------------------------------
    def patches(self, inputs: tf.Tensor) -> tf.Tensor:
        """Â: (m, P, D_in) in float32, with a column of ones for the bias."""
        rows = tf.cast(self.input_rows(inputs), self.dtype)
        if self.has_bias:
            rows = tf.concat([rows, tf.ones_like(rows[..., :1])], axis=-1)
        return rows

    def output_rows(self, output_grad: tf.Tensor) -> tf.Tensor:
        """G: (m, P, D_out) in float32."""
        g = tf.cast(output_grad, self.dtype)
        return as_rows(g, self.d_out)

    def to_matrix(self, grads: list[tf.Tensor]) -> tf.Tensor:
        """Kernel and bias gradients (or directions) as one (D_in, D_out) matrix, bias last."""
        kernel = tf.reshape(tf.cast(grads[0], self.dtype), [self.kernel_rows, self.d_out])
        if self.has_bias:
            kernel = tf.concat([kernel, tf.cast(grads[1], self.dtype)[None, :]], axis=0)
        return kernel

    def from_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        kernel = tf.reshape(matrix[: self.kernel_rows], self.layer.kernel.shape)
        out = [tf.cast(kernel, self.layer.kernel.dtype)]
        if self.has_bias:
            out.append(tf.cast(matrix[self.kernel_rows], self.layer.bias.dtype))
        return out

    # ---- cost model ----------------------------------------------------------------------------
    def cache_kind(self, p: int | None) -> CacheKind:
        """Cache whichever of (Â, G) and J is smaller: P(D_in + D_out) against D_in·D_out per sample.

        P is None for a Dense layer on inputs whose extra axes are dynamic (sequences): factors."""
        if p is None or p * (self.d_in + self.d_out) <= self.d_in * self.d_out:
            return CacheKind.FACTORS
        return CacheKind.PER_SAMPLE

    def factored_threshold(self, p: int, cache: CacheKind) -> float:
        """Route F is cheaper than route E iff m < this threshold (inf: always; 0: never).

        Flops: F costs m²P²(D_in + D_out); E costs mPD_inD_out + m²D_inD_out. If J must be cached
        anyway, E's first term is paid by both routes and drops out of the comparison.
        """
        if p is None or p == 1:
            return math.inf
        dd = self.d_in * self.d_out
        f_per_m2 = p * p * (self.d_in + self.d_out)
        e_per_m = 0 if cache is CacheKind.PER_SAMPLE else p * dd
        if f_per_m2 <= dd:
            return math.inf
        return e_per_m / (f_per_m2 - dd)

    def chunk(self, per_sample_bytes: int) -> int:
        """Samples per chunk so that one chunk's intermediate stays within the memory budget."""
        return max(1, self.memory_budget // max(1, per_sample_bytes))

    def total_positions(self, inputs: list[tf.Tensor]) -> int | None:
        """P summed over the layer's calls in a step (None if any is dynamic)."""
        ps = [self.positions(x.shape) for x in inputs]
        return None if None in ps else sum(ps)

    def describe(self, inputs_shape) -> str:
        p = self.positions(inputs_shape)
        cache = self.cache_kind(p)
        threshold = self.factored_threshold(p, cache)
        if threshold == math.inf:
            route = "Gram route F"
        elif threshold < 1:
            route = "Gram route E"
        else:
            route = f"Gram route F for batch < {threshold:.0f}, else E"
        return (
            f"{self.kind} block of layer '{self.layer.name}' (kernel{'+bias' if self.has_bias else ''},"
            f" D_in={self.d_in}, D_out={self.d_out}, P={'dynamic' if p is None else p}; {route}; caches {cache.value})"
        )

    # ---- curvature ---------------------------------------------------------------------------
    def _build_cache(self, cache: CacheKind, p: int, capacity: int | None) -> None:
        """Create the cache variables.

        With a static batch size at the first trace (`fit` traces on a concrete first batch) the
        cache holds `capacity` samples and smaller batches are zero-padded: padded samples are zero
        rows of U and the solve gives them zero weight, so this is exact. XLA needs it, because a
        variable's shape cannot change under XLA. Without a static batch size the sample dimension
        is dynamic instead (any batch size, but no XLA).
        """
        self._capacity = capacity
        dims = {"a": [capacity, p, self.d_in], "g": [capacity, p, self.d_out],
                "j": [capacity, self.d_in, self.d_out], "cholesky": [capacity, capacity]}
        names = ["a", "g"] if cache is CacheKind.FACTORS else ["j"]

        def var(name, dtype):
            shape = dims[name]
            initial = [0 if d is None else d for d in shape]
            return tf.Variable(tf.zeros(initial, dtype), shape=tf.TensorShape(shape),
                               trainable=False, name=f"{self.layer.name}_{name}")

        with tf.init_scope():
            state = {n: var(n, self.dtype) for n in names}
            state["cholesky"] = var("cholesky", woodbury.SOLVE_DTYPE)
            state["damping"] = tf.Variable(tf.constant(1.0, woodbury.SOLVE_DTYPE), trainable=False,
                                           name=f"{self.layer.name}_damping")
            # False until curvature is first stored: a fresh or restored optimizer that starts in
            # the middle of a reuse window must not precondition with an empty cache.
            self._filled = tf.Variable(False, trainable=False, name=f"{self.layer.name}_filled")
        self._cache = state

    def _to_capacity(self, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Zero-pad the sample dimension up to the cache capacity (Cholesky: identity block)."""
        if self._capacity is None:
            return state
        cap = self._capacity
        m = tf.shape(state["cholesky"])[0]
        tf.debugging.assert_less_equal(m, cap, message=(
            f"layer '{self.layer.name}': a batch larger than the first one ({cap} samples) does not "
            "fit the curvature cache, which has a fixed size when the first batch size is static "
            "(as XLA requires). Make the first batch the largest, e.g. drop_remainder=False with a "
            "fixed batch_size."))
        out = {}
        for k, t in state.items():
            if k == "damping":
                out[k] = t
            elif k == "cholesky":
                eye = tf.eye(cap, dtype=t.dtype)[m:, m:]
                out[k] = tf.pad(t, [[0, cap - m], [0, cap - m]]) + tf.pad(eye, [[m, 0], [m, 0]])
            else:
                out[k] = tf.pad(t, [[0, cap - m]] + [[0, 0]] * (t.shape.rank - 1))
            out[k] = tf.ensure_shape(out[k], self._cache[k].shape)
        return out

    def compute_curvature(self, inputs: list[tf.Tensor], output_grads: list[tf.Tensor]
                          ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """This step's factors, Gram and Cholesky factor: ({name: tensor}, damping retries).

        `inputs`/`output_grads` hold one entry per call of the layer in the step: a shared layer
        contributes the patch rows of every call to the same per-sample gradient, so the calls are
        concatenated along the position axis (exact, not an approximation).
        """
        p = self.total_positions(inputs)
        cache = self.cache_kind(p)
        g = tf.concat([self.output_rows(dz) for dz in output_grads], axis=1)
        patches = lambda xs: tf.concat([self.patches(x) for x in xs], axis=1)  # noqa: E731
        m = tf.shape(g)[0]
        threshold = self.factored_threshold(p, cache)

        def route_f():
            a = patches(inputs)
            # A chunk of rows i holds (rows, m, P, P) pairs of products; m is known at run time only.
            p_now = tf.shape(g)[1]
            rows = tf.maximum(1, self.memory_budget // (_BYTES * 2 * p_now * p_now * m))
            return a, per_sample.gram_factored(a, g, rows)

        if cache is CacheKind.FACTORS:
            a, gram = route_f()  # P(D_in + D_out) <= D_in·D_out: route F is also the cheaper one
            state = {"a": a, "g": g}
        else:
            j = per_sample.per_sample(patches, inputs, g, self.chunk(_BYTES * p * self.d_in))
            if threshold == math.inf:
                gram = route_f()[1]
            elif threshold < 1:
                gram = per_sample.gram_explicit(j)
            else:
                gram = tf.cond(tf.cast(m, tf.float64) < threshold, lambda: route_f()[1],
                               lambda: per_sample.gram_explicit(j))
            state = {"j": j}
        damped = woodbury.factorize(gram, self.damping, self.max_retries)
        state.update(cholesky=damped.cholesky, damping=damped.damping)
        return state, damped.retries

    def is_update(self, step) -> tf.Tensor:
        """Every `update_freq` steps, and whenever nothing is cached yet."""
        return tf.logical_or(tf.equal(tf.math.floormod(step, self.update_freq), 0),
                             tf.logical_not(self._filled))

    def _ensure_cache(self, inputs: list[tf.Tensor]) -> None:
        if self._cache is not None:
            return
        p = self.total_positions(inputs)
        capacity = inputs[0].shape[0]
        if capacity is None and _tf_private.in_xla_context():
            raise XlaCacheError(
                f"layer '{self.layer.name}': the curvature cache is sized by the batch, which "
                "is not static in this trace, and XLA cannot resize a variable. Compile with "
                "model.compile(jit_compile=False) (Keras turns XLA on by default on GPUs), or "
                "trace the train step with a fixed batch size.")
        self._build_cache(self.cache_kind(p), p, capacity)

    def needs_output_grads(self, step, inputs) -> tf.Tensor:
        """Whether this step recomputes the curvature (the only use of output gradients)."""
        self._ensure_cache(inputs)
        return self.is_update(step)

    def curvature(self, step, inputs, output_grads):
        """Fresh curvature on update steps (every `update_freq`), the cached one otherwise."""
        self._ensure_cache(inputs)
        cached = {k: v.read_value() for k, v in self._cache.items()}

        def fresh():
            state, retries = self.compute_curvature(inputs, output_grads)
            return self._to_capacity(state), retries

        return tf.cond(self.is_update(step), fresh, lambda: (cached, tf.constant(0)))

    def commit(self, step, curvature: dict[str, tf.Tensor]) -> None:
        """Keep fresh `curvature` for the steps until the next update (only for finite steps)."""
        def store():
            for k, v in curvature.items():
                self._cache[k].assign(v)
            self._filled.assign(True)
            return tf.constant(True)

        tf.cond(self.is_update(step), store, lambda: tf.constant(False))

    def precondition(self, grads: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        """(F + λI)⁻¹ g for this block's gradients, with the given (fresh or cached) curvature."""
        v = self.to_matrix(grads)
        c = curvature
        if "j" in c:
            j = c["j"]
            utv = per_sample.project_explicit(j, v)
            u_times = lambda s: per_sample.combine_explicit(j, s)  # noqa: E731
        else:
            a, g = c["a"], c["g"]
            utv = per_sample.project_factored(a, g, v)
            u_times = lambda s: per_sample.combine_factored(a, g, s)  # noqa: E731
        damped = woodbury.DampedGram(c["cholesky"], c["damping"], 0)
        return self.from_matrix(woodbury.inverse_times(v, utv, u_times, damped))
