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


@pytest.mark.parametrize("vocabulary", [3, 7, 1000])
def test_gram_from_matching_pairs_is_u_transpose_u(vocabulary):
    """The matching pairs only (Σᵥ nᵥ² of them): repeated tokens within and across samples, and
    a zero-padded sample (its token 0 matches others but contributes nothing)."""
    ids, g, _ = batch(m=6, p=5, vocabulary=vocabulary, d=3, seed=2)
    g = tf.concat([g[:5], tf.zeros_like(g[5:])], axis=0)
    u = explicit(ids, g, vocabulary)
    matches = tokens._matches(ids)
    pairs = tf.reduce_sum(tf.square(matches.counts))
    assert int(pairs) == sum(int(n) ** 2 for n in np.unique(ids.numpy(), return_counts=True)[1])
    np.testing.assert_allclose(tokens._gram_matching_pairs(matches, pairs, g, 6).numpy(),
                               u @ u.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory_budget, vocabulary, matching", [
    (2**20, 10**6, True),  # few matches, within the budget
    (2**20, 2, False),  # half the pairs match: all pairs are cheaper
    (64, 10**6, False),  # the matching pairs' rows would not fit in 64 bytes
])
def test_gram_takes_the_matching_pairs_when_they_fit_and_pay(monkeypatch, memory_budget,
                                                             vocabulary, matching):
    ids, g, _ = batch(m=8, p=6, vocabulary=vocabulary, d=4, seed=3)
    u = explicit(ids, g, vocabulary) if vocabulary < 10**4 else None
    taken = []
    for name in ("_gram_matching_pairs", "_gram_all_pairs"):
        original = getattr(tokens, name)
        monkeypatch.setattr(tokens, name, lambda *a, original=original, name=name: (
            taken.append(name), original(*a))[1])
    k = tokens.gram(ids, g, None, memory_budget)  # eagerly: only the branch taken runs
    assert taken == ["_gram_matching_pairs" if matching else "_gram_all_pairs"]
    expected = tokens._gram_all_pairs(ids, g, None) if u is None else u @ u.T
    np.testing.assert_allclose(k.numpy(), np.asarray(expected), rtol=1e-12)
