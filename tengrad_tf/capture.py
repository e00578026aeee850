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
there. Eager code (custom loops without `tf.function`, `run_eagerly=True`) uses a per-thread eager
record instead. Replicas of `MirroredStrategy` run in their own threads, hence the thread key.

What this module does not do: any Fisher math. It only hands tensors to the blocks.

Private API: only `_tf_private.tape_is_recording` (see there). The patch replaces the public `call` methods of `keras.layers.Dense`,
`keras.layers.Conv1D`/`Conv2D` (through their common base class, found from the public classes) and
`keras.losses.Loss.__call__`, and keeps the originals. Checked against Keras 3.15.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Any, Callable

import keras
import tensorflow as tf

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
    thread = threading.get_ident()
    if key is _EAGER:
        record = getattr(_state, "eager", None)
        if record is None:
            record = _state.eager = Record()
        return record
    with _lock:
        per_thread = _graph_records.setdefault(key, {})
        return per_thread.setdefault(thread, Record())


def consume() -> Record:
    """Return the current record and start a fresh one (called once per optimizer step)."""
    record = current_record()
    fresh = Record()
    if _key() is _EAGER:
        _state.eager = fresh
    else:
        with _lock:
            _graph_records[_key()][threading.get_ident()] = fresh
    return record


def _record_output(record: Record, call: LayerCall) -> tf.Tensor:
    """Identity on z whose gradient function stores the incoming ∂L/∂z in `call`."""

    @tf.custom_gradient
    def identity(z):
        def grad(dz):
            if not record.frozen:
                call.output_grad = dz
            return dz

        return tf.identity(z), grad

    return identity(call.preactivation)


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
                record.loss_calls.append(LossCall(self, y_true, y_pred, sample_weight))
        return original(self, y_true, y_pred, sample_weight)

    return __call__


def _is_container_loss(loss) -> bool:
    return type(loss).__name__ == "CompileLoss"


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
        _installed = True


def uninstall() -> None:
    """Restore the original methods (tests use this to show that capture is what binds)."""
    global _installed
    with _lock:
        for cls, original in _originals.items():
            if cls is keras.losses.Loss:
                cls.__call__ = original
            else:
                cls.call = original
        _originals.clear()
        _installed = False


def is_installed() -> bool:
    return _installed
