"""Capture and binding: several losses and optimizers in one step, and the scope of the patch.

Every step here is checked in float64 against the independent per-sample reference
(tests/reference.py): exact, or a clear error; never another loss's curvature.
"""

from __future__ import annotations

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD, capture
from tests import helpers, reference
from tests.helpers import DAMPING, LR, weights

M, NOISE, FEATURES = 6, 3, 4


def plain(**kw):
    return helpers.plain(**{"learning_rate": LR, "damping": DAMPING, **kw})


def dense_net(inputs, hidden, outputs):
    return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(hidden, activation="tanh"),
                             keras.layers.Dense(outputs)])


def blocks(model):
    return [(layer.kernel, layer.bias) for layer in model.layers]


def assert_steps(before, after, expected):
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - LR * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)


def bce_rows(labels, logits):
    return keras.losses.binary_crossentropy(labels, logits, from_logits=True)


class Gan:
    """The Keras DCGAN tutorial's step: two tapes in one tf.function, D on real and fake data."""

    def __init__(self, g_opt, d_opt):
        self.generator = dense_net(NOISE, 5, FEATURES)
        self.discriminator = dense_net(FEATURES, 5, 1)
        self.g_opt, self.d_opt = g_opt, d_opt
        rng = np.random.default_rng(0)
        self.z = rng.normal(size=(M, NOISE))
        self.x = rng.normal(size=(M, FEATURES))
        self.bce = keras.losses.BinaryCrossentropy(from_logits=True)

    @tf.function
    def step(self, x, z):
        helpers.dcgan_step(self.generator, self.discriminator, self.g_opt, self.d_opt, self.bce,
                           x, z)

    def expected(self, y_fisher):
        """The exact natural-gradient directions of G and D. Per-sample losses: G's is
        ℓᵢ = bce(1, D(G(zᵢ))); D's, called on real and fake batches (a shared layer, DESIGN.md),
        is ℓᵢ = bce(1, D(xᵢ)) + bce(0, D(G(zᵢ))). The Fisher uses labels y_fisher (None: the
        training labels, the empirical Fisher) in every loss term."""
        G, D = self.generator, self.discriminator
        ones, zeros = np.ones((M, 1)), np.zeros((M, 1))

        def g_losses(y1=ones):
            return bce_rows(y1, D(G(self.z, training=True), training=True))

        def d_losses(y1=ones, y0=zeros):
            return (bce_rows(y1, D(self.x, training=True))
                    + bce_rows(y0, D(G(self.z, training=True), training=True)))

        g_fisher = g_losses if y_fisher is None else lambda: g_losses(y_fisher)
        d_fisher = d_losses if y_fisher is None else lambda: d_losses(y_fisher, y_fisher)
        return (reference.natural_gradient(g_losses, g_fisher, blocks(G), DAMPING),
                reference.natural_gradient(d_losses, d_fisher, blocks(D), DAMPING))


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("discriminator", ["adam", "tengrad"])
def test_gan_step_is_exact_for_each_optimizer(float64, fixed_sampled_labels, fisher_type,
                                              discriminator):
    """G's tape differentiates g_loss through D, D's tape differentiates d_loss through G's output:
    each layer of D has two output gradients in the step, one per loss, and each optimizer must
    use its own loss's (the issue: G was 40% off when D's gradient was taken in the same step,
    and with two TENGraDs the first took every layer)."""
    y_fisher = np.array([[1.0], [0.0], [0.0], [1.0], [1.0], [0.0]])
    fixed_sampled_labels["y"] = y_fisher
    d_opt = (plain(fisher=fisher_type) if discriminator == "tengrad"
             else keras.optimizers.Adam(1e-3))
    gan = Gan(plain(fisher=fisher_type), d_opt)
    g_expected, d_expected = gan.expected(None if fisher_type == "empirical" else y_fisher)
    before = weights(gan.generator, gan.discriminator)
    gan.step(tf.constant(gan.x), tf.constant(gan.z))
    after = weights(gan.generator, gan.discriminator)
    assert_steps(before, after, g_expected)
    if discriminator == "tengrad":
        assert_steps(before, after, d_expected)
        assert all("Dense block" in t and "called 2 times" in t
                   for t in d_opt.treatments().values())


def test_gan_reference_tells_the_losses_apart(float64):
    """The check above can fail: G's step with D's loss in its Fisher is far from G's own."""
    gan = Gan(plain(fisher="empirical"), keras.optimizers.Adam())
    g_expected, _ = gan.expected(None)
    G, D = gan.generator, gan.discriminator
    wrong = reference.natural_gradient(
        lambda: bce_rows(np.ones((M, 1)), D(G(gan.z, training=True), training=True)),
        lambda: bce_rows(np.zeros((M, 1)), D(G(gan.z, training=True), training=True)),
        blocks(G), DAMPING)
    for path, d in g_expected.items():
        assert np.linalg.norm(wrong[path] - d) > 1e-3 * np.linalg.norm(d), path


@pytest.mark.parametrize("tapes", ["one tape each", "one persistent tape"])
def test_two_independent_models_in_one_function(float64, tapes):
    a, b = dense_net(5, 4, 3), dense_net(2, 3, 2)
    opt_a, opt_b = plain(fisher="empirical"), plain(fisher="empirical")
    rng = np.random.default_rng(1)
    xa, ya = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    xb, yb = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    mse = keras.losses.MeanSquaredError(reduction="sum")

    @tf.function
    def step():
        if tapes == "one tape each":
            with tf.GradientTape() as tape_a, tf.GradientTape() as tape_b:
                loss_a, loss_b = sce(ya, a(xa, training=True)), mse(yb, b(xb, training=True))
            grads_a = tape_a.gradient(loss_a, a.trainable_variables)
            grads_b = tape_b.gradient(loss_b, b.trainable_variables)
        else:
            with tf.GradientTape(persistent=True) as tape:
                loss_a, loss_b = sce(ya, a(xa, training=True)), mse(yb, b(xb, training=True))
            grads_b = tape.gradient(loss_b, b.trainable_variables)
            grads_a = tape.gradient(loss_a, a.trainable_variables)
        opt_a.apply_gradients(zip(grads_a, a.trainable_variables))
        opt_b.apply_gradients(zip(grads_b, b.trainable_variables))

    def rows_a():
        return keras.losses.sparse_categorical_crossentropy(ya, a(xa, training=True),
                                                            from_logits=True)

    def rows_b():  # the summed loss: ℓᵢ is sample i's share of the sum, as it is
        return tf.reduce_mean(tf.square(yb - b(xb, training=True)), axis=-1)

    expected = {**reference.natural_gradient(rows_a, rows_a, blocks(a), DAMPING),
                **reference.natural_gradient(rows_b, rows_b, blocks(b), DAMPING)}
    # A summed loss: its gradient is Σᵢ uᵢ, i.e. m times the mean the reference preconditions.
    expected.update({v.path: expected[v.path] * 5 for v in b.trainable_variables})
    before = weights(a, b)
    step()
    assert_steps(before, weights(a, b), expected)


def test_one_loss_split_between_two_optimizers(float64):
    """One backward pass, two optimizers each given part of the variables (e.g. two learning
    rates): both use that pass, each for its own layers."""
    model = dense_net(5, 4, 3)
    first, second = plain(fisher="empirical"), plain(fisher="empirical")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = sce(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        first.apply_gradients(zip(grads[:2], model.trainable_variables[:2]))
        second.apply_gradients(zip(grads[2:], model.trainable_variables[2:]))

    def rows():
        return keras.losses.sparse_categorical_crossentropy(y, model(x, training=True),
                                                            from_logits=True)

    expected = reference.natural_gradient(rows, rows, blocks(model), DAMPING)
    before = weights(model)
    step()
    assert_steps(before, weights(model), expected)


def test_gradients_summed_from_two_passes_are_refused(float64):
    """Two tapes differentiate two losses with respect to the same variables and the optimizer
    gets their sum: no single Fisher belongs to it, so it says so instead of guessing."""
    model = dense_net(5, 4, 3)
    opt = plain(fisher="empirical")
    x, y = np.random.default_rng(3).normal(size=(8, 5)), np.arange(8) % 3
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step():
        with tf.GradientTape() as t1, tf.GradientTape() as t2:
            out = model(x, training=True)
            l1, l2 = sce(y, out), tf.reduce_mean(tf.square(out))
        g1 = t1.gradient(l1, model.trainable_variables)
        g2 = t2.gradient(l2, model.trainable_variables)
        opt.apply_gradients(zip([a + b for a, b in zip(g1, g2)], model.trainable_variables))

    with pytest.raises(capture.AmbiguousStepError, match="one tape.gradient call per step"):
        step()


def test_gradient_penalty_through_the_layers_is_refused(float64):
    """WGAN-GP: the loss holds a gradient of D, so D's gradient is not a sum of per-sample outer
    products; a clear error names the layer rather than an inexact step."""
    critic = dense_net(FEATURES, 5, 1)
    opt = plain(fisher="empirical")
    x = np.random.default_rng(4).normal(size=(M, FEATURES))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                inner.watch(x)
                out = critic(x, training=True)
            slope = inner.gradient(out, x)
            loss = tf.reduce_mean(out) + tf.reduce_mean(tf.square(tf.norm(slope, axis=1) - 1))
        grads = tape.gradient(loss, critic.trainable_variables)
        opt.apply_gradients(zip(grads, critic.trainable_variables))

    with pytest.raises(capture.AmbiguousStepError, match=r"'dense_\d+' \(Dense\).*gradient penalty"):
        step(tf.constant(x))


def test_input_gradient_for_logging_inside_the_tape_is_not_refused(float64):
    """A gradient taken inside the tape but not differentiated again (a saliency metric) leaves
    the step exact."""
    model = dense_net(5, 4, 3)
    opt = plain(fisher="empirical")
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(8, 5)), rng.integers(0, 3, 8)
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                inner.watch(x)
                out = model(x, training=True)
            saliency = inner.gradient(out, x)
            loss = sce(y, out)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return saliency

    def rows():
        return keras.losses.sparse_categorical_crossentropy(y, model(x, training=True),
                                                            from_logits=True)

    expected = reference.natural_gradient(rows, rows, blocks(model), DAMPING)
    before = weights(model)
    step(tf.constant(x))
    assert_steps(before, weights(model), expected)


def _capture_ops(fn, *args) -> list[str]:
    graph = tf.function(fn).get_concrete_function(*args).graph
    return [op.name for op in graph.get_operations() if "tengrad_capture" in op.name]


def _sgd_train_step(model, opt):
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    return step


def test_capture_lives_as_long_as_an_optimizer():
    """The patch is installed by the first TENGraD and removed when the last one is collected:
    an SGD model traced afterwards carries no capture op (and one traced before does: the check
    can fail)."""
    gc.collect()
    assert not capture.is_installed(), "a TENGraD/KFAC from an earlier test is still alive"
    originals = (keras.layers.Dense.call, keras.losses.Loss.__call__, tf.GradientTape.gradient)
    model = dense_net(5, 4, 3)
    opt = keras.optimizers.SGD(0.1)
    x, y = tf.zeros((4, 5)), tf.zeros((4, 3))
    first, second = TENGraD(), TENGraD()
    assert capture.is_installed() and keras.layers.Dense.call is not originals[0]
    assert _capture_ops(_sgd_train_step(model, opt), x, y)
    del first
    gc.collect()
    assert capture.is_installed()  # the second one still needs it
    # Inference traces (no tape) carry nothing, even while capture is installed.
    assert not _capture_ops(lambda x: model(x), x)
    del second
    gc.collect()
    assert not capture.is_installed()
    assert (keras.layers.Dense.call, keras.losses.Loss.__call__,
            tf.GradientTape.gradient) == originals
    assert not _capture_ops(_sgd_train_step(model, opt), x, y)


def test_a_fitted_model_releases_capture_with_its_optimizer():
    """A compiled and trained model holds its TENGraD; dropping the model drops the patch."""
    gc.collect()
    assert not capture.is_installed()
    model = dense_net(5, 4, 3)
    model.compile(optimizer=TENGraD(fisher="empirical"),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((8, 5)), np.zeros(8), batch_size=4, verbose=0)
    assert capture.is_installed()
    del model
    gc.collect()
    assert not capture.is_installed()
