"""Layer-, RMS-, Group- and BatchNormalization: γ and β as one block.

Each normalizes its input to x̂ and returns y = x̂ ⊙ γ + β, with γ and β indexed by the parameter
axes (the features for LayerNormalization, the channels for the others) and shared over the
remaining ones (the positions t). Per sample,

    uᵢ = [ Σₜ x̂ᵢₜ ⊙ gᵢₜ ,  Σₜ gᵢₜ ]        gᵢₜ = ∂ℓᵢ/∂yᵢₜ,

a 2·C vector (C = the number of γ entries), computed explicitly: cheap and small.

LayerNormalization and GroupNormalization normalize each sample on its own, so this is the exact
per-sample gradient. Their call runs unchanged (the tap is on its output), and x̂ is recomputed
from the recorded input on curvature steps only, as Keras computes it.

BatchNormalization in training mode normalizes with the batch's statistics, which couples the
samples. DESIGN.md's convention applies: uᵢ is built from x̂ᵢ (normalized with the batch statistics
that the forward pass used) and gᵢ = m·(∂L/∂y)ᵢ. The call is run here (x̂ is needed, and the batch
statistics exist only inside it): y as Keras computes it, x̂ beside it, and the moving statistics
updated exactly as Keras's call does;
`renorm` and masked calls run unchanged instead, first-order. In inference mode (training=False,
or a frozen layer) it normalizes with the moving statistics and the block is exact.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf.layers.base import (ExplicitHelper, Forward, as_rows, call_arguments,
                                    static_positions)


class NormalizationHelper(ExplicitHelper):
    """γ and β over `param_axes`; subclasses give the axes and x̂ from the recorded tensor."""

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        # The layer's own call; x̂ is recomputed from its input on curvature steps only.
        return Forward(output=original(layer, *args, **kwargs),
                       recorded=args[0] if args else kwargs["inputs"])

    @property
    def variables(self):
        return [v for v in (self.layer.gamma, self.layer.beta) if v is not None]

    def param_axes(self, rank: int) -> list[int]:
        raise NotImplementedError

    def normalized(self, recorded: tf.Tensor) -> tf.Tensor:
        """x̂ in `dtype`."""
        raise NotImplementedError

    def _rows(self, t: tf.Tensor) -> tf.Tensor:
        """(m, P, C): the parameter axes last, the positions in between."""
        rank = len(t.shape)
        axes = self.param_axes(rank)
        rest = [a for a in range(1, rank) if a not in axes]
        width = int(math.prod(t.shape[a] for a in axes))
        return as_rows(tf.transpose(t, [0, *rest, *axes]), width)

    def positions(self, recorded_shape):
        axes = self.param_axes(len(recorded_shape))
        return static_positions(recorded_shape,
                                [a for a in range(1, len(recorded_shape)) if a not in axes])

    def per_sample_gradients(self, recorded, output_grad):
        g = self._rows(tf.cast(output_grad, self.dtype))
        parts = []
        if self.layer.gamma is not None:
            parts.append(tf.reduce_sum(self._rows(self.normalized(recorded)) * g, axis=1))
        if self.layer.beta is not None:
            parts.append(tf.reduce_sum(g, axis=1))
        return tf.concat(parts, axis=1)

    def per_sample_elements(self, recorded_shape):
        return 3 * int(math.prod(recorded_shape[1:])) if None not in recorded_shape[1:] else (
            self.size)


def _positive(axes, rank) -> list[int]:
    axes = axes if isinstance(axes, (list, tuple)) else [axes]
    return sorted(a % rank for a in axes)


class LayerNormalizationHelper(NormalizationHelper):
    layer_classes = (keras.layers.LayerNormalization,)
    kind = "LayerNormalization"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.gamma is None and layer.beta is None:
            return "no trainable scale or center"
        return super().unsupported_reason(layer)

    def param_axes(self, rank):
        return _positive(self.layer.axis, rank)

    def normalized(self, recorded):
        layer = self.layer
        x = tf.cast(recorded, self.dtype)
        axes = self.param_axes(len(x.shape))
        if layer.rms_scaling:  # Keras 3.15: x · rsqrt(var + ε), not centered
            return x * tf.math.rsqrt(tf.math.reduce_variance(x, axis=axes, keepdims=True)
                                     + layer.epsilon)
        mean, variance = tf.nn.moments(x, axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)


class RMSNormalizationHelper(NormalizationHelper):
    """RMSNormalization: y = x · rsqrt(mean(x²) + ε) ⊙ scale, no β."""

    layer_classes = (keras.layers.RMSNormalization,)
    kind = "RMSNormalization"

    @property
    def variables(self):
        return [self.layer.scale]

    def param_axes(self, rank):
        return _positive(self.layer.axis, rank)

    def normalized(self, recorded):
        x = tf.cast(recorded, self.dtype)
        axes = self.param_axes(len(x.shape))
        epsilon = self.layer.epsilon if self.layer.epsilon is not None else keras.config.epsilon()
        return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=axes, keepdims=True) + epsilon)

    def per_sample_gradients(self, recorded, output_grad):
        g = self._rows(tf.cast(output_grad, self.dtype))
        return tf.reduce_sum(self._rows(self.normalized(recorded)) * g, axis=1)


class GroupNormalizationHelper(NormalizationHelper):
    layer_classes = (keras.layers.GroupNormalization,)
    kind = "GroupNormalization"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.gamma is None and layer.beta is None:
            return "no trainable scale or center"
        return super().unsupported_reason(layer)

    def param_axes(self, rank):
        return _positive(self.layer.axis, rank)

    def normalized(self, recorded):
        layer = self.layer
        x = tf.cast(recorded, self.dtype)
        rank = len(x.shape)
        axis = self.param_axes(rank)[0]
        # As Keras does it: the channel axis split into (groups, channels per group), moments over
        # everything but the samples and the groups.
        shape = tf.unstack(tf.shape(x))
        groups = [layer.groups, shape[axis] // layer.groups]
        grouped = tf.reshape(x, tf.stack(shape[:axis] + groups + shape[axis + 1:]))
        reduce = [a for a in range(1, rank + 1) if a != axis]
        mean, variance = tf.nn.moments(grouped, reduce, keepdims=True)
        return tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), tf.shape(x))


class BatchNormalizationHelper(NormalizationHelper):
    layer_classes = (keras.layers.BatchNormalization,)
    kind = "BatchNormalization"

    @classmethod
    def unsupported_reason(cls, layer):
        if layer.renorm:
            return "batch renormalization (renorm=True) has no exact block"
        if layer.gamma is None and layer.beta is None:
            return "no trainable scale or center"
        return super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        arguments = call_arguments(original, layer, args, kwargs)
        if arguments.get("mask") is not None:
            return "called with a mask: masked batch statistics have no exact block"
        inputs, training = arguments["inputs"], arguments.get("training")
        # What Keras's BatchNormalization.call computes (checked against Keras 3.15), with x̂ kept.
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        rank = len(x.shape)
        axis = layer.axis % rank
        moving_mean = ops.cast(layer.moving_mean, x.dtype)
        moving_variance = ops.cast(layer.moving_variance, x.dtype)
        if training and layer.trainable:
            mean, variance = ops.moments(x, axes=[a for a in range(rank) if a != axis],
                                         synchronized=layer.synchronized)
            layer.moving_mean.assign(moving_mean * layer.momentum + mean * (1.0 - layer.momentum))
            layer.moving_variance.assign(moving_variance * layer.momentum
                                         + variance * (1.0 - layer.momentum))
        else:
            mean, variance = moving_mean, moving_variance
        shape = [1] * rank
        shape[axis] = -1
        inverse_std = ops.reshape(ops.rsqrt(variance + layer.epsilon), shape)
        mean = ops.reshape(mean, shape)
        # y as Keras computes it, x·(γ/σ) + (β − μγ/σ): two passes over x, and a backward pass
        # through per-channel factors. x̂ = (x − μ)/σ, which the block needs, is computed beside
        # it, off the gradients' path: writing y = x̂·γ + β instead cost MobileNetV2 10 % more
        # per step (docs/performance.md).
        scale = inverse_std
        if layer.gamma is not None:
            scale = scale * ops.reshape(ops.cast(layer.gamma, x.dtype), shape)
        shift = -mean * scale
        if layer.beta is not None:
            shift = shift + ops.reshape(ops.cast(layer.beta, x.dtype), shape)
        return Forward(output=x * scale + shift, recorded=(x - mean) * inverse_std,
                       activation=lambda y: ops.cast(y, layer.compute_dtype))

    def param_axes(self, rank):
        return [self.layer.axis % rank]

    def normalized(self, recorded):
        return tf.cast(recorded, self.dtype)  # recorded already normalized by `forward`
