"""The fresh process of tests/test_resume.py's main test: loads each saved .keras file, trains the
remaining steps and saves the weights for the test to compare with the uninterrupted run.

    python tests/scripts/resume_child.py FOLDER NAME=DIRECT_MAX_DIM ...

FOLDER holds data.npz and <NAME>.keras; DIRECT_MAX_DIM is the cache kind of the saving process. A
NAME ending in "+no-curvature" loads <NAME without it>.keras and drops the saved curvature: what a
file without curvature gives, the control of the test.
"""

import sys

import keras
import numpy as np

from tengrad_tf.blocks import base  # importing tengrad_tf registers TENGraD and KFAC for loading
from tests.test_resume import B, M, N

folder, runs = sys.argv[1], sys.argv[2:]
d = np.load(f"{folder}/data.npz")
for run in runs:
    name, direct_max_dim = run.split("=")
    base.DIRECT_MAX_DIM = int(direct_max_dim)
    control = name.endswith("+no-curvature")
    model = keras.models.load_model(f"{folder}/{name.removesuffix('+no-curvature')}.keras")
    if control:  # the first step recomputes the curvature
        model.optimizer._pending_state.clear()
    model.fit(d["x"][N * B:], d["y"][N * B:], batch_size=B, shuffle=False, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == N + M
    np.savez(f"{folder}/{name}.npz", *model.get_weights())
