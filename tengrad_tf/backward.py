"""Backward passes under capture: which one is running, and the taps that store what reaches them.

Every `tf.GradientTape.gradient` call is one `BackwardPass` (`tracking_gradient` wraps it): the
passes running in this thread form a stack, and a tap's gradient function stores what reaches it
in the innermost one (or in the record's one untracked pass, for a bare `tf.gradients`). A tap on a
backward pass that is itself recorded by a tape also marks its gradient, so that a later pass
through it (a gradient penalty) is seen (`BackwardPass.second_order`).

What this module does not do: decide what to tap (capture.py), or read the passes (record.py).
"""

from __future__ import annotations

import functools
import threading
from typing import Callable

import tensorflow as tf

from tengrad_tf import _tf_private
from tengrad_tf.record import BackwardPass, LayerCall, Record, source_keys

_passes = threading.local()


def active_passes() -> list[BackwardPass]:
    """The passes running in this thread, innermost last (a gradient taken inside another)."""
    stack = getattr(_passes, "passes", None)
    if stack is None:
        stack = _passes.passes = []
    return stack


def gradient_tap(record: Record, call, grads_of: Callable[[BackwardPass], dict]
                 ) -> Callable[[tf.Tensor], tf.Tensor]:
    """An identity whose gradient function stores the incoming gradient in the running backward
    pass (unless the record is frozen) and passes it on unchanged."""

    @tf.custom_gradient
    def identity(v):
        def grad(dv):
            if record.frozen:
                return dv
            stack = active_passes()
            backward = stack[-1] if stack else record.untracked
            backward.note(call, grads_of(backward), dv)
            record.note_pass(backward)
            if isinstance(call, LayerCall):
                call.differentiated = True
            if _tf_private.tape_is_recording():
                # This backward pass is itself being recorded: a later pass may differentiate it.
                dv = _second_order_marker(record, call)(dv)
            return dv

        return tf.identity(v), grad

    return identity


def _second_order_marker(record: Record, call) -> Callable[[tf.Tensor], tf.Tensor]:
    """An identity on a backward-pass gradient: if a later pass differentiates through it, that
    pass has differentiated the call's gradient (BackwardPass.second_order)."""

    @tf.custom_gradient
    def identity(v):
        def grad(dv):
            stack = active_passes()
            backward = stack[-1] if stack else record.untracked
            backward.second_order.add(id(call))
            record.note_pass(backward)
            return dv

        return tf.identity(v), grad

    return identity


def tracking_gradient(original: Callable) -> Callable:
    """`tf.GradientTape.gradient` that runs as one tracked `BackwardPass`, with its sources and
    its results noted (record.Record.pass_for finds an optimizer's pass by them)."""
    @functools.wraps(original)
    def gradient(self, target, sources, *args, **kwargs):
        keys = frozenset().union(*(source_keys(s) for s in tf.nest.flatten(sources)))
        backward = BackwardPass(tracked=True, sources=keys)
        stack = active_passes()
        stack.append(backward)
        try:
            result = original(self, target, sources, *args, **kwargs)
        finally:
            stack.pop()
        backward.results = tuple(r for r in tf.nest.flatten(result) if r is not None)
        return result

    return gradient
