"""Worker for tests/test_distribute.py: the same training steps on one device and distributed.

Run in a fresh process, because TensorFlow's devices and collectives are fixed when it initializes:

    python -m tests.distribute_worker mirrored OUT.npz
        2 logical CPU devices, MirroredStrategy; every configuration runs once without a strategy
        and once mirrored, from the same initial weights on the same global batches.
    python -m tests.distribute_worker multiworker OUT.npz --index I --ports P0,P1
        worker I of a 2-worker MultiWorkerMirroredStrategy on 127.0.0.1 (TF_CONFIG), trained with
        a custom loop (Keras 3's fit fails under this strategy); worker 0 also runs the
        single-device reference (fit) afterwards.

OUT.npz holds, per run and configuration, each variable's update (after − before) and the
optimizer's counters. The model is float64 (Conv2D + two Dense layers; for `layers_*`
configurations one of each other kind of block), so both runs agree to rounding. The true Fisher's labels are made deterministic per sample (the least likely class under the model),
so that both runs draw the same labels for the same samples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GLOBAL_BATCH = 16
SAMPLES = 40  # batches of 16, 16 and 8: the last one smaller than the cache capacity

# name -> (optimizer class, keyword arguments). Each covers a part of the step that distribution
# could get wrong: momentum, the KL clip (κ tiny so that it is active on every step), curvature
# reuse (freq 2), weight decay, Keras's clipnorm on the direction, the true Fisher, a summed loss,
# K-FAC's factors and running averages, and a skipped non-finite step.
CONFIGS = {
    "empirical_momentum_klclip_reuse": ("TENGraD", dict(
        fisher="empirical", learning_rate=0.1, damping=0.05, momentum=0.9, kl_clip=1e-6,
        curvature_update_freq=2, weight_decay=0.01)),
    "true_clipnorm": ("TENGraD", dict(
        fisher="true", learning_rate=0.1, damping=0.05, momentum=0.0, kl_clip=None,
        curvature_update_freq=1, clipnorm=0.05)),
    # D_A of the global batch's inputs: a replica's own would damp each replica differently. The
    # first Dense layer (D_in = 28 > 16 rows) takes it through the rows (blocks/metric_rows.py),
    # zero-padded in the last batch of 8; the convolution and the last layer through L_A.
    "input_metric_reuse": ("TENGraD", dict(
        fisher="true", learning_rate=0.1, damping=0.05, momentum=0.9, kl_clip=None,
        curvature_update_freq=2, damping_metric="inputs")),
    "kfac_true": ("KFAC", dict(
        fisher="true", learning_rate=0.1, damping=0.05, momentum=0.9, kl_clip=1e-6,
        cov_update_freq=1, inv_update_freq=2, stat_decay=0.5)),
    "empirical_summed_loss": ("TENGraD", dict(
        fisher="empirical", learning_rate=0.01, damping=0.05, momentum=0.0, kl_clip=None,
        curvature_update_freq=1)),
    "nan_step_skipped": ("TENGraD", dict(
        fisher="empirical", learning_rate=0.1, damping=0.05, momentum=0.9, kl_clip=1e-2,
        curvature_update_freq=1)),
    # The model of the other layer kinds (`build(layers=True)`): every block gathers its own
    # recorded tensors (token ids, normalized inputs, inputs of explicit per-sample gradients).
    "layers_true_reuse": ("TENGraD", dict(
        fisher="true", learning_rate=0.1, damping=0.05, momentum=0.0, kl_clip=None,
        curvature_update_freq=2)),
    # R rows per sample: each replica's repeated inputs and class rows gathered in one order.
    "layers_exact_reuse": ("TENGraD", dict(
        fisher="exact", learning_rate=0.1, damping=0.05, momentum=0.0, kl_clip=None,
        curvature_update_freq=2)),
}
MULTIWORKER_CONFIGS = ("empirical_momentum_klclip_reuse", "kfac_true")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mirrored", "multiworker"])
    parser.add_argument("out")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--ports", default="")
    parser.add_argument("--configs", default="")
    args = parser.parse_args(argv)

    if args.mode == "multiworker":
        hosts = [f"127.0.0.1:{p}" for p in args.ports.split(",")]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": args.index}})
    import tensorflow as tf

    if args.mode == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    else:
        # Created first: the collectives are configured when TensorFlow initializes.
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    names = args.configs.split(",") if args.configs else (
        list(CONFIGS) if args.mode == "mirrored" else list(MULTIWORKER_CONFIGS))

    import keras
    import numpy as np

    import tengrad_tf
    from tengrad_tf import fisher

    keras.config.disable_traceback_filtering()  # full tracebacks in the test's failure log
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")

    def least_likely(loss, y_pred, seed=None):
        return tf.argmin(y_pred, axis=-1, output_type=tf.int32)

    fisher.sample_labels = least_likely

    def build(layers=False):
        if not layers:
            return keras.Sequential([
                keras.Input((5, 5, 2)),
                keras.layers.Conv2D(3, 3, activation="tanh"),
                keras.layers.Flatten(),
                keras.layers.Dense(4, activation="tanh"),
                keras.layers.Dense(3),
            ])
        # Synchronized BatchNorm: its batch statistics are then the global batch's, as on one
        # device, so the two runs take the same step.
        image = keras.Input((5, 5, 2))
        h = keras.layers.BatchNormalization(synchronized=True)(
            keras.layers.Conv2D(4, 3, groups=2, activation="tanh")(image))
        h = keras.layers.DepthwiseConv2D(2, activation="tanh")(h)
        h = keras.layers.LayerNormalization()(keras.layers.Conv2DTranspose(2, 2)(h))
        ids = keras.layers.Discretization(bin_boundaries=[-1.0, 0.0, 1.0])(
            keras.layers.Flatten()(image))
        e = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(4, 2)(ids))
        h = keras.layers.Concatenate()([keras.layers.Flatten()(h), e])
        return keras.Model(image, keras.layers.Dense(3)(h))

    keras.utils.set_random_seed(0)
    initial = build().get_weights()
    initial_layers = build(layers=True).get_weights()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, 5, 5, 2))
    y = rng.integers(0, 3, size=SAMPLES)

    def loss_fn(name):
        reduction = "sum" if name == "empirical_summed_loss" else "sum_over_batch_size"
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)

    def make(name, strategy):
        cls, kwargs = CONFIGS[name]
        layers = name.startswith("layers")
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = build(layers)
            model.set_weights(initial_layers if layers else initial)
            optimizer = getattr(tengrad_tf, cls)(**kwargs)
            optimizer.build(model.trainable_variables)
        return model, optimizer

    def outcome(name, model, optimizer, before):
        result = {f"{name}/delta/{i}": v.numpy() - b
                  for i, (v, b) in enumerate(zip(model.trainable_variables, before))}
        result[f"{name}/iterations"] = np.array(int(optimizer.iterations.numpy()))
        result[f"{name}/skipped_steps"] = np.array(int(optimizer.skipped_steps.numpy()))
        return result

    def inputs(name):
        xs = x.copy()
        if name == "nan_step_skipped":
            xs[GLOBAL_BATCH + 3, 0, 0, 0] = np.nan  # one sample of the second batch
        return xs

    def run_fit(name, strategy):
        model, optimizer = make(name, strategy)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model.compile(optimizer=optimizer, loss=loss_fn(name), jit_compile=False)
        before = [v.numpy().copy() for v in model.trainable_variables]
        model.fit(inputs(name), y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        return outcome(name, model, optimizer, before)

    def run_custom_loop(name, strategy):
        # Keras 3's fit fails under MultiWorkerMirroredStrategy before any optimizer step
        # (keras-team/keras#20585: its symbolic build reduces a PerReplica batch), so the
        # multi-worker run uses a custom loop. Replica r gets the r-th contiguous part of each
        # global batch.
        model, optimizer = make(name, strategy)
        with strategy.scope():
            loss = loss_fn(name)
        replicas = strategy.num_replicas_in_sync
        xs = inputs(name)

        @tf.function
        def train_step(xb, yb):
            def step_fn(xr, yr):
                with tf.GradientTape() as tape:
                    # A Keras Loss divides its batch mean by the replicas in sync by itself.
                    value = loss(yr, model(xr, training=True))
                grads = tape.gradient(value, model.trainable_variables)
                optimizer.apply_gradients(zip(grads, model.trainable_variables))

            strategy.run(step_fn, args=(xb, yb))

        before = [v.numpy().copy() for v in model.trainable_variables]
        for start in range(0, SAMPLES, GLOBAL_BATCH):
            size = min(GLOBAL_BATCH, SAMPLES - start) // replicas

            def part(array, start=start, size=size):
                def local(ctx):
                    first = start + ctx.replica_id_in_sync_group * size
                    return tf.constant(array[first:first + size])
                return strategy.experimental_distribute_values_from_function(local)

            train_step(part(xs), part(y))
        return outcome(name, model, optimizer, before)

    distributed_run = run_fit if args.mode == "mirrored" else run_custom_loop
    results = {}
    for name in names:
        results.update({f"dist/{k}": v for k, v in distributed_run(name, strategy).items()})
    if args.mode == "mirrored" or args.index == 0:
        for name in names:
            results.update({f"single/{k}": v for k, v in run_fit(name, None).items()})
    if args.mode == "mirrored":
        # An unsupported strategy must be refused with an error that names it.
        try:
            run_fit("empirical_summed_loss", tf.distribute.experimental.CentralStorageStrategy())
            results["unsupported_error"] = np.array("no error")
        except Exception as error:  # noqa: BLE001 - the test checks type and message
            results["unsupported_error"] = np.array(f"{type(error).__name__}: {error}")
        # Each replica replays the loss with its own Dropout masks (replay.py): ρ of a tiny step
        # is 1 as without Dropout; fresh masks put it between −90,000 and 990,000.
        with strategy.scope():
            model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
                                      keras.layers.Dropout(0.5), keras.layers.Dense(3)])
            optimizer = tengrad_tf.TENGraD(learning_rate=1e-5, damping=0.5, kl_clip=None,
                                           fisher="empirical", damping_adaptation_interval=1)
            model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
        rng = np.random.default_rng(3)
        ratios = []
        for _ in range(4):
            model.fit(rng.normal(size=(16, 5)), rng.integers(0, 3, 16), batch_size=16,
                      verbose=0, shuffle=False)
            ratios.append(float(optimizer.reduction_ratio.numpy()))
        results["dropout_reduction_ratios"] = np.array(ratios)
        # Two optimizers over one model, SGD's applied first: TENGraD's replay runs through the
        # variables SGD has just moved, so h(θ) is replayed too, summed over the replicas as
        # h(θ + s) is (replay.py). ρ of a tiny step is 1; against the recorded h(θ) it measured
        # SGD's step as well.
        with strategy.scope():
            optimizer = tengrad_tf.TENGraD(learning_rate=1e-5, damping=0.5, kl_clip=None,
                                           fisher="empirical", damping_adaptation_interval=1)
            first_order = keras.optimizers.SGD(0.01)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        body, head = model.layers[0].trainable_variables, model.layers[2].trainable_variables

        @tf.function
        def split_step(xb, yb):
            def step_fn(xr, yr):
                with tf.GradientTape() as tape:
                    value = loss(yr, model(xr, training=True))
                grads = tape.gradient(value, body + head)
                first_order.apply_gradients(zip(grads[:len(body)], body))
                optimizer.apply_gradients(zip(grads[len(body):], head))

            strategy.run(step_fn, args=(xb, yb))

        ratios = []
        for _ in range(4):
            batch = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensor_slices(
                (rng.normal(size=(16, 5)), rng.integers(0, 3, 16))).batch(16))
            split_step(*next(iter(batch)))
            ratios.append(float(optimizer.reduction_ratio.numpy()))
        results["split_reduction_ratios"] = np.array(ratios)
    results["replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(args.out, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
