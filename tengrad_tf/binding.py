"""Binding: which captured layer call preconditions which variable, and every variable's fate.

An optimizer's share of the step (record.StepView) holds the calls of the layers its backward pass
reached. The layers whose variables are all the optimizer's, of a kind it has a block for and
called on batched inputs, get a block; every other variable is first-order, and its treatment
names its layer, the layer's class and why ("first-order: LSTM 'lstm': …"). `summary()` prints the
treatments.

What this module does not do: make blocks (the optimizer's `_make_block`), or step.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import tensorflow as tf

from tengrad_tf import layers
from tengrad_tf.record import BindingError, LayerCall, StepView

FIRST_ORDER_OTHER = "first-order: no layer that ran under the step's GradientTape owns it"


@dataclasses.dataclass
class Binding:
    """One traced step's binding."""

    pairs: list[tuple[Any, list[LayerCall]]]  # (block, the calls of its layer)
    treatments: dict[str, str]  # {variable path: treatment}, in the order of the variables
    first_order_layers: dict[str, tuple[Any, str]]  # {variable path: (layer, reason)}

    def first_order_owners(self) -> list[str]:
        """The first-order variables, named by layer ("LSTM 'lstm'") or, where no layer that ran
        owns them, by path; each once."""
        paths = [p for p, t in self.treatments.items() if t.startswith("first-order")]
        named = self.first_order_layers
        return list(dict.fromkeys(
            f"{type(named[p][0]).__name__} '{named[p][0].name}'" if p in named else p
            for p in paths))


def bind(record: StepView, variables, grads,
         unsupported_reason: Callable[[Any], str | None], block_for: Callable[[Any], Any]
         ) -> Binding:
    """Match this step's captured layer calls to `variables`; record every variable's fate.

    `unsupported_reason(helper)`: why the optimizer has no block for a captured layer (None: it
    has one); `block_for(layer)`: the layer's block (made on first use). A step without blocks
    is refused by `require_blocks` (after its treatments are kept, for `summary()`)."""
    calls_by_layer: dict[int, list[LayerCall]] = {}
    for call in record.layer_calls:
        calls_by_layer.setdefault(id(call.layer), []).append(call)
    owned = {id(v) for v in variables}
    batch = _batch_dimension(record)
    pairs = []
    treatments = {}
    first_order: dict[int, tuple[Any, str]] = {}  # id(variable): (layer, reason)
    for calls in calls_by_layer.values():
        layer = calls[0].layer
        helper = layers.helper_for(layer)
        if not all(id(v) in owned for v in helper.variables):
            continue  # a layer of another model, or frozen weights in a trainable layer
        record.check_exact(calls)
        reason = unsupported_reason(helper) or _unbatched_reason(calls, batch)
        if reason:
            first_order.update({id(v): (layer, reason) for v in helper.variables})
            continue
        block = block_for(layer)
        _check_same_batch(layer, calls)
        pairs.append((block, calls))
        treatments.update(describe(block, calls))
    for layer, reason in record.skipped:
        for v in layer.trainable_weights:
            first_order.setdefault(id(v), (layer, reason))
    unexplained = [v for v, g in zip(variables, grads)
                   if g is not None and v.path not in treatments and id(v) not in first_order]
    for v, layer in record.owners(unexplained).items():
        first_order[v] = (layer, layers.first_order_reason(layer))
    first_order_layers = {}  # path: (layer, reason)
    for v, g in zip(variables, grads):
        if v.path in treatments:
            continue
        if id(v) in first_order:
            layer, reason = first_order_layers[v.path] = first_order[id(v)]
            treatments[v.path] = f"first-order: {type(layer).__name__} '{layer.name}': {reason}"
        elif g is None:
            treatments[v.path] = "not updated: no gradient"
        else:
            treatments[v.path] = FIRST_ORDER_OTHER
    return Binding(pairs, {v.path: treatments[v.path] for v in variables}, first_order_layers)


def describe(block, calls) -> dict[str, str]:
    """{variable path: the summary's line} for a block and its layer's calls in a step."""
    text = block.describe(calls[0].inputs.shape)
    if len(calls) > 1:
        text += f"; called {len(calls)} times per step, contributions summed exactly"
    return {v.path: text for v in block.variables}


def require_blocks(binding: Binding, record: StepView, variables, grads,
                   optimizer_name: str) -> None:
    """Raise BindingError when the step has gradients but no layer to precondition."""
    pairs = binding.pairs
    if not pairs and any(g is not None for g in grads):
        raise BindingError(
            f"{optimizer_name} found no layer to precondition among the variables it was given "
            f"({len(variables)} variables, {len(record.layer_calls)} captured layer calls in "
            "the backward pass of its gradients). "
            "Dense, EinsumDense, Embedding, convolution and normalization layers are "
            "preconditioned (README, 'Layers'); the forward pass, the loss "
            "gradient and apply_gradients must run in the same tf.function (model.fit does "
            "this) or all eagerly, and the optimizer must exist before the model is "
            "first called for training. For models without such layers, use a first-order "
            "optimizer."
        )


def _batch_dimension(record: StepView):
    """The step's batch size as the captured calls see it: the leading dimension most of them have
    (an int, or None when dynamic), or Ellipsis when that is unclear.

    A dynamic dimension wins a tie, since a tensor computed from the batch carries it and a
    constant never does; between two static sizes the predictions' leading dimension decides."""
    dims = collections.Counter(c.preactivation.shape[0] if c.preactivation.shape.rank else
                               Ellipsis for c in record.layer_calls)
    dims.pop(Ellipsis, None)
    if not dims:
        return Ellipsis
    top = max(dims.values())
    candidates = [d for d, n in dims.items() if n == top]
    if None in candidates or len(candidates) == 1:
        return None if None in candidates else candidates[0]
    for call in record.loss_calls:
        y_pred = tf.nest.flatten(call.y_pred)
        if call.loss_grad is None or not y_pred or not tf.is_tensor(y_pred[0]):
            continue
        first = y_pred[0].shape[0] if y_pred[0].shape.rank else None
        return first if first in candidates else Ellipsis
    return Ellipsis


def _unbatched_reason(calls, batch) -> str | None:
    """Why a layer's calls have no sample axis, or None.

    A layer called on a tensor without the batch axis (an Embedding of `ops.arange(T)` positions,
    broadcast into the batch afterwards) has only the batch's summed gradient at its output, not
    the per-sample ones. Its leading dimension is then static where the batch's is dynamic, or
    another number than the other layers' (`_batch_dimension`)."""
    if batch is Ellipsis:
        return None
    for call in calls:
        shape = call.preactivation.shape
        first = shape[0] if shape.rank else None
        if first is not None and first != batch:
            return (f"called on a tensor without the batch axis (leading dimension {first}, the "
                    f"batch's is {'dynamic' if batch is None else batch}), so its output gradient "
                    "holds no per-sample gradients; feed it batched inputs (e.g. positions "
                    "broadcast to (batch, T)) for an exact block")
    return None


def _check_same_batch(layer, calls):
    sizes = {c.inputs.shape[0] for c in calls}
    if len(calls) > 1 and None not in sizes and len(sizes) > 1:
        raise BindingError(
            f"Layer '{layer.name}' was called {len(calls)} times in one step on batches of "
            f"different sizes {sorted(sizes)}; its per-sample gradients are undefined. Call it "
            "once per sample, or exclude it from TENGraD by freezing it."
        )
