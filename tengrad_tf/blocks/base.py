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
import numpy as np
import tensorflow as tf

from tengrad_tf import _tf_private, distribute, woodbury
from tengrad_tf.blocks import per_sample

_BYTES = 4  # float32; float64 models double it, which the budget check below ignores


def as_rows(x: tf.Tensor, width: int) -> tf.Tensor:
    """(m, ..., width) → (m, P, width), keeping P static when the middle axes are: the Dense fast
    paths (P = 1) and the cost model depend on it, and `[tf.shape(x)[0], -1, width]` would lose it
    whenever the batch size is dynamic."""
    middle = x.shape[1:-1]
    p = -1 if None in middle else int(math.prod(middle))
    return tf.reshape(x, [-1 if p != -1 else tf.shape(x)[0], p, width])


def once_per_step(memo: dict, step, compute):
    """`compute(step)`, built once per traced step and then reused from `memo`.

    The core hands a block the same step tensor in needs_output_grads, curvature and commit; without
    this, each call rebuilt the same schedule ops (benchmarks/profile_step.py counted about 50 of
    them on the MLP, a sixth of a reuse step's ops). A tensor of an enclosing graph can be used inside
    a cond branch (TF captures it); one from an earlier trace cannot, hence the graph check.
    """
    hit = memo.get("value")
    if hit is not None and hit[0] is step and _visible_here(tf.nest.flatten(hit[1])[0]):
        return hit[1]
    value = compute(step)
    memo["value"] = (step, value)
    return value


def _visible_here(t) -> bool:
    if not tf.is_symbolic_tensor(t):
        return tf.executing_eagerly()
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if graph is t.graph:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def assign_on_every_replica(variable: tf.Variable, value) -> None:
    """`variable.assign(value)` on every local replica's copy.

    A block's saved state is restored while a step is traced in one replica's context (under
    tf.distribute), where the assign of a replica-local variable would set that replica's copy only.
    Without a strategy this is a plain assign.
    """
    for local in tf.distribute.get_strategy().experimental_local_results(variable):
        local.assign(value)


class XlaCacheError(RuntimeError):
    """Under XLA the curvature cache needs a batch size that is static when the step is traced."""


class CacheKind(str, enum.Enum):
    FACTORS = "factors"  # Â (m, P, D_in) and G (m, P, D_out)
    PER_SAMPLE = "per-sample gradients"  # J (m, D_in, D_out)
    INVERSE = "the explicit inverse (F + λI)⁻¹"  # (d, d), d = D_in·D_out: small blocks only


#: Blocks with at most this many parameters (d = D_in·D_out) cache the explicit d × d inverse
#: (F + λI)⁻¹, float64, at most 8 MiB: it is computed on update steps by a direct d × d Cholesky
#: when the batch has at least d samples (cheaper than the m × m Woodbury solve then) and through
#: Woodbury otherwise, and a step between updates is one d × d product instead of the factored
#: Uᵀv, solve and U s. Tests set it to 0 to exercise the factored caches on tiny layers.
DIRECT_MAX_DIM = 1024


class FisherBlock(abc.ABC):
    """Exact (F + λI)⁻¹ for one layer, F = (1/m) Σᵢ vec(Jᵢ) vec(Jᵢ)ᵀ with Jᵢ = Âᵢᵀ Gᵢ."""

    #: Keras layer classes this block handles (exact type match is not required: subclasses that keep
    #: the parent's `call` are captured, because capture patches the parent's method).
    layer_classes: tuple[type, ...] = ()
    kind: str = "block"

    def __init__(self, layer: keras.layers.Layer, memory_budget: int = 256 * 2**20,
                 damping: float | tf.Variable = 0.1, update_freq: int = 1, max_retries: int = 6,
                 jit_solve: bool = False, max_batch_size: int | None = None,
                 adaptive_damping: bool = False, joint: bool = False):
        self.layer = layer
        self.memory_budget = int(memory_budget)
        # A float, or (adaptive damping) the optimizer's λ variable, which can change between
        # curvature updates: the cache then keeps the Gram and refactorizes when λ changed.
        self.damping = damping
        self.adaptive_damping = bool(adaptive_damping)
        # Part of the whole network's Fisher (blocks/network.py): the block caches its factors and
        # hands over its Gram; the one m × m solve of all blocks together is not its own.
        self.joint = bool(joint)
        self.update_freq = update_freq
        self.max_retries = max_retries
        # XLA for the m × m factorization and solves (woodbury.py), and a fixed cache capacity
        # (_ensure_cache): TENGraD's jit_solve and max_batch_size.
        self.jit_solve = bool(jit_solve)
        self.max_batch_size = max_batch_size
        self.variables = [layer.kernel] + ([layer.bias] if self.has_bias else [])
        self._cache: dict[str, tf.Variable] | None = None
        self._capacity: int | None = None
        self._schedule_memo: dict = {}
        # Set by the optimizer: called with this block once its cache exists (to restore it from a
        # saved optimizer and track it for checkpoints).
        self.state_listener = None
        # callbacks.Diagnostics: keep the condition number of the damped Gram of each update.
        self.diagnostics = False
        self.condition: tf.Variable | None = None

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
        kernel = tf.cast(grads[0], self.dtype)
        if kernel.shape.rank != 2:  # convolutions; a Dense kernel is the matrix already
            kernel = tf.reshape(kernel, [self.kernel_rows, self.d_out])
        if self.has_bias:
            kernel = tf.concat([kernel, tf.cast(grads[1], self.dtype)[None, :]], axis=0)
        return kernel

    def from_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        kernel = matrix[: self.kernel_rows] if self.has_bias else matrix
        if len(self.layer.kernel.shape) != 2:
            kernel = tf.reshape(kernel, self.layer.kernel.shape)
        out = [tf.cast(kernel, self.layer.kernel.dtype)]
        if self.has_bias:
            out.append(tf.cast(matrix[self.kernel_rows], self.layer.bias.dtype))
        return out

    # ---- cost model ----------------------------------------------------------------------------
    def cache_kind(self, p: int | None) -> CacheKind:
        """Cache whichever of (Â, G) and J is smaller: P(D_in + D_out) against D_in·D_out per sample.

        P is None for a Dense layer on inputs whose extra axes are dynamic (sequences): factors.
        Small blocks (d ≤ DIRECT_MAX_DIM) cache their explicit inverse instead, unless the
        damping adapts (the inverse would have to be rebuilt from U at every change)."""
        if self.d_in * self.d_out <= DIRECT_MAX_DIM and not (self.adaptive_damping or self.joint):
            return CacheKind.INVERSE
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
        if cache is CacheKind.INVERSE:
            route = (f"direct {self.d_in * self.d_out}×{self.d_in * self.d_out} solve when the "
                     f"batch has at least {self.d_in * self.d_out} samples, else Woodbury")
        elif threshold == math.inf:
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

        With `max_batch_size`, or a static batch size at the first trace (a custom step traced on
        fixed shapes, or a dataset batched with drop_remainder=True), the cache holds `capacity`
        samples and smaller batches are zero-padded: padded samples are zero rows of U and the
        solve gives them zero weight, so this is exact. XLA needs it, because a variable's shape
        cannot change under XLA. Otherwise (`fit` traces with an unknown batch size) the sample
        dimension is dynamic (any batch size, but no XLA).
        """
        self._capacity = capacity
        rows = [capacity] if p == 1 else [capacity, p]  # Dense factors: (m, D) matrices
        dims = {"a": rows + [self.d_in], "g": rows + [self.d_out],
                "j": [capacity, self.d_in, self.d_out], "cholesky": [capacity, capacity],
                "inverse": [self.d_in * self.d_out] * 2, "gram": [capacity, capacity],
                "requested": [], "samples": []}
        names = {CacheKind.FACTORS: ["a", "g"], CacheKind.PER_SAMPLE: ["j"],
                 CacheKind.INVERSE: []}[cache]

        def var(name, dtype):
            shape = dims[name]
            initial = [0 if d is None else d for d in shape]
            return tf.Variable(tf.zeros(initial, dtype), shape=tf.TensorShape(shape),
                               trainable=False, name=f"{self.layer.name}_{name}",
                               **distribute.REPLICA_LOCAL)

        with tf.init_scope():
            state = {n: var(n, self.dtype) for n in names}
            if not self.joint:
                solve_state = "inverse" if cache is CacheKind.INVERSE else "cholesky"
                state[solve_state] = var(solve_state, woodbury.SOLVE_DTYPE)
                if self.adaptive_damping:  # K, the λ it was factorized for, m (K may be padded)
                    state.update({n: var(n, woodbury.SOLVE_DTYPE)
                                  for n in ("gram", "requested", "samples")})
                state["damping"] = tf.Variable(
                    tf.constant(1.0, woodbury.SOLVE_DTYPE), trainable=False,
                    name=f"{self.layer.name}_damping", **distribute.REPLICA_LOCAL)
            # False until curvature is first stored: a fresh or restored optimizer that starts in
            # the middle of a reuse window must not precondition with an empty cache.
            # Replica-local (tf.distribute): every replica writes the same values to its own copy.
            self._filled = tf.Variable(False, trainable=False, name=f"{self.layer.name}_filled",
                                       **distribute.REPLICA_LOCAL)
        self._cache = state
        if self.diagnostics:
            with tf.init_scope():
                self.condition = tf.Variable(tf.constant(0.0, woodbury.SOLVE_DTYPE),
                                             trainable=False, name=f"{self.layer.name}_condition")
        if self.state_listener is not None:
            with tf.init_scope():
                self.state_listener(self)

    # ---- saving and restoring (PreconditionedOptimizer.save_own_variables) ---------------------
    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        """The cache ("a" and "g" or "j", with "cholesky"; or "inverse"; "damping") and "filled";
        {} before the first trace."""
        if self._cache is None:
            return {}
        return {**self._cache, "filled": self._filled}

    def reset_state(self) -> None:
        """Forget the cache: the next step computes fresh curvature."""
        assign_on_every_replica(self._filled, False)

    def load_state(self, arrays: dict) -> None:
        """Set the cache from saved arrays (eagerly). A cache saved with another capacity (the first
        batch size, when static) is re-padded exactly as `_to_capacity` pads a smaller batch."""
        fields = set(self.state_variables)
        mismatch = (f"layer '{self.layer.name}': the saved curvature does not fit this block "
                    "(the saved optimizer belongs to another model, or the model's layers or "
                    "dtype changed); ")
        if set(arrays) != fields:
            raise ValueError(mismatch + f"saved fields {sorted(arrays)}, expected {sorted(fields)}.")
        cache = {}
        # Samples held by the saved cache (None for the explicit inverse, which has no sample axis).
        m = np.shape(arrays["cholesky"])[0] if "cholesky" in arrays else None
        for k, v in self._cache.items():
            value = tf.convert_to_tensor(arrays[k])
            # Compare all but the sample axes, which `_to_capacity` adapts below.
            want = ([m, m] if k in ("cholesky", "gram") else [m, *v.shape[1:]]
                    if k in ("a", "g", "j") else v.shape)
            if value.dtype != v.dtype or not value.shape.is_compatible_with(want):
                raise ValueError(mismatch + f"'{k}' was saved as {value.dtype.name} "
                                 f"{value.shape}, the cache holds {v.dtype.name} {v.shape}.")
            cache[k] = value
        if self._capacity is not None and m is not None:
            if m > self._capacity:
                raise ValueError(
                    f"layer '{self.layer.name}': the saved curvature holds {m} samples, but this "
                    f"cache has a fixed capacity of {self._capacity} (max_batch_size, or the batch "
                    "size when it was static at the first trace). Resume with max_batch_size at "
                    "least as large as the saved cache.")
            cache = self._to_capacity(cache)
        for k, v in self._cache.items():
            assign_on_every_replica(v, cache[k])
        assign_on_every_replica(self._filled, bool(arrays["filled"]))

    def _to_capacity(self, state: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Zero-pad the sample dimension up to the cache capacity (Cholesky: identity block)."""
        if self._capacity is None or "inverse" in state:  # the inverse has no sample dimension
            return state
        cap = self._capacity
        too_large = (f"layer '{self.layer.name}': a batch of more than {cap} samples does not fit "
                     "the curvature cache, whose size is fixed by " + (
                         f"max_batch_size={self.max_batch_size}. Raise max_batch_size to the "
                         "largest batch size used." if self.max_batch_size is not None else
                         "the first batch (its size was static when traced). Make the first batch "
                         "the largest, or pass TENGraD(max_batch_size=<largest batch size>)."))
        square = state["cholesky" if "cholesky" in state else "gram"]  # m × m
        if square.shape[0] is not None and square.shape[0] > cap:
            raise ValueError(too_large)  # static: say so while tracing
        m = tf.shape(square)[0]
        # A dynamic batch size is checked at run time. XLA drops Assert ops, and a negative padding
        # would silently crop instead; so the padding is clamped at 0 and the shape check below,
        # which XLA does when it compiles for the actual batch size, fails for an oversized batch
        # (naming this node, e.g. "…/batch_larger_than_cache_capacity_4_raise_max_batch_size").
        check = tf.debugging.assert_less_equal(m, cap, message=too_large)
        node = f"batch_larger_than_cache_capacity_{cap}_raise_max_batch_size"
        out = {}
        with tf.control_dependencies([] if check is None else [check]):
            pad = tf.maximum(cap - m, 0)
            for k, t in state.items():
                if t.shape.rank == 0:  # damping, requested, samples
                    out[k] = t
                    continue
                if k == "cholesky":
                    eye = tf.eye(cap, dtype=t.dtype)[m:, m:]
                    padded = tf.pad(t, [[0, pad], [0, pad]]) + tf.pad(eye, [[m, 0], [m, 0]])
                elif k == "gram":
                    padded = tf.pad(t, [[0, pad], [0, pad]])
                else:
                    padded = tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1))
                # The joint mode's Gram goes to the network solve, not to this cache.
                shape = self._cache[k].shape if k in self._cache else [cap, cap]
                out[k] = tf.ensure_shape(padded, shape, name=node)
        return out

    def compute_curvature(self, inputs: list[tf.Tensor], output_grads: list[tf.Tensor]
                          ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """This step's factors, Gram and Cholesky factor: ({name: tensor}, damping retries).

        `inputs`/`output_grads` hold one entry per call of the layer in the step: a shared layer
        contributes the patch rows of every call to the same per-sample gradient, so the calls are
        concatenated along the position axis (exact, not an approximation).
        """
        if self.cache_kind(self.total_positions(inputs)) is CacheKind.INVERSE:
            with tf.name_scope("tengrad_inverse"):
                return self._explicit_inverse(inputs, output_grads)
        with tf.name_scope("tengrad_gram"):
            state, gram = self._factors_and_gram(inputs, output_grads)
        if self.joint:  # factorized with the other blocks' Grams (blocks/network.py)
            state["gram"] = tf.cast(gram, woodbury.SOLVE_DTYPE)
            return state, tf.constant(0)
        with tf.name_scope("tengrad_cholesky"):
            lam = self._damping_now()
            damped = woodbury.factorize(gram, lam, self.max_retries, jit=self.jit_solve)
        state.update(cholesky=damped.cholesky, damping=damped.damping)
        if self.adaptive_damping:
            state.update(gram=tf.cast(gram, woodbury.SOLVE_DTYPE), requested=lam,
                         samples=tf.cast(tf.shape(gram)[0], woodbury.SOLVE_DTYPE))
        return state, damped.retries

    def _damping_now(self) -> tf.Tensor:
        """λ as a float64 tensor (the optimizer's variable's current value when it adapts)."""
        return tf.cast(tf.convert_to_tensor(self.damping, dtype_hint=woodbury.SOLVE_DTYPE),
                       woodbury.SOLVE_DTYPE)

    def _explicit_inverse(self, inputs, output_grads) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """(F + λI)⁻¹ as a d × d matrix, from the explicit per-sample gradients (d is small)."""
        g = tf.concat([self.output_rows(dz) for dz in output_grads], axis=1)
        patches = lambda xs: tf.concat([self.patches(x) for x in xs], axis=1)  # noqa: E731
        j = per_sample.per_sample(patches, inputs, g)
        rows = tf.reshape(j, [tf.shape(j)[0], self.d_in * self.d_out])
        inverse = woodbury.explicit_inverse(rows, self.damping, self.max_retries)
        return {"inverse": inverse.matrix, "damping": inverse.damping}, inverse.retries

    def _factors_and_gram(self, inputs, output_grads) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """What to cache ({"a", "g"} or {"j"}) and the Gram K = UᵀU, by the cheaper route."""
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

        def route_e():
            # J is formed in chunks of samples; with a factors cache it is dropped after the Gram.
            return per_sample.per_sample(patches, inputs, g, self.chunk(_BYTES * p * self.d_in))

        # The cache (what is smaller to keep) and the Gram route (what is cheaper to compute) are
        # separate choices: with P > 1 positions, route F's m²P²(D_in + D_out) can exceed route E's
        # m·P·D_in·D_out + m²·D_in·D_out even when the factors are the smaller cache (a Dense
        # layer on sequences, a late convolution).
        a = j = None
        if threshold == math.inf:
            a, gram = route_f()
        elif threshold < 1:
            j = route_e()
            gram = per_sample.gram_explicit(j)
        elif g.shape[0] is not None:
            # A static batch decides the route here: a tf.cond on a constant predicate would be
            # folded by grappler, and a pruned branch holding a chunk loop (map_fn) breaks its
            # topological sort, after which it leaves the step unoptimized.
            if g.shape[0] < threshold:
                a, gram = route_f()
            else:
                j = route_e()
                gram = per_sample.gram_explicit(j)
        else:
            j = route_e() if cache is CacheKind.PER_SAMPLE else None
            gram = tf.cond(tf.cast(m, tf.float64) < threshold, lambda: route_f()[1],
                           lambda: per_sample.gram_explicit(route_e() if j is None else j))
        if cache is CacheKind.PER_SAMPLE:
            return {"j": route_e() if j is None else j}, gram
        a = patches(inputs) if a is None else a
        if p == 1:  # stored as matrices: the steps between updates then need no slicing
            a, g = a[:, 0], g[:, 0]
        return {"a": a, "g": g}, gram

    def is_update(self, step) -> tf.Tensor:
        """Every `update_freq` steps, and whenever nothing is cached yet."""
        return once_per_step(self._schedule_memo, step, lambda step: tf.logical_or(
            tf.equal(tf.math.floormod(step, self.update_freq), 0), tf.logical_not(self._filled)))

    def _ensure_cache(self, inputs: list[tf.Tensor]) -> None:
        if self._cache is not None:
            return
        p = self.total_positions(inputs)
        capacity = inputs[0].shape[0]
        if capacity is not None:  # under tf.distribute the cache holds the gathered global batch
            capacity *= distribute.replicas_in_sync()
        if self.max_batch_size is not None:
            if capacity is not None and capacity > self.max_batch_size:
                raise ValueError(
                    f"layer '{self.layer.name}': this step's batch has {capacity} samples, more "
                    f"than max_batch_size={self.max_batch_size}. Raise max_batch_size to the "
                    "largest batch size used (the global batch under tf.distribute).")
            capacity = self.max_batch_size
        if capacity is None and _tf_private.in_xla_context():
            # XLA compiles a variable with the shape it has and cannot change it (an assign of
            # another shape fails: "Shape of resource ... cannot be changed after
            # initialization"), and Keras's fit traces its step with an unknown batch size.
            raise XlaCacheError(
                f"layer '{self.layer.name}': under XLA (jit_compile=True) the curvature cache "
                "needs a fixed number of samples, and this step was traced with an unknown batch "
                "size (model.fit does this when the number of samples is not a multiple of "
                "batch_size, or for a tf.data dataset batched without drop_remainder=True). Pass "
                "TENGraD(max_batch_size=<your batch_size>) (the largest batch the optimizer sees; "
                "smaller batches are zero-padded exactly), or compile with "
                "model.compile(jit_compile=False).")
        self._build_cache(self.cache_kind(p), p, capacity)

    def needs_output_grads(self, step, inputs) -> tf.Tensor:
        """Whether this step recomputes the curvature (the only use of output gradients)."""
        self._ensure_cache(inputs)
        return self.is_update(step)

    def curvature(self, step, inputs, output_grads):
        """Fresh curvature on update steps (every `update_freq`), the cached one otherwise."""
        self._ensure_cache(inputs)
        with tf.name_scope("tengrad_cache"):
            cached = {k: v.read_value() for k, v in self._cache.items()}

        def fresh():
            state, retries = self.compute_curvature(inputs, output_grads)
            return self._to_capacity(state), retries

        def reuse():
            if self.joint:  # no Gram on reuse steps: the network keeps its factorization
                rows = tf.shape(next(iter(cached.values())))[0]
                return {**cached, "gram": tf.zeros([rows, rows], woodbury.SOLVE_DTYPE)}, tf.constant(0)
            if not self.adaptive_damping:
                return cached, tf.constant(0)
            lam = self._damping_now()

            def refactor():  # λ changed since the factorization: same Gram, new λ
                damped = woodbury.factorize(cached["gram"], lam, self.max_retries,
                                            jit=self.jit_solve, samples=cached["samples"])
                return {**cached, "cholesky": damped.cholesky, "damping": damped.damping,
                        "requested": lam}, damped.retries

            return tf.cond(tf.equal(cached["requested"], lam),
                           lambda: (cached, tf.constant(0)), refactor)

        return tf.cond(self.is_update(step), fresh, reuse)

    def commit(self, step, curvature: dict[str, tf.Tensor]) -> None:
        """Keep fresh `curvature` for the steps until the next update (only for finite steps).
        With adaptive damping the factorization may change on any step (a new λ): it is kept
        on every step."""
        def store(keys):
            def assign():
                for k in keys:
                    self._cache[k].assign(curvature[k])
                self._filled.assign(True)
                if self.condition is not None and keys:
                    self.condition.assign(woodbury.condition_number(curvature))
                return tf.constant(True)
            return assign

        solve = ("cholesky", "damping", "requested") if (
            self.adaptive_damping and not self.joint) else ()
        tf.cond(self.is_update(step), store([k for k in curvature if k in self._cache]),
                store(solve) if solve else lambda: tf.constant(False))

    def project(self, vectors: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> tf.Tensor:
        """Uᵀv (m, 1) for v shaped like this block's variables, with the cached per-sample
        gradients U of `curvature` (factored caches only: the explicit inverse keeps no U)."""
        return self._project_matrix(self.to_matrix(vectors), curvature)

    def _project_matrix(self, v: tf.Tensor, curvature: dict[str, tf.Tensor]) -> tf.Tensor:
        c = curvature
        with tf.name_scope("tengrad_project"):
            if "j" in c:
                return per_sample.project_explicit(c["j"], v)
            return per_sample.project_factored(c["a"], c["g"], v)

    def combine(self, s: tf.Tensor, curvature: dict[str, tf.Tensor]) -> tf.Tensor:
        """U s as one (D_in, D_out) matrix, for s (m, 1) (factored caches only)."""
        c = curvature
        with tf.name_scope("tengrad_combine"):
            if "j" in c:
                return per_sample.combine_explicit(c["j"], s)
            return per_sample.combine_factored(c["a"], c["g"], s)

    def precondition(self, grads: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        """(F + λI)⁻¹ g for this block's gradients, with the given (fresh or cached) curvature."""
        # The name scopes mark the parts of a step in profiles (benchmarks/profile_step.py).
        c = curvature
        if "inverse" in c:
            with tf.name_scope("tengrad_solve"):
                v = self.to_matrix(grads)
                d = tf.matmul(c["inverse"], tf.reshape(tf.cast(v, c["inverse"].dtype), [-1, 1]))
                return self.from_matrix(tf.reshape(tf.cast(d, v.dtype), tf.shape(v)))
        v = self.to_matrix(grads)
        utv = self._project_matrix(v, c)
        with tf.name_scope("tengrad_solve"):
            damped = woodbury.DampedGram(c["cholesky"], c["damping"], 0)
            return self.from_matrix(woodbury.inverse_times(
                v, utv, lambda s: self.combine(s, c), damped, jit=self.jit_solve))
