"""K-FAC's two inverse methods against each other: seconds to invert one damped factor.

`KFAC(inverse_method="eigh")` inverts each damped factor through an eigendecomposition (the
paper's and kfac-pytorch's baseline); `inverse_method="cholesky"` through a Cholesky factorization.
Both give the same (F + δI)⁻¹; this measures which is faster at each factor size, so that a
benchmark can run K-FAC with its faster method and say which one that was. The sizes are K-FAC's
factors on the time-to-accuracy configurations: 3C1F at width 16 has fc1's A of 1,297² (the cpu
configuration), at width 32 2,593², at the paper's width 10,369² (an eigendecomposition of
4,000² alone took 25 s here, so the paper's size is left to `--sizes` on a faster machine).

    python benchmarks/kfac_inverse.py                      # the committed result
    python benchmarks/kfac_inverse.py --sizes 10369 --repeats 1

Each size: a random positive semi-definite float32 factor F = XXᵀ/n of rank n/2 (a factor of fewer
samples than dimensions, as K-FAC's are between updates), δ = 0.1; one untimed call per method
(tracing), then `--repeats` timed calls, interleaved. Writes kfac_inverse.json (and .md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import (  # noqa: E402
    RESULTS, git_commit, report_header, time_interleaved, write_report)
from tengrad_tf.blocks.kronecker import KroneckerBlock  # noqa: E402
from tengrad_tf.kfac import INVERSE_METHODS  # noqa: E402

SIZES = (500, 1297, 2593, 4000)


def inverse_function(method: str):
    """K-FAC's own inversion of A (KroneckerBlock.damped_inverses, G a 1 × 1 factor) as a graph
    function: the timed work is what a K-FAC inversion step runs for one n × n factor."""
    layer = keras.layers.Dense(1)
    layer.build((None, 4))  # any Dense: a block is made for a layer; the sizes come from F
    block = KroneckerBlock(layer, damping=0.01, inverse_method=method)
    return tf.function(lambda f: block.damped_inverses(f, tf.eye(1, dtype=f.dtype))[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    rng = np.random.default_rng(0)
    rows = []
    for n in args.sizes:
        x = rng.normal(size=(n, max(1, n // 2))).astype(np.float32)
        factor = tf.constant(x @ x.T / n)
        functions = {method: inverse_function(method) for method in INVERSE_METHODS}
        results = {method: fn(factor) for method, fn in functions.items()}  # traced, untimed
        # Both methods invert the same matrix: their results agree (float32, moderate condition).
        difference = float(tf.reduce_max(tf.abs(results["eigh"] - results["cholesky"])))
        scale = float(tf.reduce_max(tf.abs(results["eigh"])))
        times = time_interleaved(functions, args.repeats, lambda _: factor)
        medians = {method: statistics.median(t) for method, t in times.items()}
        faster = min(medians, key=medians.get)
        rows.append({"size": n, "seconds": times, "median_seconds": medians, "faster": faster,
                     "max_relative_difference": difference / scale})
        print(f"n={n}: " + ", ".join(f"{m} {s:.3f} s" for m, s in medians.items())
              + f" -> {faster}", flush=True)
    report = report_header("kfac_inverse", argv, commit)
    report.update(repeats=args.repeats, results=rows)
    write_report(args.out, report, markdown_table)
    return report


def markdown_table(report) -> str:
    lines = [f"One damped K-FAC factor inverted, float32, median of {report['repeats']}, "
             f"{report['machine']['cpus']} CPUs, commit {report['commit']}, {report['date']}", "",
             "| factor size | eigh (s) | cholesky (s) | eigh ÷ cholesky | faster |",
             "|---|---|---|---|---|"]
    for r in report["results"]:
        eigh, chol = r["median_seconds"]["eigh"], r["median_seconds"]["cholesky"]
        lines.append(f"| {r['size']:,} | {eigh:.3f} | {chol:.3f} | {eigh / chol:.1f} | "
                     f"{r['faster']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
