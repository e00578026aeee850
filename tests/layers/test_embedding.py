"""Embedding blocks: the Gram from token matches, Uᵀv by gather and U s by scatter-add, never a
V × D row per sample; against the float64 per-sample reference, through fit."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD
from tests.helpers import sce, tensor_sizes, train_step
from tests.layers.exactness import fit_matches_reference, treatment

FISHERS = ["empirical", "true"]


def tokens(m=6, t=5, vocabulary=11, seed=0, padded=False):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocabulary, size=(m, t))
    ids[0, :3] = ids[0, 3]  # a token repeated within a sample, and across samples
    ids[1, 0] = ids[0, 3]
    if padded:
        for i, length in enumerate([5, 3, 1, 4, 2, 5][:m]):
            ids[i, length:] = 0
    return ids, rng.integers(0, 3, size=m)


def pooled_model(embedding, t=5):
    return keras.Sequential([keras.Input((t,), dtype="int32"), embedding,
                             keras.layers.Dense(4, activation="tanh"),
                             keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("mask_zero", [False, True])
def test_embedding(float64, fixed_sampled_labels, fisher_type, mask_zero):
    """With mask_zero the pooling leaves padded positions out, so their output gradient is zero:
    they contribute to neither the gradient nor the Fisher."""
    x, y = tokens(padded=mask_zero)
    embedding = keras.layers.Embedding(11, 3, mask_zero=mask_zero)
    opt = fit_matches_reference(pooled_model(embedding), x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, embedding).startswith("Embedding block")
    assert "token ids" in treatment(opt, embedding)


def test_embedding_shared_by_two_inputs(float64, fixed_sampled_labels):
    a, y = tokens(seed=1)
    b, _ = tokens(seed=2)
    first, second = keras.Input((5,), dtype="int32"), keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(11, 3)
    pooled = [keras.layers.GlobalAveragePooling1D()(embedding(i)) for i in (first, second)]
    model = keras.Model([first, second],
                        keras.layers.Dense(3)(keras.layers.Concatenate()(pooled)))
    opt = fit_matches_reference(model, [a, b], y, "empirical", fixed_sampled_labels)
    assert "called 2 times" in treatment(opt, embedding)


@pytest.mark.parametrize("cache", ["per-sample", "inverse"])
def test_small_tables_cache_per_sample_gradients_or_the_inverse(float64, fixed_sampled_labels,
                                                                monkeypatch, cache):
    """V·D = 8 < P·(D + 1): explicit per-sample gradients are smaller than the token cache; and a
    table this small caches (F + λI)⁻¹ by default."""
    from tengrad_tf.blocks import base

    monkeypatch.setattr(base, "DIRECT_MAX_DIM", 0 if cache == "per-sample" else 1024)
    x, y = tokens(vocabulary=4, t=8)
    embedding = keras.layers.Embedding(4, 2)
    opt = fit_matches_reference(pooled_model(embedding, t=8), x, y, "empirical",
                                fixed_sampled_labels)
    expected = "per-sample gradients" if cache == "per-sample" else "explicit inverse"
    assert expected in treatment(opt, embedding)


def test_a_50k_vocabulary_never_forms_a_row_per_sample():
    """V = 50,000, D = 32, m = 32, T = 16: no tensor of the traced step (curvature update, true
    Fisher) is larger than a few copies of the table, where one per sample would be 32 times it;
    and a step runs."""
    m, t, vocabulary, dim = 32, 16, 50_000, 32
    specs = (tf.TensorSpec((m, t), tf.int32), tf.TensorSpec((m,), tf.int64))

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((t,), dtype="int32"),
                                 keras.layers.Embedding(vocabulary, dim),
                                 keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(3)])

    opt = TENGraD(fisher="true", curvature_update_freq=1)
    largest = max(tensor_sizes(train_step(model(), opt), *specs, unknown_dim=m))
    assert largest[0] <= 2 * vocabulary * dim, largest
    net = model()
    opt = TENGraD(fisher="empirical")
    net.compile(optimizer=opt, loss=sce())
    rng = np.random.default_rng(0)
    net.fit(rng.integers(0, vocabulary, (m, t)), rng.integers(0, 3, m), batch_size=m, verbose=0)
    assert int(opt.skipped_steps.numpy()) == 0
    assert treatment(opt, net.layers[0]).startswith("Embedding block")


class PositionEmbedding(keras.layers.Layer):
    """Keras's text-classification example: positions from ops.arange, without the batch axis."""

    def __init__(self, length, dim):
        super().__init__()
        self.tokens = keras.layers.Embedding(11, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, x):
        return self.tokens(x) + self.positions(keras.ops.arange(keras.ops.shape(x)[-1]))


def test_position_embedding_without_a_batch_axis_is_first_order_with_the_reason():
    embedding = PositionEmbedding(5, 3)
    model = pooled_model(embedding)
    opt = TENGraD(fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    x, y = tokens()
    model.fit(x, y, batch_size=3, verbose=0)
    text = opt.treatments()[embedding.positions.embeddings.path]
    assert text.startswith("first-order: Embedding") and "without the batch axis" in text
    assert treatment(opt, embedding.tokens).startswith("Embedding block")
