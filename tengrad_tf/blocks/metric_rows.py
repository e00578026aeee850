"""The input damping metric of a Dense block through its batch's rows: D_A⁻¹ without a D_in × D_in matrix.

metric.py defines D = D_A ⊗ I, D_A = (Ā + γāI)/((1 + γ)ā), Ā = ÂᵀÂ/n over the n input rows Â of the
curvature update's batch, and solves (F + λD)⁻¹g by whitening with the Cholesky factor of D_A. That
factor is D_in × D_in, and each step applies it twice (2·D_in²·D_out). A Dense layer on flat inputs
caches only n = m rows, and on a wide layer n < D_in; then D_A is the identity plus a rank-n term,

    D_A = κ (I + ÂᵀÂ/σ),   κ = γ/(1 + γ),   σ = γ·tr(ÂÂᵀ)/D_in          (κ = σ = 1 for zero inputs)
    D_A⁻¹ = κ⁻¹ (I − Âᵀ N⁻¹ Â / σ),   N = I + ÂÂᵀ/σ   (n × n, by the Woodbury identity),

and the exact damped step needs only n × n algebra beside the products with Â that the identity
metric's step does anyway. With U's columns uᵢ = âᵢgᵢᵀ, the Woodbury identity with D gives

    d = (F + λD)⁻¹g = (D⁻¹g − D⁻¹U s)/λ,   s = (mλI + UᵀD⁻¹U)⁻¹ UᵀD⁻¹g,

and, with Q = N⁻¹ÂV for the gradient V (D_in × D_out),
    (UᵀD⁻¹g)ᵢ = κ⁻¹ ⟨Qᵢ, gᵢ⟩,   D⁻¹g − D⁻¹U s = κ⁻¹ (V − Âᵀ(Q/σ + N⁻¹ diag(s) G)),
    K̃ = UᵀD⁻¹U = κ⁻¹ (N⁻¹ÂÂᵀ) ⊙ (GGᵀ),   vᵀDv = κ (‖V‖² + ‖ÂV‖²/σ).

So a step costs the identity metric's two products with Â and two n × n triangular solves per
column of V; the cache keeps the rows Â (as without a metric), N's Cholesky factor and (κ, σ). A
zero-padded row (a fixed-capacity cache) adds nothing to ÂÂᵀ, so N is the identity there, which is
how the cache pads a Cholesky factor. The choice between this and whitening is metric.py's.
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf import woodbury

F64 = woodbury.SOLVE_DTYPE


def gram(a: tf.Tensor, g: tf.Tensor, identity_share: float) -> tuple[tf.Tensor, dict]:
    """K̃ = UᵀD⁻¹U (in the rows' dtype) and the metric's cache fields, from the rows a (n, D_in)
    and output gradients g (n, D_out) of the curvature update's batch."""
    a64 = tf.cast(a, F64)
    rows = tf.matmul(a64, a64, transpose_b=True)  # ÂÂᵀ
    trace = tf.linalg.trace(rows)
    zero = trace <= 0  # a layer whose inputs were all zero: D_A = I, not NaN
    one = tf.constant(1.0, F64)
    kappa = tf.where(zero, one, tf.constant(identity_share / (1.0 + identity_share), F64))
    sigma = tf.where(zero, one, identity_share * trace / a.shape[-1])
    factor = tf.linalg.cholesky(tf.eye(tf.shape(rows)[0], dtype=F64) + rows / sigma)
    inner = tf.linalg.cholesky_solve(factor, rows) / kappa  # âᵢᵀ D_A⁻¹ âⱼ
    k = tf.cast(inner, a.dtype) * tf.matmul(g, g, transpose_b=True)
    return k, {"metric_cholesky": factor, "metric_scale": tf.stack([kappa, sigma])}


def direction(c: dict[str, tf.Tensor], v: tf.Tensor, damped: woodbury.DampedGram,
              jit: bool = False) -> tf.Tensor:
    """(F + λD)⁻¹g for the gradient v as the block's matrix (D_in × D_out), from the cache c."""
    a, g = c["a"], c["g"]
    kappa, sigma = (tf.cast(x, v.dtype) for x in tf.unstack(c["metric_scale"]))
    # The name scopes are the λI step's parts (blocks/base.py), for benchmarks/profile_step.py.
    with tf.name_scope("tengrad_project"):
        q = tf.cast(tf.linalg.cholesky_solve(c["metric_cholesky"], tf.cast(tf.matmul(a, v), F64)),
                    v.dtype)  # N⁻¹ÂV
        u_transpose_d_inv_v = tf.reduce_sum(q * g, axis=1, keepdims=True) / kappa

    def d_inv_u_plus(s):
        # D⁻¹U s + κ⁻¹ÂᵀQ/σ: the products with Â of both terms of D⁻¹g − D⁻¹U s, in one.
        with tf.name_scope("tengrad_combine"):
            weighted = tf.cast(tf.linalg.cholesky_solve(c["metric_cholesky"],
                                                        tf.cast(s * g, F64)), v.dtype)
            return tf.matmul(a, q / sigma + weighted, transpose_a=True) / kappa

    return woodbury.inverse_times(v / kappa, u_transpose_d_inv_v, d_inv_u_plus, damped, jit=jit)


def coordinates(c: dict[str, tf.Tensor], v: tf.Tensor) -> list[tf.Tensor]:
    """Tensors whose inner products are vᵀDw (the adaptive damping's quadratic model)."""
    kappa, sigma = (tf.cast(x, v.dtype) for x in tf.unstack(c["metric_scale"]))
    return [tf.sqrt(kappa) * v, tf.sqrt(kappa / sigma) * tf.matmul(c["a"], v)]
