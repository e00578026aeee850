"""Small blocks (d ≤ DIRECT_MAX_DIM) cache their explicit inverse, by the cheaper of two solves."""

import keras
import numpy as np
import pytest

from tengrad_tf.blocks import CacheKind, FisherBlock
from tengrad_tf.blocks import base
from tests import reference
from tests.blocks.test_conv import conv_model, one_step_matches_reference
from tests.helpers import data, mlp, per_sample_sce, plain


@pytest.mark.parametrize("m", [40, 8])  # d = 6·4 = 24 and 5·3 = 15 (+ bias): m ≥ d and m < d
def test_dense_inverse_is_exact_with_both_solves(float64, direct_inverse, m):
    model = mlp(inputs=5, hidden=4)
    x, y = data(m)
    opt = one_step_matches_reference(model, x, y)
    treatment = opt.treatments()[model.layers[0].kernel.path]
    assert "caches the explicit inverse" in treatment and "direct 24×24 solve" in treatment


@pytest.mark.parametrize("m", [30, 6])  # Conv2D 2→3 channels, 3×2 kernel: d = 13·3 = 39
def test_conv_inverse_is_exact_with_both_solves(float64, direct_inverse, m):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m, 5, 4, 2))
    y = rng.integers(0, 3, size=m)
    conv = keras.layers.Conv2D(3, (3, 2), padding="same", activation="tanh")
    opt = one_step_matches_reference(conv_model(conv, (5, 4, 2)), x, y)
    assert "caches the explicit inverse" in opt.treatments()[conv.kernel.path]


def test_inverse_is_reused_between_updates(float64, direct_inverse):
    """Step 1 preconditions its own gradient with step 0's cached inverse."""
    lr, damping = 0.125, 0.05
    model = mlp()
    x, y = data(16)
    x0, y0, x1, y1 = x[:8], y[:8], x[8:], y[8:]
    opt = plain(learning_rate=lr, damping=damping, curvature_update_freq=2, fisher="empirical")
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Curvature of step 0: batch 0's per-sample gradients at the initial weights.
    u0 = reference.per_sample_gradients(model, x0, y0, per_sample_sce, model.trainable_variables)
    model.fit(x0, y0, batch_size=8, epochs=1, shuffle=False, verbose=0)
    _, g1 = reference.reference_directions(model, x1, y1, y1, per_sample_sce, damping)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    model.fit(x1, y1, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for kernel, bias in reference.layer_blocks(model):
        step0 = [u0[kernel.path], u0[bias.path]]
        d_kernel, d_bias = reference.block_direction(step0, [g1[kernel.path], g1[bias.path]],
                                                     damping)
        for v, d in ((kernel, d_kernel), (bias, d_bias)):
            np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - lr * d, rtol=1e-9,
                                       atol=1e-12, err_msg=v.path)


def test_threshold_picks_the_inverse_only_for_small_blocks(direct_inverse):
    small, large = keras.layers.Dense(32), keras.layers.Dense(64)
    small.build((None, 31))  # d = 32·32 = 1024
    large.build((None, 32))  # d = 33·64
    assert FisherBlock(small).cache_kind(1) is CacheKind.INVERSE
    assert FisherBlock(large).cache_kind(1) is CacheKind.FACTORS
    assert base.DIRECT_MAX_DIM == 1024
    # Under adaptive damping a new λ rebuilds the inverse: only up to d ≤ 4m (cost.keeps_inverse).
    adaptive = FisherBlock(small, adaptive_damping=True)
    assert adaptive.cache_kind(1, capacity=256) is CacheKind.INVERSE
    assert adaptive.cache_kind(1, capacity=255) is CacheKind.FACTORS
    assert adaptive.cache_kind(1) is CacheKind.INVERSE  # a dynamic batch: d ≤ DIRECT_MAX_DIM
    assert FisherBlock(small).cache_kind(1, capacity=8) is CacheKind.INVERSE
    adaptive.input_repeats = 10  # fisher="exact": C rows per sample, m = 10·capacity
    assert adaptive.cache_kind(1, capacity=26) is CacheKind.INVERSE


@pytest.mark.parametrize("freq", [1, 2])
@pytest.mark.parametrize("fisher_blocks", ["layer", "network"])
@pytest.mark.parametrize("cache", ["factored", "inverse"])
def test_lagged_curvature_preconditions_with_the_previous_update(float64, monkeypatch, freq,
                                                                fisher_blocks, cache):
    """lagged_curvature=True: step t takes the Fisher of the last update *before* it (step 0, with
    none cached, its own), and each update's Fisher is kept for the steps after. Simulated in
    numpy from explicit per-sample gradients; the same batch's Fisher would miss it by far."""
    if cache == "inverse":
        monkeypatch.setattr(base, "DIRECT_MAX_DIM", 1024)
    m, lr, damping, batches = 8, 0.1, 0.05, 5
    x, y = data(m * batches, seed=3)
    keras.utils.set_random_seed(0)
    model = mlp()
    init = model.get_weights()
    opt = plain(learning_rate=lr, damping=damping, curvature_update_freq=freq,
                fisher="empirical", fisher_blocks=fisher_blocks, lagged_curvature=True)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)

    twin = mlp()
    twin.set_weights(init)
    variables = twin.trainable_variables
    blocks = ([tuple(variables)] if fisher_blocks == "network" else
              [tuple(v for v in b if v is not None) for b in reference.layer_blocks(twin)])
    kept, own_batch_differs = None, False
    for step in range(batches):
        xb, yb = x[step * m:(step + 1) * m], y[step * m:(step + 1) * m]
        rows = reference.per_sample_gradients(twin, xb, yb, per_sample_sce, variables)
        update = step % freq == 0
        preconditioner = rows if kept is None else kept
        if update:
            kept = rows
        differs = reference.plain_step(blocks, preconditioner, rows, damping, lr)
        own_batch_differs |= update and step > 0 and differs
    assert own_batch_differs
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    if fisher_blocks == "layer":  # (the network's one solve never keeps an inverse)
        kinds = [opt.treatments()[v.path] for v in model.trainable_variables]
        assert any("explicit inverse" in k for k in kinds) == (cache == "inverse")
