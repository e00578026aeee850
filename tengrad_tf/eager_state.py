"""Optimizer state made during the first traced step, without making TensorFlow trace it twice.

Much of TENGraD's state can only be sized once the step is traced: a block's cache depends on its
layer's captured inputs, and Keras builds an optimizer inside the first traced step unless a
distribution strategy is set. A `tf.function` whose first trace creates variables is traced a
second time (it must then run a version that creates none), so every such variable used to double
the first step's tracing, the larger part of TENGraD's first-step time (docs/performance.md).

`outside_the_step()` makes the variables eagerly, in `tf.init_scope`, and marks them with
`tf.Variable`'s public `experimental_enable_variable_lifting=False`, which tells the tf.function
being traced that it did not create them: they are ordinary eager variables that the traced step
captures, like a model's weights. That is only correct because they are created in
`tf.init_scope` (a variable made inside the graph with lifting disabled would be made anew on each
call), so the two always go together, here.

Keras makes the compiled metrics' variables in the first traced step as well (after the optimizer
has run, so outside any scope of ours): `fit(..., metrics=["accuracy"])` traced TENGraD's step
twice all the same, about a third of its first step on 3C1F. `initializers_outside_the_step()`,
which capture wraps around `Model.compute_metrics` while it is installed (capture.py), makes every
variable created under it from an initializer (a callable initial value, as Keras's are) the same
way; a variable initialized from a tensor of the traced step is left to TensorFlow.
"""

from __future__ import annotations

import contextlib

import tensorflow as tf


def _unlifted(next_creator, **kwargs):
    kwargs["experimental_enable_variable_lifting"] = False
    return next_creator(**kwargs)


@contextlib.contextmanager
def outside_the_step():
    """Create variables eagerly, outside any function being traced (see the module docstring)."""
    # The creator scope is entered after init_scope, on the outer (eager) context's creator stack,
    # which is the one variable creation consults there.
    with tf.init_scope(), tf.variable_creator_scope(_unlifted):
        yield


def _eager_if_initialized_by_a_callable(next_creator, **kwargs):
    if tf.inside_function() and callable(kwargs.get("initial_value")):
        kwargs["experimental_enable_variable_lifting"] = False
        with tf.init_scope():
            return next_creator(**kwargs)
    return next_creator(**kwargs)


@contextlib.contextmanager
def initializers_outside_the_step():
    """Variables made from an initializer while tracing are made eagerly (module docstring)."""
    with tf.variable_creator_scope(_eager_if_initialized_by_a_callable):
        yield
