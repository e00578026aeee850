"""The adaptive step (tengrad_tf/adaptive.py, replay.py) against an explicit float64 simulation.

The simulation builds every quantity from scratch in numpy: per-sample gradients by autodiff, the
block-diagonal damped solves, the Fisher of all blocks together, the 2 × 2 system in (α, μ), the
quadratic model M(s), the loss at the new weights on the same batch, ρ and the Levenberg–Marquardt
update of λ. Over several steps with reuse of the curvature (so that λ changes between curvature
updates and the cached Gram is refactorized), the weights, (α, μ), ρ and λ must match it.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD, adaptive, replay
from tengrad_tf.blocks.metric import IDENTITY_SHARE
from tests import reference
from tests.helpers import data, dcgan_step, mlp, per_sample_sce, plain, sce


def next_damping(lam, rho, every):
    omega = (19 / 20) ** every
    if not np.isfinite(rho) or rho < 0:
        new = lam * 10
    elif rho < 0.25:
        new = lam / omega
    elif rho > 0.75:
        new = lam * omega
    else:
        new = lam
    return float(np.clip(new, 1e-8, 1e4))


def simulate(model, x, y, m, steps, freq, damping, momentum, learning_rate="auto", lagged=True,
             batch_scale=1.0, input_metric=False):
    """The adaptive TENGraD step, in numpy, on a clone of `model`: [(weights, a, ρ, λ)] per step.

    learning_rate="auto": the step is the model's minimizer in span{d, previous step}. A float:
    Keras's momentum (buffer ← μ·buffer + d, step lr·buffer) and λ never below its initial value.
    The blocks of m samples are damped with λ·batch_scale (damping_batch_size: √(it / m)), times
    D = D_A ⊗ I of the Fisher's batch with `input_metric` (damping_metric="inputs"), else I."""
    variables = model.trainable_variables
    paths = [v.path for v in variables]
    blocks = [(k.path, b.path) for k, b in reference.layer_blocks(model)]
    lam, cached, cached_metric, out = damping, None, None, []
    # Damping checks: every step here (damping_adaptation_interval=1), after a step with ρ < 1/4
    # and on the first step after a curvature update; with a fixed learning rate a scheduled
    # check that leaves λ as it was (at its floor or above), with ρ ≥ 1/4, doubles the steps to
    # the next (up to 8).
    checks, rho = 1, 1.0
    previous = {v.path: np.zeros(int(np.prod(v.shape))) for v in variables}

    def loss(xb, yb):
        return float(np.mean(per_sample_sce(yb, model(xb, training=True)).numpy()))

    for t in range(steps):
        xb, yb = x[t * m:(t + 1) * m], y[t * m:(t + 1) * m]
        rows = reference.per_sample_gradients(model, xb, yb, per_sample_sce, variables)
        g = {p: r.mean(axis=0) for p, r in rows.items()}
        # An update step takes the Fisher of the update before it when lagged (its own if none).
        rows_of = dict.fromkeys(model.layers, reference.dense_rows)
        metric = (reference.layer_metrics(model, xb, rows_of, IDENTITY_SHARE)
                  if input_metric else {kernel: np.eye(rows[kernel].shape[1] + rows[bias].shape[1])
                                        for kernel, bias in blocks})
        reuse = t % freq or (lagged and cached is not None)
        fisher_of, metric_of = (cached, cached_metric) if reuse else (rows, metric)
        if t % freq == 0:
            cached, cached_metric = rows, metric
        d = {}
        for kernel, bias in blocks:
            d[kernel], d[bias] = reference.block_direction([fisher_of[kernel], fisher_of[bias]],
                                                           [g[kernel], g[bias]], lam * batch_scale,
                                                           metric_of[kernel])
        flat = lambda v: np.concatenate([np.ravel(v[p]) for p in paths])  # noqa: E731
        u = np.concatenate([fisher_of[p] for p in paths], axis=1)  # (m, all parameters)
        damped = np.zeros((u.shape[1],) * 2)  # D of every block, on the diagonal
        at = 0
        for kernel, _ in blocks:
            size = len(metric_of[kernel])
            damped[at:at + size, at:at + size] = metric_of[kernel]
            at += size
        curvature = u.T @ u / m + lam * batch_scale * damped  # the network's F + λD
        dv, pv, gv = flat(d), flat(previous), flat(g)
        gram = np.array([[dv @ curvature @ dv, dv @ curvature @ pv],
                         [pv @ curvature @ dv, pv @ curvature @ pv]])
        b = np.array([gv @ dv, gv @ pv])
        if learning_rate != "auto":  # p is the momentum buffer
            a = np.array([learning_rate, learning_rate * momentum])
        elif momentum == "auto":
            a = np.linalg.solve(gram, b) if pv.any() else np.array([b[0] / gram[0, 0], 0.0])
        else:
            a = np.array([(b[0] - momentum * gram[0, 1]) / gram[0, 0], momentum])
        sv = a[0] * dv + a[1] * pv
        predicted = -gv @ sv + 0.5 * sv @ curvature @ sv
        before = loss(xb, yb)
        offsets = np.cumsum([0] + [int(np.prod(v.shape)) for v in variables])
        for v, lo, hi in zip(variables, offsets[:-1], offsets[1:]):
            v.assign(v.numpy() - sv[lo:hi].reshape(v.shape))
        kept = sv if learning_rate == "auto" else sv / learning_rate  # the step, or the buffer
        previous = {p: kept[lo:hi] for p, lo, hi in zip(paths, offsets[:-1], offsets[1:])}
        scheduled = t % checks == 0
        after_update = freq > 1 and t % freq == 1  # the first step a new curvature takes
        if not scheduled and rho >= 0.25 and not after_update:  # no check this step
            out.append(([v.numpy().copy() for v in variables], a, rho, lam))
            continue
        rho = (loss(xb, yb) - before) / predicted
        previous_lam = lam
        lam = next_damping(lam, rho, every=1)
        if learning_rate != "auto":
            lam = max(lam, damping)
            quiet = lam == previous_lam and rho >= 0.25
            checks = (min(2 * checks, 8) if scheduled else checks) if quiet else 1
        if not rho >= 0:  # the loss rose: the step is taken back, momentum cleared
            for v, lo, hi in zip(variables, offsets[:-1], offsets[1:]):
                v.assign(v.numpy() + sv[lo:hi].reshape(v.shape))
            previous = {p: np.zeros_like(s) for p, s in previous.items()}
        out.append(([v.numpy().copy() for v in variables], a, rho, lam))
    return out


def check_against_simulation(m, steps, freq, damping, momentum, learning_rate, inputs=5,
                             hidden=4, **options):
    """Train with adaptive damping, adapting every step, and compare each step's weights, ρ and λ
    (and with learning_rate="auto" the coefficients (α, μ)) with `simulate`. `options`: more
    TENGraD arguments."""
    model = mlp(inputs=inputs, hidden=hidden)
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    x, y = data(m * steps, inputs=inputs)
    reference_batch = options.get("damping_batch_size", 128)
    opt = TENGraD(learning_rate=learning_rate, momentum=momentum, damping=damping, kl_clip=None,
                  fisher="empirical", curvature_update_freq=freq, adaptive_damping=True,
                  damping_adaptation_interval=1, **options)
    expected = simulate(shadow, x, y, m, steps, freq, damping, momentum, learning_rate,
                        lagged=options.get("lagged_curvature", True),
                        input_metric=opt.resolved_damping_metric() == "inputs",
                        batch_scale=1.0 if reference_batch is None else np.sqrt(reference_batch / m))
    model.compile(optimizer=opt, loss=sce())
    for t in range(steps):
        model.train_on_batch(x[t * m:(t + 1) * m], y[t * m:(t + 1) * m])
        weights, a, rho, lam = expected[t]
        for v, w in zip(model.trainable_variables, weights):
            np.testing.assert_allclose(v.numpy(), w, rtol=1e-9, atol=1e-12,
                                       err_msg=f"step {t} {v.path}")
        if learning_rate == "auto":
            np.testing.assert_allclose(opt.step_coefficients.numpy(), a, rtol=1e-9)
        np.testing.assert_allclose(opt.reduction_ratio.numpy(), rho, rtol=1e-7)
        np.testing.assert_allclose(opt.damping_variable.numpy(), lam, rtol=1e-12)
    assert len({round(e[3], 12) for e in expected}) > 1  # λ did change between updates


@pytest.mark.parametrize("momentum", ["auto", 0.5])
def test_adaptive_step_matches_the_float64_simulation(float64, momentum):
    check_against_simulation(m=8, steps=4, freq=3, damping=0.5, momentum=momentum,
                             learning_rate="auto")


@pytest.mark.parametrize("momentum", ["auto", 0.5])
@pytest.mark.parametrize("inputs, hidden", [(5, 4), (12, 10)])  # m = 8 rows: L_A; the rows form
def test_adaptive_step_with_the_input_metric_matches_the_float64_simulation(float64, momentum,
                                                                             inputs, hidden):
    """damping_metric="inputs": the blocks' λD and the quadratic model's sᵀ(F + λD)s, with D of
    the Fisher's batch, kept with the cached curvature and refactorized for each new λ."""
    shape = dict(inputs=inputs, hidden=hidden, damping_metric="inputs")
    check_against_simulation(m=8, steps=4, freq=3, damping=0.5, momentum=momentum,
                             learning_rate="auto", **shape)
    if momentum == 0.5:  # and M(s) of the default mode's momentum step, with a fixed lr
        check_against_simulation(m=8, steps=6, freq=3, damping=0.05, momentum=0.9,
                                 learning_rate=1.5, **shape)


@pytest.mark.parametrize("lagged, damping_batch_size", [(True, 128), (False, 128), (True, None)])
def test_damping_adaptation_with_a_fixed_learning_rate_matches_the_float64_simulation(
        float64, lagged, damping_batch_size):
    """The default mode: M(s) of the momentum step s = lr·(d + μ·buffer), ρ, λ (floored at λ₀) and
    the steps taken back, against the simulation; with the update step's Fisher lagged (the
    default) and its own batch's, and with the blocks' λ scaled to the batch (the default) or
    not."""
    check_against_simulation(m=8, steps=6, freq=3, damping=0.05, momentum=0.9, learning_rate=1.5,
                             lagged_curvature=lagged, damping_batch_size=damping_batch_size)


def test_checks_that_find_nothing_space_out_and_any_finding_resets_them(float64):
    """A fixed learning rate small enough that every step does what the model promised: λ stays
    at λ₀, and the checks space out (interval 2: steps 0, 4, 8, 16, 32, then every 16), with an
    extra check on the first step after each curvature update (1 and 31 at freq 30), which leaves
    the spacing as it was. A check that finds a step that raised the loss (here: the learning
    rate raised to 100 in between) brings them back to every 2 steps."""
    model = mlp()
    x, y = data(8 * 64)
    opt = TENGraD(learning_rate=1e-3, damping=0.5, kl_clip=None, fisher="empirical",
                  damping_adaptation_interval=2, curvature_update_freq=30)
    model.compile(optimizer=opt, loss=sce())
    checked = []
    for t in range(40):
        ratio = opt.reduction_ratio.numpy() if opt.built else None
        model.train_on_batch(x[8 * t:8 * t + 8], y[8 * t:8 * t + 8])
        if opt.reduction_ratio.numpy() != ratio:
            checked.append(t)
    assert checked == [0, 1, 4, 8, 16, 31, 32]
    assert opt.damping_variable.numpy() == 0.5 and int(opt.check_interval.numpy()) == 16
    opt.learning_rate.assign(100.0)
    rejected = int(opt.rejected_steps.numpy())
    for t in range(40, 49):
        model.train_on_batch(x[8 * t:8 * t + 8], y[8 * t:8 * t + 8])
    assert int(opt.rejected_steps.numpy()) > rejected
    assert int(opt.check_interval.numpy()) == 2 and opt.damping_variable.numpy() > 0.5


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_the_replay_draws_the_steps_own_dropout_masks_and_noise(float64, run_eagerly):
    """h(θ + s) is replayed with the step's own random draws (replay.py). With Dropout and
    GaussianNoise, a step small enough for its loss change to be the quadratic model's first-order
    prediction gives ρ ≈ 1 at every check, as without them. With fresh draws in the replay, the
    change of mask dominated h(θ + s) − h(θ): ρ was in the hundreds or negative."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(16, activation="tanh"),
                              keras.layers.Dropout(0.5), keras.layers.GaussianNoise(0.3),
                              keras.layers.Dense(3)])
    x, y = data(8 * 12)
    opt = TENGraD(learning_rate=1e-5, damping=0.5, kl_clip=None, fisher="empirical",
                  damping_adaptation_interval=1)
    model.compile(optimizer=opt, loss=sce(), run_eagerly=run_eagerly)
    before = [v.numpy().copy() for v in model.trainable_variables]
    ratios = []
    for t in range(12):
        model.train_on_batch(x[8 * t:8 * t + 8], y[8 * t:8 * t + 8])
        ratios.append(float(opt.reduction_ratio.numpy()))
    np.testing.assert_allclose(ratios, 1.0, atol=1e-2)
    assert int(opt.rejected_steps.numpy()) == 0
    assert not all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_the_replay_of_a_gan_step_draws_each_calls_own_masks(float64):
    """A GAN step with Dropout in the discriminator, which is called twice (real and fake data),
    and the generator updated first: G's replay calls G and D again, D's only D (on the step's own
    fake batch, not on the updated G's), each call from the random state its own call in the step
    started from. A tiny step's ρ is 1 for both. With G called again in D's replay, D's ρ was
    0.1, −2.5, −29 without Dropout."""
    generator = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(5)])
    discriminator = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                                      keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    g_opt, d_opt = (TENGraD(learning_rate=1e-5, damping=0.5, kl_clip=None, fisher="empirical",
                            damping_adaptation_interval=1) for _ in range(2))
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    step = tf.function(lambda x, z: dcgan_step(generator, discriminator, g_opt, d_opt, bce, x, z))

    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(6):
        step(tf.constant(rng.normal(size=(8, 5))), tf.constant(rng.normal(size=(8, 3))))
        ratios.append([float(g_opt.reduction_ratio.numpy()), float(d_opt.reduction_ratio.numpy())])
    np.testing.assert_allclose(ratios, 1.0, atol=1e-2)


@pytest.mark.parametrize("replays_baseline", [True, False])
def test_the_generator_applied_second_compares_its_loss_at_the_updated_discriminator(
        float64, replays_baseline, monkeypatch):
    """The discriminator applied first, with a step large enough to move its loss: the generator's
    replay runs through the updated discriminator, so h(θ) is replayed there too and a tiny
    generator step's ρ is 1. With the recorded h(θ) (replays_baseline forced off, the check that
    this test can fail) ρ measured the discriminator's step as well: −150 to −3·10⁷."""
    if not replays_baseline:
        original = replay.LossReplay.of.__func__

        def recorded_baseline(cls, *args):
            found = original(cls, *args)
            if not isinstance(found, str):
                found.replays_baseline = False
            return found
        monkeypatch.setattr(replay.LossReplay, "of", classmethod(recorded_baseline))
    generator = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(5)])
    discriminator = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, activation="tanh"),
                                      keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    g_opt = TENGraD(learning_rate=1e-5, damping=0.5, kl_clip=None, fisher="empirical",
                    damping_adaptation_interval=1)
    d_opt = TENGraD(learning_rate=0.01, damping=0.5, kl_clip=None, fisher="empirical",
                    adaptive_damping=False)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    step = tf.function(lambda x, z: dcgan_step(generator, discriminator, g_opt, d_opt, bce, x, z,
                                               discriminator_first=True))

    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(6):
        step(tf.constant(rng.normal(size=(8, 5))), tf.constant(rng.normal(size=(8, 3))))
        ratios.append(float(g_opt.reduction_ratio.numpy()))
    close = np.allclose(ratios, 1.0, atol=5e-2)
    assert close == replays_baseline, ratios


def test_a_step_whose_variables_no_model_call_holds_keeps_its_damping_and_says_why(caplog):
    """The optimizer's variables belong to a bare layer called before a model: calling the model
    again on the step's input would not move the loss (ρ = 0, λ raised at every check), so the
    damping stays fixed, with a warning that says why."""
    layer = keras.layers.Dense(4)
    head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    opt = TENGraD(fisher="empirical", damping_adaptation_interval=1)
    x, y = data(8)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = sce()(y, head(layer(x), training=True))
        grads = tape.gradient(loss, layer.trainable_variables)
        opt.apply_gradients(zip(grads, layer.trainable_variables))

    with caplog.at_level("WARNING", logger="tengrad_tf"):
        for _ in range(3):
            step(tf.constant(x), tf.constant(y))
    assert "no Keras model called under the tape in this step holds its variables" in caplog.text
    assert opt.damping_variable.numpy() == opt.damping


def test_a_check_that_leaves_lambda_as_it_was_spaces_out_at_the_floor_or_above_it():
    """The rule itself (adaptive.DampingAdaptation._adapt), on chosen ρ = (h1 − h0) / M(s) with
    M(s) = −1 and λ₀ = 0.1 (interval 5): a check that leaves λ where it was and finds ρ ≥ ¼ doubles
    the spacing, at λ₀ (ρ = 0.9: λ would fall, but not below λ₀) and above it (ρ = 0.5 at λ = 1:
    nothing to change); one that moves λ (ρ = 0.9 at λ = 1, ρ = 0.1) or takes the step back
    (ρ < 0) brings the spacing back to the interval. An extra check (not `scheduled`: after a
    weak step or a curvature update) that finds nothing leaves the spacing as it was."""
    def variable(value, dtype):
        return tf.Variable(value, dtype=dtype)

    def check(lam, rho, spacing=10, scheduled=True):
        adaptation = adaptive.DampingAdaptation(
            replayer=None, adapt=tf.constant(True), h0=tf.constant(0.0, tf.float64),
            predicted=tf.constant(-1.0, tf.float64), stepped=[],
            refactor=lambda new: tf.constant(0), damping=variable(lam, tf.float64),
            damping_retries=variable(0, tf.int64), interval=5,
            checks=variable(spacing, tf.int64), scheduled=tf.constant(scheduled), floor=0.1,
            reduction_ratio=variable(0.0, tf.float64), rejected_steps=variable(0, tf.int64))
        adaptation._adapt(tf.constant(0.0, tf.float64), tf.constant(-rho, tf.float64),
                          tf.constant(True))
        return float(adaptation.damping.numpy()), int(adaptation.checks.numpy())

    assert check(0.1, 0.9) == (0.1, 20)
    assert check(0.1, 0.9, scheduled=False) == (0.1, 10)
    lam, spacing = check(0.1, -0.5, scheduled=False)
    assert lam > 0.1 and spacing == 5
    assert check(0.1, 0.5, spacing=40) == (0.1, 40)  # at most MAX_CHECK_SPACING intervals
    assert check(1.0, 0.5) == (1.0, 20)
    lam, spacing = check(1.0, 0.9)
    assert lam < 1.0 and spacing == 5
    lam, spacing = check(1.0, 0.1)
    assert lam > 1.0 and spacing == 5
    lam, spacing = check(0.1, -0.5)
    assert lam > 0.1 and spacing == 5


@pytest.mark.parametrize("fisher_blocks", ["layer", "network"])
def test_cached_factorization_follows_lambda_where_it_changes(float64, fisher_blocks):
    """λ changes only in the damping adaptation, which refactorizes every cached Gram there, so
    that reuse steps take the cache as it is: after every step, each cached Cholesky factor is
    that of mλ'I + K for the current λ (λ' ≥ λ, after retries), in both Fisher-block modes."""
    m = 8
    x, y = data(m * 6, seed=2)
    opt = TENGraD(learning_rate="auto", damping=0.5, kl_clip=None, fisher="empirical",
                  curvature_update_freq=3, adaptive_damping=True, damping_adaptation_interval=1,
                  fisher_blocks=fisher_blocks)
    model = mlp()
    model.compile(optimizer=opt, loss=sce())
    seen = set()
    for t in range(6):
        model.train_on_batch(x[t * m:(t + 1) * m], y[t * m:(t + 1) * m])
        lam = opt.damping_variable.numpy()
        seen.add(round(float(lam), 12))
        holders = [opt._network] if fisher_blocks == "network" else list(opt._blocks.values())
        for holder in holders:
            state = {k: v.numpy() for k, v in holder.state_variables.items()}
            # λ for the m = 8 samples of the Gram (damping_batch_size 128): 4λ
            assert state["requested"] == 4 * lam, f"step {t}: factorized for {state['requested']}"
            assert state["damping"] >= 4 * lam
            chol, gram = state["cholesky"], state["gram"]
            np.testing.assert_allclose(chol @ chol.T, gram + m * state["damping"] * np.eye(m),
                                       rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
    assert len(seen) > 2  # λ changed between curvature updates


def test_small_blocks_keep_their_explicit_inverse_under_adaptive_damping(float64, direct_inverse):
    """Small blocks cache (F + λI)⁻¹ with adaptive damping too, and J beside it: the exact
    quadratic model projects on J, and a new λ rebuilds the inverse from it. The steps match the
    float64 simulation, also with J zero-padded to a capacity of 16 (max_batch_size), where the
    first layer's inverse (d = 24) goes through the Gram and the second's (d = 15) is direct; and
    after every step each inverse is that of the current λ."""
    check_against_simulation(m=8, steps=6, freq=3, damping=0.05, momentum=0.9, learning_rate=1.5)
    check_against_simulation(m=8, steps=6, freq=3, damping=0.05, momentum=0.9, learning_rate=1.5,
                             max_batch_size=16)
    m = 8
    x, y = data(m * 6, seed=2)
    opt = TENGraD(learning_rate="auto", damping=0.5, kl_clip=None, fisher="empirical",
                  curvature_update_freq=3, adaptive_damping=True, damping_adaptation_interval=1)
    model = mlp()
    model.compile(optimizer=opt, loss=sce())
    for t in range(6):
        model.train_on_batch(x[t * m:(t + 1) * m], y[t * m:(t + 1) * m])
        lam = opt.damping_variable.numpy()
        for block in opt._blocks.values():
            state = {k: v.numpy() for k, v in block.state_variables.items()}
            assert "inverse" in state and state["requested"] == 4 * lam, f"step {t}"  # m = 8
            u = state["j"].reshape(m, -1)
            fisher = u.T @ u / state["samples"] + state["damping"] * np.eye(u.shape[1])
            np.testing.assert_allclose(state["inverse"] @ fisher, np.eye(u.shape[1]),
                                       atol=1e-9, err_msg=f"step {t}")
    assert "caches the explicit inverse (F + λI)⁻¹, with J for the adaptive damping" in (
        opt.treatments()[model.layers[0].kernel.path])


def test_under_adaptive_damping_only_blocks_up_to_4m_keep_their_inverse(float64, direct_inverse):
    """At m = 4 the first layer (d = 24 > 4m) keeps the factored cache and the second (d = 15)
    its inverse: the steps of the mix match the float64 simulation, and the summary says which
    is which. With a fixed damping both keep their inverse (no λ to rebuild it for)."""
    check_against_simulation(m=4, steps=6, freq=3, damping=0.05, momentum=0.9, learning_rate=1.5)
    for adaptive, first in ((True, "factors"), (False, "the explicit inverse")):
        model = mlp()
        opt = TENGraD(fisher="empirical", adaptive_damping=adaptive)
        model.compile(optimizer=opt, loss=sce())
        model.train_on_batch(*data(4))
        treatments = opt.treatments()
        assert f"caches {first}" in treatments[model.layers[0].kernel.path]
        assert "caches the explicit inverse" in treatments[model.layers[1].kernel.path]


def test_subspace_solves_the_two_by_two_system():
    g = [tf.constant([1.0, -2.0], tf.float64)]
    d = [tf.constant([0.5, 0.25], tf.float64)]
    p = [tf.constant([0.1, 0.3], tf.float64)]
    u = tf.constant([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]], tf.float64)  # m = 3 rows of U
    sub = adaptive.Subspace.of([(lambda v: tf.linalg.matvec(u, v[0])[:, None], tf.constant(
        0.2, tf.float64), [0])], d, p, g)
    c = u.numpy().T @ u.numpy() / 3 + 0.2 * np.eye(2)
    dn, pn, gn = d[0].numpy(), p[0].numpy(), g[0].numpy()
    want = np.array([[dn @ c @ dn, dn @ c @ pn], [pn @ c @ dn, pn @ c @ pn]])
    np.testing.assert_allclose(sub.gram.numpy(), want, rtol=1e-12)
    a = np.linalg.solve(want, [gn @ dn, gn @ pn])
    np.testing.assert_allclose(sub.best(None).numpy(), a, rtol=1e-12)
    s = a[0] * dn + a[1] * pn
    np.testing.assert_allclose(sub.value(a).numpy(), -gn @ s + 0.5 * s @ c @ s, rtol=1e-12)


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_network_fisher_is_the_exact_damped_natural_gradient_of_all_blocks(
        float64, fixed_sampled_labels, fisher_type, use_bias):
    """fisher_blocks="network": d = (F + λI)⁻¹ g with F the Fisher of every preconditioned
    parameter together, cross-layer terms included, formed explicitly here; and a block-diagonal
    solve would miss it by far."""
    m, lr, damping = 8, 0.125, 0.05
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(4, activation="tanh", use_bias=use_bias),
                              keras.layers.Dense(3, use_bias=use_bias)])
    x, y = data(m)
    y_fisher = (y + 1) % 3 if fisher_type == "true" else y
    fixed_sampled_labels["y"] = y_fisher
    variables = model.trainable_variables
    g_rows = reference.per_sample_gradients(model, x, y, per_sample_sce, variables)
    u_rows = reference.per_sample_gradients(model, x, y_fisher, per_sample_sce, variables)
    u = np.concatenate([u_rows[v.path] for v in variables], axis=1)
    g = np.concatenate([g_rows[v.path].mean(0) for v in variables])
    d = np.linalg.solve(u.T @ u / m + damping * np.eye(u.shape[1]), g)
    block = np.concatenate(list(reference.reference_directions(
        model, x, y, y_fisher, per_sample_sce, damping)[0].values()))
    assert np.linalg.norm(block - d) > 1e-2 * np.linalg.norm(d)
    before = np.concatenate([v.numpy().ravel() for v in variables])
    opt = plain(learning_rate=lr, damping=damping, fisher=fisher_type, fisher_blocks="network")
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = np.concatenate([v.numpy().ravel() for v in variables])
    np.testing.assert_allclose(after, before - lr * d, rtol=1e-9, atol=1e-12)


def test_network_fisher_reuses_its_factorization_and_resumes(float64, tmp_path):
    """Between curvature updates the one cached factorization preconditions new gradients; the
    network's state is saved with the optimizer and a resumed run continues bit for bit."""
    x, y = data(40, seed=4)

    def run(model, opt, part):
        model.compile(optimizer=opt, loss=sce())
        model.fit(x[part], y[part], batch_size=8, epochs=1, shuffle=False, verbose=0)

    def make():
        return TENGraD(learning_rate=0.1, damping=0.05, curvature_update_freq=3, kl_clip=None,
                       fisher="empirical", fisher_blocks="network", seed=3)

    keras.utils.set_random_seed(0)
    whole = mlp()
    init = whole.get_weights()
    run(whole, make(), slice(0, 40))  # 5 steps: updates at 0 and 3
    half = mlp()
    half.set_weights(init)
    run(half, make(), slice(0, 16))  # 2 steps, then saved in the middle of the window
    path = tmp_path / "half.keras"
    half.save(path)
    resumed = keras.models.load_model(path)
    resumed.fit(x[16:40], y[16:40], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.get_weights(), whole.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert resumed.optimizer._network is not None


@pytest.mark.parametrize("lagged,adaptive_damping", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("fisher_blocks", ["layer", "network"])
def test_curvature_batches_is_the_exact_fisher_of_the_last_k_curvature_batches(
        float64, fisher_blocks, lagged, adaptive_damping):
    """curvature_batches=2 with curvature updates every 2 steps: each update's Fisher is that of
    the per-sample gradients of its batch and of the previous update's batch (taken at the weights
    of their own steps), newest first; the last, smaller batch keeps as many of the previous
    samples as it has itself. With lagged curvature an update step takes the window before it.
    Under adaptive damping the per-layer blocks keep their Gram and compute only the new batch's
    rows of it (gram.gram_of_window); λ stays at its floor here (every check finds ρ ≥ ¼).
    Simulated in numpy with explicit per-sample gradients; k = 1 would miss it by far."""
    m, lr, damping, k, freq = 8, 0.1, 0.05, 2, 2
    x, y = data(44, seed=5)  # batches of 8, 8, 8, 8, 8 and 4
    keras.utils.set_random_seed(0)
    model = mlp()
    init = model.get_weights()
    opt = plain(learning_rate=lr, damping=damping, curvature_update_freq=freq,
                curvature_batches=k, fisher="empirical", fisher_blocks=fisher_blocks,
                lagged_curvature=lagged, adaptive_damping=adaptive_damping)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    if adaptive_damping:
        assert opt.damping_variable.numpy() == damping
        for block in opt._blocks.values():
            assert ("gram" in block.state_variables) == (fisher_blocks == "layer")

    twin = mlp()
    twin.set_weights(init)
    variables = twin.trainable_variables
    blocks = ([tuple(v for v in variables)] if fisher_blocks == "network" else
              [tuple(v for v in b if v is not None) for b in reference.layer_blocks(twin)])
    window, single_batch_differs = None, False
    for step, start in enumerate(range(0, 44, m)):
        xb, yb = x[start:start + m], y[start:start + m]
        rows = reference.per_sample_gradients(twin, xb, yb, per_sample_sce, variables)
        before = window
        if step % freq == 0:
            n = len(xb)
            window = (rows if window is None else
                      {p: np.concatenate([rows[p], window[p][:(k - 1) * n]]) for p in rows})
        fisher_of = before if lagged and step % freq == 0 and before is not None else window
        differs = reference.plain_step(blocks, fisher_of, rows, damping, lr)
        single_batch_differs |= step == 2 and differs
    assert single_batch_differs
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
