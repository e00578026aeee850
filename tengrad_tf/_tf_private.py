"""The one place where tengrad_tf touches private TensorFlow/Keras APIs (tests/test_tf_private.py).

Checked against TensorFlow 2.21 and Keras 3.15. If an import here breaks, only this module and its
test need to change.
"""

from __future__ import annotations

import tensorflow as tf
from keras.src.backend.common import masking  # private: Keras 3 has no public mask accessor
from keras.src.trainers.compile_utils import CompileLoss  # private: compile's loss container
from tensorflow.python.eager import record  # private: no public "is a tape recording?" query
from tensorflow.python.ops import control_flow_util  # private: no public "am I under XLA?" query


def in_xla_context() -> bool:
    """True while tracing a function that XLA will compile (`jit_compile=True`)."""
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def tape_is_recording() -> bool:
    """True if some GradientTape could record the ops run now (eager mode)."""
    return bool(record.could_possibly_record())


def keras_mask(x):
    """The Keras mask carried by a tensor (e.g. downstream of Embedding(mask_zero=True)), or None.

    Keras's `Loss.__call__` reads it from y_pred and leaves masked entries out of the loss."""
    return masking.get_keras_mask(x)


def set_keras_mask(x, mask) -> None:
    """Attach `mask` to tensor `x` as Keras layers do, so that a Loss called on it applies it."""
    masking.set_keras_mask(x, mask)


def outer_graph(graph):
    """The graph that `graph` is nested in (for a tf.function's or a tf.cond/while branch's graph,
    `FuncGraph.outer_graph`), or None for an outermost graph. FuncGraph is not public API."""
    return getattr(graph, "outer_graph", None)


def is_compile_loss(loss) -> bool:
    """Whether `loss` is the container `model.compile` builds around the user's losses.

    Capture records the per-output losses inside it, not the container: those are the ones whose
    predictive distribution the true Fisher samples from. CompileLoss is not public API."""
    return isinstance(loss, CompileLoss)


def seed_generator_states(model) -> list:
    """The state variables of the `keras.random.SeedGenerator`s that `model`'s layers draw their
    random numbers from (Dropout's masks, GaussianNoise, the random augmentation layers).

    A layer's next draw is a function of this state alone (Keras's random ops are stateless ops
    seeded from it), so the loss replay sets it back to reproduce the step's own draws. Keras
    tracks the states among the model's non-trainable variables under a fixed name, but has no
    public accessor for them."""
    return [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]
