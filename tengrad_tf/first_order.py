"""The step of variables without a curvature block (`first_order`): its rules and Adam's math.

A variable no block covers (an LSTM's weights, a custom layer's) takes Keras's Adam under
first_order="adam" (the default), or the heavy-ball step of the preconditioned variables with
d = g ("sgd") or d = g/λ ("damped": a block with F = 0, the damped Fisher's null space).

Under adaptive damping λ bounds every variable's step, not only the preconditioned ones': "damped"
divides by the adapted λ, and the other two rules take min(1, λ₀/λ) of their step (`trust`), as
the null space of a block does (its step is g/λ). When λ bounded only the blocks, a loss increase
caused by Adam's step raised λ tenfold without making the next step any smaller: on an LSTM text
classifier λ rose from 0.1 to 6,000, freezing the preconditioned layers, while steps kept being
taken back (docs/step.md, "Variables without a block under adaptive damping"). Which
variables those are is decided when the step is bound (binding.py); this module only has the math,
written once for the step itself and for Adam's term in the quadratic model (adaptive.adam_model).
"""

from __future__ import annotations

import tensorflow as tf
from keras import ops

FIRST_ORDER_ADAM, FIRST_ORDER_SGD, FIRST_ORDER_DAMPED = "adam", "sgd", "damped"
FIRST_ORDER_RULES = (FIRST_ORDER_ADAM, FIRST_ORDER_SGD, FIRST_ORDER_DAMPED)
# Keras's Adam defaults.
ADAM_BETA_1, ADAM_BETA_2, ADAM_EPSILON = 0.9, 0.999, 1e-7


def _const(x, dtype):
    # Not ops.cast: a Python float would go through float32 first.
    return ops.convert_to_tensor(x, dtype=dtype)


def adam_rate(iterations, learning_rate, ratio: float, dtype=tf.float64):
    """Adam's bias-corrected rate η_t·√(1 − β₂ᵗ)/(1 − β₁ᵗ) of the step after `iterations` steps,
    with η_t = ratio · learning_rate: first_order_learning_rate follows the learning rate in
    proportion (ratio = first_order_learning_rate / lr(0))."""
    t = ops.cast(iterations + 1, dtype)
    eta = _const(ratio, dtype) * ops.cast(learning_rate, dtype)
    return eta * ops.sqrt(1 - ops.power(_const(ADAM_BETA_2, dtype), t)) / (
        1 - ops.power(_const(ADAM_BETA_1, dtype), t))


def adam_moments(gradient, m, v, eta, dtype):
    """Adam (β₁ 0.9, β₂ 0.999, ε 1e-7, as Keras's) at the rate `eta` (`adam_rate`):
    (new first moment, new second moment, the step θ − θ_new)."""
    g = ops.cast(gradient, dtype)
    m, v = ops.cast(m, dtype), ops.cast(v, dtype)
    m_new = ops.add(m, ops.multiply(ops.subtract(g, m), _const(1 - ADAM_BETA_1, dtype)))
    v_new = ops.add(v, ops.multiply(ops.subtract(ops.square(g), v), _const(1 - ADAM_BETA_2, dtype)))
    step = ops.divide(ops.multiply(m_new, eta),
                      ops.add(ops.sqrt(v_new), _const(ADAM_EPSILON, dtype)))
    return m_new, v_new, step


def trust(initial_damping, damping, dtype):
    """min(1, λ₀/λ): the share of its step that a variable without a block takes once adaptive
    damping has raised λ above its initial value λ₀ (learning_rate="auto" lets λ fall below λ₀;
    the step is then not enlarged)."""
    ratio = _const(initial_damping, tf.float64) / ops.cast(damping, tf.float64)
    return ops.cast(ops.minimum(ratio, _const(1.0, tf.float64)), dtype)
