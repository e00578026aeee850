"""Building a block's update schedule once per traced step: shared by every kind of block.

The core hands a block the same step tensor in needs_output_grads, curvature and commit; without a
memo, each call rebuilt the same schedule ops (benchmarks/profile_step.py counted about 50 of them
on the MLP, a sixth of a reuse step's ops).
"""

from __future__ import annotations

import tensorflow as tf

from tengrad_tf import _tf_private


def once_per_step(memo: dict, step, compute):
    """`compute(step)`, built once per traced step and then reused from `memo`.

    A tensor of an enclosing graph can be used inside a cond branch (TF captures it); one from an
    earlier trace cannot, hence the graph check.
    """
    hit = memo.get("value")
    if hit is not None and hit[0] is step and _visible_here(tf.nest.flatten(hit[1])[0]):
        return hit[1]
    value = compute(step)
    memo["value"] = (step, value)
    return value


def every(step, freq: int) -> tf.Tensor:
    """Whether `step` is a multiple of `freq` (an update step of a schedule with that period)."""
    return tf.equal(tf.math.floormod(step, freq), 0)


def _visible_here(t) -> bool:
    if not tf.is_symbolic_tensor(t):
        return tf.executing_eagerly()
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if graph is t.graph:
            return True
        graph = _tf_private.outer_graph(graph)
    return False
