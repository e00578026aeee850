"""What one training step recorded: layer calls, loss calls, backward passes, and views of them.

Capture (capture.py) fills a `Record` per graph and thread while a step is traced (or per thread,
eagerly); this module is the data it fills and the questions an optimizer asks of it. It patches
nothing and holds no global state.

Several optimizers, several losses, one step (a GAN's generator and discriminator): every
`tf.GradientTape.gradient` call is one `BackwardPass`, which knows what it differentiated with
respect to (its sources) and collects the output gradients that passed through the taps. A layer
differentiated by two tapes keeps both. An optimizer takes the pass that produced its gradients (the
one whose results it was handed, else the one whose sources hold its variables) and, from it, only
the calls of the layers that own its variables (`Record.view_for`, a `StepView`). Where that is
ambiguous, it raises `AmbiguousStepError`, which names what to change: never a step with another
loss's curvature.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from typing import Any

import keras
import tensorflow as tf


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
    # (state variable, its value before the call) of each random-number generator the model's
    # layers draw from: the replay draws the same Dropout masks and noise as the step did.
    random_states: tuple = ()

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

    def note_pass(self, backward: BackwardPass) -> None:
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
