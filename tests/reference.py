"""Independent float64 reference for Fisher blocks: per-sample gradients by autodiff, F, a dense solve.

Nothing here uses tengrad_tf: per-sample gradients come from `tape.jacobian` of the vector of
per-sample losses, the Fisher block is formed explicitly as F = (1/m) U Uᵀ with kernel and bias
flattened together, and (F + λI) d = g is solved with numpy (or (F + λD) d = g, with the damping
metric D = D_A ⊗ I formed from the layer's own inputs: `input_metric`, `layer_metrics`).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf


def per_sample_gradients(model, x, y, per_sample_loss, variables):
    """{variable path: (m, variable.size)} per-sample gradients of ℓᵢ w.r.t. each variable."""
    return jacobian_rows(lambda: per_sample_loss(y, model(x, training=True)), variables)


def jacobian_rows(per_sample_losses, variables):
    """{variable path: (m, variable.size)}: rows of ∂ℓᵢ/∂θ for the m-vector `per_sample_losses()`."""
    with tf.GradientTape(persistent=True) as tape:
        losses = per_sample_losses()
    try:
        jac = tape.jacobian(losses, variables)
    except (ValueError, tf.errors.InvalidArgumentError):
        # TF's vectorized jacobian fails on some gradients (BiasAddGrad of a broadcast bias, the
        # filter gradient of a grouped convolution on CPUs): one gradient per sample instead.
        jac = tape.jacobian(losses, variables, experimental_use_pfor=False)
    m = int(losses.shape[0])
    return {v.path: np.reshape(j.numpy().astype(np.float64), (m, -1)) for v, j in zip(variables, jac)}


def natural_gradient(per_sample_losses, fisher_losses, blocks, damping):
    """{variable path: d} for every variable of `blocks` ([(kernel, bias or None)]): the mean
    gradient of `per_sample_losses()` preconditioned block by block with the damped Fisher of the
    per-sample gradients of `fisher_losses()` (the same function for the empirical Fisher)."""
    variables = [v for block in blocks for v in block if v is not None]
    g_rows = jacobian_rows(per_sample_losses, variables)
    u_rows = g_rows if fisher_losses is per_sample_losses else jacobian_rows(fisher_losses,
                                                                              variables)
    out = {}
    for block in blocks:
        vs = [v for v in block if v is not None]
        ds = block_direction([u_rows[v.path] for v in vs], [g_rows[v.path].mean(0) for v in vs],
                             damping)
        out.update({v.path: d for v, d in zip(vs, ds)})
    return out


def block_direction(u_blocks, g_blocks, damping, metric=None):
    """d = (F + λD)⁻¹ g for one block. u_blocks: list of (m, size) for kernel, bias; g likewise;
    `metric`: D (d × d, in the order of the flattened kernel then bias), or None for D = I."""
    u = np.concatenate(u_blocks, axis=1).T  # (d, m)
    g = np.concatenate(g_blocks)
    m = u.shape[1]
    fisher = u @ u.T / m
    metric = np.eye(fisher.shape[0]) if metric is None else metric
    d = np.linalg.solve(fisher + damping * metric, g)
    sizes = np.cumsum([b.shape[1] for b in u_blocks])[:-1]
    return np.split(d, sizes)


def input_metric(rows, d_out, identity_share):
    """D = D_A ⊗ I for a layer whose kernel-and-bias matrix is (D_in × d_out), from its n input
    rows (n, D_in), the bias's column of ones included: D_A = (Ā + γāI) / ((1 + γ)ā) with
    Ā = (1/n) Σ ââᵀ, ā = tr(Ā)/D_in and γ = `identity_share`. In the flattened order of kernel
    (D_in − 1, d_out) then bias (d_out,), entry (r, j) of the matrix is index r·d_out + j."""
    rows = np.asarray(rows, np.float64)
    moment = rows.T @ rows / rows.shape[0]
    mean = np.trace(moment) / rows.shape[1]
    d_a = (moment + identity_share * mean * np.eye(rows.shape[1])) / ((1 + identity_share) * mean)
    return np.kron(d_a, np.eye(d_out))


def layer_inputs(model, x):
    """Each layer's input on `x`, by layer (a sub-model of the built model)."""
    probe = keras.Model(model.inputs, [layer.input for layer in model.layers])
    return dict(zip(model.layers, probe([x], training=True)))


def dense_rows(layer, inputs):
    """A Dense layer's input rows, with the bias's column of ones when it has a bias."""
    rows = np.asarray(inputs, np.float64)
    return np.concatenate([rows, np.ones((len(rows), 1))], 1) if layer.use_bias else rows


def conv_rows(layer, inputs):
    """The conv's patches (kernel order kh, kw, channels), one row per output position."""
    kh, kw = layer.kernel_size
    patches = tf.image.extract_patches(inputs, [1, kh, kw, 1], [1, 1, 1, 1], [1, 1, 1, 1],
                                       padding=layer.padding.upper())
    return dense_rows(layer, np.reshape(patches.numpy(), (-1, kh * kw * inputs.shape[-1])))


def layer_metrics(model, x, rows_of, identity_share):
    """{kernel path: D_A ⊗ I} (`input_metric`) for the layers in `rows_of` ({layer: rows
    function, e.g. `dense_rows`}), from their inputs on `x`."""
    inputs = layer_inputs(model, x)
    return {layer.kernel.path: input_metric(rows(layer, inputs[layer]), layer.kernel.shape[-1],
                                            identity_share)
            for layer, rows in rows_of.items()}


def plain_step(blocks, fisher_rows, rows, damping, lr, metrics=None):
    """One plain damped natural-gradient step (no momentum, clip or decay) of every block (a tuple
    of variables): the gradient is the mean of `rows`, the Fisher that of `fisher_rows` (both
    {path: (m, size)} per-sample gradients). Returns whether the step differs by more than 1 %
    from the one with the batch's own Fisher (of `rows`). `metrics`: {first variable's path: D}
    damps those blocks with λD in both solves (`layer_metrics`)."""
    differs = False
    for block in blocks:
        g = [rows[v.path].mean(0) for v in block]
        metric = (metrics or {}).get(block[0].path)
        ds = block_direction([fisher_rows[v.path] for v in block], g, damping, metric)
        own = block_direction([rows[v.path] for v in block], g, damping, metric)
        differs |= bool(np.linalg.norm(np.concatenate(own) - np.concatenate(ds))
                        > 1e-2 * np.linalg.norm(np.concatenate(ds)))
        for v, d in zip(block, ds):
            v.assign(v.numpy() - lr * d.reshape(v.shape))
    return differs


# The variables of each layer kind that form one exact block, by class name (kept independent of
# tengrad_tf on purpose: the reference names the blocks itself).
BLOCK_VARIABLES = {
    **dict.fromkeys(["Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D",
                     "DepthwiseConv2D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose"],
                    ("kernel", "bias")),
    **dict.fromkeys(["SeparableConv1D", "SeparableConv2D"],
                    ("depthwise_kernel", "pointwise_kernel", "bias")),
    **dict.fromkeys(["LayerNormalization", "GroupNormalization", "BatchNormalization"],
                    ("gamma", "beta")),
    "Embedding": ("embeddings",),
    "RMSNormalization": ("scale",),
}


def layer_blocks(model):
    """[(variable or None, ...)] for every layer of the model with an exact block (nested models
    included; a MultiHeadAttention's four projections are EinsumDense blocks: kernel and bias)."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers"):
            out += layer_blocks(layer)
        elif type(layer).__name__ == "MultiHeadAttention" and layer.trainable:
            by_projection = {}
            for v in layer.trainable_weights:
                by_projection.setdefault(v.path.rsplit("/", 1)[0], []).append(v)
            out += [tuple(vs) for vs in by_projection.values()]
        elif type(layer).__name__ in BLOCK_VARIABLES and layer.trainable:
            out.append(tuple(getattr(layer, name, None)
                             for name in BLOCK_VARIABLES[type(layer).__name__]))
    return out


def penalty_gradients(model, penalty, variables):
    """{variable path: gradient} of a scalar penalty(model) (e.g. an explicit L2 on a kernel)."""
    with tf.GradientTape() as tape:
        value = penalty(model)
    grads = tape.gradient(value, variables)
    return {v.path: np.zeros(int(np.prod(v.shape))) if g is None
            else np.reshape(g.numpy().astype(np.float64), -1) for v, g in zip(variables, grads)}


def reference_directions(model, x, y_true, y_fisher, per_sample_loss, damping, sample_weight=None,
                         penalty=None, blocks=None, metrics=None):
    """{variable path: natural-gradient direction}, a block for each layer with an exact block
    (`layer_blocks`, or the given `blocks`), d = g elsewhere.

    g is the mean gradient at the training labels `y_true`; the Fisher uses per-sample gradients at
    `y_fisher` (the training labels for the empirical Fisher, sampled labels for the true one).
    With `sample_weight` w: g = (1/m) Σ wᵢ uᵢ (Keras's weighted batch mean) and
    F = (1/m) Σ wᵢ uᵢuᵢᵀ (samples weighted as the loss weights them).
    With `penalty` (a callable model → scalar, e.g. weight regularization): its gradient is added
    to g but is not part of any per-sample gradient, so F comes from the loss alone:
    d = (F + λI)⁻¹ (g_loss + g_penalty).
    `x` and the labels may be lists (multi-input / multi-output models); m comes from the losses.
    `metrics`: {first variable's path: D} damps those blocks with λD (`input_metric`), not λI.
    """
    variables = model.trainable_variables
    g_per = per_sample_gradients(model, x, y_true, per_sample_loss, variables)
    u_per = g_per if y_fisher is y_true else per_sample_gradients(
        model, x, y_fisher, per_sample_loss, variables)
    m = next(iter(g_per.values())).shape[0]
    w = np.ones(m) if sample_weight is None else np.asarray(sample_weight, np.float64)
    g = {p: (v * w[:, None]).mean(axis=0) for p, v in g_per.items()}
    if penalty is not None:
        extra = penalty_gradients(model, penalty, variables)
        g = {p: v + extra[p] for p, v in g.items()}
    u_per = {p: v * np.sqrt(w)[:, None] for p, v in u_per.items()}
    directions = dict(g)
    for block in layer_blocks(model) if blocks is None else blocks:
        vars_ = [v for v in block if v is not None]
        ds = block_direction([u_per[v.path] for v in vars_], [g[v.path] for v in vars_], damping,
                             (metrics or {}).get(vars_[0].path))
        for v, d in zip(vars_, ds):
            directions[v.path] = d
    return directions, g
