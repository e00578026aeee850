"""The window Gram of curvature_batches (blocks/gram.py): the fresh rows, with the held samples'
block taken from the Gram the cache keeps, against U Uᵀ of the whole window computed afresh."""

import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf.blocks import gram


def fields(kind, m, rng):
    """Cache fields of m samples: explicit J, Dense factors (P = 1), a convolution's patch rows
    and output rows (P = 4), or a lookup table's tokens."""
    if kind == "j":
        return {"j": tf.constant(rng.normal(size=(m, 3, 2)))}
    if kind == "dense":
        return {"a": tf.constant(rng.normal(size=(m, 5))),
                "g": tf.constant(rng.normal(size=(m, 3)))}
    if kind == "conv":
        return {"a": tf.constant(rng.normal(size=(m, 4, 5))),
                "g": tf.constant(rng.normal(size=(m, 4, 3)))}
    return {"tokens": tf.constant(rng.integers(0, 6, (m, 4)).astype(np.float64)),
            "g": tf.constant(rng.normal(size=(m, 4, 3)))}


@pytest.mark.parametrize("kind", ["j", "dense", "conv", "tokens"])
@pytest.mark.parametrize("kept", [0, 3, 7])
def test_window_gram_adds_the_fresh_rows_to_the_held_block(kind, kept):
    """A window of 4 fresh samples and `kept` of the 7 held ones; the held Gram is zero-padded to
    a capacity of 10, as a fixed-size cache keeps it. Its entries for the samples the window
    drops are garbage here, and must not be read."""
    rng = np.random.default_rng(0)
    fresh, held = fields(kind, 4, rng), fields(kind, 7, rng)
    window = {k: tf.concat([fresh[k], held[k][:kept]], axis=0) for k in fresh}
    held_gram = np.zeros((10, 10))
    held_gram[:7, :7] = gram.gram_of_fields(held, 2**20).numpy()
    held_gram[kept:7, :] = held_gram[:, kept:7] = 1e6  # dropped samples
    got = gram.gram_of_window(fresh, window, tf.constant(held_gram), 2**20).numpy()
    # A cache kind's U, explicitly, for U Uᵀ: per-sample gradients of all 4 + kept samples.
    if kind == "j":
        u = window["j"].numpy().reshape(4 + kept, -1)
    elif kind == "tokens":
        ids, g = window["tokens"].numpy().astype(int), window["g"].numpy()
        u = np.zeros((4 + kept, 6, 3))
        for i in range(4 + kept):
            for t in range(4):
                u[i, ids[i, t]] += g[i, t]
        u = u.reshape(4 + kept, -1)
    else:
        a, g = window["a"].numpy(), window["g"].numpy()
        a, g = (a[:, None], g[:, None]) if a.ndim == 2 else (a, g)
        u = np.einsum("ipa,ipb->iab", a, g).reshape(4 + kept, -1)
    assert got.shape == (4 + kept, 4 + kept)
    np.testing.assert_allclose(got, u @ u.T, rtol=1e-12, atol=1e-12)
