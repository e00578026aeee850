"""Run by tests/test_resume.py::test_keras_file_resumes_every_replica_under_mirrored_strategy in a
fresh process (the two logical CPU devices must be set up before TensorFlow starts):

    python tests/scripts/resume_mirrored.py PATH.keras

Trains, saves, trains on; then resumes the file under MirroredStrategy and checks that every
replica's copy of the cache was restored and that the resumed run ends where the first one did.
"""

import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tengrad_tf import TENGraD  # noqa: E402
from tengrad_tf.blocks import base  # noqa: E402
from tests.test_resume import B, N, RTOL, build, data, fit, max_rel_diff  # noqa: E402

path = sys.argv[1]
base.DIRECT_MAX_DIM = 0  # factored caches: J and (A, G)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x, y = data()
make = lambda: build(TENGraD(learning_rate=0.05, fisher="true", curvature_update_freq=3))  # noqa: E731
with strategy.scope():
    model = make()
fit(model, x[:N * B], y[:N * B])
model.save(path)
saved = {k: [v.numpy() for v in b.state_variables.values()]
         for k, b in zip("cd", model.optimizer._blocks.values())}
fit(model, x[N * B:], y[N * B:])
with strategy.scope():
    resumed = keras.models.load_model(path)
fit(resumed, x[N * B:(N + 1) * B], y[N * B:(N + 1) * B])  # a reuse step: the cache is kept
for k, b in zip("cd", resumed.optimizer._blocks.values()):
    for want, v in zip(saved[k], b.state_variables.values()):
        for copy in strategy.experimental_local_results(v):
            np.testing.assert_array_equal(copy.numpy(), want)
fit(resumed, x[(N + 1) * B:], y[(N + 1) * B:])
assert max_rel_diff(resumed.get_weights(), model.get_weights()) <= RTOL
