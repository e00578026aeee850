"""The block protocol (tengrad_tf/blocks/protocol.py): both kinds of block implement it, state is
made by an explicit `prepare`, and the predicates the core asks make nothing."""

import types

import keras
import pytest
import tensorflow as tf

from tengrad_tf.blocks import CurvatureBlock, FisherBlock
from tengrad_tf.blocks.kronecker import KroneckerBlock
from tengrad_tf.blocks.network import NetworkSolve


def dense():
    layer = keras.layers.Dense(3)
    layer.build((None, 4))
    return layer


@pytest.mark.parametrize("make", [FisherBlock, KroneckerBlock], ids=["fisher", "kronecker"])
def test_blocks_implement_the_protocol_and_prepare_their_state_explicitly(make):
    block = make(dense())
    assert isinstance(block, CurvatureBlock)
    assert block.state_variables == {}  # nothing before the core asks for it
    inputs = [tf.zeros((8, 4))]
    assert block.prepare(inputs) is True
    made = dict(block.state_variables)
    assert made
    assert block.prepare(inputs) is False  # once
    step = tf.constant(0, tf.int64)
    assert bool(block.needs_output_grads(step))  # step 0, nothing cached: an update
    assert block.state_variables == made  # the predicate created nothing


def test_arguments_keep_their_names_on_the_way_down():
    block = FisherBlock(dense(), curvature_update_freq=7, max_damping_retries=2)
    assert (block.curvature_update_freq, block.max_damping_retries) == (7, 2)
    kfac = KroneckerBlock(dense(), cov_update_freq=3, inv_update_freq=9)
    assert (kfac.cov_update_freq, kfac.inv_update_freq) == (3, 9)
    assert NetworkSolve(0.1, max_damping_retries=4).max_damping_retries == 4


def test_blocks_hold_no_reference_to_an_optimizer():
    """No callback up: a block knows its layer and its hyperparameters, nothing above."""
    block = FisherBlock(dense())
    block.prepare([tf.zeros((8, 4))])
    for value in vars(block).values():
        assert not isinstance(value, (keras.optimizers.Optimizer, types.FunctionType,
                                      types.MethodType)), value
