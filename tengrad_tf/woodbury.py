"""The damped Fisher-block solve through the Woodbury identity.

For a block with m per-sample gradients U (d × m) and damping λ:

    (λI + (1/m) U Uᵀ)⁻¹ v = (1/λ) · (v − U (mλ I_m + UᵀU)⁻¹ Uᵀ v)

Only the m × m matrix mλI + K (K = UᵀU, the Gram) is factorized, never a d × d one. This module holds
that formula and nothing about layers: callers pass Uᵀv and a function for U·s.

Numerics: the m × m work (symmetrization, Cholesky, triangular solves) runs in float64. In float32 the
subtraction v − U(…)⁻¹Uᵀv loses the small-λ part of the direction and ⟨d, g⟩ can even turn negative
(the authors' code crashed this way on 3C1F at λ = 1e-3). The d-sized vectors stay in the model's
float32. If the Cholesky factor is not finite (Gram with NaN/Inf is the caller's job; this handles
a matrix that rounding made indefinite), the factorization is retried with λ multiplied by 10, up to
`max_retries` times, and the λ actually used is returned so the solve stays consistent with it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import tensorflow as tf

SOLVE_DTYPE = tf.float64


class DampedGram(NamedTuple):
    """The Cholesky factor of mλ'I + K and the λ' it was built with (λ' ≥ λ after retries)."""

    cholesky: tf.Tensor  # (m, m), float64, lower triangular
    damping: tf.Tensor  # scalar float64
    retries: tf.Tensor  # scalar int32: how many times λ had to be raised


def factorize(gram: tf.Tensor, damping, max_retries: int = 6) -> DampedGram:
    """Cholesky factor of (m·λ·I + K) in float64, raising λ tenfold while the factor is not finite."""
    k = tf.cast(gram, SOLVE_DTYPE)
    k = 0.5 * (k + tf.transpose(k))  # K is symmetric in exact arithmetic; float32 rounding is not
    m = tf.cast(tf.shape(k)[0], SOLVE_DTYPE)
    eye = tf.eye(tf.shape(k)[0], dtype=SOLVE_DTYPE)
    # convert_to_tensor, not cast: tf.cast(0.05, float64) goes through float32 and rounds λ.
    lam0 = tf.cast(tf.convert_to_tensor(damping, dtype_hint=SOLVE_DTYPE), SOLVE_DTYPE)

    def attempt(lam):
        return tf.linalg.cholesky(k + (m * lam) * eye)

    def not_finite(chol):
        return tf.logical_not(tf.reduce_all(tf.math.is_finite(chol)))

    def cond(retries, lam, chol):
        return tf.logical_and(retries < max_retries, not_finite(chol))

    def body(retries, lam, chol):
        lam = lam * 10.0
        return retries + 1, lam, attempt(lam)

    retries, lam, chol = tf.while_loop(
        cond, body, (tf.constant(0), lam0, attempt(lam0)), maximum_iterations=max_retries
    )
    return DampedGram(chol, lam, retries)


def inverse_times(
    v: tf.Tensor,
    u_transpose_v: tf.Tensor,
    u_times: Callable[[tf.Tensor], tf.Tensor],
    damped: DampedGram,
) -> tf.Tensor:
    """(λI + (1/m)UUᵀ)⁻¹ v, given Uᵀv (m,) and a function s ↦ U s (shaped like v)."""
    b = tf.cast(u_transpose_v, SOLVE_DTYPE)[:, None]
    c = tf.linalg.cholesky_solve(damped.cholesky, b)[:, 0]
    correction = u_times(tf.cast(c, v.dtype))
    return (v - correction) / tf.cast(damped.damping, v.dtype)
