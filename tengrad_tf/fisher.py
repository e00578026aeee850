"""Output gradients for the Fisher: sampled labels (true Fisher) or the training labels (empirical).

For the true Fisher, labels ŷᵢ are drawn from the model's own predictive distribution p(y | xᵢ), and
the per-sample output gradients are those of ℓᵢ(ŷᵢ). This module knows, per Keras loss, how to draw
ŷ from y_pred and evaluates the loss at ŷ per sample. It knows nothing about layers or blocks.

Supported losses (the distribution they are the negative log-likelihood of):
  * sparse / categorical cross-entropy, logits or probabilities: categorical;
  * binary cross-entropy, logits or probabilities: Bernoulli per output;
  * mean squared error: Gaussian with variance k/2 per output (k = outputs averaged over), the
    variance for which MSE is exactly the negative log-likelihood up to a constant, so that the
    true Fisher equals the Gauss-Newton matrix of the loss.
"""

from __future__ import annotations

import keras
import tensorflow as tf

EMPIRICAL = "empirical"
TRUE = "true"
FISHER_TYPES = (TRUE, EMPIRICAL)


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


def sample_labels(loss: keras.losses.Loss, y_pred: tf.Tensor, seed=None) -> tf.Tensor:
    """ŷ ~ p(y | x) in the label format the loss expects (sparse indices, one-hot, 0/1, reals)."""
    family, from_logits = _loss_family(loss)
    y_pred = tf.stop_gradient(tf.cast(y_pred, tf.float32))
    if family in ("sparse_categorical", "categorical"):
        logits = y_pred if from_logits else tf.math.log(tf.maximum(y_pred, 1e-12))
        classes = y_pred.shape[-1]
        flat = tf.reshape(logits, [-1, classes])
        draws = tf.random.categorical(flat, 1, dtype=tf.int32, seed=seed)[:, 0]
        draws = tf.reshape(draws, tf.shape(y_pred)[:-1])
        return draws if family == "sparse_categorical" else tf.one_hot(draws, classes)
    if family == "binary":
        probs = tf.sigmoid(y_pred) if from_logits else y_pred
        return tf.cast(tf.random.uniform(tf.shape(probs), seed=seed) < probs, tf.float32)
    k = tf.cast(tf.shape(y_pred)[-1], tf.float32)
    return y_pred + tf.sqrt(k / 2.0) * tf.random.normal(tf.shape(y_pred), seed=seed)


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
    """Σᵢ √wᵢ ℓᵢ(ŷᵢ) over the batch and every recorded output: its gradient w.r.t. a layer's
    pre-activation z is the per-sample output gradient of the true Fisher (no factor m needed),
    weighted so that F = (1/m) Σ wᵢ uᵢuᵢᵀ when the loss has sample weights wᵢ."""
    total = 0.0
    for call in loss_calls:
        y_hat = sample_labels(call.loss, call.y_pred, seed)
        losses = per_sample_loss(call.loss, y_hat, call.y_pred)
        if call.sample_weight is not None:
            root_w = tf.cast(root_weights(call.sample_weight), losses.dtype)
            losses *= tf.reshape(root_w, [-1] + [1] * (losses.shape.rank - 1))
        total += tf.cast(tf.reduce_sum(losses), tf.float64)
    return total
