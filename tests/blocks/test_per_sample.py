"""The per-sample algebra: routes F and E agree, chunking changes nothing, and U, Uᵀ are adjoint."""

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf.blocks import per_sample


def factors(m=5, p=7, d_in=4, d_out=3, seed=0):
    rng = np.random.default_rng(seed)
    return tf.constant(rng.normal(size=(m, p, d_in))), tf.constant(rng.normal(size=(m, p, d_out)))


def explicit_u(a, g):
    return np.einsum("ipa,ipb->iab", a.numpy(), g.numpy()).reshape(a.shape[0], -1)


@pytest.mark.parametrize("p", [1, 7])
def test_routes_give_the_reference_gram(p):
    a, g = factors(p=p)
    u = explicit_u(a, g)
    j = per_sample.per_sample(lambda xs: xs[0], [a], g)
    np.testing.assert_allclose(per_sample.gram_factored(a, g).numpy(), u @ u.T, rtol=1e-12)
    np.testing.assert_allclose(per_sample.gram_explicit(j).numpy(), u @ u.T, rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_chunking_is_exact_for_any_chunk(chunk):
    a, g = factors(m=5)
    full = per_sample.gram_factored(a, g)
    np.testing.assert_allclose(per_sample.gram_factored(a, g, chunk).numpy(), full.numpy(),
                               rtol=1e-12)
    j_full = per_sample.per_sample(lambda xs: xs[0], [a], g)
    j_chunk = per_sample.per_sample(lambda xs: xs[0], [a], g, chunk)
    np.testing.assert_allclose(j_chunk.numpy(), j_full.numpy(), rtol=1e-12)


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 8])
def test_summed_chunks_weight_out_the_padding(chunk):
    """Σ over chunks equals the sum over the batch: the zero padding of the last chunk (m = 5 in
    chunks of 2 or 3) must count neither in the sum nor in the count, even where fn maps a zero
    sample to something nonzero (here: its entries plus one)."""
    x = tf.constant(np.random.default_rng(0).normal(size=(5, 4)))

    def fn(xs, valid):
        return tf.reduce_sum((xs + 1.0) * valid[:, None], axis=0), tf.reduce_sum(valid)

    total, count = per_sample.sum_sample_chunks(fn, [x], chunk, (tf.float64, tf.float64))
    np.testing.assert_allclose(total.numpy(), (x.numpy() + 1.0).sum(axis=0), rtol=1e-12)
    assert count.numpy() == 5


def test_chunking_with_a_dynamic_batch_inside_tf_function():
    a, g = factors(m=5)
    spec = [tf.TensorSpec([None, 7, 4], tf.float64), tf.TensorSpec([None, 7, 3], tf.float64)]
    f = tf.function(lambda a, g: per_sample.gram_factored(a, g, tf.constant(2)),
                    input_signature=spec)
    np.testing.assert_allclose(f(a, g).numpy(), per_sample.gram_factored(a, g).numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("p", [7, 1, "dense"])
def test_project_and_combine_are_u_transpose_and_u(p):
    a, g = factors(p=1 if p == "dense" else p)
    u = explicit_u(a, g)
    j = per_sample.per_sample(lambda xs: xs[0], [a], g)
    if p == "dense":  # Dense factors are cached as (m, D) matrices
        a, g = a[:, 0], g[:, 0]
    rng = np.random.default_rng(1)
    v, s = rng.normal(size=(4, 3)), rng.normal(size=(5, 1))  # s: a column, as the solve gives it
    for project, combine in [
        (lambda v: per_sample.project_factored(a, g, v), lambda s: per_sample.combine_factored(a, g, s)),
        (lambda v: per_sample.project_explicit(j, v), lambda s: per_sample.combine_explicit(j, s)),
    ]:
        utv = project(tf.constant(v)).numpy()
        assert utv.shape == (5, 1)
        np.testing.assert_allclose(utv[:, 0], u @ v.ravel(), rtol=1e-12)
        np.testing.assert_allclose(combine(tf.constant(s)).numpy().ravel(), u.T @ s[:, 0],
                                   rtol=1e-12)


@pytest.mark.parametrize("repeats", [2, 3])
def test_dense_with_repeated_input_rows_uses_the_distinct_ones(repeats):
    """fisher="exact": each input row comes R times in a row; gram, Uᵀv and U s from the distinct
    rows equal the plain products over all the rows (and the Gram rows of other samples too)."""
    rng = np.random.default_rng(repeats)
    a = tf.repeat(tf.constant(rng.normal(size=(5, 6))), repeats, axis=0)
    g = tf.constant(rng.normal(size=(5 * repeats, 4)))
    v, s = tf.constant(rng.normal(size=(6, 4))), tf.constant(rng.normal(size=(5 * repeats, 1)))
    for got, plain in [
        (per_sample.gram_factored(a, g, repeats=repeats), per_sample.gram_factored(a, g)),
        (per_sample.gram_factored(a, g, rows_of=(a[:2 * repeats], g[:2 * repeats]),
                                  repeats=repeats),
         per_sample.gram_factored(a, g, rows_of=(a[:2 * repeats], g[:2 * repeats]))),
        (per_sample.project_factored(a, g, v, repeats), per_sample.project_factored(a, g, v)),
        (per_sample.combine_factored(a, g, s, repeats), per_sample.combine_factored(a, g, s)),
    ]:
        np.testing.assert_allclose(got.numpy(), plain.numpy(), rtol=1e-12, atol=1e-12)
