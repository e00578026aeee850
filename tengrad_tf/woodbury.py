"""The damped Fisher-block solve through the Woodbury identity.

For a block with m per-sample gradients U (d × m) and damping λ:

    (λI + (1/m) U Uᵀ)⁻¹ v = (1/λ) · (v − U (mλ I_m + UᵀU)⁻¹ Uᵀ v)

Only the m × m matrix mλI + K (K = UᵀU, the Gram) is factorized, never a d × d one. This module holds
that formula and nothing about layers: callers pass Uᵀv and a function for U·s.

Numerics: the m × m work (symmetrization, Cholesky, triangular solves) runs in float64. In float32 the
subtraction v − U(…)⁻¹Uᵀv loses the small-λ part of the direction and ⟨d, g⟩ can even turn negative
(the authors' code crashed this way on 3C1F at λ = 1e-3). The d-sized vectors stay in the model's
float32. If the Cholesky factor is not finite (Gram with NaN/Inf is the caller's job; this handles
a matrix that rounding made indefinite), the factorization is retried with λ multiplied by 10, the
first retry going at least to m·λ = 100·ε·tr(K) (ε of the Gram's dtype), up to `max_retries` times,
and the λ actually used is returned so the solve stays consistent with it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import tensorflow as tf

from tengrad_tf import _tf_private

SOLVE_DTYPE = tf.float64


class DampedGram(NamedTuple):
    """The Cholesky factor of mλ'I + K and the λ' it was built with (λ' ≥ λ after retries)."""

    cholesky: tf.Tensor  # (m, m), float64, lower triangular
    damping: tf.Tensor  # scalar float64
    retries: tf.Tensor  # scalar int32: how many times λ had to be raised


def batch_damping(damping, samples, reference: int | None) -> tf.Tensor:
    """λ for a Fisher of m = `samples` per-sample gradients, where `damping` is λ at `reference`
    samples: λ·√(reference / m) (float64); `damping` itself where `reference` is None.

    Why: λ sets how far the step trusts a Fisher estimated from m samples, and that estimate's
    noise, like the batch gradient's, shrinks as 1/√m. Outside the batch's span the step is
    lr·g/λ, so this is the square-root scaling rule of adaptive methods for that part (Malladi et
    al. 2022). The linear rule, m·λ fixed, was tried too: it cost the text CNN 0.06 of accuracy
    at batch 32 (docs/step.md, "Batch size")."""
    lam = as_solve_dtype(damping)
    if reference is None:
        return lam
    return lam * tf.sqrt(tf.constant(float(reference), SOLVE_DTYPE) / as_solve_dtype(samples))


def factorize(gram: tf.Tensor, damping, max_retries: int = 6, jit: bool = False,
              samples=None) -> DampedGram:
    """Cholesky factor of (m·λ·I + K) in float64, raising λ tenfold while the factor is not finite.

    `samples`: m, when K is zero-padded beyond the m samples (a fixed-capacity cache; the padded
    diagonal then holds m·λ instead of 1, which leaves the solve of the real rows unchanged).
    `jit`: compile this with XLA (see `_factorize_xla` at the end of the module). Without it, it
    is one shared graph function all the same (`_factorize_graph`)."""
    factor = _factorize_xla if jit else _factorize_graph
    return DampedGram(*factor(gram, as_solve_dtype(damping), max_retries, samples))


def _factorize(gram: tf.Tensor, damping: tf.Tensor, max_retries: int, samples) -> DampedGram:
    """`factorize`'s ops (the body of its graph functions)."""
    k = tf.cast(gram, SOLVE_DTYPE)
    k = 0.5 * (k + tf.transpose(k))  # K is symmetric in exact arithmetic; float32 rounding is not
    m = tf.cast(tf.shape(k)[0] if samples is None else samples, SOLVE_DTYPE)
    eye = tf.eye(tf.shape(k)[0], dtype=SOLVE_DTYPE)

    def attempt(lam):
        return tf.linalg.cholesky(k + (m * lam) * eye)

    def not_finite(chol):
        return tf.logical_not(tf.reduce_all(tf.math.is_finite(chol)))

    def cond(retries, lam, chol):
        return tf.logical_and(retries < max_retries, not_finite(chol))

    # Rounding in forming K (in the factors' dtype) can make it indefinite by ~ε·‖K‖ ≤ ε·tr(K).
    # A λ far below that (1e-30, or duplicated samples at 1e-20) would not recover in a few 10×
    # steps, so the first retry goes at least to m·λ = 100·ε·tr(K), which covers that rounding.
    eps = 100.0 * float(np.finfo(gram.dtype.as_numpy_dtype).eps)
    floor = tf.cast(eps, SOLVE_DTYPE) * tf.linalg.trace(k) / m

    def body(retries, lam, chol):
        lam = tf.maximum(lam * 10.0, floor)
        return retries + 1, lam, attempt(lam)

    retries, lam, chol = tf.while_loop(
        cond, body, (tf.constant(0), damping, attempt(damping)), maximum_iterations=max_retries
    )
    return DampedGram(chol, lam, retries)


def inverse_times(
    v: tf.Tensor,
    u_transpose_v: tf.Tensor,
    u_times: Callable[[tf.Tensor], tf.Tensor],
    damped: DampedGram,
    jit: bool = False,
) -> tf.Tensor:
    """(λI + (1/m)UUᵀ)⁻¹ v, given Uᵀv (m, 1) and a function s ↦ U s (s: (m, 1); the result is
    shaped like v). Columns, not vectors: no reshapes between the two triangular solves and U.

    `jit`: the m × m triangular solves are compiled with XLA (U s and Uᵀv are not)."""
    b = tf.cast(u_transpose_v, SOLVE_DTYPE)
    c = (_cholesky_solve_xla if jit else tf.linalg.cholesky_solve)(damped.cholesky, b)
    correction = u_times(tf.cast(c, v.dtype))
    return (v - correction) / tf.cast(damped.damping, v.dtype)


class DampedInverse(NamedTuple):
    """The explicit (F + λ'I)⁻¹ of a small block and the λ' it was built with."""

    matrix: tf.Tensor  # (d, d), float64
    damping: tf.Tensor  # scalar float64
    retries: tf.Tensor  # scalar int32


def explicit_inverse(rows: tf.Tensor, damping, max_retries: int = 6, samples=None
                     ) -> DampedInverse:
    """(F + λI)⁻¹ with F = (1/m) Σᵢ uᵢuᵢᵀ, for the per-sample gradients uᵢ as the rows (m, d).
    `samples`: m, when the rows are zero-padded beyond the m samples (a fixed-capacity cache).

    By whichever solve is cheaper: with m ≥ d samples, directly, (F + λI)⁻¹ = m (UᵀU + mλI)⁻¹
    (a d × d Cholesky, d³/3); with fewer, through the Woodbury identity with the m × m Gram,
    (F + λI)⁻¹ = (I − Uᵀ(UUᵀ + mλI)⁻¹U) / λ. Forming the d × d result costs m·d² either way.
    """
    u = tf.cast(rows, SOLVE_DTYPE)
    m, d = tf.shape(u)[0], tf.shape(u)[1]
    m_float = tf.cast(m, SOLVE_DTYPE) if samples is None else as_solve_dtype(samples)
    d_float = tf.cast(d, SOLVE_DTYPE)
    lam0 = as_solve_dtype(damping)
    static = u.shape[0] is not None and u.shape[1] is not None
    if static or _tf_private.in_xla_context():
        # The solve is chosen while tracing: XLA cannot compile the conds below, whose branches
        # return matrices of different shapes. Under XLA with a batch size unknown while tracing
        # it is the direct one, exact for any m (d³/3 instead of m³/3).
        direct = u.shape[0] >= u.shape[1] if static else True

        def select(_, direct_branch, gram_branch):
            return direct_branch() if direct else gram_branch()
    else:
        direct, select = m >= d, tf.cond
    # Otherwise one factorization between two loop-free conds, not one per branch: where grappler
    # can fold `direct` it prunes a branch, and a pruned branch holding the retry while-loop
    # breaks its topological sort, after which it leaves the whole step unoptimized.
    # Direct: (F + λI)⁻¹ = m (UᵀU + mλI)⁻¹, and factorize damps with (its size)·λ, so λ·m/d.
    # Through the Gram, the diagonal takes m·λ for the m real samples (zero rows stay outside).
    matrix, lam, size = select(
        direct, lambda: (tf.matmul(u, u, transpose_a=True), lam0 * m_float / d_float, d_float),
        lambda: (tf.matmul(u, u, transpose_b=True), lam0, m_float))
    damped = factorize(matrix, lam, max_retries, samples=size)

    def direct_inverse():
        inverse = m_float * tf.linalg.cholesky_solve(damped.cholesky, tf.eye(d, dtype=SOLVE_DTYPE))
        return inverse, damped.damping * d_float / m_float

    def through_gram():
        correction = tf.matmul(u, tf.linalg.cholesky_solve(damped.cholesky, u), transpose_a=True)
        return (tf.eye(d, dtype=SOLVE_DTYPE) - correction) / damped.damping, damped.damping

    inverse, lam = select(direct, direct_inverse, through_gram)
    return DampedInverse(0.5 * (inverse + tf.transpose(inverse)), lam, damped.retries)


def condition_number(state: dict) -> tf.Tensor:
    """cond(F + λI) restricted to what the cache holds: of mλ'I + K from its Cholesky factor
    ("cholesky"), or of the explicit inverse ("inverse"); for diagnostics (an m³ or d³ eigvalsh)."""
    if "cholesky" in state:
        chol = state["cholesky"]
        e = tf.linalg.eigvalsh(tf.matmul(chol, chol, transpose_b=True))
    else:
        e = tf.linalg.eigvalsh(state["inverse"])
    return tf.reduce_max(e) / tf.reduce_min(e)


def as_solve_dtype(damping) -> tf.Tensor:
    """λ (a float, tensor or variable) as a float64 tensor, without rounding it."""
    # convert_to_tensor, not cast: tf.cast(0.05, float64) goes through float32 and rounds λ.
    return tf.cast(tf.convert_to_tensor(damping, dtype_hint=SOLVE_DTYPE), SOLVE_DTYPE)


# ---- XLA for the m × m work (TENGraD's jit_solve) ----------------------------------------------
# Only the m × m part is compiled: symmetrization, damping, Cholesky with its retry loop, and the
# triangular solves. Inside a step that is not compiled (jit_compile=False), XLA fuses these small
# ops into a few kernels and keeps the retry loop on the device; the d-sized products with U stay
# TensorFlow's. Traced once per (damping, max_retries); XLA compiles once per Gram size m (a
# dynamic batch size costs one compilation per distinct size, e.g. a smaller last batch). Inside a
# step compiled as a whole (jit_compile=True) these calls are simply part of that compilation.
_factorize_xla = tf.function(lambda gram, damping, max_retries, samples: tuple(
    _factorize(gram, damping, max_retries, samples)), jit_compile=True, reduce_retracing=True)
# Without XLA the factorization is a graph function too, for the time it takes to trace a step:
# inlined, its retry loop is some 130 ops per call, and a step with adaptive damping calls it twice
# per block (fresh and refactored curvature), on 3C1F a fifth of the step's ops. As one function,
# it is traced once per process (per Gram dtype and max_retries) and each call is one op; grappler
# inlines it again, so the step runs what it ran before (docs/performance.md, the first step).
_factorize_graph = tf.function(lambda gram, damping, max_retries, samples: tuple(
    _factorize(gram, damping, max_retries, samples)), reduce_retracing=True, autograph=False)
_cholesky_solve_xla = tf.function(tf.linalg.cholesky_solve, jit_compile=True,
                                  reduce_retracing=True)
