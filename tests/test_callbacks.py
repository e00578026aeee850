"""callbacks.Diagnostics: what the step rule did, in the logs and in TensorBoard files."""

import glob

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD, callbacks


def fit(opt, callback, epochs=1):
    x = np.random.default_rng(0).normal(size=(64, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"),
                              keras.layers.Dense(2)])
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    seen = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(
        dict(logs)))
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[callback, record])
    return model, seen


def test_diagnostics_reach_the_logs_and_tensorboard(tmp_path):
    opt = TENGraD(learning_rate="auto", momentum="auto", adaptive_damping=True,
                  damping_adaptation_interval=2, curvature_update_freq=2)
    model, seen = fit(opt, callbacks.Diagnostics(str(tmp_path), every=1))
    last = seen[-1]
    for key in ("damping", "step_size", "momentum_coefficient", "reduction_ratio", "kl_factor",
                "direction_norm", "skipped_steps", "rejected_steps"):
        assert key in last, key
    conditions = [v for k, v in last.items() if k.startswith("condition/")]
    assert len(conditions) == 2 and min(conditions) >= 1.0 and last["direction_norm"] > 0
    assert 0 < last["kl_factor"] <= 1
    assert last["damping"] == pytest.approx(float(opt.damping_variable.numpy()))
    (events,) = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events) for v in e.summary.value}
    assert {"tengrad/damping", "tengrad/reduction_ratio"} <= tags
    assert sum(t.startswith("tengrad/condition/") for t in tags) == 2


def test_diagnostics_retraces_a_step_traced_without_them():
    opt = TENGraD(fisher="empirical")
    model, _ = fit(opt, keras.callbacks.Callback())
    assert not opt._diagnostics
    model.fit(np.ones((16, 6), "float32"), np.zeros(16, "int64"), batch_size=16, verbose=0,
              callbacks=[callbacks.Diagnostics()])
    assert opt.diagnostics()["direction_norm"] > 0  # written by the retraced step


def test_diagnostics_argument_and_optimizer_are_checked():
    with pytest.raises(ValueError, match="every"):
        callbacks.Diagnostics(every=0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="Diagnostics"):
        model.fit(np.ones((4, 2)), np.ones(4), verbose=0, callbacks=[callbacks.Diagnostics()])
