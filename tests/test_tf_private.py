"""The private TF/Keras APIs wrapped in tengrad_tf._tf_private still behave as relied upon."""

import tensorflow as tf

from tengrad_tf import _tf_private


def test_in_xla_context():
    seen = []

    def probe(x):
        seen.append(_tf_private.in_xla_context())
        return x

    tf.function(probe, jit_compile=True)(tf.constant(1.0))
    tf.function(probe)(tf.constant(1.0))
    probe(tf.constant(1.0))
    assert seen == [True, False, False]


def test_tape_is_recording():
    assert not _tf_private.tape_is_recording()
    with tf.GradientTape():
        assert _tf_private.tape_is_recording()
    assert not _tf_private.tape_is_recording()
