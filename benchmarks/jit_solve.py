"""Short CPU/GPU timing of the XLA choices: TENGraD(jit_solve=...) and compile(jit_compile=...).

Prints a few lines (docs/resuming.md, "XLA"):
  1. the m × m work alone at m = 128 (float64 Cholesky of mλI + K with its retry loop, and the two
     triangular solves), in a tf.function, with and without XLA;
  2. a 3C1F `fit` step at batch 128 (benchmarks/common.py's model, empirical Fisher, curvature
     every step so that the factorization is in every step), with jit_solve off and on, and with
     the whole step compiled (jit_compile=True, max_batch_size=128).

    python benchmarks/jit_solve.py                 # about 3 minutes on 2 CPUs
    python benchmarks/jit_solve.py --steps 5 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import BATCH, Runner  # noqa: E402
from tengrad_tf import TENGraD, woodbury  # noqa: E402


def solve_alone(m: int, repeats: int) -> dict[str, float]:
    """Median seconds of factorize + solve for an m × m Gram, XLA off and on."""
    rng = np.random.default_rng(0)
    u = tf.constant(rng.normal(size=(m, 4 * m)), tf.float64)
    gram = tf.matmul(u, u, transpose_b=True)
    b = tf.constant(rng.normal(size=(m, 1)), tf.float64)
    out = {}
    for jit in (False, True):
        @tf.function
        def work(gram, b, jit=jit):
            damped = woodbury.factorize(gram, 0.1, 6, jit=jit)
            solve = woodbury._cholesky_solve_xla if jit else tf.linalg.cholesky_solve
            return solve(damped.cholesky, b)

        work(gram, b)  # trace and compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            work(gram, b).numpy()
            times.append(time.perf_counter() - t)
        out[f"jit={jit}"] = statistics.median(times)
    return out


def fit_runner(jit_compile: bool, **kw) -> Runner:
    """3C1F with TENGraD refreshing its curvature every step, so the m × m work is in every step."""
    keras.utils.set_random_seed(0)  # TENGraD's sampling seed, drawn when it is created
    return Runner("3c1f", TENGraD(fisher="empirical", curvature_update_freq=1, **kw), jit_compile)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed fit steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}, "
          f"TensorFlow {tf.__version__}")
    alone = solve_alone(BATCH, repeats=200)
    print(f"m×m factorize+solve alone, m={BATCH}: " + ", ".join(
        f"{k} {v * 1e3:.2f} ms" for k, v in alone.items()))
    configs = {"jit_solve=False": (False, dict(jit_solve=False)),
               "jit_solve=True": (False, dict(jit_solve=True)),
               "jit_compile=True": (True, dict(jit_solve=False, max_batch_size=BATCH))}
    runners = {}
    for name, (jit_compile, kw) in configs.items():
        t = time.perf_counter()
        runners[name] = fit_runner(jit_compile, **kw)
        runners[name].run(2)  # trace (and compile)
        print(f"{name}: first 2 steps (tracing, compilation) {time.perf_counter() - t:.1f} s",
              flush=True)
    times = {name: [] for name in configs}
    for _ in range(args.rounds):  # interleaved, so that machine noise hits all alike
        for name in configs:
            times[name] += runners[name].run(args.steps)
    for name, ts in times.items():
        print(f"3C1F fit step, batch {BATCH}, freq 1, {name}: median {statistics.median(ts) * 1e3:.0f}"
              f" ms [p25 {np.percentile(ts, 25) * 1e3:.0f}, p75 {np.percentile(ts, 75) * 1e3:.0f}]"
              f" over {len(ts)} steps")


if __name__ == "__main__":
    main()
