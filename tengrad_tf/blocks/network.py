"""The whole network's Fisher in one solve: fisher_blocks="network".

Per-layer Grams add up. With U stacking the per-sample gradients of every preconditioned layer (one
column per sample), the exact Fisher of all those parameters together is F = (1/m) U Uᵀ, cross-layer
terms included, and its Gram is K = UᵀU = Σ_b U_bᵀU_b = Σ_b K_b. So the exact damped natural
gradient of the whole network costs what the block-diagonal one does, with one m × m factorization
instead of one per layer:

    c = (mλI + Σ_b K_b)⁻¹ Σ_b U_bᵀg_b,   d_b = (g_b − U_b c) / λ   for every block b.

The blocks (in joint mode) keep their factors and hand over their Grams on curvature updates; this
object keeps the one Cholesky factor (and, with adaptive damping, the summed Gram, to refactorize
when λ changes) and does the solve. Its state is saved with the optimizer like a block's.
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf import distribute, eager_state, woodbury


class NetworkSolve:
    #: The key its state is saved under, beside the blocks' "curvature_<i>".
    key = "curvature_network"

    def __init__(self, damping, max_damping_retries: int = 6, jit_solve: bool = False,
                 adaptive_damping: bool = False, damping_batch_size: int | None = None):
        self.damping = damping
        self.damping_batch_size = damping_batch_size  # as the blocks' (woodbury.batch_damping)
        self.max_damping_retries = max_damping_retries
        self.jit_solve = jit_solve
        self.adaptive_damping = adaptive_damping
        self._cache: dict[str, tf.Variable] | None = None

    # ---- state (saved and restored with the optimizer, as a block's) -------------------------
    def prepare(self, capacity: int | None) -> bool:
        """Create the factorization's variables for `capacity` samples (the blocks' cache
        capacity; None: dynamic), once. True if this call created them."""
        if self._cache is not None:
            return False
        names = ["cholesky"] + (["gram"] if self.adaptive_damping else [])

        def var(name, shape):
            return tf.Variable(tf.zeros([0 if d is None else d for d in shape],
                                        woodbury.SOLVE_DTYPE), shape=tf.TensorShape(shape),
                               trainable=False, name=f"network_{name}", **distribute.REPLICA_LOCAL)

        with eager_state.outside_the_step():
            self._cache = {n: var(n, [capacity, capacity]) for n in names}
            scalars = ["damping"] + (["requested", "samples"] if self.adaptive_damping else [])
            self._cache.update({n: var(n, []) for n in scalars})
        return True

    @property
    def state_variables(self) -> dict[str, tf.Variable]:
        return dict(self._cache or {})

    def load_state(self, arrays: dict) -> None:
        if set(arrays) != set(self._cache):
            raise ValueError(f"the saved network curvature has fields {sorted(arrays)}, expected "
                             f"{sorted(self._cache)} (saved with other options?).")
        for k, v in self._cache.items():
            v.assign(arrays[k])

    def reset_state(self) -> None:
        """Nothing to forget: the blocks' `filled` flags make the next step a curvature update."""

    # ---- the solve -----------------------------------------------------------------------
    def curvature(self, fresh, grams: list[tf.Tensor], samples):
        """The factorization of mλI + Σ_b K_b: computed from this step's Grams when `fresh`, else
        the cached one (always that of the current λ: see `refactor`). `samples`: m (the Grams
        may be zero-padded to the cache's capacity)."""
        lam = woodbury.as_solve_dtype(self.damping)
        cached = {k: v.read_value() for k, v in self._cache.items()}
        with tf.name_scope("tengrad_cholesky"):
            return tf.cond(fresh, lambda: self._factorize(
                tf.add_n(grams), lam, tf.cast(samples, woodbury.SOLVE_DTYPE)),
                lambda: (cached, tf.constant(0)))

    def _factorize(self, gram, lam, samples):
        lam = woodbury.batch_damping(lam, samples, self.damping_batch_size)
        damped = woodbury.factorize(gram, lam, self.max_damping_retries, jit=self.jit_solve,
                                    samples=samples)
        state = {"cholesky": damped.cholesky, "damping": damped.damping}
        if self.adaptive_damping:
            state.update(gram=gram, requested=lam, samples=samples)
        return state, damped.retries

    def refactor(self, damping: tf.Tensor) -> tf.Tensor:
        """Refactorize the cached summed Gram for a new adaptive λ and keep it (called by the
        damping adaptation where λ changed); the damping retries it took."""
        if not self.adaptive_damping:
            return tf.constant(0)
        with tf.name_scope("tengrad_cholesky"):
            state, retries = self._factorize(self._cache["gram"].read_value(), damping,
                                             self._cache["samples"].read_value())
        for k in ("cholesky", "damping", "requested"):
            self._cache[k].assign(state[k])
        return retries

    def preconditioner(self, lags, state) -> dict[str, tf.Tensor]:
        """The factorization that solves this step: `state`, or the cached one where `lags` (the
        blocks' lagged curvature on an update step, base.FisherBlock.preconditioner)."""
        return tf.cond(lags, lambda: {k: v.read_value() for k, v in self._cache.items()},
                       lambda: state)

    def precondition(self, blocks, grads, state) -> list[list[tf.Tensor]]:
        """[(F + λI)⁻¹ g]_b for every block b of `blocks` [(block, its curvature)], with F the
        Fisher of all of them together; `grads`: each block's gradient list."""
        matrices = [b.helper.to_matrix(g) for (b, _), g in zip(blocks, grads)]
        projected = tf.add_n([tf.cast(b._project(c, v), woodbury.SOLVE_DTYPE)
                              for (b, c), v in zip(blocks, matrices)])
        with tf.name_scope("tengrad_solve"):
            c = tf.linalg.cholesky_solve(state["cholesky"], projected)
            lam = state["damping"]
            return [b.helper.from_matrix((v - b._combine(curv, tf.cast(c, v.dtype)))
                                         / tf.cast(lam, v.dtype))
                    for (b, curv), v in zip(blocks, matrices)]

    def commit(self, keep, state) -> None:
        """Keep the factorization when it is new (`keep`: a curvature update)."""
        def store():
            for k, v in self._cache.items():
                v.assign(state[k])
            return tf.constant(True)

        tf.cond(keep, store, lambda: tf.constant(False))
