"""The paper's architectures (tengrad_tf/models.py): tiny versions train one step, full-size
versions have the documented parameter counts and are made of standard Keras layers only.

To train the tiny models with another optimizer, take the `tiny` fixture (parametrized over every
registered model name) or call `tiny_model(name)`.
"""

import inspect

import keras
import numpy as np
import pytest

from tengrad_tf import models
from tengrad_tf.models import MODELS, build_model

NUM_CLASSES = 10
BATCH = 4

# Tiny versions of each registered model: same topology, a few channels, small inputs, so that a
# `fit` step (graph tracing included) takes seconds on a CPU.
TINY = {
    "3c1f": dict(input_shape=(28, 28, 1), width=4, hidden=16),
    "vgg16_bn": dict(input_shape=(16, 16, 3), width_multiplier=1 / 16),
    "wrn_28_4": dict(input_shape=(8, 8, 3), depth=10, widen_factor=1, width_multiplier=0.25),
    "densenet": dict(input_shape=(8, 8, 3), depth=10, growth_rate=4),
    "mobilenet_v2": dict(input_shape=(8, 8, 3), width_multiplier=1 / 8),
    "mobilenet_v2_dense": dict(input_shape=(8, 8, 3), width_multiplier=1 / 8),
}

# model.count_params() of the full-size models (input 32x32x3, or 28x28x1 for 3C1F; 10 classes):
# (total, trainable). The totals include BatchNormalization moving statistics.
FULL_SIZE_PARAMS = {
    "3c1f": (5_485_958, 5_485_958),
    "vgg16_bn": (14_732_490, 14_724_042),
    "wrn_28_4": (5_856_250, 5_849_050),
    "densenet": (2_949_810, 2_939_610),
    "mobilenet_v2": (2_332_010, 2_296_922),
    "mobilenet_v2_dense": (11_541_578, 11_520_698),
}

PRECONDITIONED = (keras.layers.Conv2D, keras.layers.Dense)


def tiny_model(name, **overrides):
    """A tiny version of the registered model `name` (see TINY), built in the current floatx."""
    kwargs = {**TINY[name], **overrides}
    return build_model(name, num_classes=NUM_CLASSES, **kwargs)


def random_batch(model, m=BATCH, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, *model.input_shape[1:])).astype(keras.config.floatx())
    y = rng.integers(0, NUM_CLASSES, size=m)
    return x, y


def count(model, layer_class, **attrs):
    return sum(type(layer) is layer_class and all(getattr(layer, k) == v for k, v in attrs.items())
               for layer in model.layers)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Start and leave each test with Keras' global state cleared.

    Building the first layer caches the global dtype policy from floatx; without clearing, a
    float32 model built here would make later `float64` fixtures (set_floatx only) build float32
    layers, in this module and in the modules that run after it.
    """
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield
    keras.backend.clear_session(free_memory=False)


@pytest.fixture(params=sorted(MODELS))
def model_name(request):
    return request.param


@pytest.fixture
def tiny(model_name):
    return tiny_model(model_name)


def test_registry_matches_tiny_and_counts():
    assert set(MODELS) == {"3c1f", "vgg16_bn", "wrn_28_4", "densenet", "mobilenet_v2",
                           "mobilenet_v2_dense"}
    assert set(TINY) == set(MODELS) == set(FULL_SIZE_PARAMS)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="Unknown model"):
        build_model("resnet50", (32, 32, 3), 10)


def test_tiny_output_is_logits_of_the_right_shape(tiny):
    x, _ = random_batch(tiny)
    logits = keras.ops.convert_to_numpy(tiny(x, training=False))
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
    # Logits, not probabilities: a linear classifier on top, rows not summing to one.
    last = tiny.layers[-1]
    assert isinstance(last, keras.layers.Dense) and last.activation is keras.activations.linear
    assert not np.allclose(logits.sum(axis=1), 1.0)


def test_tiny_fit_step_with_sgd(tiny):
    x, y = random_batch(tiny)
    before = [keras.ops.convert_to_numpy(v).copy() for v in tiny.trainable_variables]
    tiny.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1),
                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = tiny.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [keras.ops.convert_to_numpy(v) for v in tiny.trainable_variables]
    changed = sum(not np.array_equal(b, a) for b, a in zip(before, after))
    assert changed == len(before)


def test_tiny_builds_in_float64(float64, model_name):
    model = tiny_model(model_name)
    x, _ = random_batch(model, m=2)
    assert keras.backend.standardize_dtype(model(x).dtype) == "float64"
    assert all(keras.backend.standardize_dtype(v.dtype) == "float64" for v in model.weights)


def test_standard_keras_layers_only(tiny):
    for layer in tiny.layers:
        assert type(layer).__module__.startswith("keras."), type(layer)
    convs = [layer for layer in tiny.layers if isinstance(layer, PRECONDITIONED)]
    assert convs and isinstance(tiny.layers[-1], keras.layers.Dense)


def test_full_size_parameter_counts(model_name):
    model = build_model(model_name)  # default shape; built, never run
    total, trainable = FULL_SIZE_PARAMS[model_name]
    assert model.count_params() == total
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == trainable
    assert model.output_shape == (None, 10)
    assert model.name
    # The numbers the builder's docstring quotes are the real ones.
    doc = inspect.getdoc(MODELS[model_name])
    assert f"{total:,}" in doc or f"{trainable:,}" in doc
    assert f"{trainable:,}" in doc


def test_3c1f_layers():
    model = build_model("3c1f")
    assert model.input_shape == (None, 28, 28, 1)
    assert count(model, keras.layers.Conv2D, use_bias=True, filters=128) == 3
    assert count(model, keras.layers.BatchNormalization) == 0
    pool = model.get_layer("pool")
    assert pool.pool_size == (3, 3) and pool.strides == (3, 3)
    assert model.get_layer("flatten").output.shape[1:] == (9 * 9 * 128,)
    assert model.get_layer("fc1").units == 500


def test_vgg16_bn_layers():
    model = build_model("vgg16_bn")
    assert count(model, keras.layers.Conv2D, use_bias=False) == 13
    assert count(model, keras.layers.Conv2D, use_bias=True) == 0
    assert count(model, keras.layers.BatchNormalization) == 13
    assert count(model, keras.layers.Dense) == 1
    assert model.get_layer("logits").kernel.shape == (512, 10)
    widths = [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert widths == [c for c in models.VGG16_CONFIG if c != "M"]


def test_wrn_28_4_layers():
    model = build_model("wrn_28_4")
    assert model.name == "wrn_28_4"
    convs = [layer for layer in model.layers if type(layer) is keras.layers.Conv2D]
    assert len(convs) == 28 and not any(c.use_bias for c in convs)
    shortcuts = [c for c in convs if c.name.endswith("shortcut")]
    assert [(c.kernel_size, c.strides, c.filters) for c in shortcuts] == [
        ((1, 1), (1, 1), 64), ((1, 1), (2, 2), 128), ((1, 1), (2, 2), 256)]
    assert count(model, keras.layers.Add) == 12
    assert model.get_layer("logits").kernel.shape == (256, 10)
    with pytest.raises(ValueError, match="6n"):
        models.wide_resnet(depth=27)


def test_densenet_layers():
    model = build_model("densenet")
    assert model.name == "densenet_19_100"
    convs = [layer for layer in model.layers if type(layer) is keras.layers.Conv2D]
    assert not any(c.use_bias for c in convs)
    # depth 19 with bottlenecks: (19 - 4) // 6 = 2 layers per block, 3 blocks.
    assert sum(c.name.endswith("conv3x3") for c in convs) == 6
    assert sum(c.name.endswith("conv1x1") for c in convs) == 6
    assert [c.filters for c in convs if c.name.startswith("transition")] == [200, 200]
    assert model.get_layer("logits").kernel.shape == (400, 10)
    with pytest.raises(ValueError):
        models.densenet(depth=20)


def test_mobilenet_v2_variants():
    standard = build_model("mobilenet_v2")
    dense = build_model("mobilenet_v2_dense")
    assert count(standard, keras.layers.DepthwiseConv2D, use_bias=False) == 17
    assert count(dense, keras.layers.DepthwiseConv2D) == 0
    # The dense variant's 3x3 convs are regular Conv2D over t * in channels, t halved (6 -> 3).
    dense3x3 = [layer for layer in dense.layers
                if type(layer) is keras.layers.Conv2D and layer.name.endswith("_conv3x3")]
    assert len(dense3x3) == 17
    assert dense.get_layer("block2_expand").filters == 3 * 16
    assert standard.get_layer("block2_expand").filters == 6 * 16
    assert dense.get_layer("block1_expand").filters == standard.get_layer("block1_expand").filters
    for model in (standard, dense):
        assert not any(layer.use_bias for layer in model.layers
                       if type(layer) in (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
        # CIFAR strides: 32x32 -> 4x4 before the head.
        assert model.get_layer("stem_conv").strides == (1, 1)
        assert model.get_layer("head_conv").output.shape[1:] == (4, 4, 1280)
    # He-normal over the depthwise fan-in of 9, not 9 * channels.
    depthwise = standard.get_layer("block17_depthwise").kernel
    assert 0.3 < float(np.std(keras.ops.convert_to_numpy(depthwise))) < 0.6


def test_tiny_tengrad_step(tiny):
    """One TENGraD step through fit on every paper model: it binds, preconditions every layer
    (Conv2D, Dense, BatchNorm, DepthwiseConv2D) with an exact block, and changes the weights."""
    from tengrad_tf import TENGraD

    x, y = random_batch(tiny)
    # No KL clip: a clipped step can fall below float32 resolution for weights like BN's gamma = 1.
    # A fixed damping: an adaptive one takes back a step that raises the loss, as this unclipped
    # first step may.
    opt = TENGraD(fisher="empirical", curvature_update_freq=1, kl_clip=None,
                  adaptive_damping=False)
    tiny.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in tiny.trainable_variables]
    tiny.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    assert int(opt.skipped_steps.numpy()) == 0
    treatments = opt.treatments()
    for layer in tiny.layers:
        for v in layer.trainable_weights:
            assert "block of layer" in treatments[v.path], (layer.name, treatments[v.path])
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, tiny.trainable_variables)]
    assert all(changed)
