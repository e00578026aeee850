"""Keras wrapper layers around a layer with an exact block: the wrapped layer's block is exact."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.layers.exactness import fit_matches_reference, treatment


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_time_distributed_dense_is_one_block_over_its_time_steps(float64, fixed_sampled_labels,
                                                                 fisher_type, use_bias):
    """On a static time axis TimeDistributed calls its Dense once per time step (Keras 3); the
    Dense is then a shared layer, whose per-sample gradient sums its calls: one exact block."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4, 3)), rng.integers(0, 3, size=6)
    wrapped = keras.layers.Dense(5, activation="tanh", use_bias=use_bias)
    head = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.TimeDistributed(wrapped),
                              keras.layers.Flatten(), head])
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels,
                                blocks=[(wrapped.kernel, wrapped.bias), (head.kernel, head.bias)])
    assert "called 4 times per step" in treatment(opt, wrapped)
