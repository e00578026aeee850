"""The architectures of the TENGraD paper's experiments, as Keras 3 functional models.

Soori et al., "TENGraD: Time-Efficient Natural Gradient Descent with Exact Fisher-Block
Inversion", ICML 2021, train 3C1F on Fashion-MNIST and VGG16-BN, WRN-28-4, DenseNet (depth 19,
growth rate 100), MobileNetV2 and the authors' "dense" MobileNetV2 on CIFAR-10. This module builds
those networks so that the optimizer, the examples and the benchmarks can train the same models
as the paper.

What it is for:

* Channels-last models built only from public Keras layers (``Conv2D``, ``Dense``,
  ``DepthwiseConv2D``, ``BatchNormalization``, pooling, ``ReLU``, ``Add``, ``Concatenate``), so
  that TENGraD finds every weight layer and preconditions it with an exact block.
* Every model returns logits (no softmax): train with
  ``SparseCategoricalCrossentropy(from_logits=True)``.
* Width knobs (``width``/``hidden`` for 3C1F, ``width_multiplier``, ``depth``, ``growth_rate``)
  give tiny versions of the same topology for CPU tests.

It also builds three small models of other kinds, for the layer-coverage goal of TENGraD's exact
blocks (tests/test_coverage.py) and the step-time benchmark: a Transformer encoder text classifier
(``transformer_classifier``), an Embedding + Conv1D text CNN (``text_cnn``) and a Conv2D /
Conv2DTranspose autoencoder with BatchNormalization (``conv_autoencoder``). They are not in
``MODELS``, whose entries are image classifiers with the same signature.

What it is not for: no data pipeline or augmentation (see ``data.py``), no weight decay or
dropout inside the models (weight decay belongs to the optimizer), no pretrained weights, and no
bit-for-bit copy of the PyTorch reference initialisation (convolutions use Keras' ``he_normal``,
Dense layers Keras' default ``glorot_uniform``). BatchNormalization uses PyTorch's defaults
(``momentum=0.9`` in Keras' convention, ``epsilon=1e-5``) to match the reference training runs.

Parameter counts in the docstrings are ``model.count_params()`` for the full-size model with
``input_shape=(32, 32, 3)`` and ``num_classes=10`` (``(28, 28, 1)`` for 3C1F); they include the
non-trainable BatchNormalization moving statistics, whose number is given separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
from keras import layers

__all__ = [
    "MODELS",
    "PositionalEmbedding",
    "build_model",
    "conv_autoencoder",
    "densenet",
    "mobilenet_v2",
    "mobilenet_v2_dense",
    "text_cnn",
    "three_c_one_f",
    "transformer_classifier",
    "vgg16_bn",
    "wide_resnet",
    "wrn_28_4",
]

_CONV_INIT = "he_normal"
_BN_MOMENTUM = 0.9  # PyTorch's momentum=0.1
_BN_EPSILON = 1e-5

CIFAR_SHAPE = (32, 32, 3)
FASHION_MNIST_SHAPE = (28, 28, 1)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _check(input_shape, num_classes):
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or any(d is not None and int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (height, width, channels), got {input_shape!r}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return input_shape, int(num_classes)


def _scaled(channels, multiplier):
    """`channels * multiplier`, rounded, at least 1."""
    if multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {multiplier!r}")
    return max(1, int(round(channels * multiplier)))


def _conv(filters, kernel_size, name, strides=1, use_bias=False):
    return layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=use_bias,
                         kernel_initializer=_CONV_INIT, name=name)


def _depthwise_init():
    """He-normal for a depthwise kernel (3, 3, C, 1): its true fan-in is 9, which Keras' fan
    computation calls fan_out (it would take 9 * C as fan_in and start the kernel ~sqrt(C) too
    small)."""
    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


def _bn(name):
    return layers.BatchNormalization(momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, name=name)


def _bn_relu(x, name):
    x = _bn(f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


# --------------------------------------------------------------------------------------------
# 3C1F (Fashion-MNIST)
# --------------------------------------------------------------------------------------------

def three_c_one_f(input_shape=FASHION_MNIST_SHAPE, num_classes=10, width=128, hidden=500,
                  name="3c1f"):
    """3C1F, the paper's Fashion-MNIST network.

    Three ``Conv2D(width, 3x3, padding='same', use_bias=True)`` + ReLU, then
    ``MaxPooling2D(3)`` (pool 3, stride 3: 28x28 -> 9x9), ``Flatten``, ``Dense(hidden)`` + ReLU
    and ``Dense(num_classes)`` logits. No BatchNormalization.

    Reference configuration: ``width=128``, ``hidden=500``, input 28x28x1, 10 classes:
    5,485,958 parameters (all trainable; 5,184,500 of them in the 10368->500 Dense layer).
    ``width``/``hidden`` shrink it for CPU runs.
    """
    input_shape, num_classes = _check(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i in range(1, 4):
        x = layers.Conv2D(width, 3, padding="same", activation="relu", use_bias=True,
                          kernel_initializer=_CONV_INIT, name=f"conv{i}")(x)
    x = layers.MaxPooling2D(3, name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------------------------
# VGG16-BN (CIFAR)
# --------------------------------------------------------------------------------------------

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def vgg16_bn(input_shape=CIFAR_SHAPE, num_classes=10, width_multiplier=1.0, name="vgg16_bn"):
    """VGG16 with BatchNormalization, CIFAR variant (the ``vgg16_bn`` of the K-FAC/PyTorch
    CIFAR model zoos): no 4096-wide FC layers.

    Configuration D ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M,
    512, 512, 512, M]``: each number is ``Conv2D(c, 3x3, 'same', use_bias=False)`` +
    ``BatchNormalization`` + ReLU, each ``M`` is ``MaxPooling2D(2, padding='same')``; then
    ``Flatten`` and one ``Dense(num_classes)`` (512 -> classes on 32x32 inputs, where the five
    pools leave 1x1). The PyTorch reference keeps a (redundant) bias in each conv before
    BatchNorm; here it is dropped, so the count is 4,224 lower than PyTorch's.
    ``padding='same'`` pooling equals the reference's on 32x32 and lets inputs smaller than
    32x32 (tests) go through all five pools.

    Reference configuration (32x32x3, 10 classes): 14,732,490 parameters, of which 14,724,042
    trainable and 8,448 BatchNorm moving statistics. ``width_multiplier`` scales every conv's
    channels (rounded, at least 1).
    """
    input_shape, num_classes = _check(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    stage, index = 1, 1
    for v in VGG16_CONFIG:
        if v == "M":
            x = layers.MaxPooling2D(2, padding="same", name=f"block{stage}_pool")(x)
            stage, index = stage + 1, 1
            continue
        prefix = f"block{stage}_conv{index}"
        x = _conv(_scaled(v, width_multiplier), 3, prefix)(x)
        x = _bn_relu(x, prefix)
        index += 1
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------------------------
# Wide ResNet (CIFAR)
# --------------------------------------------------------------------------------------------

def _wrn_block(x, in_channels, out_channels, strides, name):
    """Pre-activation basic block (Zagoruyko & Komodakis): BN-ReLU-Conv3x3-BN-ReLU-Conv3x3.

    When the shape changes, the shortcut is a 1x1 strided conv of the *pre-activated* input,
    as in the reference implementation; otherwise it is the identity on the raw input.
    """
    preact = _bn_relu(x, f"{name}_preact")
    out = _conv(out_channels, 3, f"{name}_conv1", strides=strides)(preact)
    out = _bn_relu(out, f"{name}_conv1")
    out = _conv(out_channels, 3, f"{name}_conv2")(out)
    if in_channels != out_channels or strides != 1:
        shortcut = _conv(out_channels, 1, f"{name}_shortcut", strides=strides)(preact)
    else:
        shortcut = x
    return layers.Add(name=f"{name}_add")([shortcut, out])


def wide_resnet(input_shape=CIFAR_SHAPE, num_classes=10, depth=28, widen_factor=4,
                width_multiplier=1.0, name=None):
    """Pre-activation Wide ResNet WRN-``depth``-``widen_factor`` for CIFAR.

    ``Conv2D(16, 3x3)``, then three groups of ``n = (depth - 4) / 6`` basic blocks with
    ``16k, 32k, 64k`` channels (``k = widen_factor``; strides 1, 2, 2), each block
    BN-ReLU-Conv3x3-BN-ReLU-Conv3x3 plus a 1x1-conv shortcut where the shape changes; then
    BN-ReLU, ``GlobalAveragePooling2D`` and ``Dense(num_classes)``. All convs have no bias and
    ``padding='same'``; no dropout. ``width_multiplier`` scales every channel count (also the
    16-channel stem) for tiny tests.

    WRN-28-4 (32x32x3, 10 classes): 5,856,250 parameters, of which 5,849,050 trainable and
    7,200 BatchNorm moving statistics.
    """
    input_shape, num_classes = _check(input_shape, num_classes)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"Wide ResNet depth must be 6n + 4 with n >= 1, got {depth!r}")
    n = (depth - 4) // 6
    widths = [_scaled(c, width_multiplier) for c in (16, 16 * widen_factor, 32 * widen_factor,
                                                      64 * widen_factor)]
    if name is None:
        name = f"wrn_{depth}_{widen_factor}"
    inputs = keras.Input(input_shape, name="image")
    x = _conv(widths[0], 3, "stem_conv")(inputs)
    channels = widths[0]
    for group, (out_channels, strides) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
        for block in range(1, n + 1):
            x = _wrn_block(x, channels, out_channels, strides if block == 1 else 1,
                           f"group{group}_block{block}")
            channels = out_channels
    x = _bn_relu(x, "final")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def wrn_28_4(input_shape=CIFAR_SHAPE, num_classes=10, width_multiplier=1.0, depth=28,
             widen_factor=4, name=None):
    """WRN-28-4, the paper's Wide ResNet: ``wide_resnet(depth=28, widen_factor=4)``.

    28 layers (n = 4 blocks per group), channels 16 -> 64, 128, 256; 5,856,250 parameters
    (5,849,050 trainable, 7,200 BatchNorm moving statistics) for 32x32x3 inputs and 10
    classes. ``depth``/``widen_factor``/``width_multiplier`` can be lowered for tiny tests; the
    model is then named after its actual depth and widen factor.
    """
    return wide_resnet(input_shape, num_classes, depth=depth, widen_factor=widen_factor,
                       width_multiplier=width_multiplier, name=name)


# --------------------------------------------------------------------------------------------
# DenseNet-BC (CIFAR)
# --------------------------------------------------------------------------------------------

def densenet(input_shape=CIFAR_SHAPE, num_classes=10, depth=19, growth_rate=100,
             compression=0.5, bottleneck=True, name=None):
    """DenseNet-BC for CIFAR, as in the PyTorch CIFAR model zoo the K-FAC line of work uses
    (``densenet(depth, growthRate, compressionRate=2)``, bottleneck blocks).

    Layers per dense block: ``n = (depth - 4) // 6`` with bottlenecks (``(depth - 4) // 3``
    without); ``depth - 4`` must be a multiple of 3 as in the reference. For the paper's
    ``depth=19`` this is ``15 // 6 = 2`` bottleneck layers per block: the reference floors, so
    the network has 16 weight layers, not 19 (12 convs in the dense blocks, 2 transition
    convs, the stem conv and the classifier). This module chooses the same.

    Structure: ``Conv2D(2 * growth_rate, 3x3)``; three dense blocks, each layer
    BN-ReLU-Conv1x1(4 * growth_rate)-BN-ReLU-Conv3x3(growth_rate) concatenated to its input;
    between blocks a transition BN-ReLU-Conv1x1(floor(channels * compression))-AvgPool2;
    then BN-ReLU, ``GlobalAveragePooling2D``, ``Dense(num_classes)``. All convs have no bias.

    Reference configuration (depth 19, growth rate 100, 32x32x3, 10 classes): channels
    200 -> 400 | 200 -> 400 | 200 -> 400; 2,949,810 parameters, of which 2,939,610 trainable
    and 10,200 BatchNorm moving statistics. Lower ``depth`` (10 gives one layer per block) and
    ``growth_rate`` for tiny tests.
    """
    input_shape, num_classes = _check(input_shape, num_classes)
    if (depth - 4) % 3:
        raise ValueError(f"DenseNet depth must be 3n + 4, got {depth!r}")
    n = (depth - 4) // 6 if bottleneck else (depth - 4) // 3
    if n < 1:
        raise ValueError(f"DenseNet depth {depth!r} gives no layer per dense block")
    if not 0 < compression <= 1:
        raise ValueError(f"compression must be in (0, 1], got {compression!r}")
    if name is None:
        name = f"densenet_{depth}_{growth_rate}"

    inputs = keras.Input(input_shape, name="image")
    x = _conv(2 * growth_rate, 3, "stem_conv")(inputs)
    channels = 2 * growth_rate
    for block in range(1, 4):
        for layer in range(1, n + 1):
            prefix = f"dense{block}_layer{layer}"
            out = _bn_relu(x, f"{prefix}_1")
            if bottleneck:
                out = _conv(4 * growth_rate, 1, f"{prefix}_conv1x1")(out)
                out = _bn_relu(out, f"{prefix}_2")
            out = _conv(growth_rate, 3, f"{prefix}_conv3x3")(out)
            x = layers.Concatenate(axis=-1, name=f"{prefix}_concat")([x, out])
            channels += growth_rate
        if block < 3:
            prefix = f"transition{block}"
            channels = max(1, int(math.floor(channels * compression)))
            x = _bn_relu(x, prefix)
            x = _conv(channels, 1, f"{prefix}_conv")(x)
            x = layers.AveragePooling2D(2, name=f"{prefix}_pool")(x)
    x = _bn_relu(x, "final")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (CIFAR) and the authors' dense variant
# --------------------------------------------------------------------------------------------

# (expansion t, output channels c, blocks n, first stride s); CIFAR adaptation: the stem conv
# and the 24-channel stage use stride 1 instead of 2, so 32x32 inputs end at 4x4.
MOBILENET_V2_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _mobilenet_v2(input_shape, num_classes, width_multiplier, dense, name):
    input_shape, num_classes = _check(input_shape, num_classes)
    inputs = keras.Input(input_shape, name="image")
    channels = _scaled(32, width_multiplier)
    x = _conv(channels, 3, "stem_conv")(inputs)
    x = _bn_relu(x, "stem")
    index = 0
    for expansion, out, repeats, first_stride in MOBILENET_V2_CONFIG:
        if dense:
            expansion = max(1, expansion // 2)
        out = _scaled(out, width_multiplier)
        for r in range(repeats):
            index += 1
            strides = first_stride if r == 0 else 1
            prefix = f"block{index}"
            planes = expansion * channels
            y = _conv(planes, 1, f"{prefix}_expand")(x)
            y = _bn_relu(y, f"{prefix}_expand")
            if dense:
                y = _conv(planes, 3, f"{prefix}_conv3x3", strides=strides)(y)
            else:
                y = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                                           depthwise_initializer=_depthwise_init(),
                                           name=f"{prefix}_depthwise")(y)
            y = _bn_relu(y, f"{prefix}_conv3x3" if dense else f"{prefix}_depthwise")
            y = _conv(out, 1, f"{prefix}_project")(y)
            y = _bn(f"{prefix}_project_bn")(y)
            if strides == 1:
                if channels != out:
                    shortcut = _conv(out, 1, f"{prefix}_shortcut")(x)
                    shortcut = _bn(f"{prefix}_shortcut_bn")(shortcut)
                else:
                    shortcut = x
                y = layers.Add(name=f"{prefix}_add")([shortcut, y])
            x = y
            channels = out
    x = _conv(_scaled(1280, width_multiplier), 1, "head_conv")(x)
    x = _bn_relu(x, "head")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def mobilenet_v2(input_shape=CIFAR_SHAPE, num_classes=10, width_multiplier=1.0,
                 name="mobilenet_v2"):
    """MobileNetV2 for CIFAR (the widely used ``pytorch-cifar`` adaptation).

    Stem ``Conv2D(32, 3x3, stride 1)``-BN-ReLU; 17 inverted-residual blocks with the
    ``(t, c, n, s)`` table ``(1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2)
    (6,320,1,1)`` (stem and the 24-channel stage at stride 1 instead of 2 for 32x32 inputs);
    each block is Conv1x1(t * in)-BN-ReLU, ``DepthwiseConv2D(3x3, stride s)``-BN-ReLU,
    Conv1x1(c)-BN (linear bottleneck), plus a residual when the stride is 1 (a Conv1x1-BN
    projection when the channels change). Then Conv1x1(1280)-BN-ReLU,
    ``GlobalAveragePooling2D`` and ``Dense(num_classes)``. As in that adaptation, the
    activations are ReLU (not ReLU6) and the t = 1 block keeps its 1x1 expansion conv. Convs and
    depthwise convs have no bias; depthwise kernels start He-normal over their fan-in of 9.

    Reference configuration (32x32x3, 10 classes): 2,296,922 trainable parameters (equal to
    the PyTorch reference), 2,332,010 with the 35,088 BatchNorm moving statistics
    (``count_params()``). ``width_multiplier`` scales every channel count, the 1280-wide head
    included (rounded, at least 1), for tiny tests.
    """
    return _mobilenet_v2(input_shape, num_classes, width_multiplier, dense=False, name=name)


def mobilenet_v2_dense(input_shape=CIFAR_SHAPE, num_classes=10, width_multiplier=1.0,
                       name="mobilenet_v2_dense"):
    """The paper authors' MobileNetV2 variant: ``mobilenet_v2`` with every 3x3 depthwise conv
    replaced by a regular (dense) ``Conv2D(t * in, 3x3, use_bias=False)`` and the expansion
    factor halved (t = 3 instead of 6; the t = 1 block keeps t = 1), so that every weight
    layer is a Conv2D/Dense that TENGraD preconditions.

    Reference configuration (32x32x3, 10 classes): 11,541,578 parameters, of which
    11,520,698 trainable and 20,880 BatchNorm moving statistics. ``width_multiplier`` as for
    ``mobilenet_v2``.
    """
    return _mobilenet_v2(input_shape, num_classes, width_multiplier, dense=True, name=name)


# --------------------------------------------------------------------------------------------
# other kinds of model: text and an autoencoder
# --------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="tengrad_tf")
class PositionalEmbedding(layers.Layer):
    """Token embedding plus a learned position embedding.

    The positions are broadcast to the batch before the lookup, so that the position table's
    output gradient holds one row per sample (an exact block, like the token table's). Looked up
    on ``ops.arange(length)`` alone, as Keras's text examples do, the table would see only the
    batch's summed gradient and take first-order steps.
    """

    def __init__(self, vocabulary, length, dim, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary, self.length, self.dim = vocabulary, length, dim
        self.tokens = layers.Embedding(vocabulary, dim, name="tokens")
        self.positions = layers.Embedding(length, dim, name="positions")

    def call(self, x):
        positions = keras.ops.broadcast_to(keras.ops.arange(keras.ops.shape(x)[-1]),
                                           keras.ops.shape(x))
        return self.tokens(x) + self.positions(positions)

    def get_config(self):
        return {**super().get_config(), "vocabulary": self.vocabulary, "length": self.length,
                "dim": self.dim}


def transformer_classifier(vocabulary=20000, length=64, dim=64, heads=4, ffn=128, num_classes=2,
                           name="transformer"):
    """A one-block Transformer encoder text classifier (Keras's text-classification example).

    ``PositionalEmbedding`` → ``MultiHeadAttention(heads, dim // heads)`` with a residual and
    ``LayerNormalization`` → ``Dense(ffn, relu)`` → ``Dense(dim)`` with a residual and
    ``LayerNormalization`` → ``GlobalAveragePooling1D`` → ``Dense(num_classes)`` logits. Inputs
    are int token ids of shape ``(length,)``. Defaults: 1,317,698 parameters, 1,280,000 of them in
    the token table.
    """
    inputs = keras.Input((length,), dtype="int32", name="tokens")
    x = PositionalEmbedding(vocabulary, length, dim, name="embedding")(inputs)
    attention = layers.MultiHeadAttention(heads, dim // heads, name="attention")(x, x)
    x = layers.LayerNormalization(epsilon=1e-6, name="attention_norm")(x + attention)
    h = layers.Dense(ffn, activation="relu", name="ffn_in")(x)
    h = layers.Dense(dim, name="ffn_out")(h)
    x = layers.LayerNormalization(epsilon=1e-6, name="ffn_norm")(x + h)
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name=name)


def text_cnn(vocabulary=20000, length=64, dim=64, filters=128, kernel_size=5, num_classes=2,
             name="text_cnn"):
    """Embedding → ``Conv1D(filters, kernel_size, relu)`` → ``GlobalMaxPooling1D`` →
    ``Dense(num_classes)`` logits, on int token ids of shape ``(length,)``. Defaults: 1,321,346
    parameters, 1,280,000 of them in the table."""
    inputs = keras.Input((length,), dtype="int32", name="tokens")
    x = layers.Embedding(vocabulary, dim, name="embedding")(inputs)
    x = layers.Conv1D(filters, kernel_size, activation="relu", name="conv")(x)
    x = layers.GlobalMaxPooling1D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name=name)


def conv_autoencoder(input_shape=CIFAR_SHAPE, width=16, name="conv_autoencoder"):
    """A convolutional autoencoder: two ``Conv2D(3x3, stride 2)``-BN-ReLU downsampling stages
    (``width``, ``2 * width`` channels), two ``Conv2DTranspose(3x3, stride 2)`` upsampling stages
    (the first with BN-ReLU), output with the input's channels and no activation (train with
    MSE against the input). Defaults (32x32x3): 10,275 trainable parameters (10,403 with the
    BatchNorm moving statistics)."""
    input_shape = tuple(input_shape)
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, filters in enumerate((width, 2 * width)):
        x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"down{i}")(x)
        x = _bn_relu(x, f"down{i}")
    x = layers.Conv2DTranspose(width, 3, strides=2, padding="same", name="up0")(x)
    x = _bn_relu(x, "up0")
    outputs = layers.Conv2DTranspose(input_shape[-1], 3, strides=2, padding="same", name="up1")(x)
    return keras.Model(inputs, outputs, name=name)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

MODELS: dict[str, Callable[..., keras.Model]] = {
    "3c1f": three_c_one_f,
    "vgg16_bn": vgg16_bn,
    "wrn_28_4": wrn_28_4,
    "densenet": densenet,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_dense": mobilenet_v2_dense,
}


def build_model(name: str, input_shape: Sequence[int] | None = None, num_classes: int = 10,
                **kwargs) -> keras.Model:
    """Build the model registered as ``name`` in ``MODELS``.

    ``input_shape`` defaults to the builder's own default (28x28x1 for ``"3c1f"``, 32x32x3 for
    the CIFAR networks); ``kwargs`` go to the builder (``width_multiplier``, ``depth``, ...).
    """
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; known: {sorted(MODELS)}") from None
    if input_shape is not None:
        kwargs["input_shape"] = tuple(input_shape)
    return builder(num_classes=num_classes, **kwargs)
