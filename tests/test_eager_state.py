"""State made during the first traced step (tengrad_tf/eager_state.py): the step is traced once.

A tf.function whose first trace creates variables is traced a second time. TENGraD makes its
blocks' state (and, without a distribution strategy, Keras makes the optimizer's) inside the first
traced step; these tests fail if any of it is made the lifted way again.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import KFAC, TENGraD, eager_state, preconditioned
from tests.helpers import data, mlp, sce


@pytest.fixture
def traces(monkeypatch):
    """How many times `PreconditionedOptimizer.apply` runs (each traced step runs it once)."""
    count = [0]
    apply = preconditioned.PreconditionedOptimizer.apply

    def counted(self, *args, **kwargs):
        count[0] += 1
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(preconditioned.PreconditionedOptimizer, "apply", counted)
    return count


@pytest.mark.parametrize("make", [
    TENGraD,  # adaptive damping: the damping variable, the weights before a step, the Gram
    lambda: TENGraD(fisher_blocks="network", adaptive_damping=False),
    lambda: KFAC(cov_update_freq=1, inv_update_freq=2),
], ids=["tengrad", "network", "kfac"])
def test_fit_traces_the_step_once_and_keeps_its_state(traces, make):
    x, y = data(64)
    model = mlp()
    opt = make()
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert traces[0] == 1
    # The state made in that trace is the one the later steps used: filled, and kept.
    state = [v for block in opt._blocks.values() for v in block.state_variables.values()]
    assert state and all(isinstance(v, tf.Variable) for v in state)
    assert int(opt.iterations.numpy()) == 4
    before = [v.numpy().copy() for v in model.trainable_variables]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert traces[0] == 1  # the same traced step, with the same state
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_compiled_metrics_do_not_make_the_step_trace_twice(traces):
    """metrics=["accuracy"]: Keras makes the metric's variables in the first traced step; made
    eagerly (capture wraps compute_metrics), they still count every sample of the epoch, in
    training and in evaluation."""
    x, y = data(64)
    model = mlp()
    model.compile(optimizer=TENGraD(), loss=sce(), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert traces[0] == 1
    accuracy = next(m for m in model.metrics if m.name == "compile_metrics")
    counts = [v for v in accuracy.variables if "count" in v.name]
    assert [int(v.numpy()) for v in counts] == [64]  # reset per epoch, then four batches of 16
    assert 0.0 <= history.history["accuracy"][-1] <= 1.0
    predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
    _, evaluated = model.evaluate(x, y, batch_size=16, verbose=0)
    assert evaluated == pytest.approx(np.mean(predicted == y), abs=1e-6)


def test_a_variable_made_outside_the_step_persists_across_calls():
    """Made in the first trace, the variable is an ordinary eager one: created once, updated by
    every call, and the function is traced once."""
    made, traced = [], [0]

    @tf.function
    def step(x):
        traced[0] += 1
        if not made:
            with eager_state.outside_the_step():
                made.append(tf.Variable(tf.zeros([2]), trainable=False))
        made[0].assign_add(x)
        return made[0].read_value()

    step(tf.constant([1.0, 2.0]))
    out = step(tf.constant([1.0, 2.0]))
    np.testing.assert_array_equal(out.numpy(), [2.0, 4.0])
    np.testing.assert_array_equal(made[0].numpy(), [2.0, 4.0])
    assert traced[0] == 1 and len(made) == 1


def test_the_keras_optimizer_built_in_the_trace_starts_from_its_initializers():
    """Keras builds an optimizer inside the first traced step; its variables, made outside it,
    start from their initializers: zero momentum, the weights before the step saved, and λ₀."""
    x, y = data(16)
    model = mlp()
    initial = [v.numpy().copy() for v in model.trainable_variables]
    lr, momentum = 0.125, 0.9
    opt = TENGraD(learning_rate=lr, momentum=momentum, damping=0.05)
    model.compile(optimizer=opt, loss=sce())
    assert not opt.built
    model.train_on_batch(x, y)
    assert opt.built
    for v, w in zip(model.trainable_variables, initial):
        index = opt._get_variable_index(v)
        # The first step adapts λ (adaptive.py): it saved the weights before it.
        np.testing.assert_array_equal(opt._before_step[index].numpy(), w)
        # buffer = μ·0 + d and θ = θ₀ − lr·buffer (or both untouched if the step was taken back)
        np.testing.assert_allclose(w - v.numpy(), lr * opt._momentums[index].numpy(),
                                   rtol=1e-5, atol=1e-6)
    lam, omega = 0.05, 19 / 20
    assert np.isclose(opt.damping_variable.numpy(), [lam, lam * 10, lam / omega]).any()
