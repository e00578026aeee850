"""Tests for tengrad_tf.step: the finiteness check of a step's fresh curvature."""

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf.step import all_finite


def _tensors():
    return [tf.constant(np.ones((3, 4)), tf.float32), tf.constant(np.arange(5.0), tf.float64),
            tf.constant([[1.5]], tf.float16), tf.zeros([0, 7], tf.float32)]


def test_all_finite_holds_for_finite_tensors_even_where_their_norm_would_overflow():
    huge = tf.fill([1000], tf.constant(3e38, tf.float32))  # finite; ‖x‖² overflows float32
    assert bool(all_finite(_tensors() + [huge]))
    assert bool(all_finite([]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", range(3))
def test_all_finite_finds_one_non_finite_element_in_any_tensor(bad, where):
    tensors = _tensors()
    values = tensors[where].numpy().copy()
    values.flat[-1] = bad
    tensors[where] = tf.constant(values, tensors[where].dtype)
    assert not bool(all_finite(tensors))


def test_all_finite_takes_two_ops_per_tensor_when_traced():
    tensors = [tf.TensorSpec([None, 3], tf.float32)] * 10 + [tf.TensorSpec([None], tf.float64)] * 5
    graph = tf.function(lambda *ts: all_finite(list(ts))).get_concrete_function(*tensors).graph
    ops = [op.type for op in graph.get_operations() if op.type != "Placeholder"]
    assert ops.count("Mul") == 15 and ops.count("L2Loss") == 15
    assert len(ops) <= 2 * 15 + 12  # a zero, a stack, a cast and a sum per dtype; the check
