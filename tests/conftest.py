import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tengrad_tf import fisher  # noqa: E402


@pytest.fixture
def float64():
    """Build and train in float64, so that comparisons with the reference are exact to ~1e-12."""
    previous, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    # Keras caches the global dtype policy from floatx when the first layer is built; set both.
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(previous)
    keras.config.set_dtype_policy(policy)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)


@pytest.fixture
def fixed_sampled_labels(monkeypatch):
    """Expose the true Fisher's sampled labels: make them a fixed, known array."""
    labels = {}

    def sample(loss, y_pred, seed=None):
        return tf.constant(labels["y"])

    monkeypatch.setattr(fisher, "sample_labels", sample)
    return labels


@pytest.fixture(autouse=True)
def _factored_caches(monkeypatch, request):
    """Tiny test layers would all cache their explicit inverse (blocks.base.DIRECT_MAX_DIM); the
    exactness tests are about the factored Woodbury caches that real layers use, so they are the
    default here. Tests of the small-block path take the `direct_inverse` fixture."""
    from tengrad_tf.blocks import base

    if "direct_inverse" not in request.fixturenames:
        monkeypatch.setattr(base, "DIRECT_MAX_DIM", 0)


@pytest.fixture
def direct_inverse():
    """Keep blocks.base.DIRECT_MAX_DIM at its default: small blocks cache (F + λI)⁻¹."""
