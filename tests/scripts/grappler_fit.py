"""Run by tests/test_optimizer.py::test_train_step_graph_passes_grappler in a fresh process, with
TF's C++ log on: fits the step variants whose graphs grappler once failed to sort, and prints "ok".
The test then reads the log for grappler's errors."""

import keras
import numpy as np

from tengrad_tf import KFAC, TENGraD, models

x = np.random.default_rng(0).normal(size=(64, 6, 6, 1)).astype("float32")
y = np.arange(64) % 3
for opt in [TENGraD(fisher="true", curvature_update_freq=1), TENGraD(fisher="empirical"),
            TENGraD(curvature_update_freq=3, kl_clip=None), KFAC()]:
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    model.compile(optimizer=opt,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
# A tiny WRN: blocks whose Gram route is chosen by the batch size, which is static here.
wrn = models.build_model("wrn_28_4", (8, 8, 3), 3, depth=10, widen_factor=1, width_multiplier=0.25)
wrn.compile(optimizer=TENGraD(fisher="empirical"),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
wrn.fit(np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32"), y[:16],
        batch_size=16, epochs=2, verbose=0)
print("ok")
