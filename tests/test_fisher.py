"""Label sampling of the true Fisher, per loss, and one exact step per loss family."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import fisher
from tests import reference
from tests.helpers import plain

N = 20000


def test_categorical_samples_follow_the_softmax():
    logits = tf.constant([[2.0, 0.0, -1.0]] * N)
    probs = tf.nn.softmax(logits[0]).numpy()
    for loss, y_pred in [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), logits),
        (keras.losses.SparseCategoricalCrossentropy(), tf.nn.softmax(logits)),
    ]:
        draws = fisher.sample_labels(loss, y_pred, seed=1).numpy()
        np.testing.assert_allclose(np.bincount(draws, minlength=3) / N, probs, atol=0.015)
    one_hot = fisher.sample_labels(keras.losses.CategoricalCrossentropy(from_logits=True), logits)
    assert one_hot.shape == (N, 3)
    np.testing.assert_allclose(one_hot.numpy().mean(0), probs, atol=0.015)


def test_binary_samples_follow_the_sigmoid():
    logits = tf.constant([[1.5, -0.5]] * N)
    for loss, y_pred in [(keras.losses.BinaryCrossentropy(from_logits=True), logits),
                         (keras.losses.BinaryCrossentropy(), tf.sigmoid(logits))]:
        draws = fisher.sample_labels(loss, y_pred).numpy()
        np.testing.assert_allclose(draws.mean(0), tf.sigmoid(logits[0]).numpy(), atol=0.015)


def test_gaussian_samples_have_variance_k_over_2():
    """MSE = mean over k outputs: its NLL variance is k/2, so the true Fisher = Gauss-Newton."""
    y_pred = tf.zeros([N, 4])
    draws = fisher.sample_labels(keras.losses.MeanSquaredError(), y_pred).numpy()
    np.testing.assert_allclose(draws.var(0), np.full(4, 2.0), rtol=0.05)


def test_unsupported_loss_names_it_and_suggests_empirical():
    with pytest.raises(fisher.UnsupportedLossError, match="empirical"):
        fisher.check_supported(keras.losses.Huber())


LOSSES = {
    "sparse_logits": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), None),
    "sparse_probs": (lambda: keras.losses.SparseCategoricalCrossentropy(), "softmax"),
    "categorical_logits": (lambda: keras.losses.CategoricalCrossentropy(from_logits=True), None),
    "binary_logits": (lambda: keras.losses.BinaryCrossentropy(from_logits=True), None),
    "binary_probs": (lambda: keras.losses.BinaryCrossentropy(), "sigmoid"),
    "mse": (lambda: keras.losses.MeanSquaredError(), None),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_true_fisher_step_is_exact_for_every_loss(float64, monkeypatch, name):
    make_loss, activation = LOSSES[name]
    rng = np.random.default_rng(0)
    m, k = 8, 3
    x = rng.normal(size=(m, 5))
    if name.startswith("sparse"):
        y, y_hat = rng.integers(0, k, m), rng.integers(0, k, m)
    elif name.startswith("categorical"):
        y, y_hat = np.eye(k)[rng.integers(0, k, m)], np.eye(k)[rng.integers(0, k, m)]
    elif name.startswith("binary"):
        y, y_hat = rng.integers(0, 2, (m, k)).astype(float), rng.integers(0, 2, (m, k)).astype(float)
    else:
        y, y_hat = rng.normal(size=(m, k)), rng.normal(size=(m, k))
    monkeypatch.setattr(fisher, "sample_labels", lambda loss, y_pred, seed=None: tf.constant(y_hat))
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(k, activation=activation)])
    loss = make_loss()
    expected, _ = reference.reference_directions(model, x, y, y_hat, loss.call, 0.05)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    opt = plain(learning_rate=0.125, damping=0.05)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - 0.125 * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)
