"""What a change of the adaptive damping costs: every block refactorized for the new λ, by which
small blocks keep their explicit inverse.

Under adaptive damping (TENGraD's default) each change of λ refactorizes every block's cached
curvature (tengrad_tf/adaptive.py): a factored cache's m × m Gram (a Cholesky, m³/3), or a small
block's explicit inverse, rebuilt from its per-sample gradients J (m·d² products through the Gram).
Which blocks keep the inverse is `blocks.cost.keeps_inverse`. This times the refactorization of all
of a model's blocks under three rules:

    "d<=1024"  every block with d ≤ 1,024 (blocks.base.DIRECT_MAX_DIM), the rule before the next
    "d<=4m"    d ≤ 1,024 and d ≤ 4m (cost.ADAPTIVE_INVERSE_RATIO; the default)
    "none"     no block keeps its inverse

    python benchmarks/refactor_cost.py                     # MobileNetV2 α 0.35, 32×32
    python benchmarks/refactor_cost.py --models mobilenet_v2 transformer --repeats 20

Each model (benchmarks/common.py's, batch 128, its synthetic batch) trains 3 steps of TENGraD() per
rule, which fills the caches; then one graph function refactorizes every block for a new λ, called
once untimed and `--repeats` times timed, the rules interleaved. Writes refactor_cost.json (and
.md) under --out.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import (  # noqa: E402
    BATCH, RESULTS, STEP_MODELS, Runner, git_commit, report_header, time_interleaved,
    write_report)
from tengrad_tf import TENGraD  # noqa: E402
from tengrad_tf.blocks import base, cost  # noqa: E402

# Each rule as the (DIRECT_MAX_DIM, ADAPTIVE_INVERSE_RATIO) its blocks are prepared with.
RULES = {"d<=1024": (1024, 10**9), "d<=4m": (1024, 4), "none": (0, 4)}


def prepared(model_name: str, rule: str) -> list:
    """The blocks of the model trained 3 steps, their caches chosen by `rule`."""
    saved = base.DIRECT_MAX_DIM, cost.ADAPTIVE_INVERSE_RATIO
    base.DIRECT_MAX_DIM, cost.ADAPTIVE_INVERSE_RATIO = RULES[rule]
    try:  # the cache kind is chosen when a block is prepared, in the first step
        optimizer = TENGraD(learning_rate=0.003, damping=0.1, curvature_update_freq=100)
        runner = Runner(model_name, optimizer)
        runner.run(3)
    finally:
        base.DIRECT_MAX_DIM, cost.ADAPTIVE_INVERSE_RATIO = saved
    return optimizer._curvature_holders()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2"], choices=STEP_MODELS)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    rows = []
    for model_name in args.models:
        functions, kinds = {}, {}
        for rule in args.rules:
            blocks = prepared(model_name, rule)
            kinds[rule] = dict(collections.Counter(
                "inverse" if "inverse" in b.state_variables else "factored" for b in blocks))
            functions[rule] = tf.function(
                lambda lam, blocks=blocks: tf.add_n([b.refactor(lam) for b in blocks]))
            functions[rule](tf.constant(0.2, tf.float64))  # traced, untimed
        # A new λ in every round: each call refactorizes for a value not seen before.
        times = time_interleaved(functions, args.repeats,
                                 lambda i: tf.constant(0.3 + 0.01 * i, tf.float64))
        for rule in args.rules:
            rows.append({"model": model_name, "rule": rule, "batch": BATCH, "blocks": kinds[rule],
                         "seconds": times[rule], "median_seconds": statistics.median(times[rule])})
            print(f"{model_name} {rule}: {kinds[rule]}, refactorization "
                  f"{rows[-1]['median_seconds'] * 1e3:.1f} ms", flush=True)
    report = report_header("refactor_cost", argv, commit)
    report.update(repeats=args.repeats, results=rows)
    write_report(args.out, report, markdown_table)
    return report


def markdown_table(report) -> str:
    lines = [f"Every block refactorized for a new λ, median of {report['repeats']}, "
             f"{report['machine']['cpus']} CPUs, commit {report['commit']}, {report['date']}", "",
             "| model | small blocks keep the inverse | blocks: inverse, factored | ms |",
             "|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['rule']} | {r['blocks'].get('inverse', 0)}, "
                     f"{r['blocks'].get('factored', 0)} | {r['median_seconds'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
