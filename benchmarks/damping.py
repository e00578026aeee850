"""Does TENGraD train from any initial damping? A sweep of λ from 1e-4 to 1 at the other defaults.

Models, on Fashion-MNIST:
  small_cnn   3C1F at width 16 (hidden 128), batch 32 (the issue's small CNN)
  3c1f        3C1F at width 32 (hidden 128), batch 128
For each initial damping, TENGraD(damping=λ) (adaptive damping, the default) and
TENGraD(damping=λ, adaptive_damping=False) train `--steps` steps from the same initialization and
batches; the per-step training loss is recorded. A run "trains" when the mean loss of its last ten
steps is below its first loss and no loss exceeded three times the first (nothing diverges).

    python benchmarks/damping.py
    python benchmarks/damping.py --models small_cnn --steps 30 --dampings 1e-4 1

Writes damping.json (and .md) under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import RESULTS, git_commit, report_header, write_report  # noqa: E402
from tengrad_tf import TENGraD, data, models  # noqa: E402

MODELS = {"small_cnn": (16, 32), "3c1f": (32, 128)}  # width, batch
CONFIGURATIONS = {"adaptive damping (default)": {},
                  "fixed damping": {"adaptive_damping": False}}


def run(model_name, damping, options, steps, data_dir):
    width, batch = MODELS[model_name]
    keras.utils.set_random_seed(0)
    model = models.build_model("3c1f", (28, 28, 1), 10, width=width, hidden=128)
    model.compile(optimizer=TENGraD(damping=damping, **options),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = iter(data.load("fashion_mnist", "train", batch, data_dir=data_dir, seed=0,
                             shuffle=False))
    losses = [float(model.train_on_batch(*next(batches))) for _ in range(steps)]
    opt = model.optimizer
    final_damping = (float(opt.damping_variable.numpy()) if opt.adaptive_damping else damping)
    first, last = losses[0], float(np.mean(losses[-10:]))
    peak = max(losses) if all(map(math.isfinite, losses)) else float("inf")
    return {"losses": losses, "first": first, "last10": last, "max": peak,
            "final_damping": final_damping, "trains": bool(last < first and peak <= 3 * first)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    rows = []
    for model_name in args.models:
        for name, options in CONFIGURATIONS.items():
            for damping in args.dampings:
                result = run(model_name, damping, options, args.steps, args.data_dir)
                rows.append({"model": model_name, "configuration": name, "damping": damping,
                             **result})
                print(f"{model_name} {name:28s} λ₀={damping:g}: first {result['first']:.3f} "
                      f"max {result['max']:.3f} last10 {result['last10']:.3f} "
                      f"λ {result['final_damping']:.3g} trains {result['trains']}", flush=True)
    report = report_header("damping", argv, commit)
    report.update(steps=args.steps, results=rows)
    write_report(args.out, report, markdown_table)
    return report


def markdown_table(report) -> str:
    lines = [f"{report['steps']} steps per run, {report['machine']['cpus']} CPUs, commit "
             f"{report['commit']}, {report['date']}", "",
             "| model | configuration | initial λ | first loss | max loss | last 10 | final λ | "
             "trains |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['model']} | {r['configuration']} | {r['damping']:g} | "
                     f"{r['first']:.3f} | {r['max']:.3f} | {r['last10']:.3f} | "
                     f"{r['final_damping']:.3g} | {'yes' if r['trains'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
