"""Robustness: bad numbers, ill-conditioned Grams, degenerate shapes, awkward models and memory
bounds (bad configuration: test_validation.py).

Every "works" case is checked exactly (float64, rtol 1e-9) against the independent reference in
tests/reference.py; every "does not work" case must fail with a message that names the culprit.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import KFAC, TENGraD, callbacks, fisher
from tests import helpers, reference
from tests.helpers import (DAMPING, LR, data, mlp, per_sample_sce, sce, tensor_sizes, train_step,
                           weights)


def plain(**kw):
    """One exact natural-gradient step per call: no momentum, clipping or reuse; d = g for
    variables without a block, as the reference has it."""
    return helpers.plain(**{"learning_rate": LR, "damping": DAMPING, "first_order": "sgd", **kw})


def assert_step(before, after, expected, lr=LR, rtol=1e-9, atol=1e-12):
    assert set(expected) == set(after)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=rtol, atol=atol,
                                   err_msg=path)


def labels_per_loss(monkeypatch, by_loss: dict):
    """The true Fisher's sampled labels, fixed per loss object (several outputs, several losses)."""
    monkeypatch.setattr(fisher, "sample_labels",
                        lambda loss, y_pred, seed=None: tf.constant(by_loss[id(loss)]))


def fit_one_step(model, x, y, loss, per_sample_loss, fisher_type, y_fisher, monkeypatch, m=None,
                 penalty=None, **fit_kwargs):
    """One `fit` step of TENGraD against the reference; y_fisher: the true Fisher's labels."""
    if fisher_type == "true":
        losses = loss if isinstance(loss, (list, tuple)) else [loss]
        fixed = y_fisher if isinstance(loss, (list, tuple)) else [y_fisher]
        labels_per_loss(monkeypatch, {id(l): f for l, f in zip(losses, fixed)})
    else:
        y_fisher = y
    expected, _ = reference.reference_directions(model, x, y, y_fisher, per_sample_loss, DAMPING,
                                                 penalty=penalty)
    before = weights(model)
    opt = plain(fisher=fisher_type)
    model.compile(optimizer=opt, loss=loss, **fit_kwargs.pop("compile", {}))
    m = m or len(np.asarray(y if not isinstance(y, (list, tuple)) else y[0]))
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0, **fit_kwargs)
    assert_step(before, weights(model), expected)
    return opt


@pytest.mark.parametrize("cls", [TENGraD, KFAC])
@pytest.mark.parametrize("loss", ["huber", "function"])
def test_true_fisher_with_a_loss_it_cannot_sample_fails_at_the_first_step(cls, loss):
    def my_loss(y_true, y_pred):
        return keras.ops.mean(keras.ops.abs(y_true - y_pred), axis=-1)

    model = mlp()
    model.compile(optimizer=cls(fisher="true"),
                  loss=keras.losses.Huber() if loss == "huber" else my_loss)
    x, _ = data(8)
    with pytest.raises(fisher.UnsupportedLossError, match="fisher='empirical'") as err:
        model.fit(x, np.zeros((8, 3)), verbose=0)
    assert ("huber" if loss == "huber" else "my_loss") in str(err.value)



def test_true_fisher_ignores_losses_that_were_not_differentiated(float64, monkeypatch):
    """A loss computed only to monitor (here Huber, which the true Fisher cannot sample) is
    neither sampled nor counted: the step is the exact one of the differentiated loss."""
    x, y = data(8)
    y_hat = (y + 1) % 3
    model = mlp()
    expected, _ = reference.reference_directions(model, x, y, y_hat, per_sample_sce, DAMPING)
    before = weights(model)
    train_loss, monitor_loss = sce(), keras.losses.Huber()
    labels_per_loss(monkeypatch, {id(train_loss): y_hat})
    opt = plain(fisher="true")

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(xb, training=True)
            loss = train_loss(yb, logits)
            monitor = monitor_loss(tf.one_hot(yb, 3, dtype=logits.dtype), logits)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return monitor

    step(tf.constant(x), tf.constant(y))
    assert_step(before, weights(model), expected)


# =========================================================================== bad numbers
def snapshot(model, opt) -> dict[str, np.ndarray]:
    """Every variable a step may write, except the skip counters: the model's (all of them), the
    optimizer's (iterations, momentum, damping_retries, ...) and each block's curvature state."""
    out = {f"model/{v.path}": v.numpy().copy() for v in model.variables}
    out.update({f"opt/{v.path}": v.numpy().copy() for v in opt.variables
                if v.name not in ("skipped_steps", "consecutive_skips")})
    for i, block in enumerate(opt._blocks.values()):
        out.update({f"block{i}/{k}": v.numpy().copy() for k, v in block.state_variables.items()})
    return out


class DropsHugeRows(keras.Model):
    """Rows whose first feature is huge are zeroed after the hidden layer: their output gradient
    there is exactly 0, so the loss and every gradient stay finite (1e30 · 0 = 0), but the hidden
    layer's Gram entry (âᵢ·âᵢ)(gᵢ·gᵢ) overflows to inf · 0 = NaN in float32: a NaN in a factor
    only."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        keep = keras.ops.abs(x[:, :1]) < 1e6
        return self.out(keras.ops.where(keep, self.hidden(x), 0.0))


def bad_batch(source):
    """(model, loss, good x, good y, bad x, bad y) for each source of non-finite numbers."""
    x, y = data(8)
    if source == "nan_input":
        bad = x.copy()
        bad[3, 1] = np.nan
        return mlp(), sce(), x, y, bad, y
    if source == "inf_label_mse":
        targets = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
        bad = targets.copy()
        bad[2, 0] = np.inf
        return mlp(), keras.losses.MeanSquaredError(), x, targets, x, bad
    model = DropsHugeRows()
    model(x)
    bad = x.copy()
    bad[5, 0] = 1e30
    return model, sce(), x, y, bad, y


@pytest.mark.parametrize("source, cls, fisher_type, freq", [
    ("nan_input", TENGraD, "empirical", 1),
    ("nan_input", TENGraD, "true", 2),  # the bad step reuses the cached curvature
    ("nan_input", KFAC, "true", 1),
    ("inf_label_mse", TENGraD, "empirical", 1),
    ("inf_label_mse", TENGraD, "true", 1),
    ("nan_factor_only", TENGraD, "empirical", 1),
    ("nan_factor_only", TENGraD, "true", 1),
])
def test_non_finite_step_changes_nothing_and_is_counted(source, cls, fisher_type, freq):
    model, loss, x, y, bad_x, bad_y = bad_batch(source)
    if source == "nan_factor_only":  # the premise: the gradient itself is finite
        with tf.GradientTape() as tape:
            value = loss(bad_y, model(bad_x, training=True))
        assert all(np.isfinite(g.numpy()).all()
                   for g in tape.gradient(value, model.trainable_variables))
    kw = (dict(curvature_update_freq=freq) if cls is TENGraD else
          dict(cov_update_freq=freq, inv_update_freq=freq))
    opt = cls(fisher=fisher_type, **kw)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = snapshot(model, opt)
    model.fit(bad_x, bad_y, batch_size=8, epochs=1, verbose=0)
    after = snapshot(model, opt)
    assert set(after) == set(before)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert (int(opt.skipped_steps), int(opt.consecutive_skips)) == (1, 1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # a good step resets the run of skips
    assert (int(opt.skipped_steps), int(opt.consecutive_skips), int(opt.iterations)) == (1, 0, 2)
    assert any(not np.array_equal(v.numpy(), before[f"model/{v.path}"])
               for v in model.trainable_variables)


def test_too_many_skips_in_a_row_stop_training_with_the_reason():
    model, loss, x, y, bad_x, _ = bad_batch("nan_input")
    opt = TENGraD(fisher="empirical", max_consecutive_skips=3)
    model.compile(optimizer=opt, loss=loss)
    # Two bad steps, a good one, two bad ones: never 3 in a row.
    stream = np.concatenate([bad_x, bad_x, x, bad_x, bad_x])
    model.fit(stream, np.tile(y, 5), batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert (int(opt.skipped_steps), int(opt.consecutive_skips)) == (4, 2)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="3 steps in a row had a non-finite gradient"):
        model.fit(bad_x, y, batch_size=8, epochs=1, verbose=0)


def test_step_counters_callback_puts_the_counters_into_the_logs():
    model, loss, x, y, bad_x, _ = bad_batch("nan_input")
    model.compile(optimizer=TENGraD(fisher="empirical"), loss=loss)
    stream = np.concatenate([x, bad_x, x, x])
    history = model.fit(stream, np.tile(y, 4), batch_size=8, epochs=2, shuffle=False, verbose=0,
                        callbacks=[callbacks.StepCounters()])
    assert history.history["skipped_steps"] == [1, 2]
    assert history.history["damping_retries"] == [0, 0]
    sgd = mlp()
    sgd.compile(optimizer="sgd", loss=loss)
    with pytest.raises(TypeError, match="TENGraD"):
        sgd.fit(x, y, verbose=0, callbacks=[callbacks.StepCounters()])


# =========================================================================== ill-conditioned Gram
def ill_conditioned(case):
    """Inputs whose Gram mλI + K is singular for λ → 0 (K of rank < m)."""
    x, y = data(8)
    if case == "duplicated_samples":
        x, y = np.concatenate([x[:4], x[:4]]), np.concatenate([y[:4], y[:4]])
    elif case == "zero_inputs":
        x = np.zeros_like(x)  # first layer: only the bias column is nonzero, K = G Gᵀ
    # "more_samples_than_parameters": a 1-input first layer has D = 2·4 = 8 ≤ m = 16.
    model = mlp(inputs=1) if case == "more_samples_than_parameters" else mlp()
    if case == "more_samples_than_parameters":
        x, y = data(16, inputs=1)
    return model, x, y


CASES_ILL = ["duplicated_samples", "zero_inputs", "more_samples_than_parameters"]


@pytest.mark.parametrize("case", CASES_ILL)
def test_singular_gram_is_exact_at_ordinary_damping(float64, monkeypatch, case):
    model, x, y = ill_conditioned(case)
    opt = fit_one_step(model, x, y, sce(), per_sample_sce, "empirical", None, monkeypatch)
    assert int(opt.damping_retries) == 0 and int(opt.skipped_steps) == 0


@pytest.mark.parametrize("case", CASES_ILL)
def test_singular_gram_at_tiny_damping_recovers_with_more_damping(float64, case):
    """λ = 1e-30: m·λ is far below the rounding of K, so the Cholesky factorization fails. The
    retry raises λ to where it succeeds (counted), and the step is the exact natural gradient at
    the λ' actually used, to the accuracy this conditioning (‖F‖/λ' ≈ 1e13) allows."""
    model, x, y = ill_conditioned(case)
    before = weights(model)
    per = reference.per_sample_gradients(model, x, y, per_sample_sce, model.trainable_variables)
    opt = plain(fisher="empirical", damping=1e-30)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    assert int(opt.skipped_steps) == 0 and int(opt.damping_retries) >= 1
    retried = 0
    for block in opt._blocks.values():
        used = float(block.state_variables["damping"].numpy())
        retried += used > 1e-30
        names = [v.path for v in block.variables]
        g = [per[p].mean(axis=0) for p in names]
        u = np.concatenate([per[p] for p in names], axis=1).T  # (D, m)
        g = np.concatenate(g)
        got = np.concatenate([(before[p] - after[p]) / LR for p in names])
        assert np.isfinite(got).all() and got @ g > 0  # a descent direction
        # At the λ' used the damped system is still ill-conditioned (κ = ‖F + λ'I‖/λ' ≈ 1e13):
        # any float64 solve, the reference's included, is accurate to about κ·ε only.
        fisher_ = u @ u.T / u.shape[1]
        kappa = (np.linalg.eigvalsh(fisher_).max() + used) / used
        d = np.linalg.solve(fisher_ + used * np.eye(len(g)), g)
        assert np.linalg.norm(got - d) <= 10 * kappa * np.finfo(float).eps * np.linalg.norm(d)
    assert retried >= 1


# =========================================================================== degenerate shapes
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_batch_of_one(float64, monkeypatch, fisher_type):
    x, y = data(1)
    fit_one_step(mlp(), x, y, sce(), per_sample_sce, fisher_type, (y + 1) % 3, monkeypatch)


def simulate(model, batches, freq, fisher_batches=None):
    """The expected weights after plain steps (no momentum, no clip) on `batches`, curvature from
    the batch of every `freq`-th step (reused in between), by the reference."""
    cached = None
    for t, (xb, yb) in enumerate(batches):
        variables = model.trainable_variables
        per = reference.per_sample_gradients(model, xb, yb, per_sample_sce, variables)
        g = {p: v.mean(axis=0) for p, v in per.items()}
        if t % freq == 0:
            yf = yb if fisher_batches is None else fisher_batches[t]
            cached = per if fisher_batches is None else reference.per_sample_gradients(
                model, xb, yf, per_sample_sce, variables)
        for kernel, bias in reference.layer_blocks(model):
            d = reference.block_direction([cached[kernel.path], cached[bias.path]],
                                          [g[kernel.path], g[bias.path]], DAMPING)
            for v, dv in zip((kernel, bias), d):
                v.assign(v.numpy() - LR * dv.reshape(v.shape))
    return weights(model)


def fixed_labels_per_batch(monkeypatch, fisher_batches):
    """The true Fisher's labels of step t are fisher_batches[t] (the step's batch size varies)."""
    steps = iter(range(len(fisher_batches)))

    def sample(loss, y_pred, seed=None):
        return tf.reshape(tf.numpy_function(lambda: fisher_batches[next(steps)], [], tf.int64),
                          [-1])

    monkeypatch.setattr(fisher, "sample_labels", sample)


@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("sizes", [(4, 4, 2), (3, 6, 2)], ids=["last_partial", "changing"])
def test_partial_and_changing_batch_sizes_in_fit(float64, monkeypatch, sizes, fisher_type, freq):
    """fit with a last partial batch, and a dataset whose batch size changes every step; with
    freq 3 the later batches are preconditioned with the curvature of a batch of another size."""
    x, y = data(sum(sizes), seed=2)
    cuts = np.cumsum((0,) + sizes)
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    fisher_batches = None
    if fisher_type == "true":
        fisher_batches = [(yb + 1 + t) % 3 for t, (_, yb) in enumerate(batches)]
        fixed_labels_per_batch(monkeypatch, fisher_batches)
    model = mlp()
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    expected = simulate(shadow, batches, freq, fisher_batches)
    opt = plain(fisher=fisher_type, curvature_update_freq=freq)
    model.compile(optimizer=opt, loss=sce())
    if sizes == (4, 4, 2):
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    else:
        dataset = tf.data.Dataset.from_generator(
            lambda: iter(batches), output_signature=(tf.TensorSpec((None, 5), tf.float64),
                                                     tf.TensorSpec((None,), tf.int64)))
        model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    assert int(opt.iterations) == 3
    for (path, w), v in zip(expected.items(), weights(model).values()):
        np.testing.assert_allclose(v, w, rtol=1e-9, atol=1e-12, err_msg=path)


def test_static_batch_cache_takes_smaller_batches_and_refuses_larger_ones(float64):
    """A custom loop traced per shape: the cache capacity is the first batch (6); a batch of 3 is
    zero-padded exactly; a batch of 8 cannot fit and says so."""
    x, y = data(17, seed=4)
    batches = [(x[:6], y[:6]), (x[6:9], y[6:9])]
    model = mlp()
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    expected = simulate(shadow, batches, freq=1)
    step = train_step(model, plain(fisher="empirical"))
    for xb, yb in batches:
        step(tf.constant(xb), tf.constant(yb))
    for (path, w), v in zip(expected.items(), weights(model).values()):
        np.testing.assert_allclose(v, w, rtol=1e-9, atol=1e-12, err_msg=path)
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match="does not fit the curvature cache"):
        step(tf.constant(x[9:]), tf.constant(y[9:]))


@pytest.mark.parametrize("kind", ["output_times_zero", "dead_relu"])
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_layer_with_zero_output_gradient(float64, monkeypatch, kind, fisher_type):
    """G = 0 for one layer: its Gram is 0, mλI + 0 is fine, and its direction is g/λ = 0."""
    if kind == "output_times_zero":
        branch = [keras.layers.Dense(4), keras.layers.Rescaling(0.0)]
    else:
        branch = [keras.layers.Dense(4, activation="relu",
                                     bias_initializer=keras.initializers.Constant(-100.0))]
    inputs = keras.Input((5,))
    live = keras.layers.Dense(3, activation="tanh")(inputs)
    dead = inputs
    for layer in branch:
        dead = layer(dead)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Concatenate()([live, dead])))
    x, y = data(8)
    opt = fit_one_step(model, x, y, sce(), per_sample_sce, fisher_type, (y + 2) % 3, monkeypatch)
    kernel = branch[0].kernel
    assert np.abs(kernel.numpy()).max() > 0
    assert int(opt.damping_retries) == 0 and int(opt.skipped_steps) == 0


# =========================================================================== awkward models
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_multi_input_multi_output_with_loss_weights(float64, monkeypatch, fisher_type):
    """Two inputs, two outputs, two losses weighted 0.3 and 2.0: the per-sample loss is
    ℓᵢ = 0.3·ℓ¹ᵢ + 2·ℓ²ᵢ in both Fisher modes (the true Fisher at the sampled labels of each)."""
    a, b = keras.Input((5,)), keras.Input((2,))
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    model = keras.Model([a, b], [keras.layers.Dense(3, name="cls")(h),
                                 keras.layers.Dense(2, name="reg")(h)])
    rng = np.random.default_rng(5)
    m = 8
    x = [rng.normal(size=(m, 5)), rng.normal(size=(m, 2))]
    y = (rng.integers(0, 3, m), rng.normal(size=(m, 2)))
    y_fisher = (rng.integers(0, 3, m), rng.normal(size=(m, 2)))
    losses = [sce(), keras.losses.MeanSquaredError()]
    weights_ = [0.3, 2.0]

    def per_sample(yy, outputs):
        return (weights_[0] * per_sample_sce(yy[0], outputs[0])
                + weights_[1] * keras.losses.mean_squared_error(yy[1], outputs[1]))

    fit_one_step(model, x, y, losses, per_sample, fisher_type, y_fisher, monkeypatch, m=m,
                 compile=dict(loss_weights=weights_))


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_nested_model_frozen_layer_and_no_bias(float64, monkeypatch, fisher_type):
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(4, activation="tanh", use_bias=False)])
    frozen = keras.layers.Dense(4, activation="tanh")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(3)(frozen(inner(inputs))))
    frozen.trainable = False
    x, y = data(8)
    before = frozen.kernel.numpy().copy()
    opt = fit_one_step(model, x, y, sce(), per_sample_sce, fisher_type, (y + 1) % 3, monkeypatch)
    np.testing.assert_array_equal(frozen.kernel.numpy(), before)
    assert len(opt.treatments()) == 5 and all("block" in t for t in opt.treatments().values())


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_kernel_regularizer_is_in_the_gradient_not_in_the_fisher(float64, monkeypatch,
                                                                   fisher_type):
    """Convention: d = (F + λI)⁻¹ (g_loss + g_penalty), F from the loss alone (the penalty has no
    per-sample part)."""
    model = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.25)),
        keras.layers.Dense(3)])
    x, y = data(8)
    hidden = model.layers[0]

    def penalty(m):  # explicit, not through Keras's regularizer: 0.25·Σ W² (0.25: exact in float32)
        return 0.25 * tf.reduce_sum(tf.square(hidden.kernel))

    fit_one_step(model, x, y, sce(), per_sample_sce, fisher_type, (y + 1) % 3, monkeypatch,
                 penalty=penalty)


def sequence_data(m=6, t=5, vocab=7, classes=3, seed=6, lengths=(5, 3, 1, 4, 2, 5)):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(m, t))
    mask = np.arange(t)[None, :] < np.array(lengths)[:, None]
    return np.where(mask, tokens, 0), rng.integers(0, classes, (m, t)), mask


def masked_mean_sce(mask):
    """The per-sample loss of a masked, batch-averaged sequence loss: Keras averages over the
    N unmasked positions of the batch, so ℓᵢ = (m/N) Σₜ maskᵢₜ ℓᵢₜ."""
    mask = tf.constant(mask, keras.config.floatx())

    def per_sample(y, logits):
        each = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        m, n = tf.cast(tf.shape(mask)[0], mask.dtype), tf.reduce_sum(mask)
        return m / n * tf.reduce_sum(each * mask, axis=1)

    return per_sample


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_masked_sequences(float64, monkeypatch, fisher_type):
    """Embedding(mask_zero=True) → Dense on sequences: padded positions count in neither the
    gradient nor the Fisher, for the empirical and the true Fisher alike."""
    tokens, y, mask = sequence_data()
    model = keras.Sequential([keras.Input((5,), dtype="int32"),
                              keras.layers.Embedding(7, 4, mask_zero=True),
                              keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    y_fisher = (y + 1) % 3
    fit_one_step(model, tokens, y, sce(), masked_mean_sce(mask), fisher_type, y_fisher,
                 monkeypatch)


def test_unmasked_sequences_true_fisher_averages_over_positions(float64, monkeypatch):
    """Without a mask the per-sample loss is the mean over the T positions (Keras averages over
    every element); the true Fisher uses the same ℓᵢ at the sampled labels."""
    tokens, y, _ = sequence_data()
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(7, 4),
                              keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    fit_one_step(model, tokens, y, sce(), masked_mean_sce(np.ones_like(y)), "true", (y + 2) % 3,
                 monkeypatch)


def test_no_d_by_d_matrix_for_a_large_dense_layer():
    """D = D_in·D_out = 41·30 = 1230 ≫ m = 16: no tensor of the traced step (curvature update and
    true Fisher included) has D² elements; the largest is at most that of an SGD step or m·D."""
    m, d = 16, 41 * 30
    specs = (tf.TensorSpec((m, 40)), tf.TensorSpec((m,), tf.int64))

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((40,)), keras.layers.Dense(30, activation="tanh"),
                                 keras.layers.Dense(3)])

    opt = TENGraD(fisher="true", curvature_update_freq=1)
    sizes = tensor_sizes(train_step(model(), opt), *specs, unknown_dim=m)
    sgd = max(tensor_sizes(train_step(model(), keras.optimizers.SGD()), *specs, unknown_dim=m))
    largest = max(sizes)
    assert largest[0] < d * d, largest
    assert largest[0] <= max(sgd[0], m * d), (largest, sgd)

    # The check sees a D × D matrix where there is one: the explicit Fisher of the reference.
    explicit = tf.function(lambda u: tf.matmul(u, u, transpose_a=True))
    assert max(tensor_sizes(explicit, tf.TensorSpec((m, d)), unknown_dim=m))[0] == d * d


def test_convolution_chunks_keep_intermediates_within_the_memory_budget():
    """memory_budget = 1 MiB for a Conv2D at m = 128 (P = 256 positions, D_in = 73): its full
    patch tensor (m·P·D_in = 2.4M floats, 9.6 MB) would dwarf everything else in the step. Every
    tensor stays within the budget, or within what an SGD step or the curvature cache already
    hold (5% for padding the last chunk)."""
    m, budget = 128, 2**20
    specs = (tf.TensorSpec((m, 16, 16, 8)), tf.TensorSpec((m,), tf.int64))

    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((16, 16, 8)),
                                 keras.layers.Conv2D(16, 3, padding="same"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])

    opt = TENGraD(fisher="true", curvature_update_freq=1, memory_budget=budget)
    sizes = tensor_sizes(train_step(model(), opt), *specs, unknown_dim=m)
    sgd = max(tensor_sizes(train_step(model(), keras.optimizers.SGD()), *specs, unknown_dim=m))
    cache = max(int(np.prod(v.shape)) for b in opt._blocks.values()
                for v in b.state_variables.values())
    bound = 1.05 * max(budget // 4, sgd[0], cache)
    unchunked = m * 256 * (3 * 3 * 8 + 1)
    assert unchunked > 2 * bound  # the test would see a route that does not chunk
    largest = max(sizes)
    assert largest[0] <= bound, (largest, sgd, cache)


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_masking_layer_with_mean_squared_error(float64, monkeypatch, fisher_type):
    """keras.layers.Masking on float sequences → Dense → Dense, MSE: padded steps (all features
    0) count in neither the gradient nor the Fisher (the true Fisher's Gaussian samples included)."""
    rng = np.random.default_rng(7)
    m, t = 5, 4
    _, _, mask = sequence_data(m=m, t=t, lengths=(4, 2, 1, 3, 4))
    x = rng.normal(size=(m, t, 3)) * mask[..., None]
    y, y_hat = rng.normal(size=(m, t, 2)), rng.normal(size=(m, t, 2))
    model = keras.Sequential([keras.Input((t, 3)), keras.layers.Masking(0.0),
                              keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    mask_t = tf.constant(mask, keras.config.floatx())

    def per_sample(yy, out):
        each = keras.losses.mean_squared_error(yy, out)  # (m, t): mean over the 2 outputs
        return m / tf.reduce_sum(mask_t) * tf.reduce_sum(each * mask_t, axis=1)

    fit_one_step(model, x, y, keras.losses.MeanSquaredError(), per_sample, fisher_type, y_hat,
                 monkeypatch)
