"""The per-sample output gradients Gᵢ = ∂ℓᵢ/∂zᵢ that the blocks' curvature is built from.

Capture hands over, for each layer call, the gradient of the *batch* loss at its pre-activation z
in the optimizer's backward pass. The Fisher needs each sample's own gradient, of ℓᵢ = m × (sample
i's share of the differentiated loss), and this module gets it, for every captured call at once:

  * fisher="empirical": from that same backward pass, for free. ∂ℓᵢ/∂zᵢ = m·R·(∂L/∂z)ᵢ for a
    batch-mean loss (R replicas: a Keras Loss also divides by them), with the loss scale divided
    out and the rows rescaled by 1/√wᵢ for sample weights (F weights samples as the loss does).
  * fisher="true": one more backward pass, of the loss at labels sampled from the model
    (fisher.sampled_loss_sum), through the activations only, gated so that it runs only on steps
    where some block refreshes its curvature.
  * fisher="exact": R such passes, one per class (fisher.expected_loss_terms), gated alike; a
    call's R·m rows are sample by sample (a sample's R rows in a row), to match its inputs with
    each row repeated R times (`rows_per_sample`, `repeat_inputs`). That order survives any
    concatenation of samples (replicas, a window of batches, zero padding), and lets a Dense
    block find its distinct input rows as every R-th (blocks/per_sample.py).

What this module does not do: sample labels (fisher.py), or know what a block does with G.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tengrad_tf import _tf_private, fisher
from tengrad_tf.record import BindingError, LossCall, StepView


def output_gradients(record: StepView, pairs, losses: list[LossCall], fisher_type: str,
                     loss_scale: float, lso_scale, fresh, seed, iterations
                     ) -> dict[int, list[tf.Tensor]]:
    """{id(block): [Gᵢ of each of its calls]} for `pairs` [(block, its calls)].

    Built in the record's graph (the caller enters it), where `fresh` lives too. `loss_scale`:
    the optimizer's loss_scale_factor (1.0 if none); `lso_scale`: the dynamic scale of a
    LossScaleOptimizer wrapping it (None if none). `seed` and `iterations` key the true Fisher's
    label sampling (fisher.step_key). Half-precision gradients (mixed precision) are returned in
    float32, the blocks' dtype.
    """
    if not pairs:
        return {}
    if fisher_type == fisher.EMPIRICAL:
        return _empirical(pairs, losses, loss_scale, lso_scale)
    return _model_fisher(record, pairs, losses, fisher_type, loss_scale, lso_scale, fresh, seed,
                         iterations)


def rows_per_sample(fisher_type: str, losses: list[LossCall]) -> int:
    """Rows of output gradients per sample: R for the exact Fisher (fisher.outcomes), else 1."""
    if fisher_type != fisher.EXACT:
        return 1
    _require_losses(losses, fisher_type)
    return fisher.outcomes(losses)


def repeat_inputs(calls: list, rows: int) -> list:
    """The calls with each input row repeated `rows` times in a row, to match output gradients
    of `rows` rows per sample (each block then sees a batch of rows·m samples)."""
    if rows == 1:
        return calls
    return [dataclasses.replace(c, inputs=tf.nest.map_structure(
        lambda t: tf.repeat(t, rows, axis=0), c.inputs)) for c in calls]


def _require_losses(losses, fisher_type):
    if not losses:
        raise BindingError(
            f"fisher={fisher_type!r} needs to see the loss to take labels from the model's "
            "predictions, but no keras.losses.Loss was part of the differentiated loss in this "
            "step. Compute the loss with a Keras Loss object (model.compile(loss=...) does) in "
            "the same tf.function, or use fisher='empirical'.")


def loss_weight(call: LossCall, loss_scale: float, lso_scale) -> tf.Tensor:
    """A loss's weight in the differentiated total, float64. It came from the backward pass,
    which carries the loss scale (loss_scale_factor, a LossScaleOptimizer's) like the output
    gradients do; divided out here."""
    unscale = tf.cast(loss_scale, tf.float64) * (
        1.0 if lso_scale is None else tf.cast(lso_scale, tf.float64))
    return tf.cast(call.loss_grad, tf.float64) / unscale


def _empirical(pairs, losses, loss_scale, lso_scale):
    factor = _batch_mean_factor(losses)
    # The backward pass gives wᵢ·∂ℓᵢ/∂zᵢ for a weighted loss; the Fisher weights samples as the
    # loss does, F = (1/m) Σ wᵢ uᵢuᵢᵀ, so the rows are rescaled by 1/√wᵢ.
    root_w = _root_sample_weight(losses)

    # The training loss was multiplied by the optimizer's loss_scale_factor or, under
    # mixed_float16, by the dynamic scale of the LossScaleOptimizer wrapping it (which sets the
    # optimizer's to None); its backward pass carries the scale. Unscaled in float32: in float16
    # it would overflow exactly where the scale is large.
    def unscaled(c):
        g = tf.cast(c.output_grad, _fisher_dtype(c.output_grad.dtype))
        s = tf.cast(factor(c), g.dtype) / tf.constant(loss_scale, g.dtype)
        return g * (s if lso_scale is None else s / tf.cast(lso_scale, g.dtype))

    return {id(b): [_weighted_rows(unscaled(c), root_w) for c in calls] for b, calls in pairs}


def _model_fisher(record, pairs, losses, fisher_type, loss_scale, lso_scale, fresh, seed,
                  iterations):
    """The true (sampled) or exact Fisher's output gradients: extra backward passes."""
    _require_losses(losses, fisher_type)
    if tf.executing_eagerly():
        raise BindingError(
            f"fisher={fisher_type!r} needs the forward pass and apply_gradients in one "
            "tf.function (model.fit does this unless run_eagerly=True). Wrap the custom train "
            "step in tf.function, or use fisher='empirical'."
        )
    for call in losses:
        fisher.check_supported(call.loss)
    flat = [c for _, calls in pairs for c in calls]
    # The extra backward passes are needed only on steps where some block refreshes its
    # curvature (1 in curvature_update_freq). A tf.cond cannot hold them (the gradient of tensors
    # computed outside a branch does not exist inside it), so each is gated with dataflow
    # Switch/Merge instead: on other steps its seed gradient is a dead tensor, and every gradient
    # op downstream of a dead input does not run. The gate must sit on the seed (grad_ys), not on
    # the loss's input: the gradient of a Switch is a Merge with zeros, which would revive the
    # whole backward pass on gated-off steps (the profile showed exactly that).
    gate = None if _tf_private.in_xla_context() else fresh
    with record.frozen_taps():  # the taps keep the training gradients they hold
        # In the loss's dtype, as Keras's Loss.__call__ computes the training loss (float32 for
        # float16 predictions under mixed precision).
        loss_calls = [dataclasses.replace(c, y_pred=tf.nest.map_structure(
            lambda t, c=c: tf.cast(t, c.loss.dtype), c.y_pred)) for c in losses]
        loss_calls = [dataclasses.replace(c, loss_grad=loss_weight(c, loss_scale, lso_scale))
                      for c in loss_calls]
        if fisher_type == fisher.EXACT:
            terms = fisher.expected_loss_terms(loss_calls)
        else:
            terms = [fisher.sampled_loss_sum(loss_calls, fisher.step_key(seed, iterations))]
        passes = [_gated_gradients(term, flat, gate) for term in terms]
    by_call = {id(c): _sample_major([p[j] for p in passes]) for j, c in enumerate(flat)}
    return {id(b): [by_call[id(c)] for c in calls] for b, calls in pairs}


def _sample_major(rows: list[tf.Tensor]) -> tf.Tensor:
    """R passes' (m, ...) gradients → (m·R, ...), sample i's R rows in a row."""
    if len(rows) == 1:
        return rows[0]
    stacked = tf.stack(rows, axis=1)
    merged = tf.reshape(stacked, tf.concat([[-1], tf.shape(stacked)[2:]], axis=0))
    if rows[0].shape[0] is not None:  # a static batch stays static (the blocks' routes use it)
        merged.set_shape([rows[0].shape[0] * len(rows)] + rows[0].shape[1:].as_list())
    return merged


def _gated_gradients(term: tf.Tensor, flat: list, gate) -> list[tf.Tensor]:
    """∂term/∂z of every call's pre-activation z, computed only where `gate` is open (None: always);
    zeros for a call the term does not reach."""
    grad_ys = None if gate is None else tf.raw_ops.Switch(data=tf.ones_like(term), pred=gate)[1]
    grads = tf.gradients(term, [c.preactivation for c in flat], grad_ys=grad_ys)
    if gate is None:
        return [tf.zeros_like(c.preactivation) if g is None else g for c, g in zip(flat, grads)]
    # Zeros for a call the term does not reach, gated like the others: the exact Fisher stacks
    # every pass's rows, which needs one shape for all of them on gated-off steps too.
    grads = [tf.raw_ops.Switch(data=tf.zeros_like(c.preactivation), pred=gate)[1] if g is None
             else g for c, g in zip(flat, grads)]
    # Merge takes whichever input is alive: the gradient, or, when gated off, a stand-in that no
    # one reads (only curvature updates use G, and they run only where the gate is open). A dead
    # Merge would kill the step, so the stand-in is shaped from the pre-activation, which is
    # alive, not from g, which is dead. It has no samples: zeros of the pre-activation's shape
    # were written on every step.
    return [_gated(g, c.preactivation, gate) for c, g in zip(flat, grads)]


def _gated(g: tf.Tensor, preactivation: tf.Tensor, gate: tf.Tensor) -> tf.Tensor:
    """g where `gate` is open, else an empty stand-in without samples."""
    empty = tf.zeros(tf.concat([[0], tf.shape(preactivation)[1:]], axis=0), g.dtype)
    merged = tf.raw_ops.Merge(inputs=[tf.raw_ops.Switch(data=empty, pred=gate)[0], g])[0]
    # The static shape stays g's, so that what a static batch decides while tracing (a block's
    # Gram route, its chunks) stays decided: only the curvature update reads G, where it is g.
    merged.set_shape(g.shape)
    return merged


def _fisher_dtype(dtype: tf.DType) -> tf.DType:
    """float64 stays float64 (exact tests); everything else, float16/bfloat16 included, float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def _batch_mean_factor(losses: list[LossCall]):
    """m·R for losses averaged over the batch (Keras's default), 1 for summed ones.

    ∂ℓᵢ/∂zᵢ = m · (∂L/∂z)ᵢ when L is the mean over the m samples of the replica's batch; under
    tf.distribute a Keras Loss also divides such a mean by the R replicas in sync
    (keras.losses.loss.reduce_values), but leaves a summed loss as it is. A loss computed without a
    Keras Loss is taken to be a batch mean, as Keras's own are by default. `losses` are those that
    reach the optimizer's layers: summed and averaged ones together would mix the two factors in
    one output gradient, which cannot be undone, so that is refused.
    """
    summed = {getattr(c.loss, "reduction", None) == "sum" for c in losses}
    if len(summed) > 1:
        raise BindingError(
            "fisher='empirical': losses with reduction='sum' and averaged losses reach the same "
            "optimizer's layers in one step, so the per-sample output gradients cannot be "
            "recovered from their sum. Use one reduction for all, or fisher='true' (it samples "
            "each loss with its own reduction).")
    replica = tf.distribute.get_replica_context()
    replicas = replica.num_replicas_in_sync if replica is not None else 1

    def factor(call):
        if summed == {True}:
            return tf.constant(1.0, tf.float32)
        return tf.cast(tf.shape(call.output_grad)[0] * replicas, tf.float32)

    return factor


def _root_sample_weight(losses: list[LossCall]):
    """√wᵢ of the step's per-sample loss weights (None if unweighted), of the losses that reach
    the optimizer's layers.

    Keras passes `sample_weight` (and `class_weight`, converted) to the loss. With several weighted
    losses the training backward pass mixes their weights in each layer's output gradient, which
    cannot be undone per loss: that case is refused rather than silently mis-weighted.
    """
    weighted = [c for c in losses if c.sample_weight is not None]
    if not weighted:
        return None
    if len(weighted) > 1:
        raise BindingError(
            f"{len(weighted)} weighted losses in one step: fisher='empirical' cannot separate "
            "their sample weights in the output gradients. Use fisher='true' (it weights each "
            "output's sampled loss), or a single weighted loss.")
    return fisher.root_weights(weighted[0].sample_weight)


def _weighted_rows(g, root_w):
    """Gᵢ/√wᵢ row by row (a zero weight leaves a zero row)."""
    if root_w is None:
        return g
    root_w = tf.reshape(tf.cast(root_w, g.dtype), [-1] + [1] * (g.shape.rank - 1))
    return tf.math.divide_no_nan(g, root_w)
