"""TENGraD's step against the independent float64 reference (tests/reference.py), through `fit`."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tengrad_tf
from tengrad_tf import TENGraD, fisher
from tengrad_tf.blocks import base
from tests import reference
from tests.helpers import data, mlp, per_sample_sce, plain, sce, train_step, weights

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_one_fit_step_is_the_exact_natural_gradient(float64, fixed_sampled_labels, fisher_type,
                                                   use_bias):
    m, lr, damping = 8, 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable
    model = mlp(use_bias)
    x, y = data(m)
    y_fisher = (y + 1) % 3 if fisher_type == "true" else y  # labels ≠ y: catches using y by mistake
    fixed_sampled_labels["y"] = y_fisher
    expected, _ = reference.reference_directions(model, x, y, y_fisher, per_sample_sce, damping)
    before = weights(model)
    model.compile(optimizer=plain(learning_rate=lr, damping=damping, fisher=fisher_type), loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)


def test_reference_would_catch_wrong_factors(float64):
    """The tolerance above is far tighter than the errors it is meant to catch."""
    m, damping = 8, 0.05
    model = mlp()
    x, y = data(m)
    d, g = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    variables = model.trainable_variables
    u = reference.per_sample_gradients(model, x, y, per_sample_sce, variables)
    kernel, bias = variables[0], variables[1]
    # Fisher without the 1/m, and without the bias in the block.
    wrong_m = reference.block_direction([u[kernel.path] * np.sqrt(m), u[bias.path] * np.sqrt(m)],
                                        [g[kernel.path], g[bias.path]], damping)[0]
    wrong_bias = reference.block_direction([u[kernel.path]], [g[kernel.path]], damping)[0]
    for wrong in (wrong_m, wrong_bias):
        assert np.max(np.abs(wrong - d[kernel.path])) > 1e-4 * np.max(np.abs(d[kernel.path]))


@pytest.mark.parametrize("hidden, fisher_blocks", [(4, "layer"), (16, "layer"), (16, "network")])
def test_the_damping_follows_the_batch_size(float64, monkeypatch, hidden, fisher_blocks):
    """`damping` is λ at `damping_batch_size` samples, and a Fisher of m samples is damped with
    λ·√(damping_batch_size / m): 2λ at m = 8 for damping_batch_size 32. Checked against the
    reference at 2λ (which the one at λ misses by far) for small blocks keeping their explicit
    inverse (hidden 4), blocks solved through the Gram (hidden 16) and the network's one solve."""
    if hidden == 4:  # small blocks keep (F + λI)⁻¹, as outside the tests (conftest)
        monkeypatch.setattr(base, "DIRECT_MAX_DIM", 1024)
    m, lr, damping = 8, 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(hidden, activation="tanh"),
                              keras.layers.Dense(3)])
    x, y = data(m)
    variables = model.trainable_variables
    u = reference.per_sample_gradients(model, x, y, per_sample_sce, variables)

    def direction(lam):
        if fisher_blocks == "network":
            rows = np.concatenate([u[v.path] for v in variables], axis=1)
            return np.linalg.solve(rows.T @ rows / m + lam * np.eye(rows.shape[1]), rows.mean(0))
        d = reference.reference_directions(model, x, y, y, per_sample_sce, lam)[0]
        return np.concatenate([np.ravel(d[v.path]) for v in variables])

    expected, unscaled = direction(2 * damping), direction(damping)
    assert np.linalg.norm(expected - unscaled) > 1e-2 * np.linalg.norm(expected)
    before = np.concatenate([v.numpy().ravel() for v in variables])
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical", fisher_blocks=fisher_blocks,
                damping_batch_size=4 * m)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = np.concatenate([v.numpy().ravel() for v in variables])
    np.testing.assert_allclose(after, before - lr * expected, rtol=1e-9, atol=1e-12)
    if fisher_blocks == "layer":
        inverse = ["explicit inverse" in t for t in opt.treatments().values()]
        assert all(inverse) if hidden == 4 else not any(inverse), opt.treatments()


def build_model(kind):
    inputs = keras.Input((5,))
    if kind == "sequential":
        return mlp()
    if kind == "functional":
        h = keras.layers.Dense(4, activation="tanh")(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(h))
    if kind == "nested":
        inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh")])
        return keras.Model(inputs, keras.layers.Dense(3)(inner(inputs)))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(4, activation="tanh")
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.hidden(x))

    model = Subclassed()
    model(np.zeros((1, 5)))
    return model


@pytest.mark.parametrize("kind", ["sequential", "functional", "nested", "subclassed"])
def test_fit_binds_every_model_style(float64, kind):
    m, lr, damping = 8, 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable
    model = build_model(kind)
    x, y = data(m)
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    assert len(expected) == 4
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)
    assert all("Dense block" in t for t in opt.treatments().values())


@pytest.mark.parametrize("traced", [True, False])
def test_custom_training_loop(float64, traced):
    m, lr, damping = 8, 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable
    model = mlp()
    x, y = data(m)
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical")

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = sce()(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    (tf.function(step) if traced else step)(tf.constant(x), tf.constant(y))
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)


def test_true_fisher_in_eager_loop_says_what_to_do():
    model = mlp()
    x, y = data(8)
    opt = plain(fisher="true")
    with tf.GradientTape() as tape:
        loss = sce()(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    with pytest.raises(tengrad_tf.BindingError, match="tf.function"):
        opt.apply_gradients(zip(grads, model.trainable_variables))


@pytest.mark.parametrize("damping", [1e-3, 1e-4])
def test_small_damping_in_float32_stays_accurate_and_a_descent_direction(fixed_sampled_labels,
                                                                         damping):
    """DESIGN.md: float32 cancellation at small λ made the authors' ⟨d, g⟩ negative."""
    m, lr = 16, 1e-3
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    x, y = data(m, inputs=10)
    x = x.astype("float32")
    fixed_sampled_labels["y"] = (y + 1) % 3
    expected, g = reference.reference_directions(model, x, y, (y + 1) % 3, per_sample_sce, damping)
    before = weights(model)
    model.compile(optimizer=plain(learning_rate=lr, damping=damping), loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    got = np.concatenate([(before[p] - after[p]) / lr for p in expected])
    want = np.concatenate([expected[p] for p in expected])
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)
    assert got @ np.concatenate([g[p] for p in expected]) > 0


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_several_steps_with_reuse_momentum_kl_clip_and_weight_decay(float64, monkeypatch,
                                                                   fisher_type):
    """Simulate the whole step rule of DESIGN.md with the reference and compare after 5 steps
    (the blocks' λ scaled to the batch of 8 by the default damping_batch_size, 128: 4λ; λI)."""
    m, steps, freq = 8, 5, 2
    lr, damping, mu, wd, kappa = 0.0625, 0.05, 0.9, 0.01, 1e-3
    model = mlp()
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    x, y = data(m * steps, seed=3)
    y_fisher = (y + 2) % 3 if fisher_type == "true" else y

    buffers = {v.path: np.zeros(v.shape).ravel() for v in shadow.trainable_variables}
    cached = None
    for t in range(steps):
        xb, yb, yfb = x[t * m:(t + 1) * m], y[t * m:(t + 1) * m], y_fisher[t * m:(t + 1) * m]
        variables = shadow.trainable_variables
        g_per = reference.per_sample_gradients(shadow, xb, yb, per_sample_sce, variables)
        g = {p: v.mean(axis=0) for p, v in g_per.items()}
        fisher_of = cached  # lagged curvature: an update step takes the update's before it
        if t % freq == 0:
            fresh = reference.per_sample_gradients(shadow, xb, yfb, per_sample_sce, variables)
            fisher_of, cached = (fresh if cached is None else cached), fresh
        d = {}
        for kernel, bias in reference.layer_blocks(shadow):
            ds = reference.block_direction([fisher_of[kernel.path], fisher_of[bias.path]],
                                           [g[kernel.path], g[bias.path]],
                                           damping * np.sqrt(128 / m))
            d[kernel.path], d[bias.path] = ds
        vdg = sum(d[p] @ g[p] for p in d)
        nu = min(1.0, np.sqrt(kappa / (lr**2 * vdg)))
        for v in variables:
            buffers[v.path] = mu * buffers[v.path] + nu * d[v.path]
            theta = v.numpy().ravel()
            theta = theta - lr * wd * theta - lr * buffers[v.path]
            v.assign(theta.reshape(v.shape))

    batches = iter(range(steps))

    def sample_per_batch(loss, y_pred, seed=None):
        # Traced once; the known labels of the current batch come in through a numpy_function.
        def current():
            t = next(batches)
            return y_fisher[t * m:(t + 1) * m]
        return tf.reshape(tf.numpy_function(current, [], tf.int64), [m])

    monkeypatch.setattr(fisher, "sample_labels", sample_per_batch)
    opt = TENGraD(learning_rate=lr, damping=damping, momentum=mu, weight_decay=wd, kl_clip=kappa,
                  curvature_update_freq=freq, fisher=fisher_type, adaptive_damping=False,
                  damping_metric="identity")  # the metric's reuse: tests/blocks/test_metric.py
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v, w in zip(model.trainable_variables, shadow.trainable_variables):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-8, atol=1e-11, err_msg=v.path)


def test_learns_faster_than_sgd_per_step():
    """A small synthetic task: same steps, same batches, TENGraD ends lower than SGD(momentum)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 20)).astype("float32")
    teacher = rng.normal(size=(20, 5))
    y = np.argmax(np.tanh(x @ teacher) + 0.1 * rng.normal(size=(2048, 5)), axis=1)

    def final_loss(opt):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                                  keras.layers.Dense(5)])
        model.compile(optimizer=opt, loss=sce())
        return model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0).history["loss"][-1]

    tengrad = final_loss(TENGraD())
    sgd = final_loss(keras.optimizers.SGD(learning_rate=0.01, momentum=0.9))
    assert tengrad < sgd, (tengrad, sgd)


def test_summary_lists_every_variable_and_why(caplog):
    """Every first-order variable's treatment names its layer and the layer's class, for layers
    capture patches (a subclass that overrides call) and layers it does not (LSTM, PReLU); the
    warning about them is logged once per fit."""

    class Scaled(keras.layers.Dense):
        def call(self, x):
            return super().call(2.0 * x)

    inputs = keras.Input((5, 6))
    h = keras.layers.Dense(4)(inputs)
    h = keras.layers.LSTM(3, name="lstm")(h)
    h = keras.layers.PReLU(name="prelu")(h)
    h = Scaled(3, name="scaled")(h)
    model = keras.Model(inputs, keras.layers.Dense(2)(h))
    opt = TENGraD(fisher="empirical")
    assert "not bound yet" in opt.summary(print_fn=None)
    model.compile(optimizer=opt, loss=sce())
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5, 6)).astype("float32"), rng.integers(0, 2, 20)
    with caplog.at_level("WARNING", logger="tengrad_tf"):
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)  # a partial batch: traced twice
    treatments = opt.treatments()
    assert set(treatments) == {v.path for v in model.trainable_variables}
    assert sum("Dense block" in t for t in treatments.values()) == 4
    by_layer = {name: [t for p, t in treatments.items() if f"/{name}/" in f"/{p}"]
                for name in ("lstm", "prelu", "scaled")}
    assert len(by_layer["lstm"]) == 3 and all(
        t.startswith("first-order: LSTM 'lstm': recurrent weights") for t in by_layer["lstm"])
    assert by_layer["prelu"] == ["first-order: PReLU 'prelu': no exact block for this kind of "
                                 "layer (README, 'Layers': the kinds with one)"]
    assert all(t.startswith("first-order: Scaled 'scaled': it overrides Dense.call")
               for t in by_layer["scaled"])
    assert len([r for r in caplog.records if "first-order" in r.getMessage()]) == 1
    text = opt.summary(print_fn=None)
    assert all(p in text for p in treatments)


def test_no_preconditionable_layer_is_an_error_not_a_silent_sgd():
    model = keras.Sequential([keras.Input((3, 2)), keras.layers.SimpleRNN(4)])
    model.compile(optimizer=TENGraD(fisher="empirical"), loss="mse")
    with pytest.raises(tengrad_tf.BindingError, match="no layer to precondition"):
        model.fit(np.zeros((4, 3, 2), "float32"), np.zeros((4, 4)), verbose=0)


def test_config_round_trip_and_serialization():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.5)
    opt = TENGraD(learning_rate=schedule, damping=0.3, momentum=0.5, weight_decay=1e-4,
                  fisher="empirical", curvature_update_freq=7, kl_clip=None, clipnorm=1.0,
                  name="my_tengrad")
    config = opt.get_config()
    clone = TENGraD.from_config(dict(config))  # Keras replaces the schedule dict in place
    assert clone.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, TENGraD) and restored.get_config() == config
    assert restored.curvature_update_freq == 7 and restored.kl_clip is None


def test_unknown_loss_with_true_fisher_suggests_empirical():
    model = mlp()
    model.compile(optimizer=TENGraD(), loss=keras.losses.Huber())
    x, _ = data(8)
    with pytest.raises(ValueError, match="empirical"):
        model.fit(x, np.zeros((8, 3)), verbose=0)


def test_non_finite_step_leaves_weights_and_state_untouched():
    """A NaN in the batch: the step is skipped and nothing changes, not even the snapshot that a
    damping check takes to undo a step (step 1 is checked: the first after a curvature update)."""
    model = mlp()
    x, y = data(8)
    opt = TENGraD(fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = [v.numpy().copy() for v in model.variables + opt.variables
              if "skip" not in v.path]
    bad = x.copy()
    bad[0, 0] = np.nan
    model.fit(bad, y, batch_size=8, epochs=1, verbose=0)
    after = [v.numpy() for v in model.variables + opt.variables if "skip" not in v.path]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(opt.skipped_steps.numpy()) == 1


def test_xla_with_a_static_batch_is_exact(float64):
    """A fixed-shape train step under jit_compile=True: fixed-capacity cache, same update."""
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical")

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = sce()(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step(tf.constant(x), tf.constant(y))
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)


def test_xla_in_fit_without_max_batch_size_says_what_to_do():
    """fit traces its step with an unknown batch size; XLA cannot resize the cache variables."""
    from tengrad_tf.blocks import XlaCacheError

    model = mlp()
    x, y = data(20)
    model.compile(optimizer=TENGraD(fisher="empirical"), loss=sce(), jit_compile=True)
    with pytest.raises(XlaCacheError, match=r"max_batch_size=<your batch_size>.*jit_compile=False"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def _fit_weights(init, x, y, jit_compile, epochs=2, shape=None, **kw):
    model = mlp(**(shape or {}))
    model.set_weights(init)
    opt = TENGraD(learning_rate=0.1, damping=0.05, momentum=0.5, curvature_update_freq=2, seed=1,
                  **kw)
    model.compile(optimizer=opt, loss=sce(), jit_compile=jit_compile)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return np.concatenate([w.ravel() for w in model.get_weights()]), opt


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_xla_fit_with_max_batch_size_matches_the_uncompiled_run(float64, monkeypatch, fisher_type):
    """compile(jit_compile=True) + fit with max_batch_size: the cache holds 8 samples and the last
    batch of each epoch (20 = 8 + 8 + 4) is zero-padded. Two epochs with curvature reuse and momentum
    give the weights of the run without XLA and with a dynamic cache, to rounding."""
    # Labels that are a function of the predictions: "sampled" alike in both runs, and ≠ y.
    monkeypatch.setattr(fisher, "sample_labels", lambda loss, y_pred, seed=None: tf.argmin(
        y_pred, axis=-1, output_type=tf.int32))
    init = mlp().get_weights()
    x, y = data(20)
    expected, plain_opt = _fit_weights(init, x, y, jit_compile=False, fisher=fisher_type)
    got, opt = _fit_weights(init, x, y, jit_compile=True, fisher=fisher_type, max_batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert int(opt.iterations.numpy()) == 6
    for block in opt._blocks.values():
        assert block.state_variables["cholesky"].shape == (8, 8)  # fixed capacity
    for block in plain_opt._blocks.values():
        assert block.state_variables["cholesky"].shape.as_list() == [None, None]  # dynamic


def test_xla_fit_with_the_input_metric_matches_the_uncompiled_run(float64):
    """damping_metric="inputs" under XLA, cache of 8 samples: the first Dense layer (D_in = 13)
    through its rows, N's factor padded in each epoch's last batch of 4, and the second (D_in = 5)
    by L_A. Without XLA the cache is dynamic and both go through the rows: the same step."""
    shape = dict(inputs=12, hidden=4)
    init = mlp(**shape).get_weights()
    x, y = data(20, inputs=12)
    expected, _ = _fit_weights(init, x, y, jit_compile=False, shape=shape, fisher="empirical",
                               damping_metric="inputs")
    got, opt = _fit_weights(init, x, y, jit_compile=True, shape=shape, fisher="empirical",
                            max_batch_size=8, damping_metric="inputs")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert [b.metric.form for b in opt._blocks.values()] == ["rows", "whitened"]


def test_xla_fit_with_small_blocks_keeping_their_inverse_matches_the_uncompiled_run(
        float64, direct_inverse):
    """Small blocks keep their explicit inverse under adaptive damping (d ≤ 4m), built by the direct
    d × d solve when the 8-sample cache has m ≥ d (the first Dense, d = 6) and through the m × m
    Gram otherwise (the second, d = 9). Under XLA the solve is chosen while tracing: a cond
    between the two failed to compile (branches of different shapes)."""
    shape = dict(inputs=2, hidden=2)
    init = mlp(**shape).get_weights()
    x, y = data(20, inputs=2)
    expected, _ = _fit_weights(init, x, y, jit_compile=False, shape=shape, fisher="empirical")
    got, opt = _fit_weights(init, x, y, jit_compile=True, shape=shape, fisher="empirical",
                            max_batch_size=8)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-13)
    assert all("inverse" in block.state_variables for block in opt._blocks.values())


def test_xla_batch_larger_than_max_batch_size_is_refused():
    x, y = data(12)
    for samples, jit, error, message in (
            (8, False, ValueError, "max_batch_size=4"),  # batches of 8 rows: static, at trace
            (12, False, tf.errors.InvalidArgumentError, "max_batch_size=4"),  # 8 + 4: at run time
            # XLA drops the run-time assertion; its compile-time shape check names the fix.
            (12, True, tf.errors.InvalidArgumentError, "capacity_4_raise_max_batch_size")):
        model = mlp()
        model.compile(optimizer=TENGraD(fisher="empirical", max_batch_size=4), loss=sce(),
                      jit_compile=jit)
        with pytest.raises(error, match=message):
            model.fit(x[:samples], y[:samples], batch_size=8, epochs=1, verbose=0)


def test_xla_jit_solve_gives_the_exact_step(float64, monkeypatch):
    """jit_solve=True compiles the m × m factorization and solves with XLA inside a step that is
    not compiled: the same exact natural gradient as the reference, and, over a reuse step, the
    same weights as jit_solve=False."""
    from tengrad_tf import woodbury

    used = []  # which compiled functions the traced step calls
    for name in ("_factorize_xla", "_cholesky_solve_xla"):
        compiled = getattr(woodbury, name)
        monkeypatch.setattr(woodbury, name, lambda *a, f=compiled, n=name: used.append(n) or f(*a))
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = weights(model)
    model.compile(optimizer=plain(learning_rate=lr, damping=damping, fisher="empirical",
                                  jit_solve=True), loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    assert {"_factorize_xla", "_cholesky_solve_xla"} <= set(used)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)

    init = mlp().get_weights()
    x, y = data(20)
    with_jit, _ = _fit_weights(init, x, y, jit_compile=False, fisher="empirical", jit_solve=True)
    used.clear()
    without, _ = _fit_weights(init, x, y, jit_compile=False, fisher="empirical", jit_solve=False)
    assert not used
    np.testing.assert_allclose(with_jit, without, rtol=1e-10, atol=1e-13)


def test_xla_jit_solve_auto_means_gpu(monkeypatch):
    """"auto" is decided when the step is traced: XLA for the solve iff TensorFlow sees a GPU."""
    for devices, want in (([], False), (["/device:GPU:0"], True)):
        monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: devices)
        assert TENGraD().resolved_jit_solve() is want
        assert TENGraD(jit_solve=not want).resolved_jit_solve() is (not want)


@pytest.mark.parametrize("kwargs, name", [
    (dict(jit_solve="yes"), "jit_solve"), (dict(jit_solve=1), "jit_solve"),
    (dict(max_batch_size=0), "max_batch_size"), (dict(max_batch_size=8.0), "max_batch_size"),
])
def test_xla_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TENGraD(**kwargs)


def test_xla_arguments_are_serialized():
    opt = TENGraD(jit_solve=False, max_batch_size=64)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert (restored.jit_solve, restored.max_batch_size) == (False, 64)


def test_file_without_curvature_loads_and_its_first_step_computes_it(float64):
    """A file saved before the curvature was saved (only Keras's indexed variables) still loads.
    The optimizer then resumes in the middle of a reuse window with nothing cached: its first step
    must compute the curvature, not precondition with an empty cache. (Files saved now carry the
    curvature, and resume without recomputing it: tests/test_resume.py.)"""
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    expected, _ = reference.reference_directions(model, x, y, y, per_sample_sce, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, fisher="empirical", curvature_update_freq=4)
    opt.build(model.trainable_variables)
    store = {}
    opt.save_own_variables(store)
    old_file = {k: v for k, v in store.items() if k.isdigit()}
    old_file[str(opt.variables.index(opt.iterations))] = np.asarray(6)
    opt.load_own_variables(old_file)
    assert int(opt.iterations.numpy()) == 6
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_sample_weights_weight_the_fisher_like_the_loss(float64, fixed_sampled_labels, fisher_type):
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    w = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0, 1.0, 0.25])
    y_fisher = (y + 1) % 3 if fisher_type == "true" else y
    fixed_sampled_labels["y"] = y_fisher
    expected, _ = reference.reference_directions(model, x, y, y_fisher, per_sample_sce, damping,
                                                 sample_weight=w)
    before = weights(model)
    model.compile(optimizer=plain(learning_rate=lr, damping=damping, fisher=fisher_type),
                  loss=sce())
    model.fit(x, y, sample_weight=w, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)


@pytest.mark.parametrize("samples, epochs, expected", [
    (8, 7, 7 + 3),  # static batch: 7 steps, curvature at steps 0, 3, 6
    (20, 2, 6 + 2),  # batches 8, 8, 4 (dynamic batch size): 6 steps, curvature at 0, 3
])
def test_true_fisher_backward_pass_runs_only_on_curvature_update_steps(samples, epochs, expected):
    """The sampled backward pass is gated off between curvature updates (a profile once showed it
    running every step: the gradient of a Switch revived it). A layer whose gradient counts its own
    executions sees one backward pass per step plus one per curvature update."""
    counter = tf.Variable(0, dtype=tf.int64, trainable=False)

    class CountBackward(keras.layers.Layer):
        def call(self, x):
            @tf.custom_gradient
            def identity(x):
                def grad(dy):
                    # The increment reads dy's values (not only its static shape, which grappler
                    # would fold away), so it runs exactly when this gradient is computed.
                    total = tf.reduce_sum(dy)
                    count = counter.assign_add(tf.cast(tf.equal(total, total), tf.int64))
                    with tf.control_dependencies([count]):
                        return tf.identity(dy)
                return tf.identity(x), grad
            return identity(x)

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              CountBackward(), keras.layers.Dense(3)])
    model.compile(optimizer=TENGraD(fisher="true", curvature_update_freq=3), loss=sce())
    x, y = data(samples)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    assert int(counter.numpy()) == expected  # training passes + sampled passes


def test_gated_off_output_gradients_are_empty_stand_ins():
    """Between curvature updates the gated sampled gradient is replaced by a stand-in without
    samples, not by zeros of the pre-activation's shape (written on every step); the merged tensor
    keeps the static shape, so that a static batch still decides the Gram route while tracing."""
    m = 64
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(300, activation="tanh"),
                              keras.layers.Dense(3)])
    step = train_step(model, TENGraD(fisher="true"))
    graph = step.get_concrete_function(tf.TensorSpec((m, 5)), tf.TensorSpec((m,), tf.int64)).graph
    merges = [op for op in graph.get_operations()
              if op.type == "Merge" and op.name.startswith("tengrad_output_grads")]
    assert len(merges) == 2
    for merge in merges:
        switch = merge.inputs[0].op
        assert switch.type == "Switch"
        assert switch.inputs[0].shape[0] == 0, switch.inputs[0]
        assert merge.outputs[0].shape.as_list() in ([m, 300], [m, 3])


def test_train_step_graph_passes_grappler():
    """Grappler must be able to optimize the step: when it cannot sort the graph (a while loop in
    a cond branch that it prunes, as the small blocks' explicit inverse once had), TF logs an
    error and runs the whole step unoptimized. Small blocks (the direct inverse), both Fisher
    modes, every-step and reused curvature, K-FAC, and blocks whose Gram route depends on the
    batch size (once a tf.cond on a constant predicate), with a static batch size."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "grappler_fit.py")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout
    for symptom in ("topological order", "function optimization failure", "failed: INVALID_ARG"):
        assert symptom not in out.stderr, out.stderr[-3000:]


def _prelu_model_and_step(opt):
    """Dense, PReLU, Dense: (the model, PReLU's α (no block owns it), a traced step of `opt` that
    returns α's gradients)."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4),
                              keras.layers.PReLU(), keras.layers.Dense(3)])
    alphas = model.layers[1].trainable_variables
    full_step = train_step(model, opt)
    paths = [v.path for v in model.trainable_variables]

    def step(x, y):
        grads = full_step(x, y)
        return [grads[paths.index(v.path)] for v in alphas]

    return model, alphas, step


def _adam_change(moments, path, g, eta):
    """Keras's Adam (β₁ 0.9, β₂ 0.999, ε 1e-7) at the rate `eta`: the step θ − θ_new of
    `path`, whose moments `moments` keeps."""
    m, v = moments.get(path, (0.0, 0.0))
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    moments[path] = (m, v)
    return eta * m / (np.sqrt(v) + 1e-7)


def test_variables_without_a_block_take_keras_adams_step(float64):
    """first_order="adam" (the default): a variable no block owns (PReLU's α here) takes Adam's
    step at first_order_learning_rate, which follows the learning rate in proportion (here halved
    for the second step)."""
    x, y = data(8)
    opt = plain(learning_rate=0.125, damping=0.05, fisher="empirical",
                first_order_learning_rate=0.01)
    _, bn, step = _prelu_model_and_step(opt)  # PReLU's α: no block
    moments = {}
    for t, lr_scale in ((1, 1.0), (2, 0.5)):
        opt.learning_rate = 0.125 * lr_scale
        before = {v.path: v.numpy().copy() for v in bn}
        grads = step(tf.constant(x), tf.constant(y))
        for v, g in zip(bn, grads):
            eta = 0.01 * lr_scale * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            want = before[v.path] - _adam_change(moments, v.path, g.numpy(), eta)
            np.testing.assert_allclose(v.numpy(), want, rtol=1e-9, atol=1e-12, err_msg=v.path)
    (prelu,) = [t for p, t in opt.treatments().items() if "p_re_lu" in p]
    assert prelu.startswith("first-order")


@pytest.mark.parametrize("rule", ["adam", "sgd", "damped"])
def test_under_adaptive_damping_lambda_bounds_the_step_of_variables_without_a_block(float64,
                                                                                    rule):
    """Adaptive damping raised to λ = 4·λ₀: a variable no block owns (PReLU's α) takes a quarter
    of Adam's step ("adam") or of d = g ("sgd"), and d = g/λ at the adapted λ ("damped", a block
    with F = 0). The first step, at λ₀, takes its whole step."""
    x, y = data(8)
    lr, lam0 = 1e-3, 0.05
    opt = plain(learning_rate=lr, damping=lam0, fisher="empirical", first_order=rule,
                first_order_learning_rate=0.01, adaptive_damping=True,
                damping_adaptation_interval=1000)
    _, alphas, step = _prelu_model_and_step(opt)
    moments = {}
    for t in (1, 2):
        lam = lam0 if t == 1 else 4 * lam0
        if t == 2:  # as a check that found the loss raised would leave it (between checks here)
            opt.damping_variable.assign(lam)
        before = {v.path: v.numpy().copy() for v in alphas}
        grads = step(tf.constant(x), tf.constant(y))
        assert opt.rejected_steps.numpy() == 0
        for v, g in zip(alphas, grads):
            g = g.numpy()
            if rule == "adam":
                eta = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * min(1.0, lam0 / lam)
                change = _adam_change(moments, v.path, g, eta)
            elif rule == "sgd":
                change = lr * g * min(1.0, lam0 / lam)
            else:
                change = lr * g / lam
            np.testing.assert_allclose(v.numpy(), before[v.path] - change, rtol=1e-9,
                                       atol=1e-14, err_msg=(v.path, t))
