"""What crosses devices in one TENGraD curvature step under tf.distribute, for 3C1F at batch 128.

Runs one `fit` step of 3C1F (width 128, Dense 500, 28×28×1 inputs, global batch 128) under
MirroredStrategy on 2 logical CPU devices, records the shapes of the tensors the optimizer
all-gathers (tengrad_tf.distribute.gather_samples) and prints a Markdown table per layer: floats
gathered per curvature step (m · elements of one sample's layer input and output gradient), the same
in MiB at float32, against d² for the layer's d = D_in·D_out (what an explicit Fisher block would
hold) and m·d (gathering per-sample gradients J instead). Gradients cross devices twice per step
(TENGraD's all-reduce of g, Keras's of the direction).

    python benchmarks/distribute_traffic.py
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

BATCH = 128


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    from tengrad_tf import TENGraD, distribute
    from tengrad_tf.models import three_c_one_f

    recorded = []
    original = distribute.gather_samples

    def recording(context, tensors, when):
        recorded.append([t.shape for t in tensors])
        return original(context, tensors, when)

    distribute.gather_samples = recording
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = three_c_one_f()
        model.compile(optimizer=TENGraD(), jit_compile=False,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, size=BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)

    shapes = recorded[0]  # replica 0's trace: per layer, its input then its output gradient
    layers = [l for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))]
    assert len(shapes) == 2 * len(layers), (len(shapes), len(layers))
    replicas = strategy.num_replicas_in_sync
    mib = 4 / 2**20
    print(f"3C1F, global batch m = {BATCH} on {replicas} replicas; floats per curvature step\n")
    print("| layer | per sample: input + output grad | gathered m·(…) | MiB (float32) "
          "| d = D_in·D_out | d² | m·d (J instead) |")
    print("|---|---|---|---|---|---|---|")
    total = 0
    for i, layer in enumerate(layers):
        x_shape, g_shape = shapes[2 * i], shapes[2 * i + 1]
        local = x_shape[0]
        per_sample = math.prod(x_shape[1:]) + math.prod(g_shape[1:])
        gathered = local * replicas * per_sample
        total += gathered
        d = (math.prod(layer.kernel.shape[:-1]) + 1) * layer.kernel.shape[-1]
        print(f"| {layer.name} | {math.prod(x_shape[1:]):,} + {math.prod(g_shape[1:]):,} "
              f"| {gathered:,} | {gathered * mib:.1f} | {d:,} | {d * d:.2e} | {BATCH * d:,} |")
    params = model.count_params()
    print(f"| all | | {total:,} | {total * mib:.1f} | | | |")
    print(f"\nGradients: 2 × {params:,} floats = {2 * params * mib:.1f} MiB per step "
          f"(SGD: {params * mib:.1f} MiB).")


if __name__ == "__main__":
    main()
