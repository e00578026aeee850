"""The one place where tengrad_tf touches private TensorFlow/Keras APIs (tests/test_tf_private.py).

Checked against TensorFlow 2.21 and Keras 3.15. If an import here breaks, only this module and its
test need to change.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.eager import record  # private: no public "is a tape recording?" query
from tensorflow.python.ops import control_flow_util  # private: no public "am I under XLA?" query


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (`jit_compile=True`)."""
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def tape_is_recording() -> bool:
    """True if some GradientTape could record the ops run now (eager mode)."""
    return bool(record.could_possibly_record())
