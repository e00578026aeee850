"""The layer-agnostic part of an exact Fisher block: what to cache, the Gram, and the damped solve.

A block covers one layer's parameters together (kernel and bias; γ and β; a separable
convolution's two kernels and bias). What the layer is (its per-sample gradient structure, its rows,
its gradient as one matrix) is its helper's business (`tengrad_tf.layers`); everything else (which
Gram route, what to cache between curvature updates, chunking to stay within the memory budget, the
Woodbury solve) is here and the same for every kind.

Cache: a block keeps what it needs to precondition new gradients between curvature updates, in
tf.Variables whose leading (sample) dimension is dynamic, since the batch size is only known at run
time: the factors (Â, G) or the explicit per-sample gradients J, whichever is smaller, or the token
ids and output gradients of a lookup table, plus the float64 Cholesky factor of mλI + K.
"""

from __future__ import annotations

import enum
import math
import keras
import numpy as np
import tensorflow as tf

from tengrad_tf import _tf_private, distribute, layers, woodbury
from tengrad_tf.blocks import per_sample, tokens
from tengrad_tf.layers import Structure, as_rows  # noqa: F401  (as_rows: re-exported)

_BYTES = 4  # float32; float64 models double it, which the budget check below ignores


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
    PER_SAMPLE = "per-sample gradients"  # J (m, *matrix): (m, D_in, D_out) for Kronecker layers
    TOKENS = "token ids and output gradients"  # (m, P) ids and G (m, P, D): lookup tables
    INVERSE = "the explicit inverse (F + λI)⁻¹"  # (d, d): small blocks only


#: Blocks with at most this many parameters (d, e.g. D_in·D_out) cache the explicit d × d inverse
#: (F + λI)⁻¹, float64, at most 8 MiB: it is computed on update steps by a direct d × d Cholesky
#: when the batch has at least d samples (cheaper than the m × m Woodbury solve then) and through
#: Woodbury otherwise, and a step between updates is one d × d product instead of the factored
#: Uᵀv, solve and U s. Tests set it to 0 to exercise the factored caches on tiny layers.
DIRECT_MAX_DIM = 1024


class FisherBlock:
    """Exact (F + λI)⁻¹ for one layer, F = (1/m) Σᵢ uᵢuᵢᵀ over its per-sample gradients uᵢ.

    Every layer kind is this one class: the layer's helper (`tengrad_tf.layers`) says how uᵢ is
    built (its `Structure`) and lays the kernel and bias out as one matrix; the block decides what
    to cache and forms the Gram, Uᵀv and U s for it. The extension points, one per cache kind
    (`CacheKind`), are `_cache_and_gram` (what to cache and the Gram K = UᵀU), `_project` (Uᵀv) and
    `_combine` (U s), each a call into the pure functions of per_sample.py or tokens.py.
    """

    def __init__(self, layer: keras.layers.Layer, memory_budget: int = 256 * 2**20,
                 damping: float | tf.Variable = 0.1, update_freq: int = 1, max_retries: int = 6,
                 jit_solve: bool = False, max_batch_size: int | None = None,
                 adaptive_damping: bool = False, joint: bool = False,
                 curvature_batches: int = 1):
        helper = layers.helper_for(layer)
        if helper is None or not helper.captures:
            raise ValueError(f"no exact Fisher block for layer '{layer.name}' "
                             f"({type(layer).__name__})")
        self.helper = helper
        self.layer = layer
        self.kind = helper.kind
        self.memory_budget = int(memory_budget)
        # A float, or (adaptive damping) the optimizer's λ variable, which can change between
        # curvature updates: the cache then keeps the Gram and refactorizes when λ changed.
        self.damping = damping
        self.adaptive_damping = bool(adaptive_damping)
        # Part of the whole network's Fisher (blocks/network.py): the block caches what its
        # layer needs and hands over its Gram; the one m × m solve of all blocks is not its own.
        self.joint = bool(joint)
        # The Fisher of the samples of the last `curvature_batches` curvature updates together
        # (a window of up to k·m samples, newest first): rank up to k·m instead of m.
        self.curvature_batches = int(curvature_batches)
        self.update_freq = update_freq
        self.max_retries = max_retries
        # XLA for the m × m factorization and solves (woodbury.py), and a fixed cache capacity
        # (_ensure_cache): TENGraD's jit_solve and max_batch_size.
        self.jit_solve = bool(jit_solve)
        self.max_batch_size = max_batch_size
        self.variables = helper.variables
        self._cache: dict[str, tf.Variable] | None = None
        self._capacity: int | None = None
        self._schedule_memo: dict = {}
        # Set by the optimizer: called with this block once its cache exists (to restore it from a
        # saved optimizer and track it for checkpoints).
        self.state_listener = None
        # callbacks.Diagnostics: keep the condition number of the damped Gram of each update.
        self.diagnostics = False
        self.condition: tf.Variable | None = None

    @property
    def dtype(self) -> tf.DType:
        return self.helper.dtype

    @property
    def d_in(self) -> int:
        """Rows of a Kronecker-structured block's matrix (per group), bias included."""
        return self.helper.d_in

    @property
    def d_out(self) -> int:
        return self.helper.d_out

    @property
    def _kronecker(self) -> bool:
        """One Kronecker structure (Dense, EinsumDense, convolutions): routes F and E both exist."""
        return self.helper.structure is Structure.KRONECKER and self.helper.groups == 1

    # ---- cost model ----------------------------------------------------------------------------
    def cache_kind(self, p: int | None) -> CacheKind:
        """What to keep between curvature updates: the smaller of the layer's factors and its
        explicit per-sample gradients J, per sample.

        Kronecker layers: (Â, G), P(D_in + D_out), against J, D_in·D_out (P None: a Dense layer on
        inputs whose extra axes are dynamic: factors). Lookup tables: token ids and G, P(D + 1),
        against V·D. Grouped convolutions and explicit layers: J. Small blocks
        (d ≤ DIRECT_MAX_DIM) cache their explicit inverse instead, unless the damping adapts (the
        inverse would have to be rebuilt at every change), the block is part of the network's
        one solve, or it keeps several batches (the window's samples must be kept)."""
        h = self.helper
        d = h.size
        if d <= DIRECT_MAX_DIM and not (self.adaptive_damping or self.joint
                                        or self.curvature_batches > 1):
            return CacheKind.INVERSE
        if h.structure is Structure.TOKENS:
            return (CacheKind.TOKENS if p is None or p * (h.d_out + 1) <= d
                    else CacheKind.PER_SAMPLE)
        if not self._kronecker:
            return CacheKind.PER_SAMPLE
        if p is None or p * (self.d_in + self.d_out) <= d:
            return CacheKind.FACTORS
        return CacheKind.PER_SAMPLE

    def factored_threshold(self, p: int, cache: CacheKind) -> float:
        """Route F is cheaper than route E iff m < this threshold (inf: always; 0: never).

        Flops: F costs m²P²(D_in + D_out); E costs mPD_inD_out + m²D_inD_out. If J must be cached
        anyway, E's first term is paid by both routes and drops out of the comparison. Layers that
        are not one Kronecker structure have route E only.
        """
        if not self._kronecker:
            return 0.0
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
        ps = [self.helper.positions(x.shape) for x in inputs]
        return None if None in ps else sum(ps)

    def describe(self, inputs_shape) -> str:
        p = self.helper.positions(inputs_shape)
        cache = self.cache_kind(p)
        threshold = self.factored_threshold(p, cache)
        d = self.helper.size
        if cache is CacheKind.INVERSE:
            route = (f"direct {d}×{d} solve when the batch has at least {d} samples, else "
                     "Woodbury")
        elif cache is CacheKind.TOKENS:
            route = "Gram from token matches"
        elif threshold == math.inf:
            route = "Gram route F"
        elif threshold < 1:
            route = "Gram route E"
        else:
            route = f"Gram route F for batch < {threshold:.0f}, else E"
        return (
            f"{self.kind} block of layer '{self.layer.name}' ({self.helper.describe_parameters()}, "
            f"P={'dynamic' if p is None else p}; {route}; caches {cache.value})"
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
        h = self.helper
        rows = [capacity] if p == 1 else [capacity, p]  # Dense factors: (m, D) matrices
        if cache is CacheKind.FACTORS:
            fields = {"a": rows + [self.d_in], "g": rows + [self.d_out]}
        elif cache is CacheKind.TOKENS:
            # Token ids are kept as floats (exact below 2²⁴, layers.EmbeddingHelper), so that every
            # cached tensor is one the core's finiteness check of fresh curvature can take.
            fields = {"tokens": [capacity, p], "g": [capacity, p, self.d_out]}
        elif cache is CacheKind.PER_SAMPLE:
            fields = {"j": [capacity, *h.matrix_shape]}
        else:
            fields = {}
        if self.joint:  # the network solve keeps the factorization (blocks/network.py)
            solve_state = {}
        elif cache is CacheKind.INVERSE:
            solve_state = {"inverse": [h.size] * 2}
        else:
            solve_state = {"cholesky": [capacity, capacity]}
            if self.adaptive_damping:  # K and the λ it was factorized for
                solve_state.update(gram=[capacity, capacity], requested=[])
        if "cholesky" in solve_state and self.adaptive_damping or self.curvature_batches > 1:
            solve_state["samples"] = []  # m, the real samples (the cache may be zero-padded)

        def var(name, shape, dtype):
            initial = [0 if d is None else d for d in shape]
            return tf.Variable(tf.zeros(initial, dtype), shape=tf.TensorShape(shape),
                               trainable=False, name=f"{self.layer.name}_{name}",
                               **distribute.REPLICA_LOCAL)

        with tf.init_scope():
            state = {n: var(n, shape, self.dtype) for n, shape in fields.items()}
            state.update({n: var(n, shape, woodbury.SOLVE_DTYPE)
                          for n, shape in solve_state.items()})
            if not self.joint:
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
        """The cache ("a" and "g", "j", or "tokens" and "g", with "cholesky"; or "inverse";
        "damping"; "gram", "requested" and "samples" when they are kept) and "filled"; {} before
        the first trace."""
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
            want = ([m, m] if k in ("cholesky", "gram") else
                    [m, *v.shape[1:]] if k in ("a", "g", "j", "tokens") else v.shape)
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
        """This step's cache, Gram and Cholesky factor: ({name: tensor}, damping retries).

        `inputs`/`output_grads` hold one entry per call of the layer in the step (the tensors its
        helper recorded, and the output gradients): a shared layer contributes every call to the
        same per-sample gradient (rows concatenated along the position axis, or explicit
        per-sample gradients summed), which is exact, not an approximation.
        """
        cache = self.cache_kind(self.total_positions(inputs))
        if cache is CacheKind.INVERSE:
            with tf.name_scope("tengrad_inverse"):
                return self._explicit_inverse(inputs, output_grads)
        with tf.name_scope("tengrad_gram"):
            if self.curvature_batches > 1:
                state = self._window(self._cache_fields(cache, inputs, output_grads))
                gram = self._gram_of_fields(state)
                state["samples"] = tf.cast(tf.shape(gram)[0], woodbury.SOLVE_DTYPE)
            else:
                state, gram = self._cache_and_gram(cache, inputs, output_grads)
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

    # ---- several batches (curvature_batches = k) ------------------------------------------------
    def _cache_fields(self, cache: CacheKind, inputs, output_grads) -> dict[str, tf.Tensor]:
        """This batch's cache fields, laid out as stored, without a Gram."""
        h = self.helper
        if cache is CacheKind.TOKENS:
            ids = tf.concat([h.tokens(x) for x in inputs], axis=1)
            return {"tokens": tf.cast(ids, self.dtype), "g": self._output_rows(output_grads)}
        if cache is CacheKind.PER_SAMPLE:
            return {"j": self._per_sample(inputs, output_grads)}
        a = tf.concat([h.input_rows(x) for x in inputs], axis=1)
        g = self._output_rows(output_grads)
        if self.total_positions(inputs) == 1:
            a, g = a[:, 0], g[:, 0]
        return {"a": a, "g": g}

    def _window(self, fresh: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """This batch's samples first, then up to (k − 1)·m of those the cache holds from the
        previous curvature updates (its real samples, not its zero padding); the oldest go."""
        m = tf.shape(next(iter(fresh.values())))[0]
        held = tf.cast(self._cache["samples"], tf.int32)
        keep = tf.where(self._filled, tf.minimum(held, (self.curvature_batches - 1) * m), 0)
        return {k: tf.concat([t, self._cache[k][:keep]], axis=0) for k, t in fresh.items()}

    def _gram_of_fields(self, fields: dict[str, tf.Tensor]) -> tf.Tensor:
        """K = UᵀU over the samples of cache fields (route F for factors: the window's J is never
        formed)."""
        if "j" in fields:
            return per_sample.gram_explicit(fields["j"])
        g = fields["g"]
        if "tokens" in fields:
            return tokens.gram(tf.cast(fields["tokens"], tf.int32), g, self._pair_chunk(g))
        return per_sample.gram_factored(fields["a"], g,
                                        None if g.shape.rank == 2 else self._pair_chunk(g))

    def _damping_now(self) -> tf.Tensor:
        """λ as a float64 tensor (the optimizer's variable's current value when it adapts)."""
        return tf.cast(tf.convert_to_tensor(self.damping, dtype_hint=woodbury.SOLVE_DTYPE),
                       woodbury.SOLVE_DTYPE)

    def _explicit_inverse(self, inputs, output_grads) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """(F + λI)⁻¹ as a d × d matrix, from the explicit per-sample gradients (d is small)."""
        j = self._per_sample(inputs, output_grads)
        rows = tf.reshape(j, [tf.shape(j)[0], self.helper.size])
        inverse = woodbury.explicit_inverse(rows, self._damping_now(), self.max_retries)
        return {"inverse": inverse.matrix, "damping": inverse.damping}, inverse.retries

    def _output_rows(self, output_grads) -> tf.Tensor:
        return tf.concat([self.helper.output_rows(dz) for dz in output_grads], axis=1)

    def _per_sample(self, inputs, output_grads) -> tf.Tensor:
        """J, the explicit per-sample gradients (m, *matrix), chunked over samples."""
        h = self.helper
        intermediate = sum(h.per_sample_elements(x.shape) for x in inputs)
        chunk = self.chunk(_BYTES * intermediate)
        if h.structure is Structure.KRONECKER:
            patches = lambda xs: tf.concat([h.input_rows(x) for x in xs], axis=1)  # noqa: E731
            return per_sample.per_sample(patches, inputs, self._output_rows(output_grads), chunk)
        if h.structure is Structure.TOKENS:  # small tables only (cache_kind)
            ids = tf.concat([h.tokens(x) for x in inputs], axis=1)
            return tokens.per_sample(ids, self._output_rows(output_grads), h.vocabulary)
        n = len(inputs)
        return per_sample.map_sample_chunks(
            lambda *ts: tf.add_n([h.per_sample_gradients(ts[k], ts[n + k]) for k in range(n)]),
            [*inputs, *output_grads], chunk, dtype=self.dtype)

    def _pair_chunk(self, g: tf.Tensor) -> tf.Tensor:
        """Rows i per chunk of a pairwise Gram: a chunk holds (rows, m, P, P) products, twice; m
        and P are known at run time only."""
        m, p_now = tf.shape(g)[0], tf.shape(g)[1]
        return tf.maximum(1, self.memory_budget // (_BYTES * 2 * p_now * p_now * m))

    def _cache_and_gram(self, cache: CacheKind, inputs, output_grads
                        ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """What to cache ({"a", "g"}, {"j"} or {"tokens", "g"}) and the Gram K = UᵀU."""
        h = self.helper
        if cache is CacheKind.TOKENS:
            ids = tf.concat([h.tokens(x) for x in inputs], axis=1)
            g = self._output_rows(output_grads)
            cached = {"tokens": tf.cast(ids, self.dtype), "g": g}
            return cached, tokens.gram(ids, g, self._pair_chunk(g))
        j = None if cache is CacheKind.FACTORS else self._per_sample(inputs, output_grads)
        if not self._kronecker:
            return {"j": j}, per_sample.gram_explicit(j)
        p = self.total_positions(inputs)
        threshold = self.factored_threshold(p, cache)
        g = self._output_rows(output_grads)

        def route_f():
            a = tf.concat([h.input_rows(x) for x in inputs], axis=1)
            return a, per_sample.gram_factored(a, g, self._pair_chunk(g))

        def route_e():
            # J is formed in chunks of samples; with a factors cache it is dropped after the Gram.
            return per_sample.gram_explicit(self._per_sample(inputs, output_grads) if j is None
                                            else j)

        # The cache (what is smaller to keep) and the Gram route (what is cheaper to compute) are
        # separate choices: with P > 1 positions, route F's m²P²(D_in + D_out) can exceed route E's
        # m·P·D_in·D_out + m²·D_in·D_out even when the factors are the smaller cache (a Dense
        # layer on sequences, a late convolution).
        a = None
        if threshold == math.inf:
            a, gram = route_f()
        elif threshold < 1:
            gram = route_e()
        elif g.shape[0] is not None:
            # A static batch decides the route here: a tf.cond on a constant predicate would be
            # folded by grappler, and a pruned branch holding a chunk loop (map_fn) breaks its
            # topological sort, after which it leaves the step unoptimized.
            if g.shape[0] < threshold:
                a, gram = route_f()
            else:
                gram = route_e()
        else:
            gram = tf.cond(tf.cast(tf.shape(g)[0], tf.float64) < threshold,
                           lambda: route_f()[1], route_e)
        if cache is CacheKind.PER_SAMPLE:
            return {"j": j}, gram
        if a is None:
            a = tf.concat([h.input_rows(x) for x in inputs], axis=1)
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
        if capacity is not None:  # the window of curvature_batches batches
            capacity *= self.curvature_batches
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
                return ({**cached, "gram": tf.zeros([rows, rows], woodbury.SOLVE_DTYPE)},
                        tf.constant(0))
            if not self.adaptive_damping or "cholesky" not in cached:
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
            self.adaptive_damping and not self.joint and "cholesky" in self._cache) else ()
        tf.cond(self.is_update(step), store([k for k in curvature if k in self._cache]),
                store(solve) if solve else lambda: tf.constant(False))

    def precondition(self, grads: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        """(F + λI)⁻¹ g for this block's gradients, with the given (fresh or cached) curvature."""
        # The name scopes mark the parts of a step in profiles (benchmarks/profile_step.py).
        c, h = curvature, self.helper
        if "inverse" in c:
            with tf.name_scope("tengrad_solve"):
                v = h.to_matrix(grads)
                d = tf.matmul(c["inverse"], tf.reshape(tf.cast(v, c["inverse"].dtype), [-1, 1]))
                return h.from_matrix(tf.reshape(tf.cast(d, v.dtype), h.matrix_shape))
        v = h.to_matrix(grads)
        utv = self._project(c, v)

        def u_times(s):
            return self._combine(c, s)

        with tf.name_scope("tengrad_solve"):
            damped = woodbury.DampedGram(c["cholesky"], c["damping"], 0)
            return h.from_matrix(woodbury.inverse_times(v, utv, u_times, damped,
                                                        jit=self.jit_solve))

    def project(self, vectors: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> tf.Tensor:
        """Uᵀv (m, 1) for v shaped like this block's variables, with the per-sample gradients U
        of `curvature` (factored caches: the explicit inverse keeps no U). The quadratic model
        of adaptive.py is made of these."""
        return self._project(curvature, self.helper.to_matrix(vectors))

    # The name scopes mark the parts of a step in profiles (benchmarks/profile_step.py).
    def _project(self, c: dict[str, tf.Tensor], v: tf.Tensor) -> tf.Tensor:
        """Uᵀv (m, 1) from the cache, for v as the block's matrix."""
        with tf.name_scope("tengrad_project"):
            if "j" in c:
                return per_sample.project_explicit(c["j"], v)
            if "tokens" in c:
                return tokens.project(tf.cast(c["tokens"], tf.int32), c["g"], v)
            return per_sample.project_factored(c["a"], c["g"], v)

    def _combine(self, c: dict[str, tf.Tensor], s: tf.Tensor) -> tf.Tensor:
        """U s, shaped like the block's matrix, from the cache."""
        with tf.name_scope("tengrad_combine"):
            if "j" in c:
                return per_sample.combine_explicit(c["j"], s)
            if "tokens" in c:
                return tokens.combine(tf.cast(c["tokens"], tf.int32), c["g"], s,
                                      self.helper.vocabulary)
            return per_sample.combine_factored(c["a"], c["g"], s)
