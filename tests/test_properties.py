"""Property-based tests: random Dense, Conv1D and Conv2D layers (shapes, bias, strides, padding,
dilation), batch sizes, damping and Fisher modes; one TENGraD step each, exact against the float64
reference of tests/reference.py (rtol 1e-9).

Deterministic for CI (derandomize=True) and small (10 examples per property: each example traces a
new train step).
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tengrad_tf import fisher
from tests import reference
from tests.helpers import LR, per_sample_sce, plain

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None)
CLASSES = 3


@contextlib.contextmanager
def float64_policy():
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous)
        keras.config.set_dtype_policy(policy)


def check_one_step(layer, input_shape, m, damping, fisher_type, seed):
    """Input → layer (tanh) → Flatten → Dense(3): one fit step is θ − lr·(F + λI)⁻¹g per block."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(input_shape), layer, keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES)])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, *input_shape))
    y = rng.integers(0, CLASSES, m)
    y_fisher = rng.integers(0, CLASSES, m) if fisher_type == "true" else y
    expected, _ = reference.reference_directions(model, x, y, y_fisher, per_sample_sce, damping)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    opt = plain(learning_rate=LR, damping=damping, fisher=fisher_type)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fisher, "sample_labels",
                      lambda loss, y_pred, seed=None: tf.constant(y_fisher))
        model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    assert sum("block" in t for t in opt.treatments().values()) == len(expected)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - LR * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)


common = dict(
    m=st.integers(1, 6),
    damping=st.sampled_from([1e-3, 0.05, 1.0]),
    fisher_type=st.sampled_from(["empirical", "true"]),
    use_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)


@SETTINGS
@given(d_in=st.integers(1, 6), units=st.integers(1, 5), positions=st.sampled_from([None, 1, 3]),
       **common)
def test_dense_is_exact(d_in, units, positions, m, damping, fisher_type, use_bias, seed):
    """Dense on (m, d_in) or on sequences (m, positions, d_in)."""
    shape = (d_in,) if positions is None else (positions, d_in)
    with float64_policy():
        layer = keras.layers.Dense(units, activation="tanh", use_bias=use_bias)
        check_one_step(layer, shape, m, damping, fisher_type, seed)


def conv_geometry(draw, rank):
    """(input spatial size, kernel, strides, dilation, padding) with a non-empty output; Keras's
    TensorFlow backend refuses strides > 1 together with dilation > 1."""
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = (1,) * rank if max(strides) > 1 else tuple(
        draw(st.integers(1, 2)) for _ in range(rank))
    paddings = ["valid", "same"] + (["causal"] if rank == 1 else [])
    padding = draw(st.sampled_from(paddings))
    span = [(k - 1) * r + 1 for k, r in zip(kernel, dilation)]
    size = tuple(draw(st.integers(s, s + 3)) for s in span)
    return size, kernel, strides, dilation, padding


@st.composite
def conv_layers(draw, rank):
    size, kernel, strides, dilation, padding = conv_geometry(draw, rank)
    c_in, filters = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return size + (c_in,), dict(filters=filters, kernel_size=kernel, strides=strides,
                                dilation_rate=dilation, padding=padding)


@SETTINGS
@given(spec=conv_layers(1), **common)
def test_conv1d_is_exact(spec, m, damping, fisher_type, use_bias, seed):
    shape, kwargs = spec
    with float64_policy():
        layer = keras.layers.Conv1D(activation="tanh", use_bias=use_bias, **kwargs)
        check_one_step(layer, shape, m, damping, fisher_type, seed)


@SETTINGS
@given(spec=conv_layers(2), **common)
def test_conv2d_is_exact(spec, m, damping, fisher_type, use_bias, seed):
    shape, kwargs = spec
    with float64_policy():
        layer = keras.layers.Conv2D(activation="tanh", use_bias=use_bias, **kwargs)
        check_one_step(layer, shape, m, damping, fisher_type, seed)
