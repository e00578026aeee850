"""The token algebra of lookup tables: the token-match Gram, Uᵀv and U s against explicit
per-sample gradients, for any chunk."""

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf.blocks import tokens


def batch(m=5, p=4, vocabulary=7, d=3, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocabulary, (m, p))
    ids[0, :2] = ids[1, 3]  # repeats within and across samples
    return tf.constant(ids, tf.int32), tf.constant(rng.normal(size=(m, p, d))), vocabulary


def explicit(ids, g, vocabulary):
    u = np.zeros((ids.shape[0], vocabulary, g.shape[-1]))
    for i, row in enumerate(ids.numpy()):
        for t, token in enumerate(row):
            u[i, token] += g.numpy()[i, t]
    return u.reshape(ids.shape[0], -1)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
def test_gram_is_u_transpose_u(chunk):
    ids, g, vocabulary = batch()
    u = explicit(ids, g, vocabulary)
    np.testing.assert_allclose(tokens.gram(ids, g, chunk).numpy(), u @ u.T, rtol=1e-12)
    np.testing.assert_allclose(tokens.per_sample(ids, g, vocabulary).numpy().reshape(5, -1), u,
                               rtol=1e-12)


def test_project_and_combine_are_u_transpose_and_u():
    ids, g, vocabulary = batch()
    u = explicit(ids, g, vocabulary)
    rng = np.random.default_rng(1)
    v, s = rng.normal(size=(vocabulary, 3)), rng.normal(size=(5, 1))
    np.testing.assert_allclose(tokens.project(ids, g, tf.constant(v)).numpy()[:, 0],
                               u @ v.ravel(), rtol=1e-12)
    np.testing.assert_allclose(tokens.combine(ids, g, tf.constant(s), vocabulary).numpy().ravel(),
                               u.T @ s[:, 0], rtol=1e-12)
