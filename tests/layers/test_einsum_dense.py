"""EinsumDense blocks (a Dense over positions), MultiHeadAttention's projections included, against
the float64 per-sample reference, through fit."""

import keras
import numpy as np
import pytest

from tengrad_tf import TENGraD
from tests.helpers import sce
from tests.layers.exactness import fit_matches_reference, treatment

FISHERS = ["empirical", "true"]


def data(shape, m=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, *shape)), rng.integers(0, 3, size=m)


def head(x):
    return keras.layers.Dense(3)(keras.layers.Flatten()(x))


EQUATIONS = [
    # equation, input shape, output shape, bias axes
    ("ab,bc->ac", (4,), (3,), "c"),
    ("...b,bc->...c", (5, 4), (3,), "c"),
    ("abc,dc->adb", (5, 4), (3, 5), "d"),  # kernel (output, input); output axis before positions
    ("abcd,cde->abe", (5, 2, 3), (5, 4), "e"),  # two contracted axes (MHA's output projection)
    ("abc,cde->abde", (5, 4), (5, 2, 3), "ed"),  # two output axes (MHA's query/key/value)
    ("abc,ced->abde", (5, 4), (5, 2, 3), None),  # kernel output axes in another order, no bias
]


@pytest.mark.parametrize("equation, shape, output, bias", EQUATIONS)
def test_einsum_dense_equations(float64, fixed_sampled_labels, equation, shape, output, bias):
    """A transposed kernel, rows of the wrong positions or a bias in the wrong order fail these."""
    x, y = data(shape)
    inputs = keras.Input(shape)
    layer = keras.layers.EinsumDense(equation, output, bias_axes=bias, activation="tanh",
                                     bias_initializer="random_normal")
    model = keras.Model(inputs, head(layer(inputs)))
    opt = fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels)
    assert treatment(opt, layer).startswith("EinsumDense block")


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_multi_head_attention(float64, fixed_sampled_labels, fisher_type, use_bias):
    """Self-attention: the four projections are EinsumDense blocks; attention couples the
    positions of a sample, never samples, so every block is exact."""
    x, y = data((4, 6))
    inputs = keras.Input((4, 6))
    attention = keras.layers.MultiHeadAttention(2, 3, use_bias=use_bias)
    h = keras.layers.LayerNormalization()(inputs + attention(inputs, inputs))
    model = keras.Model(inputs, head(h))
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert all(t.startswith(("EinsumDense block", "LayerNormalization block", "Dense block"))
               for t in opt.treatments().values())
    assert sum(t.startswith("EinsumDense block") for t in opt.treatments().values()) == (
        8 if use_bias else 4)


def test_cross_attention_with_rank_4_inputs(float64, fixed_sampled_labels):
    """Query and value of other lengths, attention over one of two position axes."""
    rng = np.random.default_rng(1)
    query, value = rng.normal(size=(5, 2, 3, 4)), rng.normal(size=(5, 2, 4, 4))
    y = rng.integers(0, 3, size=5)
    q, v = keras.Input((2, 3, 4)), keras.Input((2, 4, 4))
    attention = keras.layers.MultiHeadAttention(2, 2, attention_axes=(2,))
    model = keras.Model([q, v], head(attention(q, v)))
    fit_matches_reference(model, [query, value], y, "empirical", fixed_sampled_labels)


@pytest.mark.parametrize("equation, output, bias, why", [
    ("abc,bcd->abd", (5, 3), "d", "in the input, the kernel and the output"),
    ("abc,cde->abde", (5, 2, 3), "e", "bias_axes 'e' are not exactly"),
    ("abc,cd->ad", (3,), "d", "summed over without the kernel"),
])
def test_unsupported_equations_are_first_order_with_the_reason(equation, output, bias, why):
    inputs = keras.Input((5, 4))
    layer = keras.layers.EinsumDense(equation, output, bias_axes=bias)
    model = keras.Model(inputs, head(layer(inputs)))
    opt = TENGraD(fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    model.fit(np.zeros((4, 5, 4), "float32"), np.zeros(4), verbose=0)
    text = treatment(opt, layer)
    assert text.startswith(f"first-order: EinsumDense '{layer.name}': ") and why in text, text
