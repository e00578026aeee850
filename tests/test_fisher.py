"""Label sampling of the true Fisher, per loss, and one exact step per loss family."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import TENGraD, fisher
from tengrad_tf.blocks.metric import IDENTITY_SHARE
from tengrad_tf.record import LossCall
from tests import reference
from tests.helpers import DAMPING, LR, plain

N = 20000


def test_categorical_samples_follow_the_softmax():
    logits = tf.constant([[2.0, 0.0, -1.0]] * N)
    probs = tf.nn.softmax(logits[0]).numpy()
    for loss, y_pred in [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), logits),
        (keras.losses.SparseCategoricalCrossentropy(), tf.nn.softmax(logits)),
    ]:
        draws = fisher.sample_labels(loss, y_pred, seed=1).numpy()
        np.testing.assert_allclose(np.bincount(draws, minlength=3) / N, probs, atol=0.015)
    one_hot = fisher.sample_labels(keras.losses.CategoricalCrossentropy(from_logits=True), logits)
    assert one_hot.shape == (N, 3)
    np.testing.assert_allclose(one_hot.numpy().mean(0), probs, atol=0.015)


def test_binary_samples_follow_the_sigmoid():
    logits = tf.constant([[1.5, -0.5]] * N)
    for loss, y_pred in [(keras.losses.BinaryCrossentropy(from_logits=True), logits),
                         (keras.losses.BinaryCrossentropy(), tf.sigmoid(logits))]:
        draws = fisher.sample_labels(loss, y_pred).numpy()
        np.testing.assert_allclose(draws.mean(0), tf.sigmoid(logits[0]).numpy(), atol=0.015)


def test_gaussian_samples_have_variance_k_over_2():
    """MSE = mean over k outputs: its NLL variance is k/2, so the true Fisher = Gauss-Newton."""
    y_pred = tf.zeros([N, 4])
    draws = fisher.sample_labels(keras.losses.MeanSquaredError(), y_pred).numpy()
    np.testing.assert_allclose(draws.var(0), np.full(4, 2.0), rtol=0.05)


def test_unsupported_loss_names_it_and_suggests_empirical():
    with pytest.raises(fisher.UnsupportedLossError, match="empirical"):
        fisher.check_supported(keras.losses.Huber())


LOSSES = {
    "sparse_logits": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), None),
    "sparse_probs": (lambda: keras.losses.SparseCategoricalCrossentropy(), "softmax"),
    "categorical_logits": (lambda: keras.losses.CategoricalCrossentropy(from_logits=True), None),
    "binary_logits": (lambda: keras.losses.BinaryCrossentropy(from_logits=True), None),
    "binary_probs": (lambda: keras.losses.BinaryCrossentropy(), "sigmoid"),
    "mse": (lambda: keras.losses.MeanSquaredError(), None),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_true_fisher_step_is_exact_for_every_loss(float64, monkeypatch, name):
    make_loss, activation = LOSSES[name]
    rng = np.random.default_rng(0)
    m, k = 8, 3
    x = rng.normal(size=(m, 5))
    if name.startswith("sparse"):
        y, y_hat = rng.integers(0, k, m), rng.integers(0, k, m)
    elif name.startswith("categorical"):
        y, y_hat = np.eye(k)[rng.integers(0, k, m)], np.eye(k)[rng.integers(0, k, m)]
    elif name.startswith("binary"):
        y, y_hat = rng.integers(0, 2, (m, k)).astype(float), rng.integers(0, 2, (m, k)).astype(float)
    else:
        y, y_hat = rng.normal(size=(m, k)), rng.normal(size=(m, k))
    monkeypatch.setattr(fisher, "sample_labels", lambda loss, y_pred, seed=None: tf.constant(y_hat))
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(k, activation=activation)])
    loss = make_loss()
    expected, _ = reference.reference_directions(model, x, y, y_hat, loss.call, 0.05)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    opt = plain(learning_rate=0.125, damping=0.05)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - 0.125 * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)


# ---- the exact Fisher: every class, weighted by its probability -------------------------------
def _logit_jacobians(logits_model, x, variables):
    """{variable path: (m, classes, size)}: ∂logitsᵢ/∂θ per sample (an independent route: the
    network's Jacobian, not any loss gradient)."""
    with tf.GradientTape(persistent=True) as tape:
        logits = logits_model(x, training=True)
    jac = tape.jacobian(logits, variables, experimental_use_pfor=False)
    m, k = logits.shape
    return {v.path: np.reshape(j.numpy(), (m, k, -1)) for v, j in zip(variables, jac)}, logits


def _exact_fisher_directions(model, logits_model, x, y, loss, damping, sample_weight=None,
                             metrics=None):
    """d = (F + λI)⁻¹ g per layer, F = (1/m) Σᵢ wᵢ Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ from the logits'
    Jacobians Jᵢ: the softmax Fisher in closed form, with no labels at all. `metrics`: λD
    instead of λI for those blocks ({first variable's path: D}, tests/reference.py)."""
    variables = model.trainable_variables
    jac, logits = _logit_jacobians(logits_model, x, variables)
    p = tf.nn.softmax(logits).numpy()
    m = x.shape[0]
    w = np.ones(m) if sample_weight is None else np.asarray(sample_weight, np.float64)
    with tf.GradientTape() as tape:
        mean = tf.reduce_mean(w * loss.call(y, model(x, training=True)))
    g = {v.path: t.numpy().ravel() for v, t in zip(variables, tape.gradient(mean, variables))}
    out = {}
    for block in reference.layer_blocks(model):
        vs = [v for v in block if v is not None]
        j = np.concatenate([jac[v.path] for v in vs], axis=2)  # (m, k, d)
        h = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])  # (m, k, k)
        f = np.einsum("i,iac,iab,ibd->cd", w, j, h, j) / m
        metric = (metrics or {}).get(vs[0].path, np.eye(f.shape[0]))
        d = np.linalg.solve(f + damping * metric, np.concatenate([g[v.path] for v in vs]))
        out.update(zip([v.path for v in vs], np.split(d, np.cumsum([int(np.prod(v.shape)) for v in vs])[:-1])))
    return out


def _conv_model(k):
    return keras.Sequential([keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, activation="tanh"),
                             keras.layers.Flatten(), keras.layers.Dense(k)])


EXACT_CASES = {
    "sparse_logits": (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), None),
    "sparse_probs": (lambda: keras.losses.SparseCategoricalCrossentropy(), "softmax"),
    "categorical_logits": (lambda: keras.losses.CategoricalCrossentropy(from_logits=True), None),
    "categorical_probs": (lambda: keras.losses.CategoricalCrossentropy(), "softmax"),
}


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
@pytest.mark.parametrize("kind", ["dense", "conv", "weighted"])
def test_exact_fisher_step_is_the_softmax_fisher_in_closed_form(float64, name, kind):
    make_loss, activation = EXACT_CASES[name]
    rng = np.random.default_rng(1)
    m, k = 6, 3
    if kind == "conv":
        x = rng.normal(size=(m, 5, 5, 2))
        logits_model = _conv_model(k)
    else:
        x = rng.normal(size=(m, 5))
        logits_model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh"),
                                         keras.layers.Dense(k)])
    model = (logits_model if activation is None else
             keras.Sequential([logits_model, keras.layers.Activation(activation)]))
    labels = rng.integers(0, k, m)
    y = labels if name.startswith("sparse") else np.eye(k)[labels]
    weight = rng.uniform(0.2, 2.0, m) if kind == "weighted" else None
    loss = make_loss()
    expected = _exact_fisher_directions(model, logits_model, x, y, loss, DAMPING, weight)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    opt = plain(learning_rate=LR, damping=DAMPING, fisher="exact")
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, sample_weight=weight, batch_size=m, epochs=1, shuffle=False, verbose=0)
    assert set(expected) == set(before)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - LR * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)


def test_exact_fisher_with_the_input_metric(float64):
    """fisher="exact" repeats each input row once per class in the Gram; D_A is still the second
    moment of the batch's own inputs."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh"),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    metrics = reference.layer_metrics(model, x, dict.fromkeys(model.layers, reference.dense_rows),
                                      IDENTITY_SHARE)
    expected = _exact_fisher_directions(model, model, x, y, loss, DAMPING, metrics=metrics)
    before = {v.path: v.numpy().ravel() for v in model.trainable_variables}
    model.compile(optimizer=plain(learning_rate=LR, damping=DAMPING, fisher="exact",
                                 damping_metric="inputs"), loss=loss)
    model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    for v in model.trainable_variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - LR * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)


def test_exact_fisher_reference_would_catch_a_sampled_or_unweighted_fisher(float64):
    """The closed form differs from one sampled label per sample and from the classes left
    unweighted by their probabilities: the test above would see either."""
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, "tanh"),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    exact = _exact_fisher_directions(model, model, x, labels, loss, DAMPING)
    sampled, _ = reference.reference_directions(model, x, labels, (labels + 1) % 3, loss.call,
                                                DAMPING)
    rows = reference.jacobian_rows(lambda: tf.concat(
        [loss.call(np.full(6, c), model(x)) for c in range(3)], 0), model.trainable_variables)
    unweighted = {}
    for block in reference.layer_blocks(model):
        vs = [v for v in block if v is not None]
        ds = reference.block_direction([rows[v.path] for v in vs],
                                       [sampled_g for sampled_g in
                                        [reference.jacobian_rows(lambda: loss.call(labels, model(x)),
                                                                 [v])[v.path].mean(0)
                                         for v in vs]], DAMPING)
        unweighted.update(zip([v.path for v in vs], ds))
    for other in (sampled, unweighted):
        assert max(np.max(np.abs(exact[p] - other[p]) / (np.abs(exact[p]) + 1e-3))
                   for p in exact) > 1e-2


def test_exact_fisher_stacks_the_classes_of_several_outputs(float64):
    """Two classification heads: R = 3 + 2 rows per sample, each output's classes weighted by its
    own probabilities. The exact Fisher is the expectation of the true one, whose per-sample loss
    is ℓᵢ = Σ_l w_l ℓᵢˡ (compile's loss weights w_l, docs/DESIGN.md): the heads' cross terms
    vanish in it, and each head's Fisher enters times w_l²."""
    rng = np.random.default_rng(2)
    m = 6
    x = rng.normal(size=(m, 5))
    y1, y2 = rng.integers(0, 3, m), rng.integers(0, 2, m)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, activation="tanh")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(3)(hidden), keras.layers.Dense(2)(hidden)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        z1, z2 = model(x, training=True)
        mean = tf.reduce_mean(loss.call(y1, z1)) + 0.5 * tf.reduce_mean(loss.call(y2, z2))
    g = {v.path: t.numpy().ravel() for v, t in zip(variables, tape.gradient(mean, variables))}
    jacs = [tape.jacobian(z, variables, experimental_use_pfor=False) for z in (z1, z2)]
    before = {v.path: v.numpy().ravel() for v in variables}
    expected = {}
    for block in reference.layer_blocks(model):
        vs = [v for v in block if v is not None]
        f = 0.0
        for z, jac, weight in zip((z1, z2), jacs, (1.0, 0.25)):
            p = tf.nn.softmax(z).numpy()
            idx = [[u.path for u in variables].index(v.path) for v in vs]
            j = np.concatenate([np.zeros((m, z.shape[1], int(np.prod(variables[i].shape))))
                                if jac[i] is None else  # the other head's layer
                                np.reshape(jac[i].numpy(), (m, z.shape[1], -1)) for i in idx], 2)
            h = np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])
            f = f + weight * np.einsum("iac,iab,ibd->cd", j, h, j) / m
        d = np.linalg.solve(f + DAMPING * np.eye(f.shape[0]),
                            np.concatenate([g[v.path] for v in vs]))
        expected.update(zip([v.path for v in vs],
                            np.split(d, np.cumsum([int(np.prod(v.shape)) for v in vs])[:-1])))
    model.compile(optimizer=plain(learning_rate=LR, damping=DAMPING, fisher="exact"),
                  loss=[loss, keras.losses.SparseCategoricalCrossentropy(from_logits=True)],
                  loss_weights=[1.0, 0.5])
    model.fit(x, (y1, y2), batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v in variables:
        np.testing.assert_allclose(v.numpy().ravel(), before[v.path] - LR * expected[v.path],
                                   rtol=1e-9, atol=1e-12, err_msg=v.path)


@pytest.mark.parametrize("loss, y_pred, named", [
    (keras.losses.BinaryCrossentropy(), tf.zeros([4, 3]), "BinaryCrossentropy"),
    (keras.losses.MeanSquaredError(), tf.zeros([4, 3]), "MeanSquaredError"),
    (keras.losses.SparseCategoricalCrossentropy(), tf.zeros([4, 7, 3]), r"\(4, 7, 3\)"),
])
def test_exact_fisher_refuses_what_it_cannot_sum_and_says_why(loss, y_pred, named):
    call = LossCall(loss=loss, y_true=None, y_pred=y_pred, sample_weight=None, loss_grad=1.0)
    with pytest.raises(fisher.UnsupportedLossError, match=f"fisher='exact'.*{named}.*'true'"):
        fisher.outcomes([call])


def test_exact_fisher_fails_in_fit_naming_the_loss():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="sigmoid")])
    model.compile(optimizer=TENGraD(fisher="exact"), loss="binary_crossentropy")
    with pytest.raises(fisher.UnsupportedLossError, match="binary_crossentropy"):
        model.fit(np.zeros((4, 5)), np.zeros((4, 3)), verbose=0)


def test_exact_fisher_refuses_a_fixed_cache_size_at_construction():
    with pytest.raises(ValueError, match="max_batch_size"):
        TENGraD(fisher="exact", max_batch_size=32)


def test_exact_fisher_refuses_a_gram_beyond_the_memory_budget():
    """10 classes × 64 samples: a 640 × 640 float64 Gram per block, 3.1 MiB, over a 1 MiB budget;
    refused with the numbers, before any step."""
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(10)])
    model.compile(optimizer=TENGraD(fisher="exact", memory_budget=2**20),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"640 × 640 Gram.*memory_budget=1048576"):
        model.fit(np.zeros((64, 5)), np.zeros(64), batch_size=64, verbose=0)
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    model.compile(optimizer=TENGraD(fisher="exact", memory_budget=2**22),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((64, 5)), np.zeros(64), batch_size=64, verbose=0)  # 3.1 MiB < 4 MiB
