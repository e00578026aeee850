"""The new blocks under XLA (fixed-capacity caches, zero-padded batches) and mixed precision: the
update of a model with one layer of each kind is that of the plain float32 run."""

import keras
import numpy as np
import pytest

from tengrad_tf import TENGraD

M, T, VOCABULARY = 8, 6, 20


def zoo():
    keras.utils.set_random_seed(3)
    tokens = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(VOCABULARY, 8)(tokens)
    x = keras.layers.LayerNormalization()(x)
    x = x + keras.layers.MultiHeadAttention(2, 4)(x, x)
    x = keras.layers.Conv1D(8, 3, groups=2, padding="same")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Reshape((T, 8, 1))(keras.layers.ReLU()(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(x)
    x = keras.layers.Conv2DTranspose(2, 2, strides=2)(x)
    x = keras.layers.GroupNormalization(groups=2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(tokens, keras.layers.Dense(3)(x))


def data():
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCABULARY, (2 * M + 3, T)), rng.integers(0, 3, 2 * M + 3)


def update(policy="float32", jit=False, **optimizer):
    keras.config.set_dtype_policy(policy)
    try:
        model = zoo()
        before = [w.copy() for w in model.get_weights()]
        opt = TENGraD(learning_rate=0.05, damping=0.5, momentum=0.0, kl_clip=None,
                      curvature_update_freq=2, fisher="empirical", adaptive_damping=False,
                      **optimizer)
        model.compile(optimizer=opt, jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = data()
        model.fit(x, y, batch_size=M, epochs=1, shuffle=False, verbose=0)  # 8, 8, then 3
        assert int(opt.skipped_steps.numpy()) == 0
        assert all("block of layer" in t for t in opt.treatments().values()), opt.summary(None)
        return np.concatenate([(w - b).ravel() for w, b in zip(model.get_weights(), before)])
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def reference():
    return update()


def test_xla_with_a_fixed_capacity_gives_the_same_update(reference):
    got = update(jit=True, max_batch_size=M)
    np.testing.assert_allclose(got, reference, rtol=2e-3, atol=2e-5)


def test_mixed_float16_is_close_to_float32(reference):
    got = update("mixed_float16")
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 1.5e-2
