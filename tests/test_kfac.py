"""K-FAC against an independent float64 Kronecker-factored reference, through `fit`.

The reference below uses neither tengrad_tf nor Keras's layer calls for the curvature: it recomputes
each layer's pre-activations from the weights with TF ops, takes the per-sample output gradients
gᵢ = ∂ℓᵢ/∂zᵢ as the gradient of Σᵢ ℓᵢ w.r.t. those pre-activations (samples do not interact), unfolds
convolution patches with numpy loops, forms

    A = 1/(m·P) Σᵢₜ âᵢₜ âᵢₜᵀ,   G = 1/m Σᵢₜ gᵢₜ gᵢₜᵀ,   π = sqrt((tr A / D_in) / (tr G / D_out)),

and applies d = (A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹ with numpy solves.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tengrad_tf
from tengrad_tf.kfac import KFAC
from tests import helpers
from tests.helpers import data, mlp, per_sample_sce, sce


def weights(model):
    """In the variables' shapes (unlike helpers.weights): the reference's directions are too."""
    return {v.path: v.numpy().astype(np.float64).copy() for v in model.trainable_variables}


def plain(**kw):
    """K-FAC taking one plain damped step per call (helpers.plain), on the empirical Fisher unless
    told otherwise."""
    return helpers.plain(KFAC, **{"fisher": "empirical", **kw})


# ---- the reference ------------------------------------------------------------------------------
def unfold(x, kernel_size):
    """Valid, stride-1 patches of x (m, *spatial, c) in the order of a Keras kernel: (m, P, k·c)."""
    if len(kernel_size) == 1:
        (k,) = kernel_size
        m, t, c = x.shape
        return np.stack([x[:, s:s + k, :].reshape(m, -1) for s in range(t - k + 1)], axis=1)
    kh, kw = kernel_size
    m, h, w, c = x.shape
    rows = [x[:, r:r + kh, s:s + kw, :].reshape(m, -1)
            for r in range(h - kh + 1) for s in range(w - kw + 1)]
    return np.stack(rows, axis=1)


def preconditioned_layers(model):
    return [l for l in model.layers if isinstance(l, (keras.layers.Dense, keras.layers.Conv1D,
                                                      keras.layers.Conv2D))]


def layer_statistics(model, x, y_fisher):
    """Per preconditioned layer: patch rows Â (m, P, D_in) and per-sample output grads (m, P, D_out).

    The model must be a chain of Dense/Conv (valid, stride 1) layers and Flatten layers.
    """
    h = tf.constant(x)
    inputs, preacts = [], []
    with tf.GradientTape() as tape:
        for layer in model.layers:
            if isinstance(layer, keras.layers.Flatten):
                h = tf.reshape(h, [h.shape[0], -1])
                continue
            inputs.append(h.numpy())
            if isinstance(layer, keras.layers.Dense):
                z = tf.tensordot(h, layer.kernel, axes=1)
            else:
                z = tf.nn.convolution(h, layer.kernel, padding="VALID")
            if layer.bias is not None:
                z = z + layer.bias
            preacts.append(z)
            h = layer.activation(z)
        total = tf.reduce_sum(per_sample_sce(y_fisher, h))
    np.testing.assert_allclose(h.numpy(), model(x).numpy(), rtol=1e-12, atol=1e-12)
    out_grads = tape.gradient(total, preacts)
    stats = []
    for layer, a, dz in zip(preconditioned_layers(model), inputs, out_grads):
        m = a.shape[0]
        if isinstance(layer, keras.layers.Dense):
            rows = a.reshape(m, -1, a.shape[-1])  # positions: the input's extra axes
        else:
            rows = unfold(a, layer.kernel_size)
        if layer.bias is not None:
            rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        g = dz.numpy().reshape(m, -1, dz.shape[-1])
        stats.append((rows, g))
    return stats


def gradient_matrices(model, x, y):
    """Per preconditioned layer: the mean-loss gradient as one (D_in, D_out) matrix, bias last."""
    layers = preconditioned_layers(model)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_sample_sce(y, model(x)))
    grads = tape.gradient(loss, [[l.kernel] + ([l.bias] if l.bias is not None else [])
                                 for l in layers])
    out = []
    for layer, g in zip(layers, grads):
        v = g[0].numpy().reshape(-1, layer.kernel.shape[-1])
        if layer.bias is not None:
            v = np.concatenate([v, g[1].numpy()[None, :]], axis=0)
        out.append(v)
    return out


def kronecker_factors(rows, g):
    m, p = rows.shape[:2]
    a = np.einsum("mpi,mpj->ij", rows, rows) / (m * p)
    gg = np.einsum("mpi,mpj->ij", g, g) / m
    return a, gg


def damped_inverses(a, g, damping):
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    root = np.sqrt(damping)
    return (np.linalg.inv(a + pi * root * np.eye(a.shape[0])),
            np.linalg.inv(g + root / pi * np.eye(g.shape[0])))


def split(layer, d):
    """(D_in, D_out) direction → {variable path: array shaped like the variable}."""
    rows = int(np.prod(layer.kernel.shape[:-1]))
    out = {layer.kernel.path: d[:rows].reshape(layer.kernel.shape)}
    if layer.bias is not None:
        out[layer.bias.path] = d[rows]
    return out


def reference_directions(model, x, y, y_fisher, damping):
    directions = {}
    stats = layer_statistics(model, x, y_fisher)
    for layer, (rows, g), v in zip(preconditioned_layers(model), stats,
                                   gradient_matrices(model, x, y)):
        a_inv, g_inv = damped_inverses(*kronecker_factors(rows, g), damping)
        directions.update(split(layer, a_inv @ v @ g_inv))
    return directions


# ---- models ------------------------------------------------------------------------------------
# ---- one step ----------------------------------------------------------------------------------
@pytest.mark.parametrize("inverse_method", ["eigh", "cholesky"])
@pytest.mark.parametrize("use_bias, fisher_type", [(True, "empirical"), (False, "empirical"),
                                                   (True, "true")])
def test_one_fit_step_is_the_damped_kronecker_inverse(float64, fixed_sampled_labels, use_bias,
                                                      fisher_type, inverse_method):
    m, lr, damping = 8, 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable
    model = mlp(use_bias)
    x, y = data(m)
    y_fisher = (y + 1) % 3 if fisher_type == "true" else y
    fixed_sampled_labels["y"] = y_fisher
    expected = reference_directions(model, x, y, y_fisher, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, fisher=fisher_type,
                inverse_method=inverse_method)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    assert set(expected) == set(after)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)
    assert all(t.startswith("K-FAC Dense block") for t in opt.treatments().values())


def test_exact_fisher_g_factor_is_the_expectation_over_classes(float64):
    """fisher="exact": G = (1/m) Σᵢ Σ_c pᵢ꜀ gᵢ꜀gᵢ꜀ᵀ, from each class's output gradients weighted by
    the model's probabilities; A is unchanged."""
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    p = tf.nn.softmax(model(x)).numpy()
    per_class = [layer_statistics(model, x, np.full(m, c)) for c in range(3)]
    directions = {}
    for i, (layer, v) in enumerate(zip(preconditioned_layers(model),
                                       gradient_matrices(model, x, y))):
        rows = per_class[0][i][0]
        g = np.concatenate([np.sqrt(3 * p[:, c])[:, None, None] * per_class[c][i][1]
                            for c in range(3)])
        a_inv, g_inv = damped_inverses(kronecker_factors(rows, per_class[0][i][1])[0],
                                       kronecker_factors(np.concatenate([rows] * 3), g)[1],
                                       damping)
        directions.update(split(layer, a_inv @ v @ g_inv))
    before = weights(model)
    model.compile(optimizer=plain(learning_rate=lr, damping=damping, fisher="exact"), loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in directions.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "dense-on-sequence"])
def test_multi_position_one_fit_step_is_kfc(float64, kind):
    m, lr, damping = 6, 0.125, 0.05
    rng = np.random.default_rng(len(kind))
    if kind == "conv2d":
        shape, conv = (5, 6, 2), keras.layers.Conv2D(3, (3, 2), activation="tanh")
    elif kind == "conv1d":
        shape, conv = (7, 2), keras.layers.Conv1D(4, 3, activation="relu")
    else:
        shape, conv = (4, 5), keras.layers.Dense(3, activation="tanh")
    model = keras.Sequential([keras.Input(shape), conv, keras.layers.Flatten(), keras.layers.Dense(3)])
    x = rng.normal(size=(m,) + shape)
    y = rng.integers(0, 3, size=m)
    # The reference's own patches and output gradients reproduce the autodiff gradient.
    (rows, g), _ = layer_statistics(model, x, y)
    np.testing.assert_allclose(np.einsum("mpi,mpj->ij", rows, g) / m, gradient_matrices(model, x, y)[0],
                               rtol=1e-10, atol=1e-13)
    expected = reference_directions(model, x, y, y, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12,
                                   err_msg=path)
    assert opt.treatments()[conv.kernel.path].startswith(
        "K-FAC Dense block" if kind == "dense-on-sequence" else "K-FAC Conv block")


def test_reference_would_catch_other_conventions(float64):
    """Normalizing A by m instead of m·P, or dropping π, moves the step far beyond the tolerance."""
    rng = np.random.default_rng(5)
    model = keras.Sequential([keras.Input((5, 6, 2)), keras.layers.Conv2D(3, (3, 2), activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    x, y = rng.normal(size=(6, 5, 6, 2)), rng.integers(0, 3, size=6)
    damping = 0.05
    (rows, g), _ = layer_statistics(model, x, y)
    v = gradient_matrices(model, x, y)[0]
    a, gg = kronecker_factors(rows, g)
    a_inv, g_inv = damped_inverses(a, gg, damping)
    d = a_inv @ v @ g_inv
    p = rows.shape[1]
    wrong_a = damped_inverses(a * p, gg, damping)
    no_pi = (np.linalg.inv(a + np.sqrt(damping) * np.eye(len(a))),
             np.linalg.inv(gg + np.sqrt(damping) * np.eye(len(gg))))
    for ai, gi in (wrong_a, no_pi):
        assert np.max(np.abs(ai @ v @ gi - d)) > 1e-4 * np.max(np.abs(d))
    # ... while rescaling A by c and G by 1/c changes nothing (the π correction).
    ai, gi = damped_inverses(a * 7.0, gg / 7.0, damping)
    np.testing.assert_allclose(ai @ v @ gi, d, rtol=1e-10, atol=1e-14)


def test_eager_custom_loop(float64):
    m, lr, damping = 8, 0.125, 0.05
    model = mlp()
    x, y = data(m)
    expected = reference_directions(model, x, y, y, damping)
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping)
    with tf.GradientTape() as tape:
        loss = sce()(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    after = weights(model)
    for path, d in expected.items():
        np.testing.assert_allclose(after[path], before[path] - lr * d, rtol=1e-9, atol=1e-12)


# ---- several steps -----------------------------------------------------------------------------
@pytest.mark.parametrize("cov_freq, inv_freq", [(1, 2), (2, 3)])
def test_running_averages_and_schedules_over_several_steps(float64, cov_freq, inv_freq):
    """Simulate the schedule, the running averages and the whole step rule; compare after 5 steps."""
    m, steps = 8, 5
    lr, damping, mu, wd, kappa, decay = 0.0625, 0.05, 0.9, 0.01, 1e-3, 0.8
    model = mlp()
    shadow = keras.models.clone_model(model)
    shadow.set_weights(model.get_weights())
    x, y = data(m * steps, seed=3)

    layers = preconditioned_layers(shadow)
    factors = [None] * len(layers)
    inverses = [None] * len(layers)
    buffers = {v.path: np.zeros(v.shape) for v in shadow.trainable_variables}
    for t in range(steps):
        xb, yb = x[t * m:(t + 1) * m], y[t * m:(t + 1) * m]
        stats = layer_statistics(shadow, xb, yb)
        grads = gradient_matrices(shadow, xb, yb)
        d, g = {}, {}
        for i, (layer, (rows, gr), v) in enumerate(zip(layers, stats, grads)):
            if t % cov_freq == 0:
                new = kronecker_factors(rows, gr)
                factors[i] = new if t == 0 else tuple(decay * f + (1 - decay) * n
                                                      for f, n in zip(factors[i], new))
            if t % inv_freq == 0:
                inverses[i] = damped_inverses(*factors[i], damping)
            d.update(split(layer, inverses[i][0] @ v @ inverses[i][1]))
            g.update(split(layer, v))
        vdg = sum(np.sum(d[p] * g[p]) for p in d)
        nu = min(1.0, np.sqrt(kappa / (lr**2 * vdg)))
        for var in shadow.trainable_variables:
            buffers[var.path] = mu * buffers[var.path] + nu * d[var.path]
            theta = var.numpy()
            var.assign(theta - lr * wd * theta - lr * buffers[var.path])

    opt = KFAC(learning_rate=lr, damping=damping, momentum=mu, weight_decay=wd, kl_clip=kappa,
               fisher="empirical", stat_decay=decay, cov_update_freq=cov_freq,
               inv_update_freq=inv_freq)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=m, epochs=1, shuffle=False, verbose=0)
    for v, w in zip(model.trainable_variables, shadow.trainable_variables):
        np.testing.assert_allclose(v.numpy(), w.numpy(), rtol=1e-8, atol=1e-11, err_msg=v.path)
    # The block state holds the last averages and the count of factor updates.
    block = opt._blocks[id(model.layers[-1])]
    state = block.state_variables
    assert int(state["updates"].numpy()) == len(range(0, steps, cov_freq))
    np.testing.assert_allclose(state["A"].numpy(), factors[-1][0], rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(state["G"].numpy(), factors[-1][1], rtol=1e-8, atol=1e-11)


# ---- robustness, API ---------------------------------------------------------------------------
def test_non_finite_step_leaves_weights_and_state_untouched():
    model = mlp()
    x, y = data(8)
    opt = KFAC(fisher="empirical", cov_update_freq=1, inv_update_freq=1)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    block_vars = [v for b in opt._blocks.values() for v in b.state_variables.values()]
    assert block_vars

    def snapshot():
        return [v.numpy().copy() for v in model.variables + opt.variables + block_vars
                if "skip" not in getattr(v, "path", v.name)]

    before = snapshot()
    bad = x.copy()
    bad[0, 0] = np.nan
    model.fit(bad, y, batch_size=8, epochs=1, verbose=0)
    for b, a in zip(before, snapshot()):
        np.testing.assert_array_equal(a, b)
    assert int(opt.skipped_steps.numpy()) == 1
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # and carries on
    assert int(opt.skipped_steps.numpy()) == 1


def test_trains_on_a_small_synthetic_task():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, 8, 3)).astype("float32")
    teacher = rng.normal(size=(24, 4))
    y = np.argmax(np.tanh(x.reshape(len(x), -1) @ teacher), axis=1)
    model = keras.Sequential([keras.Input((8, 3)), keras.layers.Conv1D(8, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(4)])
    opt = KFAC(learning_rate=0.01, cov_update_freq=2, inv_update_freq=10)
    model.compile(optimizer=opt, loss=sce())
    initial = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, batch_size=64, epochs=3, shuffle=False, verbose=0).history["loss"]
    final = model.evaluate(x, y, verbose=0)
    assert np.all(np.isfinite(history))
    assert final < 0.75 * initial, (initial, history, final)
    assert int(opt.skipped_steps.numpy()) == 0
    assert all(t.startswith("K-FAC") for t in opt.treatments().values())


def test_config_round_trip_and_serialization():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 100, 0.5)
    opt = KFAC(learning_rate=schedule, damping=0.3, momentum=0.5, weight_decay=1e-4,
               fisher="empirical", kl_clip=None, stat_decay=0.9, cov_update_freq=7,
               inv_update_freq=21, inverse_method="cholesky", clipnorm=1.0, name="my_kfac")
    config = opt.get_config()
    clone = KFAC.from_config(dict(config))
    assert clone.get_config() == config
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, KFAC) and restored.get_config() == config
    assert (restored.stat_decay, restored.cov_update_freq, restored.inv_update_freq) == (0.9, 7, 21)
    assert restored.inverse_method == "cholesky"
    assert restored.kl_clip is None and restored.damping == 0.3
    assert isinstance(opt, tengrad_tf.PreconditionedOptimizer)


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"damping": 0.0}, "damping"),
    ({"damping": "big"}, "damping"),
    ({"momentum": 1.0}, "momentum"),
    ({"fisher": "sampled"}, "fisher"),
    ({"kl_clip": -1.0}, "kl_clip"),
    ({"stat_decay": 1.0}, "stat_decay"),
    ({"stat_decay": -0.1}, "stat_decay"),
    ({"cov_update_freq": 0}, "cov_update_freq"),
    ({"cov_update_freq": 2.0}, "cov_update_freq"),
    ({"inv_update_freq": 0}, "inv_update_freq"),
    ({"inv_update_freq": True}, "inv_update_freq"),
    ({"inverse_method": "lu"}, "inverse_method"),
    ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
])
def test_bad_hyperparameters_fail_at_construction_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        KFAC(**kwargs)


# ---- layers beyond Dense and Conv -------------------------------------------------------------
def output_gradients(layer, head, x, y_fisher):
    """The layer's (linear) output and ∂(Σᵢ ℓᵢ)/∂output, the per-sample output gradients."""
    z = tf.constant(layer(x).numpy())
    with tf.GradientTape() as tape:
        tape.watch(z)
        total = tf.reduce_sum(per_sample_sce(y_fisher, head(z)))
    return z.numpy(), tape.gradient(total, z).numpy()


def mean_gradient(model, x, y, variables):
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(per_sample_sce(y, model(x)))
    return [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, variables)]


def one_step(model, x, y, lr=0.125, damping=0.05, inverse_method="eigh"):
    before = weights(model)
    opt = plain(learning_rate=lr, damping=damping, inverse_method=inverse_method)
    model.compile(optimizer=opt, loss=sce())
    model.fit(x, y, batch_size=len(y), epochs=1, shuffle=False, verbose=0)
    return opt, before, weights(model)


@pytest.mark.parametrize("inverse_method", ["eigh", "cholesky"])
def test_embedding_factors_are_the_token_frequencies(float64, inverse_method):
    """A = diag(token counts)/(m·P), G = Σ gᵢₜgᵢₜᵀ/m: d = (A + π√λ)⁻¹ V (G + √λ/π I)⁻¹."""
    rng = np.random.default_rng(0)
    m, t, vocabulary, lr, damping = 6, 4, 9, 0.125, 0.05
    x, y = rng.integers(0, vocabulary, (m, t)), rng.integers(0, 3, m)
    embedding = keras.layers.Embedding(vocabulary, 3)
    head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    model = keras.Sequential([keras.Input((t,), dtype="int32"), embedding, head])
    _, g = output_gradients(embedding, head, x, y)
    counts = np.bincount(x.ravel(), minlength=vocabulary) / (m * t)
    gg = np.einsum("mpi,mpj->ij", g, g) / m
    pi = np.sqrt((counts.sum() / vocabulary) / (np.trace(gg) / 3))
    v = mean_gradient(model, x, y, [embedding.embeddings])[0]
    d = (v / (counts + pi * np.sqrt(damping))[:, None]) @ np.linalg.inv(
        gg + np.sqrt(damping) / pi * np.eye(3))
    opt, before, after = one_step(model, x, y, lr, damping, inverse_method)
    np.testing.assert_allclose(after[embedding.embeddings.path],
                               before[embedding.embeddings.path] - lr * d, rtol=1e-9,
                               atol=1e-12)
    assert opt.treatments()[embedding.embeddings.path].startswith("K-FAC Embedding block")


@pytest.mark.parametrize("inverse_method", ["eigh", "cholesky"])
def test_depthwise_factors_are_per_channel(float64, inverse_method):
    """One (A, G) pair per input channel: A from that channel's 3×3 windows and the bias, G from
    its depth_multiplier output gradients."""
    rng = np.random.default_rng(1)
    m, lr, damping, mult = 5, 0.125, 0.05, 2
    x, y = rng.normal(size=(m, 5, 4, 3)), rng.integers(0, 3, m)
    conv = keras.layers.DepthwiseConv2D(3, depth_multiplier=mult)
    head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    model = keras.Sequential([keras.Input((5, 4, 3)), conv, head])
    _, g = output_gradients(conv, head, x, y)
    kernel_grad, bias_grad = mean_gradient(model, x, y, [conv.kernel, conv.bias])
    expected_kernel, expected_bias = np.zeros_like(kernel_grad), np.zeros_like(bias_grad)
    for c in range(3):
        rows = unfold(x[..., c:c + 1], (3, 3))
        rows = np.concatenate([rows, np.ones(rows.shape[:2] + (1,))], axis=2)
        gc = g[..., c * mult:(c + 1) * mult].reshape(m, -1, mult)
        v = np.concatenate([kernel_grad[:, :, c, :].reshape(9, mult),
                            bias_grad[None, c * mult:(c + 1) * mult]])
        a_inv, g_inv = damped_inverses(*kronecker_factors(rows, gc), damping)
        d = a_inv @ v @ g_inv
        expected_kernel[:, :, c, :] = d[:9].reshape(3, 3, mult)
        expected_bias[c * mult:(c + 1) * mult] = d[9]
    opt, before, after = one_step(model, x, y, lr, damping, inverse_method)
    for var, d in ((conv.kernel, expected_kernel), (conv.bias, expected_bias)):
        np.testing.assert_allclose(after[var.path], before[var.path] - lr * d, rtol=1e-9,
                                   atol=1e-12, err_msg=var.path)


def test_einsum_dense_is_a_dense_over_positions(float64):
    rng = np.random.default_rng(2)
    m, lr, damping = 6, 0.125, 0.05
    x, y = rng.normal(size=(m, 4, 5)), rng.integers(0, 3, m)
    layer = keras.layers.EinsumDense("abc,cde->abde", (4, 2, 3), bias_axes="de")
    head = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    model = keras.Sequential([keras.Input((4, 5)), layer, head])
    _, g = output_gradients(layer, head, x, y)
    rows = np.concatenate([x, np.ones((m, 4, 1))], axis=2)
    kernel_grad, bias_grad = mean_gradient(model, x, y, [layer.kernel, layer.bias])
    v = np.concatenate([kernel_grad.reshape(5, 6), bias_grad.reshape(1, 6)])
    a_inv, g_inv = damped_inverses(*kronecker_factors(rows, g.reshape(m, 4, 6)), damping)
    d = a_inv @ v @ g_inv
    opt, before, after = one_step(model, x, y, lr, damping)
    np.testing.assert_allclose(after[layer.kernel.path],
                               before[layer.kernel.path] - lr * d[:5].reshape(5, 2, 3),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(after[layer.bias.path],
                               before[layer.bias.path] - lr * d[5].reshape(2, 3),
                               rtol=1e-9, atol=1e-12)


def test_layers_without_a_kronecker_factorization_are_first_order_by_name():
    """K-FAC says, per layer, that it does not factor normalization, transposed and separable
    convolutions, and takes a first-order step for them (never a crash)."""
    model = keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(), keras.layers.Conv2DTranspose(2, 3, strides=2),
        keras.layers.SeparableConv2D(3, 3), keras.layers.LayerNormalization(),
        keras.layers.GroupNormalization(groups=1), keras.layers.Flatten(), keras.layers.Dense(3)])
    opt = KFAC(fisher="empirical", cov_update_freq=1, inv_update_freq=1)
    model.compile(optimizer=opt, loss=sce())
    model.fit(np.random.default_rng(0).normal(size=(8, 6, 6, 2)), np.zeros(8), batch_size=4,
              verbose=0)
    assert int(opt.skipped_steps.numpy()) == 0
    for layer in model.layers[1:7]:
        for v in layer.trainable_weights:
            assert opt.treatments()[v.path].startswith(
                f"first-order: {type(layer).__name__} '{layer.name}': K-FAC has no standard "
                "Kronecker factorization")
    assert opt.treatments()[model.layers[0].kernel.path].startswith("K-FAC Conv block")
