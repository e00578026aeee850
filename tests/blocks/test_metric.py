"""damping_metric="inputs" (tengrad_tf/blocks/metric.py): d = (F + λ·D_A ⊗ I)⁻¹ g, exactly.

The reference forms D_A itself, from the layer's input rows taken out of the model (a sub-model's
activations for Dense, tf.image.extract_patches for Conv2D), and solves the dense
(d × d) system with numpy (tests/reference.py). It would catch a D_A of the wrong batch or scale,
a missing bias column, transposed patches, or a whitening undone on the wrong side.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD, adaptive
from tengrad_tf.blocks import CacheKind, FisherBlock, metric
from tests import reference
from tests.reference import conv_rows, dense_rows
from tests.helpers import DAMPING, LR, data, mlp, per_sample_sce, plain, sce, weights
from tests.layers.exactness import fit_matches_reference, treatment


def metrics_of(model, x, rows_of):
    """The reference's D_A ⊗ I (tests/reference.py) at the package's γ."""
    return reference.layer_metrics(model, x, rows_of, metric.IDENTITY_SHARE)


def conv_model(use_bias=True):
    return keras.Sequential([
        keras.Input((5, 4, 2)),
        keras.layers.Conv2D(3, (3, 2), padding="same", activation="tanh", use_bias=use_bias),
        keras.layers.Conv2D(2, 2, activation="tanh", use_bias=use_bias),
        keras.layers.Flatten(),
        keras.layers.Dense(3, use_bias=use_bias),
    ])


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_step_is_the_exact_solve_with_the_input_metric(float64, fixed_sampled_labels,
                                                            fisher_type, use_bias):
    model = mlp(use_bias=use_bias, inputs=5, hidden=4)
    x, y = data(6)  # m < d: the factored Woodbury caches, in whitened coordinates
    metrics = metrics_of(model, x, {layer: dense_rows for layer in model.layers})
    fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels, metrics=metrics,
                          damping_metric="inputs")


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("max_batch_size", [None, 9])
def test_wide_dense_layers_solve_through_the_batchs_rows(float64, fixed_sampled_labels, fisher_type,
                                                         use_bias, max_batch_size):
    """n = 6 rows < D_in (13 and 11): D_A⁻¹ through the rows' 6 × 6 matrix (metric_rows.py), also
    with the cache zero-padded to a capacity of 9."""
    model = mlp(use_bias=use_bias, inputs=12, hidden=10)
    x, y = data(6, inputs=12)
    metrics = metrics_of(model, x, {layer: dense_rows for layer in model.layers})
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels, metrics=metrics,
                                damping_metric="inputs", max_batch_size=max_batch_size)
    for layer in model.layers:
        assert treatment(opt, layer).endswith("damping metric D_A ⊗ I, through the batch's rows)")


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_conv_step_is_the_exact_solve_with_the_input_metric(float64, fixed_sampled_labels,
                                                           fisher_type, use_bias):
    model = conv_model(use_bias)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 5, 4, 2)), rng.integers(0, 3, size=6)
    conv_a, conv_b, _, dense = model.layers
    metrics = metrics_of(model, x, {conv_a: conv_rows, conv_b: conv_rows, dense: dense_rows})
    fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels, metrics=metrics,
                          damping_metric="inputs")


@pytest.mark.parametrize("threshold, cache", [
    (np.inf, CacheKind.FACTORS), (np.inf, CacheKind.PER_SAMPLE), (0.0, CacheKind.PER_SAMPLE),
])
def test_both_conv_gram_routes_and_caches_whiten_alike(float64, fixed_sampled_labels, monkeypatch,
                                                       threshold, cache):
    """Route F (patches) and route E (explicit J), and each cache kind, take the same D."""
    monkeypatch.setattr(FisherBlock, "factored_threshold", lambda self, p, c: threshold)
    monkeypatch.setattr(FisherBlock, "cache_kind", lambda self, p, capacity=None: cache)
    model = conv_model()
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 5, 4, 2)), rng.integers(0, 3, size=6)
    conv_a, conv_b, _, dense = model.layers
    metrics = metrics_of(model, x, {conv_a: conv_rows, conv_b: conv_rows, dense: dense_rows})
    fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels, metrics=metrics,
                          damping_metric="inputs")


def test_dense_on_sequences_takes_the_rows_of_every_position(float64, fixed_sampled_labels):
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4, 3)), rng.integers(0, 3, size=6)
    first, _, last = model.layers
    positions = lambda layer, inputs: dense_rows(layer, np.reshape(inputs, (-1, 3)))  # noqa: E731
    metrics = metrics_of(model, x, {first: positions, last: dense_rows})
    fit_matches_reference(model, x, y, "true", fixed_sampled_labels, metrics=metrics,
                          damping_metric="inputs")


@pytest.mark.parametrize("m", [40, 8])  # d = 24 for the first layer: direct and Woodbury inverse
def test_small_blocks_invert_f_plus_lambda_d_explicitly(float64, fixed_sampled_labels,
                                                         direct_inverse, m):
    model = mlp(inputs=5, hidden=4)
    x, y = data(m)
    metrics = metrics_of(model, x, {layer: dense_rows for layer in model.layers})
    opt = fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels, metrics=metrics,
                                damping_metric="inputs")
    assert "caches the explicit inverse" in opt.treatments()[model.layers[0].kernel.path]


def test_the_identity_metric_would_fail_the_same_check(float64, fixed_sampled_labels):
    """The comparison can fail: D = I gives a step that the input-metric reference rejects."""
    model = mlp(inputs=5, hidden=4)
    x, y = data(6, seed=3)
    x = x * np.array([3.0, 1.0, 0.2, 1.0, 0.5]) + 0.7  # inputs far from isotropic
    metrics = metrics_of(model, x, {layer: dense_rows for layer in model.layers})
    with pytest.raises(AssertionError):
        fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels, metrics=metrics)


@pytest.mark.parametrize("inputs, hidden", [(5, 4), (12, 10)])  # whitened; through the rows
def test_reused_curvature_keeps_its_batchs_metric(float64, inputs, hidden):
    """Between updates the cached curvature and its D_A, both of the update's batch, precondition
    the new gradient."""
    model = mlp(inputs=inputs, hidden=hidden)
    x, y = data(16, inputs=inputs)
    x0, y0, x1, y1 = x[:8], y[:8], x[8:], y[8:]
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    opt = plain(learning_rate=LR, damping=DAMPING, curvature_update_freq=2, fisher="empirical",
                damping_metric="inputs")
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(x0, y0)
    # The reference: step 0 as a plain step; step 1's gradient with step 0's Fisher and metric,
    # both at step 0's weights.
    variables = shadow.trainable_variables
    fisher_rows = reference.per_sample_gradients(shadow, x0, y0, per_sample_sce, variables)
    metrics = metrics_of(shadow, x0, {layer: dense_rows for layer in shadow.layers})
    blocks = [tuple(layer.trainable_weights) for layer in shadow.layers]
    for step, (xb, yb) in enumerate(((x0, y0), (x1, y1))):
        rows = reference.per_sample_gradients(shadow, xb, yb, per_sample_sce, variables)
        reference.plain_step(blocks, fisher_rows, rows, DAMPING, LR, metrics=metrics)
        if step == 0:
            for path, w in weights(shadow).items():
                np.testing.assert_allclose(weights(model)[path], w, rtol=1e-9, atol=1e-12)
    model.train_on_batch(x1, y1)
    for path, w in weights(shadow).items():
        np.testing.assert_allclose(weights(model)[path], w, rtol=1e-9, atol=1e-12, err_msg=path)


def test_subspace_measures_the_damping_in_the_metric():
    """M(s) = −gᵀs + ½ sᵀ(F + λD)s with D = LLᵀ, from U_bᵀv and Lᵀv as the blocks give them."""
    rng = np.random.default_rng(0)
    g, d, p = ([tf.constant(rng.normal(size=3), tf.float64)] for _ in range(3))
    u = tf.constant(rng.normal(size=(4, 3)), tf.float64)  # m = 4 rows of U
    low = np.tril(rng.normal(size=(3, 3))) + 3 * np.eye(3)  # L, D = LLᵀ
    lam = tf.constant(0.3, tf.float64)
    blocks = [(lambda v: tf.linalg.matvec(u, v[0])[:, None], lam, [0],
               lambda v: [tf.linalg.matvec(tf.constant(low.T), v[0])])]
    sub = adaptive.Subspace.of(blocks, d, p, g)
    c = u.numpy().T @ u.numpy() / 4 + 0.3 * low @ low.T
    dn, pn, gn = d[0].numpy(), p[0].numpy(), g[0].numpy()
    np.testing.assert_allclose(sub.gram.numpy(), [[dn @ c @ dn, dn @ c @ pn],
                                                   [pn @ c @ dn, pn @ c @ pn]], rtol=1e-12)
    s = 0.7 * dn - 0.2 * pn
    np.testing.assert_allclose(adaptive.model_value(blocks, [tf.constant(s)], g).numpy(),
                               -gn @ s + 0.5 * s @ c @ s, rtol=1e-12)


def test_summary_names_each_blocks_metric():
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    opt = TENGraD(damping_metric="inputs")
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(np.array([[1, 2, 3], [4, 5, 0]]), np.array([0, 1]))
    treatments = opt.treatments()
    assert treatments[model.layers[2].kernel.path].endswith(
        "damping metric D_A ⊗ I, through the batch's rows)")  # 2 rows < D_in = 13
    assert "damping metric I: its per-sample gradients are not input rows times output rows" in (
        treatments[model.layers[0].embeddings.path])
    plain_opt = TENGraD(damping_metric="identity")
    model.compile(optimizer=plain_opt, loss=sce())
    model.train_on_batch(np.array([[1, 2, 3], [4, 5, 0]]), np.array([0, 1]))
    assert "damping metric" not in plain_opt.treatments()[model.layers[2].kernel.path]


@pytest.mark.parametrize("kwargs, resolved", [
    ({}, "inputs"), (dict(fisher_blocks="network"), "identity"),
    (dict(curvature_batches=2), "identity"), (dict(damping_metric="identity"), "identity"),
])
def test_the_default_metric_is_the_inputs_where_it_applies(kwargs, resolved):
    """damping_metric="auto": D_A ⊗ I with one block per layer and one batch's Fisher, λI under
    the network's shared solve or a window of batches (which would mix metrics); summary() says
    which each block takes."""
    opt = TENGraD(**kwargs)
    assert opt.resolved_damping_metric() == resolved
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(np.ones((2, 3), "float32"), np.array([0, 1]))
    described = "damping metric D_A ⊗ I" in opt.treatments()[model.layers[0].kernel.path]
    assert described == (resolved == "inputs")


def test_wide_inputs_take_the_rows_form_or_keep_the_identity_and_say_so():
    """D_in > MAX_INPUT_DIM: no L_A; a Dense layer with one row per sample solves through its
    rows, and under fisher="exact" (each input row repeated per class) it keeps λI."""
    model = keras.Sequential([keras.Input((metric.MAX_INPUT_DIM,)), keras.layers.Dense(2)])
    x, y = np.ones((2, metric.MAX_INPUT_DIM), "float32"), np.array([0, 1])
    opt = TENGraD(damping_metric="inputs")
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(x, y)
    assert opt.treatments()[model.layers[0].kernel.path].endswith("through the batch's rows)")
    opt = TENGraD(damping_metric="inputs", fisher="exact")
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(x, y)
    assert (f"damping metric I: D_in = {metric.MAX_INPUT_DIM + 1} > {metric.MAX_INPUT_DIM}, and "
            "its rows are not one per sample") in opt.treatments()[model.layers[0].kernel.path]


@pytest.mark.parametrize("inputs", [3, 6])  # 4 rows: whitened; through the rows
def test_zero_inputs_take_the_identity_not_nan(float64, inputs):
    """A layer whose inputs are all zero (no bias) has ā = 0: D_A is I, and the step is finite."""
    model = keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(2, use_bias=False)])
    opt = plain(damping_metric="inputs", fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    model.train_on_batch(np.zeros((4, inputs)), np.array([0, 1, 0, 1]))
    assert np.all(np.isfinite(model.layers[0].kernel.numpy()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(damping_metric="kronecker"), "damping_metric"),
    (dict(damping_metric="inputs", fisher_blocks="network"), "fisher_blocks='layer'"),
    (dict(damping_metric="inputs", curvature_batches=2), "curvature_batches=1"),
])
def test_bad_metric_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TENGraD(**kwargs)


def test_config_round_trip():
    opt = TENGraD(damping_metric="inputs")
    assert TENGraD.from_config(opt.get_config()).damping_metric == "inputs"
    assert TENGraD().get_config()["damping_metric"] == "auto"
    assert TENGraD.from_config(TENGraD().get_config()).resolved_damping_metric() == "inputs"
