"""Issue 12's goal: at least 99% of the trainable parameters in exact blocks, after one fit step,
on four kinds of model: MobileNetV2 (keras.applications, α 0.35, 32×32), a Transformer encoder
text classifier, an Embedding + Conv1D text CNN, and a Conv2D/Conv2DTranspose autoencoder with
BatchNorm. (Only recurrent layers may stay first-order; none of these has one.)"""

import keras
import numpy as np
import pytest

from tengrad_tf import TENGraD, models

M = 8


def share_in_blocks(model, x, y, loss) -> tuple[float, dict[str, str]]:
    """(share of trainable parameters in exact blocks, {path: treatment} of the others)."""
    opt = TENGraD(fisher="empirical", curvature_update_freq=1)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=M, epochs=1, verbose=0)
    assert int(opt.skipped_steps.numpy()) == 0
    treatments = opt.treatments()
    sizes = {v.path: int(np.prod(v.shape)) for v in model.trainable_variables}
    first_order = {p: t for p, t in treatments.items() if "block of layer" not in t}
    return 1 - sum(sizes[p] for p in first_order) / sum(sizes.values()), first_order


def tokens(vocabulary, length, rng):
    return rng.integers(0, vocabulary, (M, length)), rng.integers(0, 2, M)


@pytest.mark.parametrize("kind", ["mobilenet_v2", "transformer", "text_cnn", "autoencoder"])
def test_at_least_99_percent_of_parameters_are_in_exact_blocks(kind):
    rng = np.random.default_rng(0)
    sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if kind == "mobilenet_v2":
        model = keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None,
                                               classes=10)
        x, y = rng.normal(size=(M, 32, 32, 3)).astype("float32"), rng.integers(0, 10, M)
        loss = keras.losses.SparseCategoricalCrossentropy()  # the model ends in a softmax
    elif kind == "transformer":
        model = models.transformer_classifier(vocabulary=500, length=12, dim=16, heads=2, ffn=32)
        (x, y), loss = tokens(500, 12, rng), sce
    elif kind == "text_cnn":
        model = models.text_cnn(vocabulary=500, length=12, dim=8, filters=8, kernel_size=3)
        (x, y), loss = tokens(500, 12, rng), sce
    else:
        model = models.conv_autoencoder(input_shape=(16, 16, 3), width=4)
        x = rng.normal(size=(M, 16, 16, 3)).astype("float32")
        y, loss = x, keras.losses.MeanSquaredError()
    share, first_order = share_in_blocks(model, x, y, loss)
    assert share >= 0.99, first_order
