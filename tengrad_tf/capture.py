"""Capture of layer inputs, pre-activation outputs and output gradients.

Keras never hands an optimizer its model: `build()` sees variables and `fit`'s train step only calls
`scale_loss` and `apply_gradients`. So the layers record themselves. Once `install()` has run (every
TENGraD/KFAC constructor calls it, before `compile` and therefore before the first trace), each call
of a supported layer kind (Dense, Conv1D/2D) is routed through `_capturing_call`, which

  * asks the layer's Fisher block for the pre-activation output z (the block knows its layer's math),
  * passes z through an identity whose custom gradient stores ∂L/∂z when the loss is differentiated,
  * applies the layer's activation as Keras would.

Keras losses record (y_true, y_pred, sample_weight) the same way, which is what the true Fisher needs
to sample labels from the model's predictive distribution.

Records are kept per (graph, thread): inside `fit`'s `tf.function` the forward pass, the backward pass
and `apply_gradients` are traced into one graph, so the optimizer finds the tensors of this very step
there. When `apply` runs in a graph nested in that one (Keras's `LossScaleOptimizer` calls it inside a
`tf.cond` branch under mixed_float16), `consume` finds the record in the enclosing graphs. Eager code
(custom loops without `tf.function`, `run_eagerly=True`) uses a per-thread eager record instead.
Replicas of `MirroredStrategy` run in their own threads, hence the thread key.

`keras.optimizers.LossScaleOptimizer.scale_loss` records the loss scale it multiplied the loss with,
so that the optimizer it wraps can unscale the captured output gradients (which carry that scale).

What this module does not do: any Fisher math. It only hands tensors to the blocks.

Private API: only `_tf_private.tape_is_recording`, `_tf_private.keras_mask` and
`_tf_private.outer_graph` (see there). The patch replaces the public `call` methods of `keras.layers.Dense`,
`keras.layers.Conv1D`/`Conv2D` (through their common base class, found from the public classes) and
`keras.losses.Loss.__call__` and `keras.optimizers.LossScaleOptimizer.scale_loss`, and keeps the
originals. Checked against Keras 3.15.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import weakref
from typing import Any, Callable

import keras
import tensorflow as tf

from tengrad_tf import _tf_private

_EAGER = "eager"


@dataclasses.dataclass(eq=False)
class LayerCall:
    """One call of a supported layer inside the current step."""

    layer: keras.layers.Layer
    inputs: tf.Tensor
    preactivation: tf.Tensor
    # ∂L/∂z from the backward pass of the training loss (None until that pass has run through here).
    output_grad: tf.Tensor | None = None


@dataclasses.dataclass(eq=False)
class LossCall:
    """One call of a Keras loss inside the current step."""

    loss: keras.losses.Loss
    y_true: Any
    y_pred: Any
    sample_weight: Any
    # The Keras mask of y_pred (e.g. downstream of Embedding(mask_zero=True)), which Loss.__call__
    # applies; kept here because the optimizer evaluates the loss again on a gated copy of y_pred.
    mask: Any = None
    # ∂(differentiated loss)/∂(this loss's value), set by the training backward pass: the loss's
    # weight in the total (compile's loss_weights, times any loss scale). None if the loss was not
    # differentiated (e.g. a loss computed only for a metric).
    loss_grad: Any = None


@dataclasses.dataclass(eq=False)
class Record:
    """Everything captured since the optimizer last consumed a step, for one graph and thread."""

    layer_calls: list[LayerCall] = dataclasses.field(default_factory=list)
    loss_calls: list[LossCall] = dataclasses.field(default_factory=list)
    # Layers of a supported kind that ran but cannot be preconditioned, with the reason.
    skipped: list[tuple[keras.layers.Layer, str]] = dataclasses.field(default_factory=list)
    # While the optimizer differentiates its own sampled loss, the identities must not overwrite the
    # training gradients they already hold.
    frozen: bool = False
    # (LossScaleOptimizer, the scale its scale_loss multiplied the loss with) in this step.
    loss_scales: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    # The graph the record's tensors live in (a weak reference: the graph owns its records), or
    # None for the eager record.
    graph_ref: Any = None

    def as_default(self):
        """Context in which ops are built in the record's own graph (nothing to do eagerly).

        The optimizer builds the true Fisher's sampled backward pass there: `tf.gradients` of the
        step's tensors only works in the graph that holds them, not in a `tf.cond` branch nested
        in it; the results are then captured by the nested graph like any outer tensor."""
        graph = None if self.graph_ref is None else self.graph_ref()
        if graph is None or graph is tf.compat.v1.get_default_graph():
            return contextlib.nullcontext()
        return graph.as_default()

    def loss_scale_of(self, optimizer):
        """The scale a LossScaleOptimizer wrapping `optimizer` applied to this step's loss (None
        if none did: then the captured output gradients carry no such scale)."""
        scales = [s for lso, s in self.loss_scales if lso.inner_optimizer is optimizer]
        return scales[-1] if scales else None


# Eager records are dropped past this many layer calls without an optimizer step (e.g. a long eager
# evaluation), so that capture never grows memory without bound.
_MAX_EAGER_CALLS = 10_000

_state = threading.local()
_graph_records: "weakref.WeakKeyDictionary[Any, dict[int, Record]]" = weakref.WeakKeyDictionary()
_installed = False
_originals: dict[Any, Callable] = {}
_lock = threading.Lock()


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


def _graph_record(graph) -> Record:
    with _lock:
        per_thread = _graph_records.setdefault(graph, {})
        return per_thread.setdefault(threading.get_ident(), Record(graph_ref=weakref.ref(graph)))


def _step_graph():
    """The graph holding this step's record: the current graph, or the nearest enclosing graph
    (`FuncGraph.outer_graph`) whose record for this thread holds anything.

    Layers record in the graph they run in, so a step whose `apply` is traced in a nested graph
    (a `tf.cond` branch of LossScaleOptimizer, a nested tf.function) finds its forward pass in an
    enclosing one. Sibling graphs (the body of a while loop a layer ran in) are never searched:
    their tensors cannot be used outside them.
    """
    current = tf.compat.v1.get_default_graph()
    thread = threading.get_ident()
    graph = current
    with _lock:
        while graph is not None:
            record = _graph_records.get(graph, {}).get(thread)
            if record is not None and (record.layer_calls or record.loss_calls
                                       or record.loss_scales or record.skipped):
                return graph
            graph = _tf_private.outer_graph(graph)  # None past the outermost graph
    return current


def consume() -> Record:
    """Return this step's record and start a fresh one (called once per optimizer step)."""
    if _key() is _EAGER:
        record = current_record()
        _state.eager = Record()
        return record
    graph = _step_graph()
    record = _graph_record(graph)
    with _lock:
        _graph_records[graph][threading.get_ident()] = Record(graph_ref=weakref.ref(graph))
    return record


def _gradient_tap(record: Record, call, attribute: str) -> Callable[[tf.Tensor], tf.Tensor]:
    """An identity whose gradient function stores the incoming gradient as `call.<attribute>`
    (unless the record is frozen) and passes it on unchanged."""

    @tf.custom_gradient
    def identity(v):
        def grad(dv):
            if not record.frozen:
                setattr(call, attribute, dv)
            return dv

        return tf.identity(v), grad

    return identity


def _record_output(record: Record, call: LayerCall) -> tf.Tensor:
    """Identity on z whose gradient function stores the incoming ∂L/∂z in `call`."""
    with tf.name_scope("tengrad_capture"):  # marks capture's ops in profiles
        return _gradient_tap(record, call, "output_grad")(call.preactivation)


def _capturing_call(original: Callable) -> Callable:
    from tengrad_tf import _tf_private, blocks  # blocks import Keras layers; avoid a cycle

    @functools.wraps(original)
    def call(self, inputs, *args, **kwargs):
        block_class = blocks.block_class_for(self)
        if block_class is None or not self.trainable:
            return original(self, inputs, *args, **kwargs)
        # Eagerly, only a call under a recording GradientTape can be part of a training step;
        # recording others (an eager inference loop) would only hold their inputs in memory.
        if tf.executing_eagerly() and not _tf_private.tape_is_recording():
            return original(self, inputs, *args, **kwargs)
        record = current_record()
        if record.frozen:
            return original(self, inputs, *args, **kwargs)
        reason = block_class.unsupported_reason(self)
        if reason:
            record.skipped.append((self, reason))
            return original(self, inputs, *args, **kwargs)
        if tf.executing_eagerly() and _starts_new_eager_step(record, self):
            consume()  # drop the previous step's calls
            record = current_record()
        z = block_class.preactivation(self, inputs)
        layer_call = LayerCall(layer=self, inputs=inputs, preactivation=z)
        z = _record_output(record, layer_call)
        layer_call.preactivation = z
        record.layer_calls.append(layer_call)
        return self.activation(z) if self.activation is not None else z

    return call


def _starts_new_eager_step(record: Record, layer) -> bool:
    """Eager code has no graph to scope a step: a layer that runs again after the backward pass
    reached its last call begins the next step's forward pass, so the old calls are dropped."""
    if len(record.layer_calls) >= _MAX_EAGER_CALLS:
        return True
    return any(c.layer is layer and c.output_grad is not None for c in record.layer_calls)


def _capturing_loss_call(original: Callable) -> Callable:
    @functools.wraps(original)
    def __call__(self, y_true, y_pred, sample_weight=None):
        # CompileLoss is the container `compile` builds; the per-output losses inside it are the ones
        # whose predictive distribution we can sample from.
        if not _is_container_loss(self):
            record = current_record()
            if not record.frozen:
                from tengrad_tf import _tf_private

                mask = _tf_private.keras_mask(y_pred) if tf.is_tensor(y_pred) else None
                call = LossCall(self, y_true, y_pred, sample_weight, mask=mask)
                record.loss_calls.append(call)
                return _record_loss_grad(record, call,
                                         original(self, y_true, y_pred, sample_weight))
        return original(self, y_true, y_pred, sample_weight)

    return __call__


def _record_loss_grad(record: Record, call: LossCall, value):
    """Identity on a loss value whose gradient function stores ∂(total loss)/∂value in `call`.

    The true Fisher weights each output's sampled loss as the training loss weights it (compile's
    loss_weights, or any factor a custom loop applies), and skips losses nobody differentiated."""
    if not tf.is_tensor(value) or not value.dtype.is_floating:
        return value
    return _gradient_tap(record, call, "loss_grad")(value)


def unrecorded_loss(loss, y_true, y_pred, sample_weight=None):
    """`loss(y_true, y_pred, sample_weight)` without recording it: the optimizer's own evaluation
    of the loss at sampled labels is not part of the step."""
    original = _originals.get(keras.losses.Loss, keras.losses.Loss.__call__)
    return original(loss, y_true, y_pred, sample_weight)


def _is_container_loss(loss) -> bool:
    return type(loss).__name__ == "CompileLoss"


def _capturing_scale_loss(original: Callable) -> Callable:
    @functools.wraps(original)
    def scale_loss(self, loss):
        # The scale is the one LossScaleOptimizer.scale_loss multiplies with (Keras 3.15:
        # dynamic_scale once built, initial_scale before), read here, before the step can change it.
        scale = self.dynamic_scale if self.built else self.initial_scale
        scale = tf.convert_to_tensor(scale, tf.float32)
        record = current_record()
        # Keep one entry per wrapper: an eager loop that scales without stepping must not grow it.
        record.loss_scales = [(o, s) for o, s in record.loss_scales if o is not self]
        record.loss_scales.append((self, scale))
        return original(self, loss)

    return scale_loss


def patched_classes() -> list[type]:
    """Layer classes whose `call` capture replaces: Dense, Conv1D and the base of Conv2D/3D."""
    conv_base = keras.layers.Conv2D.__mro__[1]  # BaseConv, shared by Conv1D/Conv2D/Conv3D
    assert conv_base is keras.layers.Conv1D.__mro__[1], "Keras changed its convolution hierarchy"
    return [keras.layers.Dense, conv_base, keras.layers.Conv1D]  # Conv1D overrides call


def install() -> None:
    """Route supported layers and Keras losses through capture. Idempotent and thread-safe."""
    global _installed
    with _lock:
        if _installed:
            return
        for cls in patched_classes():
            _originals[cls] = cls.call
            cls.call = _capturing_call(cls.call)
        _originals[keras.losses.Loss] = keras.losses.Loss.__call__
        keras.losses.Loss.__call__ = _capturing_loss_call(keras.losses.Loss.__call__)
        lso = keras.optimizers.LossScaleOptimizer
        _originals[lso] = lso.scale_loss
        lso.scale_loss = _capturing_scale_loss(lso.scale_loss)
        _installed = True


def uninstall() -> None:
    """Restore the original methods (tests use this to show that capture is what binds)."""
    global _installed
    with _lock:
        for cls, original in _originals.items():
            if cls is keras.losses.Loss:
                cls.__call__ = original
            elif cls is keras.optimizers.LossScaleOptimizer:
                cls.scale_loss = original
            else:
                cls.call = original
        _originals.clear()
        _installed = False


def is_installed() -> bool:
    return _installed
