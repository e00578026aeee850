"""blocks/metric_rows.py against explicit float64 matrices: U's columns vec(âᵢgᵢᵀ), F = UUᵀ/m,
D = D_A ⊗ I with D_A = (Ā + γāI)/((1 + γ)ā) formed from Ā itself, and (F + λD)⁻¹g by a dense solve.
The package never forms D_A: it goes through the n × n matrix of the rows (n < D_in)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import woodbury
from tengrad_tf.blocks import metric_rows

N, D_IN, D_OUT, LAM, GAMMA = 5, 9, 4, 0.3, 1.0


def rows(seed=0, scale=None):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(N, D_IN)) * (np.linspace(0.2, 3.0, D_IN) if scale is None else scale)
    return a + 0.5, rng.normal(size=(N, D_OUT))


def dense_metric(a, gamma=GAMMA):
    second = a.T @ a / len(a)
    mean = np.trace(second) / a.shape[1]
    if mean == 0:
        return np.eye(a.shape[1] * D_OUT)
    d_a = (second + gamma * mean * np.eye(a.shape[1])) / ((1 + gamma) * mean)
    return np.kron(d_a, np.eye(D_OUT))  # vec of a D_in × D_out matrix, row-major


def step(a, g, v):
    k, fields = metric_rows.gram(tf.constant(a), tf.constant(g), GAMMA)
    damped = woodbury.factorize(k, LAM)
    c = {"a": tf.constant(a), "g": tf.constant(g), **fields}
    return metric_rows.direction(c, tf.constant(v), damped).numpy(), c


@pytest.mark.parametrize("seed", [0, 1])
def test_direction_is_the_dense_solve_with_d_a(seed):
    a, g = rows(seed)
    v = np.random.default_rng(seed + 10).normal(size=(D_IN, D_OUT))
    u = np.stack([np.outer(a[i], g[i]).ravel() for i in range(N)], axis=1)  # (d, m)
    f = u @ u.T / N
    expected = np.linalg.solve(f + LAM * dense_metric(a), v.ravel()).reshape(D_IN, D_OUT)
    d, _ = step(a, g, v)
    np.testing.assert_allclose(d, expected, rtol=1e-9, atol=1e-12)
    # The control: the identity metric's step is not it (the inputs are far from isotropic).
    identity = np.linalg.solve(f + LAM * np.eye(f.shape[0]), v.ravel()).reshape(D_IN, D_OUT)
    assert not np.allclose(identity, expected, rtol=1e-3)


def test_gram_is_u_transpose_d_inverse_u():
    a, g = rows()
    u = np.stack([np.outer(a[i], g[i]).ravel() for i in range(N)], axis=1)
    k, _ = metric_rows.gram(tf.constant(a), tf.constant(g), GAMMA)
    np.testing.assert_allclose(k.numpy(), u.T @ np.linalg.solve(dense_metric(a), u), rtol=1e-9)


def test_coordinates_give_the_metrics_inner_products():
    a, g = rows()
    rng = np.random.default_rng(3)
    v, w = rng.normal(size=(2, D_IN, D_OUT))
    _, c = step(a, g, v)
    inner = sum(np.sum(x * y) for x, y in zip(metric_rows.coordinates(c, tf.constant(v)),
                                              metric_rows.coordinates(c, tf.constant(w))))
    np.testing.assert_allclose(inner, v.ravel() @ dense_metric(a) @ w.ravel(), rtol=1e-12)


def test_zero_inputs_damp_with_the_identity():
    a, g = np.zeros((N, D_IN)), rows()[1]
    v = np.random.default_rng(4).normal(size=(D_IN, D_OUT))
    d, c = step(a, g, v)
    assert c["metric_scale"].numpy().tolist() == [1.0, 1.0]
    np.testing.assert_allclose(d, v / LAM, rtol=1e-12)  # F = 0 and D = I
