"""The damped Gram solve: matches a dense solve, and recovers from an indefinite Gram."""

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import woodbury


def test_batch_damping_scales_with_the_square_root_of_the_batch():
    def lam(m, reference):
        return float(woodbury.batch_damping(0.1, m, reference))

    assert lam(32, 128) == pytest.approx(0.2, rel=1e-15)
    assert lam(512, 128) == pytest.approx(0.05, rel=1e-15)
    assert lam(128, 128) == 0.1 and lam(7, None) == 0.1


def test_matches_dense_solve_at_small_damping():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(40, 6))  # d = 40, m = 6
    v = rng.normal(size=40)
    for lam in (1e-1, 1e-3, 1e-6):
        damped = woodbury.factorize(tf.constant(u.T @ u), lam)
        d = woodbury.inverse_times(tf.constant(v), tf.constant(u.T @ v)[:, None],
                                   lambda s: tf.linalg.matvec(tf.constant(u), s[:, 0]), damped)
        want = np.linalg.solve(u @ u.T / 6 + lam * np.eye(40), v)
        np.testing.assert_allclose(d.numpy(), want, rtol=1e-6 if lam < 1e-4 else 1e-9)


def test_indefinite_gram_is_refactorized_with_more_damping():
    gram = tf.constant([[1.0, 2.0], [2.0, 1.0]], tf.float64)  # eigenvalues 3 and -1
    damped = woodbury.factorize(gram, 0.1)  # 2·0.1 = 0.2 < 1: not PD; 2·1 = 2 > 1 is
    assert int(damped.retries) == 1
    assert np.isclose(float(damped.damping), 1.0)
    assert np.all(np.isfinite(damped.cholesky.numpy()))


def test_float32_gram_does_not_round_the_damping():
    damped = woodbury.factorize(tf.eye(3, dtype=tf.float32), 0.05)
    assert float(damped.damping) == 0.05


def test_explicit_inverse_by_either_solve_matches_a_dense_inverse():
    rng = np.random.default_rng(2)
    for m, d in ((30, 12), (5, 12)):  # direct d × d solve, then Woodbury with the m × m Gram
        u = rng.normal(size=(m, d))
        for lam in (1e-1, 1e-4):
            inverse = woodbury.explicit_inverse(tf.constant(u), lam)
            want = np.linalg.inv(u.T @ u / m + lam * np.eye(d))
            np.testing.assert_allclose(inverse.matrix.numpy(), want, rtol=1e-8, atol=1e-10 / lam)
            assert float(inverse.damping) == lam and int(inverse.retries) == 0
