"""Convolutions (channels_last): Conv1D/2D/3D (grouped too), DepthwiseConv1D/2D, SeparableConv1D/2D
and Conv1D/2D/3DTranspose.

The patch rows Âᵢ are the receptive fields of each output position, unfolded in the order of the
Keras kernel (k₁, …, c_in) (`unfold`), so that Âᵢᵀ Gᵢ is the sample's kernel gradient. Padding
('valid', 'same', Conv1D's 'causal'), strides and dilation follow Keras's TensorFlow backend, which
uses TF's own SAME/VALID rules.

  Conv (groups = 1)      uᵢ = Σₜ âᵢₜ gᵢₜᵀ, one Kronecker structure (D_in = k·c_in + 1).
  grouped, depthwise     the same per group of channels: group j sees input channels j·c_in/groups…
                         and produces output channels j·c_out/groups…; a depthwise convolution is
                         the grouped one with groups = c_in, one input channel and
                         depth_multiplier outputs per group (its kernel (k…, c_in, multiplier) is
                         laid out exactly as the grouped kernel (k…, 1, c_in·multiplier)).
  transposed             y = conv_transpose(x, W) is the input gradient of a convolution with the
                         same geometry, so the kernel gradient is Σₜ patch(g)ₜ ⊗ xₜ: the unfolded
                         *output gradient* at each input position, times the input there.
  separable              depthwise then a 1×1 convolution (with the bias); the depthwise part's
                         output gradient is ∂ℓ/∂h = g · W_pointwiseᵀ, exact, from the one tap on the
                         layer's output.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf
from keras import ops

from tengrad_tf.layers.base import (ExplicitHelper, Forward, KroneckerHelper, as_rows,
                                    static_positions)


def unfold(x: tf.Tensor, kernel_size, strides, dilation, padding: str) -> tf.Tensor:
    """Receptive fields of a channels_last convolution: (m, *output_spatial, k₁·…·c) with the
    window in the order of a Keras kernel (k₁, …, c). `padding` is 'valid' or 'same' (TF's rule:
    the odd padding pixel goes after)."""
    rank = len(kernel_size)
    if rank == 1:  # unfold as a 1 × k image
        patches = unfold(x[:, None], (1, *kernel_size), (1, *strides), (1, *dilation), padding)
        return patches[:, 0]
    if rank == 2:
        return tf.image.extract_patches(x, sizes=[1, *kernel_size, 1], strides=[1, *strides, 1],
                                        rates=[1, *dilation, 1], padding=padding.upper())
    return _unfold_by_slicing(x, kernel_size, strides, dilation, padding)


def _unfold_by_slicing(x, kernel_size, strides, dilation, padding):
    """Any rank: one strided slice of the padded input per kernel offset, stacked."""
    stacked = tf.stack(windows(x, kernel_size, strides, dilation, padding), axis=-2)
    if None in stacked.shape[1:]:  # (m, *out, window, c)
        return tf.reshape(stacked, tf.concat([tf.shape(stacked)[:-2], [-1]], 0))
    return tf.reshape(stacked, [-1, *stacked.shape[1:-2], stacked.shape[-2] * stacked.shape[-1]])


def windows(x, kernel_size, strides, dilation, padding) -> list[tf.Tensor]:
    """The input seen by each kernel offset, in the order of a Keras kernel: a list of
    (m, *output_spatial, c), one strided slice of the padded input per offset (any rank)."""
    shape = tf.shape(x)
    spatial = [x.shape[1 + i] if x.shape[1 + i] is not None else shape[1 + i]
               for i in range(len(kernel_size))]
    pads, outs = [[0, 0]], []
    for n, k, s, r in zip(spatial, kernel_size, strides, dilation):
        extent = (k - 1) * r + 1
        if padding == "same":
            out = (n + s - 1) // s
            total = tf.maximum((out - 1) * s + extent - n, 0) if tf.is_tensor(n) else max(
                (out - 1) * s + extent - n, 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (n - extent) // s + 1
            pads.append([0, 0])
        outs.append(out)
    padded = tf.pad(x, pads + [[0, 0]])
    sliced = []
    for offset in _offsets(kernel_size):
        begin = [0] + [o * r for o, r in zip(offset, dilation)] + [0]
        end = [0] + [o * r + (n - 1) * s + 1 for o, r, n, s in zip(offset, dilation, outs, strides)]
        sliced.append(tf.strided_slice(padded, begin, end + [0], [1, *strides, 1],
                                       begin_mask=1 | (1 << (len(kernel_size) + 1)),
                                       end_mask=1 | (1 << (len(kernel_size) + 1))))
    return sliced


def _offsets(kernel_size):
    if not kernel_size:
        return [()]
    return [(o, *rest) for o in range(kernel_size[0]) for rest in _offsets(kernel_size[1:])]


def _causal_padded(layer, inputs):
    """Inputs after Conv1D's causal padding, and the padding mode that then applies."""
    if layer.padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        return ops.pad(inputs, [[0, 0], [left, 0], [0, 0]]), "valid"
    return inputs, layer.padding


def _with_bias(layer, z, bias):
    if bias is None:
        return z
    return ops.add(z, ops.reshape(bias, (1,) * (layer.rank + 1) + (-1,)))


def _channels_first_reason(layer) -> str | None:
    if layer.data_format != "channels_last":
        return "channels_first convolutions are not preconditioned (use channels_last)"
    return None


class ConvHelper(KroneckerHelper):
    """Conv1D/2D/3D with any `groups`, and (subclass) depthwise convolutions."""

    layer_classes = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    kind = "Conv"

    def __init__(self, layer):
        super().__init__(layer)
        self.window = int(math.prod(self.kernel.shape[: layer.rank]))
        self.groups, self.in_per_group, self.out_per_group = self._grouping()

    def _grouping(self) -> tuple[int, int, int]:
        """(groups, input channels per group, output channels per group)."""
        groups = int(self.layer.groups)
        return groups, int(self.kernel.shape[-2]), int(self.kernel.shape[-1]) // groups

    @classmethod
    def unsupported_reason(cls, layer):
        return _channels_first_reason(layer) or super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        x, padding = _causal_padded(layer, inputs)
        z = ops.conv(x, layer.kernel, strides=list(layer.strides), padding=padding,
                     dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        return Forward(output=_with_bias(layer, z, layer.bias), recorded=inputs,
                       activation=layer.activation)

    @property
    def kernel_rows(self) -> int:
        return self.window * self.in_per_group

    @property
    def d_out(self) -> int:
        return self.out_per_group

    def _kernel_as_matrix(self, kernel):
        if self.groups == 1:
            return tf.reshape(kernel, [self.kernel_rows, self.d_out])
        grouped = tf.reshape(kernel, [self.kernel_rows, self.groups, self.d_out])
        return tf.transpose(grouped, [1, 0, 2])

    def _kernel_from_matrix(self, matrix):
        if self.groups > 1:
            matrix = tf.transpose(matrix, [1, 0, 2])
        return tf.reshape(matrix, self.kernel.shape)

    def _input_rows(self, recorded):
        layer = self.layer
        x, padding = _causal_padded(layer, recorded)
        patches = unfold(x, layer.kernel_size, layer.strides, layer.dilation_rate, padding)
        channels = self.groups * self.in_per_group
        rows = as_rows(patches, self.window * channels)
        if self.groups == 1:
            return rows
        # (window, groups, c_in/groups) → (groups, window, c_in/groups): each group's own window.
        m = tf.shape(rows)[0]
        p = rows.shape[1] if rows.shape[1] is not None else tf.shape(rows)[1]
        rows = tf.reshape(rows, [m, p, self.window, self.groups, self.in_per_group])
        rows = tf.transpose(rows, [0, 1, 3, 2, 4])
        return tf.reshape(rows, [m, p, self.groups, self.kernel_rows])

    def positions(self, recorded_shape):
        out = self.layer.compute_output_shape(tuple(recorded_shape))
        return static_positions(out, range(1, len(out) - 1))

    @property
    def per_sample_from_rows(self) -> bool:
        # A strided slice per offset is slower than TF's patch extraction (2–3× at stride 2 on
        # this CPU), so strided convolutions unfold; at stride 1 the slices are the cheaper route.
        return any(s > 1 for s in self.layer.strides)

    def per_sample_gradients(self, recorded, output_grad):
        """Jᵢ = Âᵢᵀ Gᵢ without the patches Â (stride 1): one batched product per kernel offset o,
        Σₜ x_{i, t + o·r} gᵢₜᵀ, of the input that offset sees (a slice) with the output
        gradients. Unfolding writes k copies of the input and then reads them once; on 3C1F at
        width 32 that took twice as long as these k products (docs/performance.md). The result
        is laid out as the block's matrix (`matrix_shape`), bias row last."""
        layer = self.layer
        x, padding = _causal_padded(layer, tf.cast(recorded, self.dtype))
        g = self.output_rows(output_grad)  # (m, P, D_out) or (m, P, groups, D_out)
        m = tf.shape(g)[0]
        grouped = [m, -1, self.groups, self.in_per_group]
        per_offset = []
        for seen in windows(x, layer.kernel_size, layer.strides, layer.dilation_rate, padding):
            if self.groups == 1:
                per_offset.append(tf.einsum("ipa,ipb->iab", as_rows(seen, self.in_per_group), g))
            else:
                per_offset.append(tf.einsum("ipga,ipgb->igab", tf.reshape(seen, grouped), g))
        # (window, c_in/groups) rows per group, as `_input_rows` lays them out.
        groups = [self.groups] if self.groups > 1 else []
        j = tf.reshape(tf.stack(per_offset, axis=-3), [-1, *groups, self.kernel_rows, self.d_out])
        if self.has_bias:
            j = tf.concat([j, tf.reduce_sum(g, axis=1)[..., None, :]], axis=-2)
        return j


class DepthwiseConvHelper(ConvHelper):
    """DepthwiseConv1D/2D: the grouped convolution with one input channel per group."""

    layer_classes = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    kind = "DepthwiseConv"

    def _grouping(self) -> tuple[int, int, int]:
        # Kernel (k…, c_in, multiplier): c_in groups of one input and `multiplier` outputs.
        return int(self.kernel.shape[-2]), 1, int(self.kernel.shape[-1])

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        z = ops.depthwise_conv(inputs, layer.kernel, strides=layer.strides, padding=layer.padding,
                               dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        return Forward(output=_with_bias(layer, z, layer.bias), recorded=inputs,
                       activation=layer.activation)


class SeparableConvHelper(ExplicitHelper):
    """SeparableConv1D/2D: depthwise kernel, pointwise kernel and bias as one block."""

    layer_classes = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
    kind = "SeparableConv"

    @classmethod
    def unsupported_reason(cls, layer):
        return _channels_first_reason(layer) or super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        z = ops.separable_conv(inputs, layer.depthwise_kernel, layer.pointwise_kernel,
                               strides=layer.strides, padding=layer.padding,
                               dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        return Forward(output=_with_bias(layer, z, layer.bias), recorded=inputs,
                       activation=layer.activation)

    @property
    def variables(self):
        layer = self.layer
        return [layer.depthwise_kernel, layer.pointwise_kernel] + (
            [layer.bias] if layer.bias is not None else [])

    def positions(self, recorded_shape):
        out = self.layer.compute_output_shape(tuple(recorded_shape))
        return static_positions(out, range(1, len(out) - 1))

    def per_sample_gradients(self, recorded, output_grad):
        layer, dtype = self.layer, self.dtype
        x = tf.cast(recorded, dtype)
        depthwise = tf.cast(layer.depthwise_kernel, dtype)
        pointwise = tf.cast(layer.pointwise_kernel, dtype)
        channels, multiplier = depthwise.shape[-2], depthwise.shape[-1]
        window = int(math.prod(layer.kernel_size))
        h = ops.depthwise_conv(x, depthwise, strides=layer.strides, padding=layer.padding,
                               dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        g = as_rows(tf.cast(output_grad, dtype), pointwise.shape[-1])
        h = as_rows(h, channels * multiplier)
        # ∂ℓ/∂h: the pointwise convolution is a matrix product at each position.
        dh = tf.matmul(g, tf.reshape(pointwise, [channels * multiplier, -1]), transpose_b=True)
        patches = as_rows(unfold(x, layer.kernel_size, layer.strides, layer.dilation_rate,
                                 layer.padding), window * channels)
        m, p = tf.shape(g)[0], tf.shape(g)[1]
        patches = tf.reshape(patches, [m, p, window, channels])
        dh = tf.reshape(dh, [m, p, channels, multiplier])
        parts = [tf.einsum("ipkc,ipcn->ikcn", patches, dh), tf.einsum("ipa,ipb->iab", h, g)]
        if layer.bias is not None:
            parts.append(tf.reduce_sum(g, axis=1))
        return tf.concat([tf.reshape(part, [m, -1]) for part in parts], axis=1)

    def per_sample_elements(self, recorded_shape):
        p = self.positions(recorded_shape) or 1
        window = int(math.prod(self.layer.kernel_size))
        return max(p * window * int(recorded_shape[-1]), self.size)


class ConvTransposeHelper(ExplicitHelper):
    """Conv1D/2D/3DTranspose: kernel (k…, c_out, c_in) and bias."""

    layer_classes = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                     keras.layers.Conv3DTranspose)
    kind = "ConvTranspose"

    @classmethod
    def unsupported_reason(cls, layer):
        return _channels_first_reason(layer) or super().unsupported_reason(layer)

    @classmethod
    def forward(cls, layer, original, args, kwargs):
        inputs = args[0] if args else kwargs["inputs"]
        z = ops.conv_transpose(inputs, layer.kernel, strides=list(layer.strides),
                               padding=layer.padding, output_padding=layer.output_padding,
                               dilation_rate=layer.dilation_rate, data_format=layer.data_format)
        return Forward(output=_with_bias(layer, z, layer.bias), recorded=inputs,
                       activation=layer.activation)

    @property
    def variables(self):
        return [self.layer.kernel] + ([self.layer.bias] if self.layer.bias is not None else [])

    def positions(self, recorded_shape):
        return static_positions(recorded_shape, range(1, len(recorded_shape) - 1))

    def per_sample_gradients(self, recorded, output_grad):
        layer, dtype = self.layer, self.dtype
        g = tf.cast(output_grad, dtype)
        c_out, c_in = self.layer.kernel.shape[-2], self.layer.kernel.shape[-1]
        # The output gradient unfolded by the geometry of the convolution this layer transposes:
        # one window per input position.
        windows = unfold(g, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
        window = int(math.prod(layer.kernel_size))
        a = as_rows(windows, window * c_out)
        x = as_rows(tf.cast(recorded, dtype), c_in)
        m = tf.shape(x)[0]
        parts = [tf.reshape(tf.einsum("ipa,ipb->iab", a, x), [m, -1])]
        if layer.bias is not None:
            parts.append(tf.reduce_sum(as_rows(g, c_out), axis=1))
        return tf.concat(parts, axis=1)

    def per_sample_elements(self, recorded_shape):
        p = self.positions(recorded_shape) or 1
        window = int(math.prod(self.layer.kernel_size))
        return max(p * window * int(self.layer.kernel.shape[-2]), self.size)
