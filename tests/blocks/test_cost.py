"""The cost model: which Gram route and which cache each layer gets, and that both are exact."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD
from tengrad_tf.blocks import CacheKind, FisherBlock, cost
from tests.blocks.test_conv import conv_model, one_step_matches_reference
from tests.helpers import train_step


def test_cost_model_switches_where_the_arithmetic_says():
    """Late, small-image layers (small P) take route F; early ones (large P) take route E."""
    late = keras.layers.Conv2D(128, 3, padding="same")
    late.build((None, 3, 3, 128))
    early = keras.layers.Conv2D(128, 3, padding="same")
    early.build((None, 28, 28, 128))
    late_block, early_block = FisherBlock(late, 2**28), FisherBlock(early, 2**28)
    m = 128
    for block, p in ((late_block, 9), (early_block, 784)):
        cache = block.cache_kind(p)
        threshold = block.factored_threshold(p, cache)
        d_in, d_out = block.d_in, block.d_out
        cost_f = m * m * p * p * (d_in + d_out)
        cost_e = (0 if cache is CacheKind.PER_SAMPLE else m * p * d_in * d_out) + m * m * d_in * d_out
        assert (m < threshold) == (cost_f < cost_e), (p, threshold)
    assert late_block.factored_threshold(9, late_block.cache_kind(9)) > m
    assert early_block.factored_threshold(784, early_block.cache_kind(784)) < m
    dense = keras.layers.Dense(10)
    dense.build((None, 500))
    assert FisherBlock(dense, 2**28).cache_kind(1) is CacheKind.FACTORS


def test_the_cache_is_what_makes_the_steps_between_updates_cheaper():
    """J (D_in·D_out per sample) replaces the factors (P(D_in + D_out)) where it is smaller, and
    from J_POSITIONS positions on, where projecting on it costs less than the factored
    m·P·D_in·D_out, unless it would hold more than J_MEMORY_RATIO times the factors' memory."""
    def kind(layer, shape, p):
        layer.build(shape)
        return FisherBlock(layer, 2**28).cache_kind(p)

    # A text convolution, 5 × 64 → 128 over 36 positions: J is 2.5× the factors' memory, and
    # a step between updates projects on 36× fewer numbers (the defaults study's text CNN).
    assert kind(keras.layers.Conv1D(128, 5), (None, 40, 64), 36) is CacheKind.PER_SAMPLE
    # The same layer over 8 positions: factors (the factored projection costs about as much).
    assert kind(keras.layers.Conv1D(128, 5), (None, 12, 64), 8) is CacheKind.FACTORS
    # A wide Dense layer on 16 tokens: J would be 32× the factors: factors.
    assert kind(keras.layers.Dense(1024), (None, 16, 1024), 16) is CacheKind.FACTORS
    # A Dense layer on 64 tokens, 64 → 128 (a Transformer's feed-forward): J.
    assert kind(keras.layers.Dense(128), (None, 64, 64), 64) is CacheKind.PER_SAMPLE
    # One row per sample: J is never cheaper to project on than (A, G).
    assert kind(keras.layers.Dense(4096), (None, 4096), 1) is CacheKind.FACTORS
    assert cost.J_POSITIONS == 12 and cost.J_MEMORY_RATIO == 8


@pytest.mark.parametrize("length, cache", [(12, "factors"), (16, "per-sample gradients")])
def test_both_caches_give_the_reference_step_through_fit(float64, length, cache):
    """Conv1D(24, 5) on 10 channels (d = 51·24, beyond the explicit-inverse blocks) over P = 8
    positions keeps its factors, over P = 12 its J (the larger cache there); through fit, the
    step agrees with the dense float64 reference either way."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, length, 10))
    y = rng.integers(0, 3, size=6)
    conv = keras.layers.Conv1D(24, 5, activation="tanh")
    opt = one_step_matches_reference(conv_model(conv, (length, 10)), x, y)
    assert opt.treatments()[conv.kernel.path].endswith(f"caches {cache})")


def test_a_repeated_gram_beyond_the_budget_is_refused_naming_the_layer():
    """fisher="exact": 512 rows fit in 2 MiB (exactly), 513 do not; one row per sample (repeats
    1) and a dynamic capacity are never refused here."""
    cost.check_repeated_gram("dense", 512, 4, 2 * 2**20)
    with pytest.raises(ValueError, match=r"layer 'dense'.*513 × 513 Gram.*memory_budget=2097152"):
        cost.check_repeated_gram("dense", 513, 4, 2 * 2**20)
    cost.check_repeated_gram("dense", 10**6, 1, 2**20)
    cost.check_repeated_gram("dense", None, 4, 2**20)


def test_keeps_inverse_bounds_small_blocks_by_the_batch_only_under_adaptive_damping():
    assert cost.ADAPTIVE_INVERSE_RATIO == 4
    assert cost.keeps_inverse(512, 1024, 128, adaptive_damping=True)
    assert not cost.keeps_inverse(513, 1024, 128, adaptive_damping=True)
    assert cost.keeps_inverse(1024, 1024, 128, adaptive_damping=False)
    assert cost.keeps_inverse(1024, 1024, None, adaptive_damping=True)  # dynamic batch
    assert not cost.keeps_inverse(1025, 1024, 4096, adaptive_damping=True)


def test_only_intermediates_larger_than_twice_what_the_step_holds_are_chunked():
    """One piece at ≤ 2× the held elements per sample, chunks within the budget above it."""
    assert cost.chunk(2**20, 100, 50) is None
    assert cost.chunk(2**20, 101, 50, item_bytes=8) == 2**20 // 808
    assert cost.chunk(2**20, 10**9) == 1  # never less than a sample


def chunk_loops(model, input_shape) -> list[str]:
    """The chunk loops (map_fn) of a TENGraD() step traced with a dynamic batch."""
    step = train_step(model, TENGraD())
    graph_def = step.get_concrete_function(tf.TensorSpec((None, *input_shape)),
                                           tf.TensorSpec((None,), tf.int64)).graph.as_graph_def()
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    return [n.name for n in nodes if "While" in n.op and "map/" in n.name]


def test_a_dense_step_traces_no_chunk_loop_and_a_convolution_keeps_its_own(direct_inverse):
    """A Dense layer's rows are its input and a bias column, its J no more than it computes, so
    with a dynamic batch neither D_A's moment nor J (these small blocks cache their inverse, built
    from J) is a loop over chunks, each a while loop that the first step traces and optimizes; a
    3 × 3 convolution's patches, 9× its input, are summed in chunks (D_A's moment)."""
    keras.utils.set_random_seed(0)
    mlp = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dense(3)])
    assert chunk_loops(mlp, (5,)) == []
    conv = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(6, 3, padding="same"),
                             keras.layers.Flatten(), keras.layers.Dense(3)])
    assert any("tengrad_metric" in name for name in chunk_loops(conv, (8, 8, 4)))
