"""Save and resume: the whole optimizer state (iterations, momentum, curvature, sampling seed).

The main test trains N steps, saves in the middle of a reuse window (the cached curvature is from an
earlier step than the save), resumes in a fresh process and compares with the uninterrupted run.
An exact resume runs the same float32 ops on the same values, so the weights must agree to float32
rounding (bitwise equal when measured); we allow about 8 float32 ulps relative (rtol 1e-6) and
atol 1e-7 for entries near zero. Recomputing the curvature at the resume point instead of restoring
it changes the weights by orders of magnitude more (the control requires > 1e-4 relative).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tengrad_tf import KFAC, TENGraD, fisher
from tengrad_tf.blocks import base

B, N, M = 8, 5, 4  # batch, steps before the save, steps after it
RTOL, ATOL = 1e-6, 1e-7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "tests", "scripts")  # what runs in the fresh processes

# Curvature refreshes: TENGraD at steps 0, 3, 6; K-FAC factors at 0, 2, 4, 6, inverses at 0, 3, 6.
# The save after step 4 (iterations = 5) is inside a reuse window of every one of them. Momentum
# and KL clipping are on (the defaults); seed=None: the drawn sampling seed must be saved too.
CONFIGS = {
    "tengrad-empirical": lambda: TENGraD(learning_rate=0.05, fisher="empirical",
                                         curvature_update_freq=3),
    "tengrad-true": lambda: TENGraD(learning_rate=0.05, fisher="true", curvature_update_freq=3),
    # The explicit inverse of small blocks is cached only with a fixed damping.
    "tengrad-true-inverse": lambda: TENGraD(learning_rate=0.05, fisher="true",
                                            curvature_update_freq=3, adaptive_damping=False),
    # The damping metric is cached with the curvature it belongs to: the convolution's L_A, the
    # Dense layer's factor of N and (κ, σ) (8 rows < D_in = 33: blocks/metric_rows.py).
    "tengrad-metric": lambda: TENGraD(learning_rate=0.05, fisher="true", curvature_update_freq=3,
                                      damping_metric="inputs"),
    "kfac-true": lambda: KFAC(learning_rate=0.05, fisher="true", kl_clip=1e-2, stat_decay=0.9,
                              cov_update_freq=2, inv_update_freq=3),
}

# Which cache the tiny layers get (blocks.base.DIRECT_MAX_DIM, which conftest sets to 0): the
# factored caches (the convolution caches J, the Dense layer A and G), or the explicit inverse.
DIRECT_MAX_DIM = {"tengrad-true-inverse": 10**6}


def data():
    rng = np.random.default_rng(0)
    return (rng.normal(size=((N + M) * B, 4, 4, 1)).astype("float32"),
            rng.integers(0, 3, (N + M) * B))


def build(optimizer):
    """A convolution (its cache holds per-sample gradients J), a Dense layer (factors A, G) and an
    Embedding of the discretized pixels (token ids and G)."""
    image = keras.Input((4, 4, 1))
    h = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, padding="same", activation="tanh")(image))
    ids = keras.layers.Discretization(bin_boundaries=list(np.linspace(-2, 2, 39)))(
        keras.layers.Flatten()(image))
    e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(40, 2)(ids))
    model = keras.Model(image, keras.layers.Dense(3)(keras.layers.Concatenate()([h, e])))
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def fit(model, x, y, **kwargs):
    return model.fit(x, y, batch_size=B, shuffle=False, verbose=0, **kwargs)


def assert_same_weights(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def max_rel_diff(got, want):
    return max(np.max(np.abs(g - w)) / np.max(np.abs(w)) for g, w in zip(got, want))


class SaveAfter(keras.callbacks.Callback):
    def __init__(self, steps, path):
        super().__init__()
        self.steps, self.path = steps, path

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.steps:
            self.model.save(self.path)


def test_keras_file_resumed_in_a_fresh_process_equals_the_uninterrupted_run(tmp_path,
                                                                            monkeypatch):
    x, y = data()
    np.savez(tmp_path / "data.npz", x=x, y=y)
    uninterrupted, caches = {}, set()
    for name, make in CONFIGS.items():
        monkeypatch.setattr(base, "DIRECT_MAX_DIM", DIRECT_MAX_DIM.get(name, 0))
        model = build(make())
        fit(model, x, y, callbacks=[SaveAfter(N, str(tmp_path / f"{name}.keras"))])
        uninterrupted[name] = model.get_weights()
        caches |= {kind for kind in base.CacheKind for treatment in
                   model.optimizer.treatments().values() if f"caches {kind.value}" in treatment}
    assert caches == set(base.CacheKind), caches  # every kind of cache is saved and resumed
    runs = [f"{name}={DIRECT_MAX_DIM.get(name, 0)}" for name in CONFIGS]
    runs.append("tengrad-true+no-curvature=0")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "resume_child.py"),
                           str(tmp_path), *runs], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def resumed(name):
        with np.load(tmp_path / f"{name}.npz") as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]

    for name in CONFIGS:
        assert_same_weights(resumed(name), uninterrupted[name])
    # The control: recomputing the curvature at the resume point is far outside the tolerance.
    assert max_rel_diff(resumed("tengrad-true+no-curvature"), uninterrupted["tengrad-true"]) > 1e-4


@pytest.mark.parametrize("name", ["tengrad-true", "kfac-true"])
def test_checkpoint_restores_everything_even_before_the_first_step(tmp_path, name):
    x, y = data()
    model = build(CONFIGS[name]())
    fit(model, x[:N * B], y[:N * B])
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(str(tmp_path / "ckpt"))
    fit(model, x[N * B:], y[N * B:])
    # Other random weights and another drawn sampling seed: everything must come from the
    # checkpoint. It is read before the optimizer is built and before any curvature variable
    # exists, so TF restores those when they are created (deferred restoration).
    fresh = build(CONFIGS[name]())
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path)
    fit(fresh, x[N * B:], y[N * B:])
    status.assert_consumed()  # every saved value, the curvature included, found its variable
    assert_same_weights(fresh.get_weights(), model.get_weights())


def test_load_weights_into_a_trained_optimizer_replaces_its_curvature(tmp_path):
    """The blocks already hold (later) curvature: loading must overwrite it, not keep it."""
    x, y = data()
    model = build(CONFIGS["kfac-true"]())
    fit(model, x[:N * B], y[:N * B])
    model.save_weights(tmp_path / "a.weights.h5")
    fit(model, x[N * B:], y[N * B:])
    uninterrupted = model.get_weights()
    model.load_weights(tmp_path / "a.weights.h5")
    assert int(model.optimizer.iterations.numpy()) == N
    fit(model, x[N * B:], y[N * B:])
    assert_same_weights(model.get_weights(), uninterrupted)


def test_backup_and_restore_resumes_exactly(tmp_path):
    """Interrupted after 2 of 3 epochs (6 steps; curvature from step 4, freq 4), resumed by a fresh
    model and optimizer through BackupAndRestore: the same weights as one uninterrupted fit."""
    x, y = data()
    x, y = x[:3 * B], y[:3 * B]  # 3 steps per epoch

    def make():
        return build(TENGraD(learning_rate=0.05, curvature_update_freq=4, seed=7))

    reference = make()
    initial = reference.get_weights()
    fit(reference, x, y, epochs=3)

    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    interrupted = make()
    interrupted.set_weights(initial)
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(interrupted, x, y, epochs=3,
            callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path)), Interrupt()])
    resumed = make()
    history = fit(resumed, x, y, epochs=3,
                  callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path))])
    assert len(history.epoch) == 1 and int(resumed.optimizer.iterations.numpy()) == 9
    assert_same_weights(resumed.get_weights(), reference.get_weights())


def test_a_fixed_capacity_smaller_than_the_saved_cache_is_a_clear_error(tmp_path):
    """A cache of fixed capacity (max_batch_size) cannot hold a saved cache of more samples, and
    says so instead of dropping it."""
    x, y = data()
    model = build(TENGraD(fisher="empirical"))
    fit(model, x[:B], y[:B])
    model.save_weights(tmp_path / "a.weights.h5")
    fresh = build(TENGraD(fisher="empirical", max_batch_size=B // 2))
    fresh.optimizer.build(fresh.trainable_variables)  # else Keras skips the optimizer's state
    fresh.load_weights(tmp_path / "a.weights.h5")
    with pytest.raises(ValueError,
                       match="layer '(conv2d|embedding).*max_batch_size at least as large"):
        fresh.fit(x, y, batch_size=B // 2, verbose=0)


def test_sampled_labels_depend_on_the_seed_and_the_step_only():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    logits = tf.zeros([3000, 3])

    def draw(seed, step):
        return fisher.sample_labels(loss, logits, fisher.step_key(seed, step)).numpy()

    np.testing.assert_array_equal(draw(5, 3), draw(5, 3))  # no hidden state between calls
    # Independent uniform draws over 3 classes differ 2/3 of the time (± 0.009 here).
    assert np.mean(draw(5, 3) != draw(5, 4)) > 0.6 and np.mean(draw(5, 3) != draw(6, 3)) > 0.6
    # seed=None draws a seed per optimizer, fixed by keras.utils.set_random_seed.
    keras.utils.set_random_seed(1)
    a = TENGraD()
    keras.utils.set_random_seed(1)
    b, c = TENGraD(), TENGraD()
    seeds = [int(o._resume_state.sampling_seed.numpy()) for o in (a, b, c)]
    assert seeds[0] == seeds[1] != seeds[2]


def test_keras_file_resumes_every_replica_under_mirrored_strategy(tmp_path):
    """The pending state is restored while one replica traces the step: every replica's copy of
    the (replica-local) cache must get it, not only that replica's."""
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "resume_mirrored.py"),
                           str(tmp_path / "m.keras")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
