"""TENGraD's exact Fisher block: one class for every layer kind, F = (1/m) Σᵢ uᵢuᵢᵀ, solved exactly.

A block covers one layer's parameters together (kernel and bias; γ and β; a separable
convolution's two kernels and bias). What the layer is (its per-sample gradient structure, its rows,
its gradient as one matrix) is its helper's business (`tengrad_tf.layers`). What to cache and which
Gram route is cheaper is the cost model's (cost.py); forming the cache and the Gram is gram.py's;
the cache's variables, capacity and persistence are cache.py's; the damped solve is woodbury.py's.
This class holds one layer's choices and its schedule, and implements protocol.py's protocol.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tengrad_tf import eager_state, layers, woodbury
from tengrad_tf.blocks import cost, gram, metric, metric_rows, per_sample, schedule, tokens
from tengrad_tf.blocks.cache import Cache, cache_layout, capacity_for
from tengrad_tf.blocks.cost import CacheKind
from tengrad_tf.blocks.protocol import CurvatureBlock

#: Blocks with at most this many parameters (d) cache the explicit float64 (F + λI)⁻¹, ≤ 8 MiB
#: (adaptive damping: d ≤ 4m, cost.keeps_inverse), so that a step between updates is one d × d
#: product, not Uᵀv, solve and U s. Tests set it to 0 to exercise the factored caches.
DIRECT_MAX_DIM = 1024


class FisherBlock(CurvatureBlock):
    """Exact (F + λI)⁻¹ for one layer, F = (1/m) Σᵢ uᵢuᵢᵀ over its per-sample gradients uᵢ.

    Every layer kind is this one class: the layer's helper says how uᵢ is built (its `Structure`)
    and lays the kernel and bias out as one matrix; the block decides what to cache (`CacheKind`)
    and forms the Gram, Uᵀv (`_project`) and U s (`_combine`) for it, each a call into the pure
    functions of per_sample.py or tokens.py.
    """

    def __init__(self, layer: keras.layers.Layer, memory_budget: int = 256 * 2**20,
                 damping: float | tf.Variable = 0.1, curvature_update_freq: int = 1,
                 max_damping_retries: int = 6, jit_solve: bool = False,
                 max_batch_size: int | None = None, adaptive_damping: bool = False,
                 joint: bool = False, curvature_batches: int = 1,
                 lagged_curvature: bool = False, damping_batch_size: int | None = None,
                 damping_metric: str = "identity"):
        helper = layers.helper_for(layer)
        if helper is None or not helper.captures:
            raise ValueError(f"no exact Fisher block for layer '{layer.name}' "
                             f"({type(layer).__name__})")
        self.helper = helper
        self.layer = layer
        self.kind = helper.kind
        self.memory_budget = int(memory_budget)
        # A float, or (adaptive damping) the optimizer's λ variable, which can change between
        # curvature updates: the cache then keeps the Gram and refactorizes when λ changed. It
        # is λ at `damping_batch_size` samples; m samples take λ_m (woodbury.batch_damping).
        self.damping, self.damping_batch_size = damping, damping_batch_size
        self.adaptive_damping = bool(adaptive_damping)
        self.metric = metric.DampingMetric(damping_metric)  # λD_A ⊗ I or λI
        # Part of the whole network's Fisher (blocks/network.py): the block caches what its
        # layer needs and hands over its Gram; the one m × m solve of all blocks is not its own.
        self.joint = bool(joint)
        # The Fisher of the samples of the last `curvature_batches` curvature updates together
        # (a window of up to k·m samples, newest first): rank up to k·m instead of m.
        self.curvature_batches = int(curvature_batches)
        self.curvature_update_freq = int(curvature_update_freq)
        # Precondition an update step with the curvature cached before it (`preconditioner`).
        self.lagged_curvature = bool(lagged_curvature)
        self.max_damping_retries = max_damping_retries
        # XLA for the m × m factorization and solves (woodbury.py), and a fixed cache capacity
        # (cache.py): TENGraD's jit_solve and max_batch_size.
        self.jit_solve, self.max_batch_size = bool(jit_solve), max_batch_size
        self.variables = helper.variables
        self._cache: Cache | None = None
        self._schedule_memo: dict = {}
        self.diagnostics = False  # callbacks.Diagnostics: keep each update's condition number
        self.input_repeats = 1  # fisher="exact": rows per input row (per_sample._distinct)
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
    def capacity(self) -> int | None:
        """Samples the cache holds (None: dynamic); known once prepared."""
        return None if self._cache is None else self._cache.capacity

    # ---- cost model (cost.py) --------------------------------------------------------------------
    def cache_kind(self, p: int | None, capacity: int | None = None) -> CacheKind:
        """What to keep between curvature updates (cost.cache_kind). Small blocks cache their
        explicit inverse (cost.keeps_inverse), unless the block is part of the network's one
        solve or keeps several batches (the window's samples must be kept). Under adaptive
        damping their per-sample gradients J are kept beside it: the exact quadratic model projects
        on them, and a new λ rebuilds the inverse (`refactor`). `capacity`: default, the cache's."""
        capacity = self.capacity if capacity is None else capacity
        rows = None if capacity is None else capacity * self.input_repeats
        inverse = cost.keeps_inverse(self.helper.size, DIRECT_MAX_DIM, rows,
                                     self.adaptive_damping) and not (
            self.joint or self.curvature_batches > 1)
        return cost.cache_kind(self.helper, p, inverse)

    def factored_threshold(self, p: int | None, cache: CacheKind) -> float:
        """Route F is cheaper than route E iff m < this threshold (cost.factored_threshold)."""
        return cost.factored_threshold(self.helper, p, cache)

    def describe(self, inputs_shape) -> str:
        p = self.helper.positions(inputs_shape)
        capacity = self.capacity or capacity_for(self.layer.name, inputs_shape[0],
                                                 self.max_batch_size, self.curvature_batches)
        cache = self.cache_kind(p, capacity)
        route = cost.route(self.helper.size, cache, self.factored_threshold(p, cache))
        kept = cache.value + (", with J for the adaptive damping"
                              if cache is CacheKind.INVERSE and self.adaptive_damping else "")
        damping = self.metric.describe(self.helper, cache, p, capacity, self.input_repeats)
        return (
            f"{self.kind} block of layer '{self.layer.name}' ({self.helper.describe_parameters()}, "
            f"P={'dynamic' if p is None else p}; {route}; caches {kept}{damping})"
        )

    # ---- state -----------------------------------------------------------------------------------
    def prepare(self, inputs: list[tf.Tensor]) -> bool:
        """Create the cache for the layer's calls on `inputs`, once: its kind from P, its capacity
        from the batch (cache.capacity_for). True if this call created it."""
        if self._cache is not None:
            return False
        p = gram.total_positions(self.helper, inputs)
        capacity = capacity_for(self.layer.name, inputs[0].shape[0], self.max_batch_size,
                                self.curvature_batches)
        cost.check_repeated_gram(self.layer.name, capacity, self.input_repeats, self.memory_budget)
        kind = self.cache_kind(p, capacity)
        self.metric.choose(self.helper, kind, p, capacity, self.input_repeats)
        fields = cache_layout(self.helper, kind, capacity, p, adaptive_damping=self.adaptive_damping,
                              joint=self.joint, window=self.curvature_batches > 1,
                              metric_form=self.metric.form)
        self._cache = Cache(self.layer.name, fields, capacity, self.max_batch_size, ones=("damping",))
        if self.diagnostics:
            with eager_state.outside_the_step():
                self.condition = tf.Variable(tf.constant(0.0, woodbury.SOLVE_DTYPE),
                                             trainable=False, name=f"{self.layer.name}_condition")
        return True

    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        """The cache ("a" and "g", "j", or "tokens" and "g", with "cholesky"; or "inverse";
        "damping"; "gram", "requested" and "samples" when they are kept) and "filled"; {} before
        `prepare`."""
        return {} if self._cache is None else self._cache.state_variables

    def reset_state(self) -> None:
        self._cache.reset()

    def load_state(self, arrays: dict) -> None:
        self._cache.load(arrays)

    # ---- curvature ---------------------------------------------------------------------------
    def is_update(self, step) -> tf.Tensor:
        """Every `curvature_update_freq` steps, and whenever nothing is cached yet."""
        return schedule.once_per_step(self._schedule_memo, step, lambda step: tf.logical_or(
            schedule.every(step, self.curvature_update_freq),
            tf.logical_not(self._cache.filled)))

    def needs_output_grads(self, step) -> tf.Tensor:
        """Whether this step recomputes the curvature (the only use of output gradients)."""
        return self.is_update(step)

    def compute_curvature(self, inputs: list[tf.Tensor], output_grads: list[tf.Tensor]
                          ) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """This step's cache, Gram and Cholesky factor: ({name: tensor}, damping retries)."""
        # Under a damping metric, the curvature of whitened input rows (metric.py).
        h, white = self.metric.helper_for_curvature(self.helper, inputs, self.memory_budget)
        p = gram.total_positions(h, inputs)
        cache = self.cache_kind(p)
        if cache is CacheKind.INVERSE:
            with tf.name_scope("tengrad_inverse"):
                j = gram.per_sample_gradients(h, inputs, output_grads, self.memory_budget)
                state, retries = self._inverse(
                    j, self._damping_now(), tf.cast(tf.shape(j)[0], woodbury.SOLVE_DTYPE))
                return {**state, **white, **({"j": j} if self.adaptive_damping else {})}, retries
        with tf.name_scope("tengrad_gram"):
            if self.curvature_batches > 1:
                fresh = gram.cache_fields(h, cache, inputs, output_grads, self.memory_budget)
                state = self._cache.window(fresh, self.curvature_batches)
                if "gram" in self._cache:  # kept for the adaptive damping: only new rows
                    k = gram.gram_of_window(fresh, state, self._cache.variables["gram"],
                                            self.memory_budget, self.input_repeats)
                else:
                    k = gram.gram_of_fields(state, self.memory_budget, None, self.input_repeats)
                state["samples"] = tf.cast(tf.shape(k)[0], woodbury.SOLVE_DTYPE)
            elif self.metric.form == metric.ROWS:  # K̃ = UᵀD⁻¹U, through the rows (metric_rows.py)
                state = gram.cache_fields(h, cache, inputs, output_grads, self.memory_budget)
                k, white = metric_rows.gram(state["a"], state["g"], metric.IDENTITY_SHARE)
            else:
                state, k = gram.cache_and_gram(h, cache, inputs, output_grads,
                                               self.factored_threshold(p, cache),
                                               self.memory_budget, self.input_repeats)
        if self.joint:  # factorized with the other blocks' Grams (blocks/network.py)
            state["gram"] = tf.cast(k, woodbury.SOLVE_DTYPE)
            return state, tf.constant(0)
        solve, retries = self._factorize(k, self._damping_now())
        state.update(solve, **white)
        if self.adaptive_damping:
            state.update(gram=tf.cast(k, woodbury.SOLVE_DTYPE),
                         samples=tf.cast(tf.shape(k)[0], woodbury.SOLVE_DTYPE))
        return state, retries

    def _factorize(self, k, lam, samples=None) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """The Cholesky factor of mλ_mI + K (m real samples of K's rows; None: all of them)."""
        lam = woodbury.batch_damping(lam, tf.shape(k)[0] if samples is None else samples,
                                     self.damping_batch_size)
        with tf.name_scope("tengrad_cholesky"):
            damped = woodbury.factorize(k, lam, self.max_damping_retries, jit=self.jit_solve,
                                        samples=samples)
        state = {"cholesky": damped.cholesky, "damping": damped.damping}
        if self.adaptive_damping:
            state["requested"] = lam
        return state, damped.retries

    def _inverse(self, j, lam, samples) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """The explicit (F + λ_mI)⁻¹ from the per-sample gradients J (m real samples of its rows)."""
        lam = woodbury.batch_damping(lam, samples, self.damping_batch_size)
        rows = tf.reshape(j, [tf.shape(j)[0], self.helper.size])
        inverse = woodbury.explicit_inverse(rows, lam, self.max_damping_retries, samples=samples)
        state = {"inverse": inverse.matrix, "damping": inverse.damping}
        if self.adaptive_damping:
            state.update(requested=lam, samples=samples)
        return state, inverse.retries

    def _damping_now(self) -> tf.Tensor:
        """λ as a float64 tensor (the optimizer's variable's current value when it adapts)."""
        return woodbury.as_solve_dtype(self.damping)

    def curvature(self, step, inputs, output_grads):
        """Fresh curvature on update steps (every `curvature_update_freq`), the cached one
        otherwise. A cached factorization is always that of the current λ: an adaptive λ changes
        only in the damping adaptation, which refactorizes the cache there (`refactor`)."""
        with tf.name_scope("tengrad_cache"):
            cached = self._cache.read()

        def fresh():
            state, retries = self.compute_curvature(inputs, output_grads)
            return self._cache.to_capacity(state), retries

        def reuse():
            if self.joint:  # no Gram on reuse steps: the network keeps its factorization
                rows = tf.shape(next(iter(cached.values())))[0]
                return ({**cached, "gram": tf.zeros([rows, rows], woodbury.SOLVE_DTYPE)},
                        tf.constant(0))
            return cached, tf.constant(0)

        return tf.cond(self.is_update(step), fresh, reuse)

    def commit(self, step, curvature: dict[str, tf.Tensor]) -> None:
        """Keep fresh `curvature` for the steps until the next update (only for finite steps)."""
        def store():
            self._cache.store(curvature, [k for k in curvature if k in self._cache])
            if self.condition is not None and not self.joint:  # joint: the network's factor
                self.condition.assign(woodbury.condition_number(curvature))
            return tf.constant(True)

        tf.cond(self.is_update(step), store, lambda: tf.constant(False))

    def refactor(self, damping: tf.Tensor) -> tf.Tensor:
        """Refactorize the cached Gram for a new adaptive λ (`damping`, float64) and keep it: the
        damping adaptation calls this on the steps where λ changed, so that reuse steps need no
        check of their own. Returns the damping retries it took (int32)."""
        if not self.adaptive_damping or self.joint or self._cache is None:
            return tf.constant(0)
        cached = self._cache.read()
        if "inverse" in cached:  # small blocks: the inverse again, from the cached J
            with tf.name_scope("tengrad_inverse"):
                state, retries = self._inverse(cached["j"], damping, cached["samples"])
        else:
            state, retries = self._factorize(cached["gram"], damping, cached["samples"])
        # Only the solve's state: factors, Gram and `filled` stay those of the last update.
        for k, v in state.items():
            self._cache.variables[k].assign(v)
        if self.condition is not None:
            self.condition.assign(woodbury.condition_number(state))
        return retries

    def preconditioner(self, step, curvature: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """With lagged curvature, an update step takes the previous update's curvature (the first
        its own); `curvature`, the fresh one, is kept for the steps after (docs/step.md, why)."""
        if not self.lagged_curvature:
            return curvature

        def cached():
            held = self._cache.read()
            return {k: held.get(k, v) for k, v in curvature.items()}

        return tf.cond(self.lags(step), cached, lambda: curvature)

    def lags(self, step) -> tf.Tensor:
        """Whether `preconditioner` gives this step the cached curvature (a bool tensor)."""
        if not self.lagged_curvature:
            return tf.constant(False)
        return tf.logical_and(schedule.every(step, self.curvature_update_freq), self._cache.filled)

    def precondition(self, grads: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> list[tf.Tensor]:
        """(F + λD)⁻¹ g for this block's gradients, with the given (fresh or cached) curvature."""
        # The name scopes mark the parts of a step in profiles (benchmarks/profile_step.py).
        c, h = curvature, self.helper
        v = metric.whiten(c, h.to_matrix(grads))  # (F + λD)⁻¹ = L⁻ᵀ(L⁻¹FL⁻ᵀ + λI)⁻¹L⁻¹
        if "inverse" in c:
            with tf.name_scope("tengrad_solve"):
                d = tf.matmul(c["inverse"], tf.reshape(tf.cast(v, c["inverse"].dtype), [-1, 1]))
                d = tf.reshape(tf.cast(d, v.dtype), h.matrix_shape)
        else:
            damped = woodbury.DampedGram(c["cholesky"], c["damping"], 0)
            if "metric_scale" in c:  # D through the batch's rows: D⁻¹ is part of the solve
                with tf.name_scope("tengrad_solve"):
                    return h.from_matrix(metric_rows.direction(c, v, damped, self.jit_solve))
            utv = self._project(c, v)
            with tf.name_scope("tengrad_solve"):
                d = woodbury.inverse_times(v, utv, lambda s: self._combine(c, s), damped,
                                           jit=self.jit_solve)
        return h.from_matrix(metric.unwhiten(c, d))

    def project(self, vectors: list[tf.Tensor], curvature: dict[str, tf.Tensor]) -> tf.Tensor:
        """Uᵀv (m, 1) for v shaped like this block's variables, from `curvature`'s U (not the
        explicit inverse's, which keeps none): the quadratic model of adaptive.py."""
        v = metric.metric_coordinates(curvature, self.helper.to_matrix(vectors))
        return self._project(curvature, v)  # the whitened cache's (L⁻¹U)ᵀLᵀv = Uᵀv

    def _project(self, c: dict[str, tf.Tensor], v: tf.Tensor) -> tf.Tensor:
        """Uᵀv (m, 1) from the cache, for v as the block's matrix."""
        with tf.name_scope("tengrad_project"):
            if "j" in c:
                return per_sample.project_explicit(c["j"], v)
            if "tokens" in c:
                return tokens.project(tf.cast(c["tokens"], tf.int32), c["g"], v)
            return per_sample.project_factored(c["a"], c["g"], v, self.input_repeats)

    def _combine(self, c: dict[str, tf.Tensor], s: tf.Tensor) -> tf.Tensor:
        """U s, shaped like the block's matrix, from the cache."""
        with tf.name_scope("tengrad_combine"):
            if "j" in c:
                return per_sample.combine_explicit(c["j"], s)
            if "tokens" in c:
                return tokens.combine(tf.cast(c["tokens"], tf.int32), c["g"], s,
                                      self.helper.vocabulary)
            return per_sample.combine_factored(c["a"], c["g"], s, self.input_repeats)
