"""LayerNormalization, GroupNormalization and BatchNormalization blocks (γ and β together) against
the float64 per-sample reference, through fit, with and without scale/center, both Fisher modes."""

import keras
import numpy as np
import pytest

from tengrad_tf import TENGraD
from tests import reference
from tests.helpers import DAMPING, per_sample_sce, sce
from tests.layers.exactness import fit_matches_reference, treatment

FISHERS = ["empirical", "true"]
SCALE_CENTER = [(True, True), (True, False), (False, True)]


def data(shape, m=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, *shape)) * 2 + 0.5, rng.integers(0, 3, size=m)


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("scale, center", SCALE_CENTER)
def test_layer_normalization(float64, fixed_sampled_labels, fisher_type, scale, center):
    x, y = data((4, 3))
    norm = keras.layers.LayerNormalization(scale=scale, center=center,
                                           gamma_initializer="random_normal",
                                           beta_initializer="random_normal")
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh"), norm,
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, norm).startswith("LayerNormalization block")


@pytest.mark.parametrize("axis, rms", [([1, 2], False), (1, False), (-1, True)])
def test_layer_normalization_axes_and_rms_scaling(float64, fixed_sampled_labels, axis, rms):
    """Several parameter axes, a parameter axis before the positions, and rms_scaling (γ only):
    a wrong transposition of x̂ or g, or a centred x̂ for rms_scaling, fails these."""
    x, y = data((4, 3, 2))
    norm = keras.layers.LayerNormalization(axis=axis, rms_scaling=rms,
                                           gamma_initializer="random_normal")
    model = keras.Sequential([keras.Input((4, 3, 2)), norm, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels)


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("scale, center", SCALE_CENTER[:2])
def test_group_normalization(float64, fixed_sampled_labels, fisher_type, scale, center):
    x, y = data((5, 4, 2))
    norm = keras.layers.GroupNormalization(groups=2, scale=scale, center=center,
                                           gamma_initializer="random_normal")
    model = keras.Sequential([keras.Input((5, 4, 2)),
                              keras.layers.Conv2D(4, 3, padding="same", activation="tanh"), norm,
                              keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, norm).startswith("GroupNormalization block")


def test_group_normalization_on_another_axis(float64, fixed_sampled_labels):
    x, y = data((4, 6))
    norm = keras.layers.GroupNormalization(groups=2, axis=1, gamma_initializer="random_normal")
    model = keras.Sequential([keras.Input((4, 6)), norm, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    fit_matches_reference(model, x, y, "empirical", fixed_sampled_labels)


@pytest.mark.parametrize("fisher_type", FISHERS)
@pytest.mark.parametrize("scale, center", SCALE_CENTER)
def test_batch_normalization_in_training_mode(float64, fixed_sampled_labels, fisher_type, scale,
                                              center):
    """BatchNorm on the model's input: no parameter before it and no batch coupling after it, so
    DESIGN.md's convention (x̂ with the batch statistics, gᵢ = m·(∂L/∂y)ᵢ) is the exact per-sample
    gradient here, and the moving statistics are those Keras's own call computes."""
    x, y = data((4, 4, 2))
    norm = keras.layers.BatchNormalization(scale=scale, center=center,
                                           gamma_initializer="random_normal")
    model = keras.Sequential([keras.Input((4, 4, 2)), norm,
                              keras.layers.Conv2D(3, 3, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, norm).startswith("BatchNormalization block")
    # The reference's own forward passes moved the statistics too: compare with Keras's call
    # run as often (one SGD fit step plus the reference's training-mode passes).
    twin.compile(optimizer=keras.optimizers.SGD(0.0), loss=sce())
    for _ in range(1 if fisher_type == "empirical" else 2):
        twin(x, training=True)
    twin.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(norm, name).numpy(),
                                   getattr(twin.layers[0], name).numpy(), rtol=1e-12)


class InferenceNorm(keras.Model):
    """Dense → BatchNormalization called with training=False → Dense."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(4, activation="tanh")
        self.norm = keras.layers.BatchNormalization(moving_mean_initializer="random_normal",
                                                    gamma_initializer="random_normal")
        self.out = keras.layers.Dense(3)

    def call(self, x):
        return self.out(self.norm(self.hidden(x), training=False))


@pytest.mark.parametrize("fisher_type", FISHERS)
def test_batch_normalization_in_inference_mode(float64, fixed_sampled_labels, fisher_type):
    """training=False: normalized by the moving statistics, no coupling, exact after a Dense."""
    x, y = data((5,))
    model = InferenceNorm()
    model(x)
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, model.norm).startswith("BatchNormalization block")


def test_batch_renormalization_is_first_order_by_name():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(renorm=True), keras.layers.Dense(2)])
    opt = TENGraD(fisher="empirical")
    model.compile(optimizer=opt, loss=sce())
    model.fit(np.zeros((8, 4), "float32"), np.zeros(8), verbose=0)
    bn = model.layers[1]
    assert treatment(opt, bn).startswith(
        f"first-order: BatchNormalization '{bn.name}': batch renormalization")


def test_the_reference_tells_a_wrong_block_apart(float64):
    """γ and β as two blocks (no cross terms) gives a direction far outside the tolerance of the
    tests above: they would catch a block that dropped β's part of uᵢ or its coupling with γ."""
    x, y = data((4, 3))
    norm = keras.layers.LayerNormalization(gamma_initializer="random_normal")
    model = keras.Sequential([keras.Input((4, 3)), norm, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    right, _ = reference.reference_directions(model, x, y, y, per_sample_sce, DAMPING)
    wrong, _ = reference.reference_directions(
        model, x, y, y, per_sample_sce, DAMPING,
        blocks=[(norm.gamma,), (norm.beta,)] + reference.layer_blocks(model)[1:])
    for v in (norm.gamma, norm.beta):
        assert np.linalg.norm(wrong[v.path] - right[v.path]) > 1e-3 * np.linalg.norm(right[v.path])


@pytest.mark.parametrize("fisher_type", FISHERS)
def test_rms_normalization(float64, fixed_sampled_labels, fisher_type):
    x, y = data((4, 3))
    norm = keras.layers.RMSNormalization()
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh"), norm,
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = fit_matches_reference(model, x, y, fisher_type, fixed_sampled_labels)
    assert treatment(opt, norm).startswith("RMSNormalization block")
