"""Depthwise, grouped, separable, transposed and 3-D convolution blocks against the float64
per-sample reference, through fit (Conv1D/Conv2D: tests/blocks/test_conv.py)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf.layers import helper_for, unfold
from tests.layers.exactness import fit_matches_reference, treatment

FISHERS = ["empirical", "true"]


def data(shape, m=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, *shape)), rng.integers(0, 3, size=m)


def conv_model(conv, shape):
    return keras.Sequential([keras.Input(shape), conv, keras.layers.Flatten(),
                             keras.layers.Dense(3)])


GEOMETRY = [  # padding, strides, dilation
    ("valid", 1, 1), ("same", 1, 1), ("same", 2, 1), ("valid", 1, 2), ("same", 2, 2),
    ("same", (2, 1), (1, 2)),
]


@pytest.mark.parametrize("padding, strides, dilation", GEOMETRY)
@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_conv2d(float64, fixed_sampled_labels, padding, strides, dilation, bias):
    """Stride and dilation together too: Keras then runs the dilated convolution at stride 1 and
    subsamples, which must be the same windows."""
    x, y = data((7, 6, 3))
    conv = keras.layers.DepthwiseConv2D(3, padding=padding, strides=strides,
                                        dilation_rate=dilation, depth_multiplier=2,
                                        use_bias=bias, activation="tanh",
                                        bias_initializer="random_normal")
    opt = fit_matches_reference(conv_model(conv, (7, 6, 3)), x, y, "empirical",
                                fixed_sampled_labels)
    assert treatment(opt, conv).startswith("DepthwiseConv block")


@pytest.mark.parametrize("fisher_type", FISHERS)
def test_depthwise_conv1d(float64, fixed_sampled_labels, fisher_type):
    x, y = data((9, 2))
    conv = keras.layers.DepthwiseConv1D(3, padding="same", strides=2, depth_multiplier=3,
                                        activation="relu")
    fit_matches_reference(conv_model(conv, (9, 2)), x, y, fisher_type, fixed_sampled_labels)


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_conv2d(float64, fixed_sampled_labels, fisher_type, bias):
    x, y = data((6, 5, 4))
    conv = keras.layers.Conv2D(6, (3, 2), groups=2, padding="same", use_bias=bias,
                               activation="tanh")
    opt = fit_matches_reference(conv_model(conv, (6, 5, 4)), x, y, fisher_type,
                                fixed_sampled_labels)
    assert "2 groups" in treatment(opt, conv)


@pytest.mark.parametrize("padding", ["valid", "causal"])
def test_grouped_conv1d(float64, fixed_sampled_labels, padding):
    x, y = data((8, 6))
    conv = keras.layers.Conv1D(4, 3, groups=2, padding=padding, dilation_rate=2)
    fit_matches_reference(conv_model(conv, (8, 6)), x, y, "empirical", fixed_sampled_labels)


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("bias", [True, False])
def test_separable_conv2d(float64, fixed_sampled_labels, fisher_type, bias):
    x, y = data((6, 6, 2))
    conv = keras.layers.SeparableConv2D(3, 3, padding="same", strides=2, depth_multiplier=2,
                                        use_bias=bias, activation="tanh")
    opt = fit_matches_reference(conv_model(conv, (6, 6, 2)), x, y, fisher_type,
                                fixed_sampled_labels)
    assert treatment(opt, conv).startswith("SeparableConv block")


def test_separable_conv1d_with_dilation(float64, fixed_sampled_labels):
    x, y = data((9, 3))
    conv = keras.layers.SeparableConv1D(2, 3, dilation_rate=2, activation="relu")
    fit_matches_reference(conv_model(conv, (9, 3)), x, y, "empirical", fixed_sampled_labels)


TRANSPOSED = [  # padding, strides, output_padding, dilation (> 1: TF has no CPU kernel)
    ("valid", 1, None, 1), ("same", 1, None, 1), ("valid", 2, None, 1), ("same", 2, None, 1),
    ("valid", 2, 1, 1), ("same", 3, 1, 1),
]


@pytest.mark.parametrize("padding, strides, output_padding, dilation", TRANSPOSED)
def test_conv2d_transpose(float64, fixed_sampled_labels, padding, strides, output_padding,
                          dilation):
    x, y = data((4, 3, 2))
    conv = keras.layers.Conv2DTranspose(3, (3, 2), padding=padding, strides=strides,
                                        output_padding=output_padding, dilation_rate=dilation,
                                        activation="tanh")
    opt = fit_matches_reference(conv_model(conv, (4, 3, 2)), x, y, "empirical",
                                fixed_sampled_labels)
    assert treatment(opt, conv).startswith("ConvTranspose block")


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_transpose(float64, fixed_sampled_labels, fisher_type, bias):
    x, y = data((5, 2))
    conv = keras.layers.Conv1DTranspose(3, 3, strides=2, padding="same", use_bias=bias)
    fit_matches_reference(conv_model(conv, (5, 2)), x, y, fisher_type, fixed_sampled_labels)


@pytest.mark.parametrize("padding, strides, dilation", [("valid", 1, 1), ("same", 2, 1),
                                                        ("same", 1, (1, 2, 1))])
def test_conv3d(float64, fixed_sampled_labels, padding, strides, dilation):
    x, y = data((4, 5, 3, 2), m=4)
    conv = keras.layers.Conv3D(3, (2, 3, 2), padding=padding, strides=strides,
                               dilation_rate=dilation, activation="tanh")
    opt = fit_matches_reference(conv_model(conv, (4, 5, 3, 2)), x, y, "empirical",
                                fixed_sampled_labels)
    assert treatment(opt, conv).startswith("Conv block")


def test_conv3d_transpose(float64, fixed_sampled_labels):
    x, y = data((3, 2, 3, 2), m=4)
    conv = keras.layers.Conv3DTranspose(2, 2, strides=2, padding="same")
    fit_matches_reference(conv_model(conv, (3, 2, 3, 2)), x, y, "empirical", fixed_sampled_labels)


@pytest.mark.parametrize("padding, strides, dilation", itertools.product(
    ["valid", "same"], [1, 2, (2, 3)], [1, 2]))
def test_unfold_by_slicing_matches_extract_patches(padding, strides, dilation):
    """The any-rank unfold (3-D convolutions) against TF's own 2-D patch extraction."""
    from tengrad_tf.layers.conv import _unfold_by_slicing

    x = tf.constant(np.random.default_rng(0).normal(size=(2, 7, 8, 3)))
    strides = strides if isinstance(strides, tuple) else (strides, strides)
    expected = unfold(x, (3, 2), strides, (dilation, dilation), padding)
    got = _unfold_by_slicing(x, (3, 2), strides, (dilation, dilation), padding)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())


@pytest.mark.parametrize("layer", ["depthwise", "conv3d", "conv3d_transpose", "conv2d_transpose"])
def test_true_fisher_without_bias(float64, fixed_sampled_labels, layer):
    if layer == "depthwise":
        shape, conv = (6, 5, 2), keras.layers.DepthwiseConv2D(3, strides=2, use_bias=False)
    elif layer == "conv3d":
        shape, conv = (4, 3, 3, 2), keras.layers.Conv3D(2, 2, use_bias=False, activation="tanh")
    elif layer == "conv3d_transpose":
        shape, conv = (2, 3, 2, 2), keras.layers.Conv3DTranspose(2, 2, use_bias=False)
    else:
        shape, conv = (3, 4, 2), keras.layers.Conv2DTranspose(2, 3, strides=2, use_bias=False)
    x, y = data(shape, m=4)
    fit_matches_reference(conv_model(conv, shape), x, y, "true", fixed_sampled_labels)


@pytest.mark.parametrize("conv, shape", [
    (keras.layers.Conv2D(4, (3, 2), padding="same", dilation_rate=(1, 2)), (7, 6, 3)),
    (keras.layers.Conv2D(6, 3, groups=3, use_bias=False), (6, 5, 3)),
    (keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2), (5, 6, 4)),
    (keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2), (9, 2)),
    (keras.layers.Conv3D(2, 2, padding="same"), (4, 3, 3, 2)),
], ids=["conv2d-dilated", "grouped", "depthwise", "conv1d-causal", "conv3d"])
def test_per_sample_gradients_by_offset_match_the_unfolded_rows(conv, shape):
    """At stride 1 a convolution forms J by kernel offset, never unfolding: the same J as Âᵢᵀ Gᵢ
    from the patches, laid out as the block's matrix (bias row last, groups first)."""
    conv_model(conv, shape)  # builds the layer
    helper = helper_for(conv)
    assert not helper.per_sample_from_rows
    rng = np.random.default_rng(1)
    x = tf.constant(rng.normal(size=(3, *shape)), tf.float32)
    g = tf.constant(rng.normal(size=(3, *conv(x).shape[1:])), tf.float32)
    rows = helper.input_rows(x)
    equation = "ipa,ipb->iab" if helper.groups == 1 else "ipga,ipgb->igab"
    expected = tf.einsum(equation, rows, helper.output_rows(g))
    got = helper.per_sample_gradients(x, g)
    assert got.shape == (3, *helper.matrix_shape) == expected.shape
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_strided_convolutions_unfold():
    """Strided slices are slower than TF's patch extraction: strided convolutions keep route E
    from the unfolded rows."""
    conv = keras.layers.Conv2D(2, 3, strides=(1, 2))
    conv_model(conv, (6, 6, 1))
    assert helper_for(conv).per_sample_from_rows
