"""Conv1D/Conv2D blocks against the float64 reference: every padding/stride/dilation/bias case.

Depthwise, grouped, separable, transposed and 3-D convolutions: tests/layers/test_conv.py."""

import itertools

import keras
import numpy as np
import pytest

from tengrad_tf.blocks import CacheKind, FisherBlock
from tests import reference
from tests.helpers import per_sample_sce, plain


def one_step_matches_reference(model, x, y, damping=0.05, lr=0.125):
    """Run one fit step (empirical Fisher, no momentum/clip) and compare with the reference."""
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - lr * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)
    return opt


def conv_model(conv, input_shape):
    return keras.Sequential([keras.Input(input_shape), conv, keras.layers.Flatten(),
                             keras.layers.Dense(3)])


CONV2D_CASES = [
    (padding, strides, dilation, bias)
    for padding, strides, dilation, bias in itertools.product(
        ["valid", "same"], [1, 2], [1, 2], [True, False])
    if not (strides > 1 and dilation > 1)  # Keras rejects both at once
] + [("same", (2, 1), 1, True), ("valid", 1, (2, 1), True)]


@pytest.mark.parametrize("padding, strides, dilation, bias", CONV2D_CASES)
def test_conv2d_block_is_exact(float64, padding, strides, dilation, bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 6, 2))
    y = rng.integers(0, 3, size=6)
    conv = keras.layers.Conv2D(3, (3, 2), padding=padding, strides=strides, dilation_rate=dilation,
                               use_bias=bias, activation="tanh")
    opt = one_step_matches_reference(conv_model(conv, (7, 6, 2)), x, y)
    assert opt.treatments()[conv.kernel.path].startswith("Conv block")


@pytest.mark.parametrize("padding, strides, dilation, bias", [
    (p, s, d, b) for p, s, d, b in itertools.product(
        ["valid", "same", "causal"], [1, 2], [1, 2], [True, False]) if not (s > 1 and d > 1)])
def test_conv1d_block_is_exact(float64, padding, strides, dilation, bias):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 9, 2))
    y = rng.integers(0, 3, size=5)
    conv = keras.layers.Conv1D(4, 3, padding=padding, strides=strides, dilation_rate=dilation,
                               use_bias=bias, activation="relu")
    one_step_matches_reference(conv_model(conv, (9, 2)), x, y)


@pytest.mark.parametrize("threshold, cache", [
    (np.inf, CacheKind.FACTORS), (np.inf, CacheKind.PER_SAMPLE), (0.0, CacheKind.PER_SAMPLE),
])
def test_both_gram_routes_and_both_caches_are_exact(float64, monkeypatch, threshold, cache):
    """Force route F / route E and each cache kind, over several steps of curvature reuse."""
    monkeypatch.setattr(FisherBlock, "factored_threshold", lambda self, p, c: threshold)
    monkeypatch.setattr(FisherBlock, "cache_kind", lambda self, p, capacity=None: cache)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 5, 5, 2))
    y = rng.integers(0, 3, size=6)
    model = conv_model(keras.layers.Conv2D(3, 3, padding="same", activation="tanh"), (5, 5, 2))
    one_step_matches_reference(model, x, y)


def test_dense_on_rank3_inputs_sums_over_positions(float64):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 3))
    y = rng.integers(0, 3, size=6)
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = one_step_matches_reference(model, x, y)
    assert "P=4" in opt.treatments()[model.layers[0].kernel.path]


def test_shared_layer_called_twice_is_exact(float64):
    rng = np.random.default_rng(4)
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh")
    h = shared(shared(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    x, y = rng.normal(size=(6, 4)), rng.integers(0, 3, size=6)
    opt = one_step_matches_reference(model, x, y)
    assert "called 2 times" in opt.treatments()[shared.kernel.path]


def test_small_cnn_with_batchnorm_and_pooling(float64):
    """Conv, BatchNorm (training mode), pooling, Dense, through fit.

    BatchNorm in training mode couples the samples, so the reference here uses the convention of
    DESIGN.md: uᵢ from âᵢ (for BatchNorm: x̂ᵢ, normalized with the batch statistics) and
    m·(∂L/∂z)ᵢ of the batch loss, built independently with a tape.
    """
    rng = np.random.default_rng(5)
    m = 6
    x = rng.normal(size=(m, 6, 6, 1))
    y = rng.integers(0, 3, size=m)
    conv = keras.layers.Conv2D(2, 3, padding="same")
    model = keras.Sequential([keras.Input((6, 6, 1)), conv, keras.layers.BatchNormalization(),
                              keras.layers.ReLU(), keras.layers.MaxPooling2D(2),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    import tensorflow as tf

    # Reference with BN coupling: per-sample rows of the batch-loss gradient at each pre-activation.
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        z1 = conv(tf.constant(x))
        h = z_bn = model.layers[1](z1, training=True)
        for layer in model.layers[2:-1]:
            h = layer(h)
        z2 = model.layers[-1](h)
        loss = tf.reduce_mean(per_sample_sce(y, z2))
    grads = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
    g1, g2, g_bn = (m * t.numpy() for t in tape.gradient(loss, [z1, z2, z_bn]))
    patches = tf.image.extract_patches(tf.constant(x), [1, 3, 3, 1], [1, 1, 1, 1], [1, 1, 1, 1],
                                       "SAME").numpy().reshape(m, 36, 9)
    u1 = np.einsum("ipa,ipb->iab", np.concatenate([patches, np.ones((m, 36, 1))], 2),
                   g1.reshape(m, 36, 2)).reshape(m, -1)
    a2 = np.concatenate([h.numpy(), np.ones((m, 1))], 1)
    u2 = np.einsum("ia,ib->iab", a2, g2).reshape(m, -1)

    def direction(u, kernel, bias):
        gk, gb = grads[kernel.path].numpy(), grads[bias.path].numpy()
        g = np.concatenate([gk.reshape(-1, gk.shape[-1]), gb[None]], 0).ravel()
        d = np.linalg.solve(u.T @ u / m + 0.05 * np.eye(u.shape[1]), g).reshape(-1, gk.shape[-1])
        return {kernel.path: d[:-1].ravel(), bias.path: d[-1]}

    bn = model.layers[1]
    mean, var = z1.numpy().mean(axis=(0, 1, 2)), z1.numpy().var(axis=(0, 1, 2))
    x_hat = (z1.numpy() - mean) / np.sqrt(var + bn.epsilon)
    u_bn = np.concatenate([(x_hat * g_bn).sum(axis=(1, 2)), g_bn.sum(axis=(1, 2))], axis=1)
    g = np.concatenate([grads[bn.gamma.path].numpy(), grads[bn.beta.path].numpy()])
    d_bn = np.linalg.solve(u_bn.T @ u_bn / m + 0.05 * np.eye(4), g)

    dense = model.layers[-1]
    expected = {p: grads[p].numpy().ravel() for p in grads}
    expected.update(direction(u1, conv.kernel, conv.bias))
    expected.update(direction(u2, dense.kernel, dense.bias))
    expected.update({bn.gamma.path: d_bn[:2], bn.beta.path: d_bn[2:]})
    before = {v.path: v.numpy().ravel() for v in variables}
    opt = plain(learning_rate=0.125, damping=0.05, fisher="empirical", first_order="sgd")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v in variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - 0.125 * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)
    bn_treatments = [t for p, t in opt.treatments().items() if "batch_normalization" in p]
    assert len(bn_treatments) == 2
    assert all(t.startswith("BatchNormalization block") for t in bn_treatments)
