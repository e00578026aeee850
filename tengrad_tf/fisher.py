"""Output gradients for the Fisher: sampled labels (true Fisher), every label weighted by its
probability (exact Fisher), or the training labels (empirical).

For the true Fisher, labels ŷᵢ are drawn from the model's own predictive distribution p(y | xᵢ), and
the per-sample output gradients are those of ℓᵢ(ŷᵢ): one draw of F = Σ_c pᵢ꜀ ∇ℓᵢ(c) ∇ℓᵢ(c)ᵀ per
sample. The exact Fisher takes that expectation itself, for losses over C classes: C rows per
sample, √pᵢ꜀ ∇ℓᵢ(c) (kfac-jax's "fisher_exact"). This module knows, per Keras loss, how to draw ŷ
from y_pred, and evaluates the loss at ŷ (or at each class) per sample. It knows nothing about
layers or blocks.

Supported losses (the distribution they are the negative log-likelihood of):
  * sparse / categorical cross-entropy, logits or probabilities: categorical;
  * binary cross-entropy, logits or probabilities: Bernoulli per output;
  * mean squared error: Gaussian with variance k/2 per output (k = outputs averaged over), the
    variance for which MSE is exactly the negative log-likelihood up to a constant, so that the
    true Fisher equals the Gauss-Newton matrix of the loss.

Sampling is stateless: the labels of a training step are a function of (seed, step) only, never of
how many random ops ran before (`step_key`). A run resumed from a checkpoint at step t therefore
draws exactly the labels the uninterrupted run drew from step t on.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tengrad_tf import _tf_private, capture

EMPIRICAL = "empirical"
TRUE = "true"
EXACT = "exact"
FISHER_TYPES = (TRUE, EMPIRICAL, EXACT)
_CATEGORICAL = ("sparse_categorical", "categorical")


class UnsupportedLossError(ValueError):
    """fisher='true' was asked for with a loss we cannot sample labels for."""


def _loss_family(loss: keras.losses.Loss) -> tuple[str, bool]:
    """(family, from_logits) of a Keras loss, or raise UnsupportedLossError."""
    fn = getattr(loss, "fn", None)
    config = loss.get_config() if hasattr(loss, "get_config") else {}
    from_logits = bool(config.get("from_logits", False))
    families = {
        keras.losses.sparse_categorical_crossentropy: "sparse_categorical",
        keras.losses.categorical_crossentropy: "categorical",
        keras.losses.binary_crossentropy: "binary",
        keras.losses.mean_squared_error: "gaussian",
    }
    for known, family in families.items():
        if fn is known:
            return family, from_logits
    raise UnsupportedLossError(
        f"fisher='true' cannot sample labels for the loss {getattr(loss, 'name', loss)!r} "
        f"({type(loss).__name__}). Supported: (sparse) categorical cross-entropy, binary "
        "cross-entropy and mean squared error. Use TENGraD(fisher='empirical') for other losses."
    )


def check_supported(loss: keras.losses.Loss) -> None:
    _loss_family(loss)


def step_key(base_seed, step) -> tf.Tensor:
    """The stateless sampling key of one training step: a function of (base_seed, step) alone.

    Under tf.distribute each replica also folds in its id: the replicas hold different samples
    and must not draw from one stream.
    """
    key = tf.stack([tf.cast(base_seed, tf.int64), tf.constant(0, tf.int64)])
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(step, tf.int64))
    replica = tf.distribute.get_replica_context()
    if replica is not None and replica.num_replicas_in_sync > 1:
        key = tf.random.experimental.stateless_fold_in(key, replica.replica_id_in_sync_group)
    return key


def _as_key(seed) -> tf.Tensor:
    """A stateless key from a key (shape [2] integer tensor), an int, or None (a random key)."""
    if seed is None:
        # Standalone use only: the optimizer always passes step_key(...).
        return tf.random.uniform([2], minval=0, maxval=2**31 - 1, dtype=tf.int64)
    if isinstance(seed, int):
        return tf.constant([seed, 0], tf.int64)
    return seed


def sample_labels(loss: keras.losses.Loss, y_pred: tf.Tensor, seed=None) -> tf.Tensor:
    """ŷ ~ p(y | x) in the label format the loss expects (sparse indices, one-hot, 0/1, reals).

    `seed`: a stateless key (shape [2] integer tensor, e.g. from `step_key`), an int, or None
    for a random key. The same key and predictions always give the same labels.
    """
    family, from_logits = _loss_family(loss)
    key = _as_key(seed)
    y_pred = tf.stop_gradient(tf.cast(y_pred, tf.float32))
    if family in ("sparse_categorical", "categorical"):
        logits = y_pred if from_logits else tf.math.log(tf.maximum(y_pred, 1e-12))
        classes = y_pred.shape[-1]
        flat = tf.reshape(logits, [-1, classes])
        draws = tf.random.stateless_categorical(flat, 1, seed=key, dtype=tf.int32)[:, 0]
        # NaN logits draw the out-of-range label `classes`, which the loss op rejects with an error
        # on CPU. The loss is NaN there anyway, so the step is skipped; keep the label in range.
        draws = tf.minimum(draws, classes - 1)
        draws = tf.reshape(draws, tf.shape(y_pred)[:-1])
        return draws if family == "sparse_categorical" else tf.one_hot(draws, classes)
    if family == "binary":
        probs = tf.sigmoid(y_pred) if from_logits else y_pred
        return tf.cast(tf.random.stateless_uniform(tf.shape(probs), seed=key) < probs, tf.float32)
    k = tf.cast(tf.shape(y_pred)[-1], tf.float32)
    return y_pred + tf.sqrt(k / 2.0) * tf.random.stateless_normal(tf.shape(y_pred), seed=key)


def per_sample_loss(loss: keras.losses.Loss, y_true, y_pred) -> tf.Tensor:
    """The loss without reduction over the batch (Loss.call is Keras's public per-sample loss)."""
    return loss.call(y_true, y_pred)


def root_weights(sample_weight) -> tf.Tensor:
    """√wᵢ per sample (m,) from a Keras sample_weight of shape (m,) or (m, 1)."""
    w = tf.cast(sample_weight, tf.float64)  # cast to each tensor's dtype where it is used
    if w.shape.rank is not None and w.shape.rank > 1:
        w = tf.reshape(w, [tf.shape(w)[0], -1])
        tf.debugging.assert_equal(tf.shape(w)[1], 1, message=(
            "the Fisher supports one weight per sample; got per-element sample weights"))
        w = w[:, 0]
    return tf.sqrt(w)


def sampled_loss_sum(loss_calls, seed=None) -> tf.Tensor:
    """Σᵢ √wᵢ ℓᵢ(ŷᵢ) over the batch and every differentiated output: its gradient w.r.t. a layer's
    pre-activation z is the per-sample output gradient of the true Fisher (no factor m needed),
    weighted so that F = (1/m) Σ wᵢ uᵢuᵢᵀ when the loss has sample weights wᵢ.

    ℓᵢ is the same per-sample loss the empirical Fisher differentiates (see `_sampled_loss`), only
    at the sampled labels: each output weighted as in the training loss (`loss_grad`: compile's
    loss_weights), its Keras mask applied, and outputs with extra axes (sequences) averaged over
    their (unmasked) positions as Keras's batch mean averages them. Losses that were not
    differentiated (`loss_grad` None, e.g. computed only for a metric) do not count.

    `seed`: the step's key (`step_key`); each output draws with its own key folded from it."""
    key = _as_key(seed)
    total = 0.0
    for index, call in enumerate(loss_calls):
        if call.loss_grad is None:
            continue
        y_hat = sample_labels(call.loss, call.y_pred,
                              tf.random.experimental.stateless_fold_in(key, index))
        total += _sampled_loss(call, y_hat)
    return total


def outcomes(loss_calls) -> int:
    """R, the rows per sample of the exact Fisher: the classes of every differentiated loss.

    Raises UnsupportedLossError for a loss that is not a cross-entropy over classes, or whose
    predictions are not (batch, classes): a sequence of T predictions per sample would need T·C
    rows per sample."""
    total = 0
    for call in loss_calls:
        if call.loss_grad is None:
            continue
        try:
            family, _ = _loss_family(call.loss)
        except UnsupportedLossError:
            family = None
        shape = tf.nest.flatten(call.y_pred)[0].shape
        if family not in _CATEGORICAL or shape.rank != 2 or shape[-1] is None:
            raise UnsupportedLossError(
                f"fisher='exact' sums over the classes of a (sparse) categorical cross-entropy "
                f"with predictions of shape (batch, classes); the loss "
                f"{getattr(call.loss, 'name', call.loss)!r} ({type(call.loss).__name__}) has "
                f"predictions of shape {shape}. Use fisher='true' (it samples one label).")
        total += int(shape[-1])
    return total


def expected_loss_terms(loss_calls) -> list[tf.Tensor]:
    """One scalar per outcome r = (loss, class c), in order: Σᵢ √(R·pᵢ꜀·wᵢ) ℓᵢ(c), with R =
    `outcomes(loss_calls)`. The gradient of term r w.r.t. a pre-activation gives its rows
    √(R·pᵢ꜀·wᵢ) ∂ℓᵢ(c)/∂zᵢ, so that the Fisher of the R·m rows, (1/(R·m)) Σ uuᵀ, is
    (1/m) Σᵢ wᵢ Σ_c pᵢ꜀ ∇ℓᵢ(c) ∇ℓᵢ(c)ᵀ: the expectation that one sampled label estimates.
    Different losses' cross terms vanish in it (each score has mean zero under its own
    prediction), so their rows stack. ℓᵢ is `sampled_loss_sum`'s, at label c."""
    rows = outcomes(loss_calls)
    terms = []
    for call in loss_calls:
        if call.loss_grad is None:
            continue
        family, from_logits = _loss_family(call.loss)
        y_pred = tf.stop_gradient(call.y_pred)
        dtype = tf.float64 if y_pred.dtype == tf.float64 else tf.float32
        y_pred = tf.cast(y_pred, dtype)
        # The loss's own distribution: Keras's cross-entropy normalizes probabilities it is given.
        probs = (tf.nn.softmax(y_pred) if from_logits
                 else y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True))
        weight = (tf.ones_like(probs[:, 0]) if call.sample_weight is None
                  else tf.reshape(tf.cast(call.sample_weight, dtype), [-1]))
        classes = int(y_pred.shape[-1])
        for c in range(classes):
            label = tf.fill(tf.shape(y_pred)[:1], c)
            if family == "categorical":
                label = tf.one_hot(label, classes, dtype=dtype)
            # `_sampled_loss` weights each sample by the root of its sample weight.
            weighted = dataclasses.replace(call, sample_weight=rows * probs[:, c] * weight)
            terms.append(_sampled_loss(weighted, label))
    return terms


def _sampled_loss(call, y_hat) -> tf.Tensor:
    """Σᵢ √wᵢ ℓᵢ(ŷᵢ) for one loss call, in float64.

    Keras's own `Loss.__call__` evaluates the loss at ŷ, so the mask, the sample weights (passed as
    √w) and the reduction are exactly those of the training loss. For a batch-mean reduction over
    m samples with T (unmasked) positions each, that value is (1/(m·T)) Σᵢₜ √wᵢ ℓᵢₜ (Keras also
    divides by the R replicas under tf.distribute); times m·R it is Σᵢ √wᵢ ℓᵢ with
    ℓᵢ = (1/T) Σₜ ℓᵢₜ, the share of sample i in the batch loss times m, which is also what the
    empirical Fisher's ∂ℓᵢ/∂z = m·(∂L/∂z)ᵢ differentiates. A "sum" reduction needs no factor.
    """
    y_pred = call.y_pred
    if call.mask is not None and _tf_private.keras_mask(y_pred) is None:
        y_pred = tf.identity(y_pred)  # a gated copy lost the attribute: give it back
        _tf_private.set_keras_mask(y_pred, call.mask)
    root_w = None
    if call.sample_weight is not None:
        root_w = tf.reshape(root_weights(call.sample_weight), tf.shape(call.sample_weight))
    value = capture.unrecorded_loss(call.loss, y_hat, y_pred, root_w)
    reduction = getattr(call.loss, "reduction", "sum_over_batch_size")
    if reduction == "sum":
        factor = 1
    else:
        factor = tf.shape(tf.nest.flatten(y_pred)[0])[0]
        if reduction in ("sum_over_batch_size", "mean", "mean_with_sample_weight"):
            replica = tf.distribute.get_replica_context()
            factor *= replica.num_replicas_in_sync if replica is not None else 1
    weight = tf.stop_gradient(tf.cast(call.loss_grad, tf.float64))
    return tf.cast(factor, tf.float64) * tf.reduce_sum(weight * tf.cast(value, tf.float64))
