"""What the exactness tests share: the loss, a small model and its data, the step size, an
optimizer that takes plain natural-gradient steps, and views of weights and traced graphs.

The independent float64 reference these are compared with is tests/reference.py.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tengrad_tf import TENGraD

LR, DAMPING = 0.125, 0.05  # lr exact in float32: Keras keeps it in a float32 variable


def sce():
    # Built per test: a Loss takes its dtype from floatx when constructed.
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def per_sample_sce(y, logits):
    """The training loss of each sample, as the reference differentiates it."""
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def mlp(use_bias=True, inputs=5, hidden=4, classes=3):
    return keras.Sequential([
        keras.Input((inputs,)),
        keras.layers.Dense(hidden, activation="tanh", use_bias=use_bias),
        keras.layers.Dense(classes, use_bias=use_bias),
    ])


def data(m, inputs=5, classes=3, seed=0):
    """m normal inputs in floatx (float64 under the `float64` fixture) and random labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, inputs)).astype(keras.config.floatx())
    y = rng.integers(0, classes, size=m)
    return x, y


def plain(cls=TENGraD, **kw):
    """An optimizer whose every step is one exact damped natural-gradient step with its own
    batch's Fisher: no momentum, KL clip, weight decay, lagged curvature or curvature reuse, and
    a fixed damping λI at every batch size; `kw` overrides any of it."""
    base = dict(momentum=0.0, weight_decay=None, kl_clip=None)
    if cls is TENGraD:
        base.update(curvature_update_freq=1, adaptive_damping=False, lagged_curvature=False,
                    damping_batch_size=None, damping_metric="identity")
    else:
        base.update(cov_update_freq=1, inv_update_freq=1)
    base.update(kw)
    return cls(**base)


def weights(*models):
    """{variable path: flat float64 values} of the models' trainable variables."""
    return {v.path: v.numpy().astype(np.float64).ravel()
            for model in models for v in model.trainable_variables}


def train_step(model, opt):
    """A custom training step: forward pass, loss and apply_gradients in one tf.function. It
    returns the gradients, in the order of `model.trainable_variables`."""
    loss_fn = sce()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    return step


def dcgan_step(generator, discriminator, g_opt, d_opt, bce, x, z, discriminator_first=False):
    """The Keras DCGAN tutorial's step (call it in a tf.function): two tapes, the discriminator on
    real and fake data, the generator's optimizer applied first (or second)."""
    with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
        fake = generator(z, training=True)
        real_out = discriminator(x, training=True)
        fake_out = discriminator(fake, training=True)
        g_loss = bce(tf.ones_like(fake_out), fake_out)
        d_loss = bce(tf.ones_like(real_out), real_out) + bce(tf.zeros_like(fake_out), fake_out)
    g_grads = g_tape.gradient(g_loss, generator.trainable_variables)
    d_grads = d_tape.gradient(d_loss, discriminator.trainable_variables)
    updates = [(g_opt, g_grads, generator), (d_opt, d_grads, discriminator)]
    for opt, grads, model in updates[::-1] if discriminator_first else updates:
        opt.apply_gradients(zip(grads, model.trainable_variables))


def tensor_sizes(function, *specs, unknown_dim: int) -> list[tuple[int, str]]:
    """(elements, op name) of every tensor in the traced graph of `function`, nested graphs
    (tf.cond branches, map_fn loop bodies) included, from the shapes TF infers while tracing.
    A dimension TF could not infer (a chunk count, an m-sized identity) is taken as
    `unknown_dim` (the batch size: only sample counts are dynamic in a static-batch trace)."""
    graph_def = function.get_concrete_function(*specs).graph.as_graph_def(add_shapes=True)
    nodes = list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]
    sizes = []
    for node in nodes:
        for shape in node.attr["_output_shapes"].list.shape:
            assert not shape.unknown_rank, node.name
            dims = [unknown_dim if d.size < 0 else d.size for d in shape.dim]
            sizes.append((int(np.prod(dims)), node.name))
    return sizes
