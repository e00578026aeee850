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
summary can name the layer and class of each first-order variable (an LSTM, a custom layer).

Keras losses record (y_true, y_pred, sample_weight) the same way, which is what the true Fisher needs
to sample labels from the model's predictive distribution.

Several optimizers, several losses, one step (a GAN's generator and discriminator): every
`tf.GradientTape.gradient` call is one `BackwardPass`, which knows what it differentiated with
respect to (its sources) and collects the output gradients that passed through the taps. A layer
differentiated by two tapes keeps both. An optimizer takes the pass that produced its gradients (the
one whose results it was handed, else the one whose sources hold its variables) and, from it, only
the calls of the layers that own its variables (`Record.view_for`). Where that is ambiguous, it
raises `AmbiguousStepError`, which names what to change: never a step with another loss's
curvature.

Records are kept per (graph, thread), on the graph: inside `fit`'s `tf.function` the forward pass,
the backward pass and `apply_gradients` are traced into one graph, so the optimizer finds the tensors
of this very step there. When `apply` runs in a graph nested in that one (Keras's
`LossScaleOptimizer` calls it inside a `tf.cond` branch under mixed_float16), `step_record` finds
the record in the enclosing graphs. Eager code (custom loops without `tf.function`,
`run_eagerly=True`) uses a per-thread eager record, which a new forward pass resets. Replicas of
`MirroredStrategy` run in their own threads, hence the thread key.

`keras.optimizers.LossScaleOptimizer.scale_loss` records the loss scale it multiplied the loss with,
so that the optimizer it wraps can unscale the captured output gradients (which carry that scale).

What this module does not do: any Fisher math. It only hands tensors to the blocks.

Private API: only through `_tf_private`. The patch replaces the public `call` methods of the layer
classes the helpers handle (the class that defines each one's `call`, found from the public classes:
`layers.captured_classes`), `keras.layers.Layer.__call__` (which only notes the layer),
`keras.losses.Loss.__call__`, `keras.optimizers.LossScaleOptimizer.scale_loss` and
`tf.GradientTape.gradient`, and keeps the originals, which `release` puts back when the last
optimizer is gone. Checked against Keras 3.15 and TensorFlow 2.21.
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

from tengrad_tf import _tf_private, layers

_EAGER = "eager"
# The attribute of a tf.Graph that holds its records ({thread id: Record}). On the graph, not in a
# module-level map: the graph owns the tensors its records hold, so both go away together.
_GRAPH_ATTRIBUTE = "_tengrad_records"


class BindingError(RuntimeError):
    """The optimizer could not find the layers of the variables it was asked to update."""

    # Errors raised while tf.function traces a step with autograph (custom loops) keep their type
    # only if autograph can rebuild them from a message, which it does for this constructor.
    __init__ = Exception.__init__


class AmbiguousStepError(BindingError):
    """The step's backward passes do not say which loss an optimizer's gradients came from, or
    they cannot give the exact Fisher (a gradient of a gradient)."""


@dataclasses.dataclass(eq=False)
class LayerCall:
    """One call of a supported layer inside the current step."""

    layer: keras.layers.Layer
    inputs: tf.Tensor
    preactivation: tf.Tensor
    # ∂(target)/∂z of the backward pass an optimizer takes: set only on the copies that
    # `Record.view_for` hands to one optimizer; None on the record's own calls.
    output_grad: tf.Tensor | None = None
    # True once some backward pass ran through this call (eager: marks the end of its forward pass).
    differentiated: bool = False


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
    # ∂(target)/∂(this loss's value) in the optimizer's backward pass: the loss's weight in the
    # differentiated total (compile's loss_weights, times any loss scale). Set only on the copies
    # that `Record.view_for` hands to one optimizer; None there if that pass did not differentiate
    # this loss (e.g. a loss computed only for a metric, or another optimizer's loss).
    loss_grad: Any = None
    # The loss's value in the step (before any weighting), for the reduction ratio of adaptive
    # damping: h(θ) on this batch.
    value: Any = None


@dataclasses.dataclass(eq=False)
class ModelCall:
    """One outermost call of a Keras model under a recording tape: what adaptive damping calls
    again, after the step, to evaluate the loss at the new weights on the same batch."""

    model_ref: Any  # weakref: a graph's record must not keep the model (and its optimizer) alive
    args: tuple
    kwargs: dict
    outputs: Any

    @property
    def model(self):
        return self.model_ref()


@dataclasses.dataclass(eq=False)
class BackwardPass:
    """One differentiation in the step, and what it sent through the taps.

    Tracked passes are `tf.GradientTape.gradient` calls: their sources and results are known.
    Gradients taken any other way (a bare `tf.gradients` in a graph) go to the record's one
    untracked pass, which cannot tell two such differentiations apart (`repeated`).
    """

    tracked: bool
    sources: frozenset = frozenset()  # `source_keys` of what it differentiated with respect to
    results: tuple = ()  # the gradient tensors it returned
    output_grads: dict[int, tf.Tensor] = dataclasses.field(default_factory=dict)  # id(LayerCall)
    loss_grads: dict[int, Any] = dataclasses.field(default_factory=dict)  # id(LossCall)
    # Calls that an untracked differentiation reached twice: which gradient is whose is unknown.
    repeated: set[int] = dataclasses.field(default_factory=set)
    # Calls whose own backward pass this pass differentiated (a gradient penalty, a Hessian-vector
    # product): their gradient is no longer a sum of per-sample outer products.
    second_order: set[int] = dataclasses.field(default_factory=set)

    def note(self, call, grads: dict, value) -> None:
        if not self.tracked and id(call) in grads:
            self.repeated.add(id(call))
        grads[id(call)] = value


@dataclasses.dataclass(eq=False)
class Record:
    """Everything captured in one graph (or eagerly) and thread."""

    layer_calls: list[LayerCall] = dataclasses.field(default_factory=list)
    loss_calls: list[LossCall] = dataclasses.field(default_factory=list)
    # Layers of a supported kind that ran but cannot be preconditioned, with the reason.
    skipped: list[tuple[keras.layers.Layer, str]] = dataclasses.field(default_factory=list)
    # Outermost model calls (a model called inside another is part of its call), in order.
    model_calls: list[ModelCall] = dataclasses.field(default_factory=list)
    # Every layer called under a recording tape ({id: weak reference}), captured kinds or not: the
    # summary names the layer of each first-order variable. Weak: the record lives as long as the
    # traced graph, and a model (which holds its optimizer, which holds capture) must not.
    called_layers: dict[int, weakref.ref] = dataclasses.field(default_factory=dict)
    # While the optimizer differentiates its own sampled loss, the taps must not record.
    frozen: bool = False
    # (LossScaleOptimizer, the scale its scale_loss multiplied the loss with) in this step.
    # Weakly: the record lives as long as its graph, which must not keep the wrapper (and so the
    # optimizer it wraps, and capture) alive.
    loss_scales: list[tuple[weakref.ref, Any]] = dataclasses.field(default_factory=list)
    # The tracked passes that reached this record's taps, in order, and the untracked one.
    passes: list[BackwardPass] = dataclasses.field(default_factory=list)
    untracked: BackwardPass = dataclasses.field(
        default_factory=lambda: BackwardPass(tracked=False))
    # The graph the record's tensors live in (a weak reference: the graph owns its records), or
    # None for the eager record.
    graph_ref: Any = None

    def is_empty(self) -> bool:
        return not (self.layer_calls or self.loss_calls or self.loss_scales or self.skipped
                    or self.model_calls)

    def as_default(self):
        """Context in which ops are built in the record's own graph (nothing to do eagerly).

        The optimizer builds the true Fisher's sampled backward pass there: `tf.gradients` of the
        step's tensors only works in the graph that holds them, not in a `tf.cond` branch nested
        in it; the results are then captured by the nested graph like any outer tensor."""
        graph = None if self.graph_ref is None else self.graph_ref()
        if graph is None or graph is tf.compat.v1.get_default_graph():
            return contextlib.nullcontext()
        return graph.as_default()

    @contextlib.contextmanager
    def frozen_taps(self):
        """The taps record nothing inside (the optimizer's own differentiation of its sampled loss)."""
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False

    def loss_scale_of(self, optimizer):
        """The scale a LossScaleOptimizer wrapping `optimizer` applied to this step's loss (None
        if none did: then the captured output gradients carry no such scale)."""
        scales = [s for lso, s in self.loss_scales
                  if lso() is not None and lso().inner_optimizer is optimizer]
        return scales[-1] if scales else None

    def _note_pass(self, backward: BackwardPass) -> None:
        if backward.tracked and not any(p is backward for p in self.passes):
            self.passes.append(backward)

    # ---- one optimizer's view of the step ------------------------------------------------------
    def pass_for(self, variables, grads) -> BackwardPass | None:
        """The backward pass that produced `grads` for `variables` (None if none reached a tap).

        First the pass that returned these very gradient tensors (Keras's fit, and custom loops
        that hand the tape's gradients on unchanged); else the one pass whose sources hold the
        variables (gradients transformed on the way, e.g. unscaled by a LossScaleOptimizer); else,
        when no tracked pass reached the taps, the untracked one (bare `tf.gradients`).
        """
        present = [g for g in grads if g is not None]
        by_result = [p for p in self.passes
                     if present and all(any(g is r for r in p.results) for g in present)]
        if len(by_result) == 1:
            return by_result[0]
        keys = set().union(*(source_keys(v) for v, g in zip(variables, grads) if g is not None))
        by_source = [p for p in self.passes if p.sources & keys]
        if len(by_source) == 1:
            return by_source[0]
        if len(by_source) > 1:
            raise AmbiguousStepError(
                f"{len(by_source)} GradientTape.gradient calls in this step differentiated with "
                "respect to the variables of one TENGraD/KFAC optimizer, and the gradients it was "
                "handed are not exactly those one call returned, so which loss they (and so the "
                "Fisher) belong to is unknown. Take that optimizer's gradients with one "
                "tape.gradient call per step and pass them to apply_gradients unchanged.")
        if self.untracked.output_grads:
            return self.untracked
        return None

    def view_for(self, variables, grads) -> "StepView":
        """The step as one optimizer sees it: its backward pass's output gradients and loss
        weights, on copies of the calls (the record itself is shared by every optimizer)."""
        backward = self.pass_for(variables, grads)
        if backward is None:
            return StepView(self, None, [], [])
        calls = [dataclasses.replace(c, output_grad=backward.output_grads[id(c)])
                 for c in self.layer_calls if id(c) in backward.output_grads]
        losses = [dataclasses.replace(c, loss_grad=backward.loss_grads.get(id(c)))
                  for c in self.loss_calls]
        return StepView(self, backward, calls, losses)


@dataclasses.dataclass(eq=False)
class StepView:
    """One optimizer's share of a Record: `layer_calls` are the calls its backward pass reached
    (with `output_grad` set), `loss_calls` every loss call (with that pass's `loss_grad`)."""

    record: Record
    backward: BackwardPass | None
    layer_calls: list[LayerCall]
    loss_calls: list[LossCall]

    @property
    def skipped(self):
        return self.record.skipped

    def owners(self, variables) -> dict[int, keras.layers.Layer]:
        """{id(variable): the innermost layer called in this step that owns it}, for the variables
        some called layer owns (an LSTM's, not its enclosing model's, for the LSTM's kernel)."""
        wanted = {id(v) for v in variables}
        found: dict[int, keras.layers.Layer] = {}
        if not wanted:
            return found
        called = [layer for layer in (r() for r in self.record.called_layers.values()) if layer]
        for layer in sorted(called, key=lambda layer: len(layer.trainable_weights)):
            for w in layer.trainable_weights:
                if id(w) in wanted:
                    found.setdefault(id(w), layer)
        return found

    def as_default(self):
        return self.record.as_default()

    def frozen_taps(self):
        return self.record.frozen_taps()

    def loss_scale_of(self, optimizer):
        return self.record.loss_scale_of(optimizer)

    def check_exact(self, layer_calls: list[LayerCall]) -> None:
        """Refuse calls whose output gradients cannot give the exact Fisher (see BackwardPass)."""
        if self.backward is None:
            return
        for call in layer_calls:
            if id(call_of(call, self.record)) in self.backward.second_order:
                raise AmbiguousStepError(
                    f"layer '{call.layer.name}' ({type(call.layer).__name__}) was differentiated "
                    "through its own gradient in this step (a gradient penalty, or another "
                    "gradient of a gradient): its gradient is then not a sum of per-sample outer "
                    "products, and TENGraD/KFAC cannot precondition it exactly. Train that "
                    "model with a first-order optimizer, or compute the penalty without "
                    "differentiating through its layers.")
            if id(call_of(call, self.record)) in self.backward.repeated:
                raise AmbiguousStepError(
                    f"layer '{call.layer.name}' ({type(call.layer).__name__}) was differentiated "
                    "twice in this step outside tf.GradientTape (e.g. by tf.gradients), so which "
                    "output gradient belongs to the optimizer's loss is unknown. Compute the "
                    "gradients with tf.GradientTape.")

    def losses_reaching(self, layer_calls: list[LayerCall]) -> list[LossCall]:
        """The differentiated loss calls whose predictions depend on any of `layer_calls`.

        In a graph, by walking the ops back from each loss's predictions; eagerly, where there is
        no graph to walk, every loss this pass differentiated."""
        differentiated = [c for c in self.loss_calls if c.loss_grad is not None]
        targets = {c.preactivation.op for c in layer_calls if tf.is_symbolic_tensor(c.preactivation)}
        if not targets:
            return differentiated
        return [c for c in differentiated if depends_on(tf.nest.flatten(c.y_pred), targets)]


def call_of(view_call: LayerCall, record: Record) -> LayerCall:
    """The record's own call that a view's copy was made from (same layer and pre-activation)."""
    for c in record.layer_calls:
        if c.preactivation is view_call.preactivation:
            return c
    return view_call


def depends_on(tensors, target_ops) -> bool:
    """Whether any of `tensors` is computed from an op in `target_ops` (a walk over op inputs)."""
    stack = [t.op for t in tensors if tf.is_symbolic_tensor(t)]
    if len(stack) < len(tensors):
        return True  # an eager tensor: nothing to walk; count it as reached
    seen = set()
    while stack:
        op = stack.pop()
        if op in target_ops:
            return True
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
    return False


def source_keys(x) -> set[int]:
    """The identity under which a differentiated source reaches an optimizer: Keras's fit and
    custom loops hand the tape and apply_gradients the same variable objects."""
    return {id(x)}


# Eager records are dropped past this many layer calls without a backward pass reaching them (e.g.
# a long eager evaluation under a tape), so that capture never grows memory without bound.
_MAX_EAGER_CALLS = 10_000

_state = threading.local()
_lock = threading.RLock()


def _active_passes() -> list[BackwardPass]:
    stack = getattr(_state, "passes", None)
    if stack is None:
        stack = _state.passes = []
    return stack


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


def _gradient_tap(record: Record, call, grads_of: Callable[[BackwardPass], dict]
                  ) -> Callable[[tf.Tensor], tf.Tensor]:
    """An identity whose gradient function stores the incoming gradient in the running backward
    pass (unless the record is frozen) and passes it on unchanged."""

    @tf.custom_gradient
    def identity(v):
        def grad(dv):
            if record.frozen:
                return dv
            stack = _active_passes()
            backward = stack[-1] if stack else record.untracked
            backward.note(call, grads_of(backward), dv)
            record._note_pass(backward)
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
            stack = _active_passes()
            backward = stack[-1] if stack else record.untracked
            backward.second_order.add(id(call))
            record._note_pass(backward)
            return dv

        return tf.identity(v), grad

    return identity


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
            z = _gradient_tap(record, layer_call, lambda p: p.output_grads)(forward.output)
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
                return _gradient_tap(record, call, lambda p: p.loss_grads)(value)
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
        _state.model_depth = depth + 1
        try:
            outputs = original(self, *args, **kwargs)
        finally:
            _state.model_depth = depth
        current_record().model_calls.append(ModelCall(weakref.ref(self), args, kwargs, outputs))
        return outputs

    return __call__


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


def _tracking_gradient(original: Callable) -> Callable:
    @functools.wraps(original)
    def gradient(self, target, sources, *args, **kwargs):
        keys = frozenset().union(*(source_keys(s) for s in tf.nest.flatten(sources)))
        backward = BackwardPass(tracked=True, sources=keys)
        stack = _active_passes()
        stack.append(backward)
        try:
            result = original(self, target, sources, *args, **kwargs)
        finally:
            stack.pop()
        backward.results = tuple(r for r in tf.nest.flatten(result) if r is not None)
        return result

    return gradient


# ---- installing the patch, for as long as some optimizer lives -------------------------------
_originals: dict[Any, Callable] = {}
_users = 0


def patched_classes() -> list[type]:
    """Layer classes whose `call` capture replaces: for every kind with a layer helper, the class
    that defines its `call` (layers.captured_classes)."""
    return layers.captured_classes()


def _patches() -> list[tuple[Any, str, Callable]]:
    """(owner, attribute, wrapper factory) of every method capture replaces."""
    return ([(cls, "call", _capturing_call) for cls in patched_classes()] + [
        (keras.layers.Layer, "__call__", _recording_layer_call),
        (keras.losses.Loss, "__call__", _capturing_loss_call),
        (keras.optimizers.LossScaleOptimizer, "scale_loss", _capturing_scale_loss),
        (tf.GradientTape, "gradient", _tracking_gradient),
        # Layer.__call__ as models inherit it: patched on keras.Model, so layers are not affected.
        (keras.Model, "__call__", _capturing_model_call),
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
