"""Capture of layer inputs, pre-activation outputs and output gradients, per backward pass.

Keras never hands an optimizer its model: `build()` sees variables and `fit`'s train step only calls
`scale_loss` and `apply_gradients`. So the layers record themselves. While capture is installed
(as long as some TENGraD/KFAC instance is alive: `acquire`/`release`), each call of a layer kind
with a helper (`tengrad_tf.layers`: Dense, EinsumDense, Embedding, convolutions, normalization)
made under a recording GradientTape is routed through `_capturing_call`, which

  * asks the layer's helper to run the layer: it returns the output before the activation z,
    computed exactly as the layer's own call (or the call's own output, for layers without an
    activation), and the tensor the blocks need later (the input, the normalized input, token ids),
  * passes z through an identity whose custom gradient stores ∂(target)/∂z for the backward pass
    that is running,
  * applies the layer's activation as Keras would.

Every other layer called under a recording tape is only noted (`Record.called_layers`), so that the
summary can name the layer and class of each first-order variable (an LSTM, a custom layer). Keras
losses record (y_true, y_pred, sample_weight, their value) through a tap of their own, which the
true Fisher needs to sample labels; `LossScaleOptimizer.scale_loss` records the scale it applied;
`GradientTape.gradient` opens one `BackwardPass` per call (backward.py: the passes and the taps;
record.py: what is recorded, and how one optimizer's share of it is found).

Records are kept per (graph, thread), on the graph: inside `fit`'s `tf.function` the forward pass,
the backward pass and `apply_gradients` are traced into one graph, so the optimizer finds the tensors
of this very step there. When `apply` runs in a graph nested in that one (Keras's
`LossScaleOptimizer` calls it inside a `tf.cond` branch under mixed_float16), `step_record` finds
the record in the enclosing graphs. Eager code uses a per-thread eager record, which a new forward
pass resets. Replicas of `MirroredStrategy` run in their own threads, hence the thread key.

What this module does not do: any Fisher math. It only hands tensors to the blocks.

Private API: only through `_tf_private`. The patch replaces the public `call` methods of the layer
classes the helpers handle (the class that defines each one's `call`, found from the public classes:
`layers.captured_classes`), `keras.layers.Layer.__call__` (which only notes the layer),
`keras.losses.Loss.__call__`, `keras.optimizers.LossScaleOptimizer.scale_loss`,
`tf.GradientTape.gradient` and `keras.Model.compute_metrics` (only to make the compiled metrics'
variables outside the traced step, eager_state.py), and keeps the originals, which `release` puts
back when the last optimizer is gone. Checked against Keras 3.15 and TensorFlow 2.21.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

import keras
import tensorflow as tf

from tengrad_tf import _tf_private, backward, eager_state, layers
from tengrad_tf.record import (AmbiguousStepError, BindingError, LayerCall, LossCall, ModelCall,
                               Record)

# The errors and the recorded data are record.py's; the errors and Record stay importable from here.
__all__ = ["AmbiguousStepError", "BindingError", "Record", "acquire", "current_record",
           "is_installed", "step_record", "unrecorded_loss"]

_EAGER = "eager"
# The attribute of a tf.Graph that holds its records ({thread id: Record}). On the graph, not in a
# module-level map: the graph owns the tensors its records hold, so both go away together.
_GRAPH_ATTRIBUTE = "_tengrad_records"


# Eager records are dropped past this many layer calls without a backward pass reaching them (e.g.
# a long eager evaluation under a tape), so that capture never grows memory without bound.
_MAX_EAGER_CALLS = 10_000

_state = threading.local()
_lock = threading.RLock()


def _key():
    if tf.executing_eagerly():
        return _EAGER
    return tf.compat.v1.get_default_graph()


def current_record() -> Record:
    """The record of the current graph (or of eager execution) for this thread."""
    key = _key()
    if key is _EAGER:
        record = getattr(_state, "eager", None)
        if record is None:
            record = _state.eager = Record()
        return record
    return _graph_record(key)


def _records_of(graph) -> dict[int, Record] | None:
    return getattr(graph, _GRAPH_ATTRIBUTE, None)


def _graph_record(graph) -> Record:
    with _lock:
        per_thread = _records_of(graph)
        if per_thread is None:
            per_thread = {}
            setattr(graph, _GRAPH_ATTRIBUTE, per_thread)
        return per_thread.setdefault(threading.get_ident(), Record(graph_ref=weakref.ref(graph)))


def step_record() -> Record:
    """The record of the step an optimizer is applying: the current graph's, or the nearest
    enclosing graph's (`FuncGraph.outer_graph`) whose record for this thread holds anything.

    Layers record in the graph they run in, so a step whose `apply` is traced in a nested graph
    (a `tf.cond` branch of LossScaleOptimizer, a nested tf.function) finds its forward pass in an
    enclosing one. Sibling graphs (the body of a while loop a layer ran in) are never searched:
    their tensors cannot be used outside them.

    Nothing is reset: every optimizer of the step reads the same record, each its own share of it.
    A graph's record goes away with the graph; the eager record is reset by the next forward pass.
    """
    if _key() is _EAGER:
        return current_record()
    current = tf.compat.v1.get_default_graph()
    thread = threading.get_ident()
    graph = current
    with _lock:
        while graph is not None:
            record = (_records_of(graph) or {}).get(thread)
            if record is not None and not record.is_empty():
                return record
            graph = _tf_private.outer_graph(graph)  # None past the outermost graph
    return current_record()


def _reset_eager_record() -> Record:
    # The layers that ran so far are kept: the model (or a layer before the first captured one)
    # was called before the next step's first captured call resets the record.
    called = getattr(_state, "eager", Record()).called_layers
    _state.eager = Record(called_layers=called)
    return _state.eager


def _capturing_call(original: Callable) -> Callable:
    @functools.wraps(original)
    def call(self, *args, **kwargs):
        helper = layers.helper_class_for(self)
        # Only the class's own call is captured: a subclass that overrides `call` and reaches
        # this one through super() computes something else with the same variables (it is named
        # first-order instead, layers.first_order_reason), and Conv1D's call, which calls its
        # base's, is captured once.
        if (helper is None or not self.trainable or type(self).call is not call
                # Only a call under a recording GradientTape can be part of a training step: an
                # inference trace (predict, evaluate) or an eager inference loop gets no capture
                # op and holds nothing in memory.
                or not _tf_private.tape_is_recording()):
            return original(self, *args, **kwargs)
        record = current_record()
        if record.frozen:
            return original(self, *args, **kwargs)
        reason = helper.unsupported_reason(self)
        if reason is None and tf.executing_eagerly() and _starts_new_eager_step(record, self):
            record = _reset_eager_record()
        forward = reason or helper.forward(self, original, args, kwargs)
        if isinstance(forward, str):  # this layer, or this call of it, has no exact block
            record.skipped.append((self, forward))
            return original(self, *args, **kwargs)
        layer_call = LayerCall(layer=self, inputs=forward.recorded, preactivation=forward.output)
        with tf.name_scope("tengrad_capture"):  # marks capture's ops in profiles
            z = backward.gradient_tap(record, layer_call, lambda p: p.output_grads)(forward.output)
        layer_call.preactivation = z
        record.layer_calls.append(layer_call)
        return forward.activation(z) if forward.activation is not None else z

    return call


def _recording_layer_call(original: Callable) -> Callable:
    """Layer.__call__ that notes which layers ran under a recording tape, so that the summary can
    name the layer (and its class) of every first-order variable, captured kinds or not. Python
    only: no op is added to the graph."""

    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        if _tf_private.tape_is_recording():
            record = current_record()
            if not record.frozen and len(record.called_layers) < _MAX_EAGER_CALLS:
                record.called_layers.setdefault(id(self), weakref.ref(self))
        return original(self, *args, **kwargs)

    return __call__


def _starts_new_eager_step(record: Record, layer) -> bool:
    """Eager code has no graph to scope a step: a layer that runs again after a backward pass
    reached one of its calls begins the next step's forward pass, so the old record is dropped."""
    if len(record.layer_calls) >= _MAX_EAGER_CALLS:
        return True
    return any(c.layer is layer and c.differentiated for c in record.layer_calls)


def _capturing_loss_call(original: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, y_true, y_pred, sample_weight=None):
        # CompileLoss is the container `compile` builds; the per-output losses inside it are the ones
        # whose predictive distribution we can sample from.
        if not _tf_private.is_compile_loss(self) and _tf_private.tape_is_recording():
            record = current_record()
            if not record.frozen:
                mask = _tf_private.keras_mask(y_pred) if tf.is_tensor(y_pred) else None
                call = LossCall(self, y_true, y_pred, sample_weight, mask=mask)
                record.loss_calls.append(call)
                value = original(self, y_true, y_pred, sample_weight)
                if not tf.is_tensor(value) or not value.dtype.is_floating:
                    return value
                call.value = value
                # The true Fisher weights each output's sampled loss as the differentiated loss
                # weights it (compile's loss_weights, or any factor a custom loop applies), and
                # skips losses a pass did not differentiate.
                return backward.gradient_tap(record, call, lambda p: p.loss_grads)(value)
        return original(self, y_true, y_pred, sample_weight)

    return __call__


def unrecorded_loss(loss, y_true, y_pred, sample_weight=None):
    """`loss(y_true, y_pred, sample_weight)` without recording it: the optimizer's own evaluation
    of the loss at sampled labels is not part of the step."""
    original = _originals.get((keras.losses.Loss, "__call__"), (keras.losses.Loss.__call__,))[0]
    return original(loss, y_true, y_pred, sample_weight)


def _capturing_model_call(original: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):
        depth = getattr(_state, "model_depth", 0)
        if depth or not _tf_private.tape_is_recording() or current_record().frozen:
            return original(self, *args, **kwargs)
        # Read before the call, which advances them (ops on one variable run in program order).
        random_states = tuple((v, tf.identity(v.value))
                              for v in _tf_private.seed_generator_states(self))
        _state.model_depth = depth + 1
        try:
            outputs = original(self, *args, **kwargs)
        finally:
            _state.model_depth = depth
        current_record().model_calls.append(
            ModelCall(weakref.ref(self), args, kwargs, outputs, random_states))
        return outputs

    return __call__


def _metrics_made_outside_the_step(original: Callable) -> Callable:
    @functools.wraps(original)
    def compute_metrics(self, *args, **kwargs):
        # Keras builds the compiled metrics in the first traced step; made there, their variables
        # would make TensorFlow trace the whole step (TENGraD's included) a second time.
        with eager_state.initializers_outside_the_step():
            return original(self, *args, **kwargs)
    return compute_metrics


def _capturing_scale_loss(original: Callable) -> Callable:
    @functools.wraps(original)
    def scale_loss(self, loss):
        # The scale is the one LossScaleOptimizer.scale_loss multiplies with (Keras 3.15:
        # dynamic_scale once built, initial_scale before), read here, before the step can change it.
        scale = self.dynamic_scale if self.built else self.initial_scale
        scale = tf.convert_to_tensor(scale, tf.float32)
        record = current_record()
        # Keep one entry per wrapper: an eager loop that scales without stepping must not grow it.
        record.loss_scales = [(o, s) for o, s in record.loss_scales if o() is not self]
        record.loss_scales.append((weakref.ref(self), scale))
        return original(self, loss)

    return scale_loss


# ---- installing the patch, for as long as some optimizer lives -------------------------------
_originals: dict[Any, Callable] = {}
_users = 0


def _patches() -> list[tuple[Any, str, Callable]]:
    """(owner, attribute, wrapper factory) of every method capture replaces."""
    return ([(cls, "call", _capturing_call) for cls in layers.captured_classes()] + [
        (keras.layers.Layer, "__call__", _recording_layer_call),
        (keras.losses.Loss, "__call__", _capturing_loss_call),
        (keras.optimizers.LossScaleOptimizer, "scale_loss", _capturing_scale_loss),
        (tf.GradientTape, "gradient", backward.tracking_gradient),
        # Layer.__call__ as models inherit it: patched on keras.Model, so layers are not affected.
        (keras.Model, "__call__", _capturing_model_call),
        (keras.Model, "compute_metrics", _metrics_made_outside_the_step),
    ])


def acquire(owner) -> None:
    """Install capture for as long as `owner` (a TENGraD/KFAC instance) lives.

    The patch is process-wide while installed (every call of a covered layer under a recording tape
    gets a tap), so it is removed as soon as the last owner is garbage-collected: a model traced
    after that, with any optimizer, carries no capture op. Thread-safe."""
    global _users
    with _lock:
        if _users == 0:
            for owner_class, name, wrap in _patches():
                original = getattr(owner_class, name)
                # An inherited method is deleted again on release, not set on the class.
                _originals[(owner_class, name)] = (original, name in vars(owner_class))
                setattr(owner_class, name, wrap(original))
        _users += 1
    weakref.finalize(owner, _release)


def _release() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for (owner_class, name), (original, own) in _originals.items():
                if own:
                    setattr(owner_class, name, original)
                else:
                    delattr(owner_class, name)
            _originals.clear()


def is_installed() -> bool:
    """Whether capture is installed now (some TENGraD/KFAC instance is alive)."""
    return _users > 0
