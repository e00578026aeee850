"""tf.distribute: a step over R replicas equals a single-device step on the same global batch.

The runs happen in fresh processes (tests/distribute_worker.py): logical devices and collectives are
fixed when TensorFlow initializes. The model is float64 (Conv2D + Dense), three steps with global
batches of 16, 16 and 8 samples; each variable's update must equal the single-device update to
rounding (rtol 1e-9). Checked by hand while writing the tests, on the first variable: without the
all-gather of the curvature samples the updates change by 28–122% of their size, with per-replica
gradients preconditioned (all-reduced only by Keras) by 45–78%, and handing Keras d/R instead of d
on replica 0 changes the clipnorm configuration's update by 110%.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import distribute_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env.pop("TF_CONFIG", None)
    return env


def _worker(*args):
    return [sys.executable, "-m", "tests.distribute_worker", *args]


def _check_same_updates(result, names):
    assert int(result["replicas"]) == 2
    for name in names:
        deltas = sorted(k for k in result.files if k.startswith(f"dist/{name}/delta/"))
        assert deltas, name
        for key in deltas:
            dist, single = result[key], result["single/" + key[len("dist/"):]]
            scale = np.max(np.abs(single))
            assert scale > 0, key  # the step moved the variable
            np.testing.assert_allclose(dist, single, rtol=0, atol=1e-9 * scale, err_msg=key)
        for counter in ("iterations", "skipped_steps"):
            assert result[f"dist/{name}/{counter}"] == result[f"single/{name}/{counter}"], (
                name, counter)


def _check_failed(proc, what):
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}:\n{proc.stdout[-4000:]}")


def test_mirrored_strategy_step_equals_single_device_step(tmp_path):
    out = tmp_path / "mirrored.npz"
    proc = subprocess.run(_worker("mirrored", str(out)), cwd=ROOT, env=_env(), timeout=TIMEOUT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _check_failed(proc, "the MirroredStrategy worker")
    result = np.load(out)
    _check_same_updates(result, distribute_worker.CONFIGS)
    # The non-finite step was skipped everywhere (one sample on one replica was NaN).
    assert result["dist/nan_step_skipped/skipped_steps"] == 1
    assert result["dist/nan_step_skipped/iterations"] == 2
    # The replicas replayed the loss with their step's own Dropout masks.
    np.testing.assert_allclose(result["dropout_reduction_ratios"], 1.0, atol=1e-2)
    # Two optimizers over one model: the second's h(θ), replayed at the first's new weights.
    np.testing.assert_allclose(result["split_reduction_ratios"], 1.0, atol=5e-2)
    # Unsupported strategies are refused by name.
    error = str(result["unsupported_error"])
    assert error.startswith("DistributionError") and "CentralStorageStrategy" in error, error


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_multi_worker_mirrored_strategy_step_equals_single_device_step(tmp_path):
    ports = ",".join(str(p) for p in _free_ports(2))
    outs = [tmp_path / f"worker{i}.npz" for i in range(2)]
    procs = [subprocess.Popen(_worker("multiworker", str(out), "--index", str(i), "--ports", ports),
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i, out in enumerate(outs)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            pytest.fail(f"worker {i} exited with {p.returncode}:\n{log[-4000:]}")
    first, second = np.load(outs[0]), np.load(outs[1])
    _check_same_updates(first, distribute_worker.MULTIWORKER_CONFIGS)
    # Both workers hold the same weights after the steps.
    for key in first.files:
        if key.startswith("dist/"):
            np.testing.assert_array_equal(first[key], second[key], err_msg=key)
