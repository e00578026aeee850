"""Mixed precision: layers compute in float16/bfloat16, the Fisher does not.

Under `mixed_float16` Keras's `compile` wraps the optimizer in a `LossScaleOptimizer`, which scales the
loss (so the captured output gradients carry its dynamic scale) and calls the inner optimizer's
`apply` inside a `tf.cond` branch. The factors and the Gram are kept in float32, the Cholesky factor
and the solve in float64, and the directions go to the float32 variables.

How close to the float32 run can a mixed run be? Its forward and backward passes round every
activation and output gradient to 11 (float16) or 8 (bfloat16) significant bits (unit roundoff
4.9e-4 and 3.9e-3), so even the plain gradient differs from float32: on the model below, three SGD
steps differ by 8.7e-4 (float16) and 2.6e-3 (bfloat16) in relative norm of the whole update. The
natural-gradient direction is a smooth function of the same captured quantities, amplified by the
damped inverse (at most (‖F‖ + λ)/λ): for the test below (λ = 0.5, three steps) we measured
3.1e-3 / 0.9e-3 (float16, empirical / true Fisher) and 6.4e-3 / 2.9e-3 (bfloat16). The tolerances
(1.5e-2 and 3e-2) leave about 5× margin above that, and stay far below what real mistakes cause:
a factor of 2 in the curvature moves this update by 0.40 (checked below), forgetting the loss scale
by more than 0.5 (checked below).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import KFAC, TENGraD, capture

TOLERANCE = {"mixed_float16": 1.5e-2, "mixed_bfloat16": 3e-2}
M = 16


@pytest.fixture(autouse=True)
def _restore_policy():
    previous = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(previous)


def cnn():
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(M, 6, 6, 2)).astype("float32"), rng.integers(0, 3, size=M)


def tengrad(**kw):
    base = dict(learning_rate=0.1, damping=0.5, momentum=0.0, kl_clip=None, curvature_update_freq=2,
                adaptive_damping=False)
    base.update(kw)
    return TENGraD(**base)


def train(policy, optimizer, init, steps, optimizer_wrapper=None):
    """The update (weights after − before) of `steps` train_on_batch steps under `policy`."""
    keras.config.set_dtype_policy(policy)
    model = cnn()
    model.set_weights(init)
    x, y = data()
    compiled = optimizer if optimizer_wrapper is None else optimizer_wrapper(optimizer)
    model.compile(optimizer=compiled, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for _ in range(steps):
        model.train_on_batch(x, y)
    keras.config.set_dtype_policy("float32")
    return model, np.concatenate([(w - w0).ravel() for w, w0 in zip(model.get_weights(), init)])


def relative_error(update, reference):
    return np.linalg.norm(update - reference) / np.linalg.norm(reference)


def initial_weights():
    keras.config.set_dtype_policy("float32")
    return cnn().get_weights()


@pytest.mark.parametrize("fisher_type, metric", [("empirical", "identity"), ("true", "identity"),
                                                 ("exact", "identity"), ("true", "inputs")])
def test_mixed_precision_update_matches_float32(fixed_sampled_labels, fisher_type, metric):
    """Three steps at curvature_update_freq=2 (fresh, cached, fresh curvature), both policies;
    with the damping metric too (D_A from the float16 inputs, its factor in float32)."""
    _, y = data()
    fixed_sampled_labels["y"] = (y + 1) % 3  # the same sampled labels in every run
    init = initial_weights()
    _, reference = train("float32", tengrad(fisher=fisher_type, damping_metric=metric), init,
                         steps=3)
    for policy, tolerance in TOLERANCE.items():
        opt = tengrad(fisher=fisher_type, damping_metric=metric)
        model, update = train(policy, opt, init, steps=3)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) == (
            policy == "mixed_float16")  # Keras's own wrapping: the case this file is about
        assert model.layers[0].compute_dtype == policy.split("_")[1]
        assert all(v.dtype == "float32" for v in model.trainable_variables)
        for block in opt._blocks.values():
            cache = block.state_variables
            if metric == "inputs":  # the convolution by L_A, the Dense layer by its 16 < 65 rows
                assert block.metric.form == ("rows" if block.kind == "Dense" else "whitened")
            assert cache["cholesky"].dtype == tf.float64
            assert all(v.dtype == tf.float32 for k, v in cache.items() if k in ("a", "g", "j"))
        assert int(opt.iterations.numpy()) == 3 and int(opt.skipped_steps.numpy()) == 0
        assert relative_error(update, reference) < tolerance, policy


def test_tolerance_would_catch_a_curvature_off_by_two():
    """(2F + λI)⁻¹g = ½ (F + λ/2 I)⁻¹g: a float32 run at half the damping and half the learning
    rate is what a factor 2 in F gives. Its update is far outside the mixed-precision tolerance."""
    init = initial_weights()
    _, reference = train("float32", tengrad(fisher="empirical"), init, steps=1)
    _, doubled = train("float32", tengrad(fisher="empirical", learning_rate=0.05, damping=0.25),
                       init, steps=1)
    assert relative_error(doubled, reference) > 5 * max(TOLERANCE.values())


def test_empirical_fisher_divides_out_the_loss_scale(monkeypatch):
    """Without the LossScaleOptimizer's scale (2¹⁵ by default), F would be 2³⁰ times too large."""
    init = initial_weights()
    _, reference = train("float32", tengrad(fisher="empirical"), init, steps=1)
    monkeypatch.setattr(capture.Record, "loss_scale_of", lambda self, optimizer: None)
    _, update = train("mixed_float16", tengrad(fisher="empirical"), init, steps=1)
    assert relative_error(update, reference) > 0.5


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_steps_skipped_by_the_loss_scale_optimizer_change_nothing(fixed_sampled_labels,
                                                                   fisher_type):
    """With a huge initial scale the float16 backward pass overflows: LossScaleOptimizer skips the
    step (our apply never runs) and halves the scale, until the first finite step, which must be
    the float32 step, taken with the (still large) scale divided out."""
    _, y = data()
    fixed_sampled_labels["y"] = (y + 1) % 3
    init = initial_weights()
    _, reference = train("float32", tengrad(fisher=fisher_type, momentum=0.5), init, steps=1)

    keras.config.set_dtype_policy("mixed_float16")
    model = cnn()
    model.set_weights(init)
    opt = tengrad(fisher=fisher_type, momentum=0.5)
    lso = keras.optimizers.LossScaleOptimizer(opt, initial_scale=2.0**24)
    model.compile(optimizer=lso, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, _ = data()
    skipped = 0
    while int(opt.iterations.numpy()) == 0:
        before = [w.copy() for w in model.get_weights()]
        model.train_on_batch(x, y)
        if int(opt.iterations.numpy()) == 0:
            skipped += 1
            for a, b in zip(model.get_weights(), before):
                np.testing.assert_array_equal(a, b)
            assert not any(v.numpy().any() for v in opt._momentums)
            assert not any(b.state_variables["filled"].numpy() for b in opt._blocks.values())
        assert skipped < 15
    assert skipped >= 1
    assert float(lso.dynamic_scale.numpy()) >= 2.0**10  # the step was taken with a large scale
    assert int(opt.skipped_steps.numpy()) == 0  # LossScaleOptimizer's skips are not ours
    update = np.concatenate([(w - w0).ravel() for w, w0 in zip(model.get_weights(), init)])
    assert relative_error(update, reference) < TOLERANCE["mixed_float16"]


def test_kfac_under_mixed_float16_matches_float32():
    """K-FAC shares the output-gradient path (and so the loss-scale handling) with TENGraD."""
    init = initial_weights()
    kfac = lambda: KFAC(learning_rate=0.1, damping=0.5, momentum=0.0, kl_clip=None,  # noqa: E731
                        fisher="empirical")
    _, reference = train("float32", kfac(), init, steps=2)
    model, update = train("mixed_float16", kfac(), init, steps=2)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert relative_error(update, reference) < TOLERANCE["mixed_float16"]


def test_capture_records_the_scale_that_scale_loss_applied():
    """The recorded scale is the factor LossScaleOptimizer.scale_loss multiplied the loss with,
    before and after the wrapper is built (its initial scale, then its dynamic scale)."""
    inner = tengrad()
    lso = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**7)
    loss = tf.constant(3.0)
    for scale in (2.0**7, 2.0**5):
        if scale != 2.0**7:
            lso.build([tf.Variable(1.0)])
            lso.dynamic_scale.assign(scale)
        scaled = lso.scale_loss(loss)
        recorded = capture.current_record().loss_scale_of(inner)
        assert float(recorded) == float(scaled) / 3.0 == scale
        assert capture.current_record().loss_scale_of(tengrad()) is None  # another optimizer's
    capture._reset_eager_record()


@pytest.mark.parametrize("policy", list(TOLERANCE))
def test_adaptive_damping_under_mixed_precision_matches_float32(policy):
    """The loss replayed at the new weights runs in the policy's precision and is unscaled like the
    recorded one: ρ and the adapted λ after the first step are those of float32, to the policy's
    rounding."""
    init = initial_weights()
    opts = {}
    for p in ("float32", policy):
        opts[p] = tengrad(fisher="empirical", adaptive_damping=True, damping=1e-3)
        train(p, opts[p], init, steps=1)
    ratio = {p: float(o.reduction_ratio.numpy()) for p, o in opts.items()}
    assert ratio["float32"] != 0.0
    assert abs(ratio[policy] - ratio["float32"]) < 10 * TOLERANCE[policy] * abs(ratio["float32"])
    lam = {p: float(o.damping_variable.numpy()) for p, o in opts.items()}
    assert lam[policy] == pytest.approx(lam["float32"])  # same adaptation decision
