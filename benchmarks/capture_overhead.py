"""What capture costs a model that TENGraD does not train: SGD step time with and without a live
TENGraD when the step is traced.

While some TENGraD/KFAC instance is alive, capture is installed process-wide (tengrad_tf.capture),
so a model compiled with another optimizer and traced then carries a tap (one identity with a custom
gradient) at each Dense/Conv output of its training step; inference traces carry none. Once the
last instance is gone, nothing is patched. This benchmark traces the same SGD model twice, once with
no TENGraD alive ("clean") and once while one is ("captured"), counts the capture ops in each
training graph, and times `fit` steps of both, interleaved in rounds so that machine noise hits them
alike.

    python benchmarks/capture_overhead.py                       # mlp and 3c1f
    python benchmarks/capture_overhead.py --models mlp --steps 200 --rounds 7

Writes capture_overhead.json (and .md) under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tensorflow as tf  # noqa: E402

from benchmarks.common import (  # noqa: E402
    BATCH, RESULTS, Runner, git_commit, report_header, write_report)
from tengrad_tf import TENGraD, capture  # noqa: E402


def capture_ops(runner: Runner) -> int:
    """Capture ops in a trace of the runner's training step made now (Keras does not expose the
    function it traced, and a trace now sees the same capture state as the runner's did)."""
    step = tf.function(runner.model.train_step).get_concrete_function(runner.data.element_spec)
    return sum("tengrad_capture" in op.name for op in step.graph.get_operations())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "3c1f"], choices=["mlp", "3c1f"])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round (mlp; "
                        "3c1f runs a tenth)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()

    results = []
    for model_name in args.models:
        steps = args.steps if model_name == "mlp" else max(1, args.steps // 10)
        gc.collect()
        assert not capture.is_installed(), "a TENGraD is alive before the clean trace"
        clean = Runner(model_name, "sgd", False)
        clean.run(args.warmup)  # traced with nothing patched
        ops = {"clean": capture_ops(clean)}
        keep_alive = TENGraD()
        captured = Runner(model_name, "sgd", False)
        captured.run(args.warmup)  # traced with capture installed
        ops["captured"] = capture_ops(captured)
        del keep_alive
        gc.collect()
        runners = {"clean": clean, "captured": captured}
        times = {k: [] for k in runners}
        for r in range(args.rounds):
            for name, runner in runners.items():
                times[name] += runner.run(steps)
            print(f"{model_name} round {r + 1}/{args.rounds}: " + ", ".join(
                f"{k} {statistics.median(v) * 1e3:.2f} ms" for k, v in times.items()), flush=True)
        medians = {k: statistics.median(v) for k, v in times.items()}
        results.append({
            "model": model_name, "batch": BATCH, "steps_timed": len(times["clean"]),
            "capture_ops_in_training_graph": ops,
            "median_s_per_step": medians,
            "captured_over_clean": medians["captured"] / medians["clean"],
            # Per-round ratios show the noise the overall ratio has to be read against.
            "round_ratios": [statistics.median(times["captured"][i * steps:(i + 1) * steps])
                             / statistics.median(times["clean"][i * steps:(i + 1) * steps])
                             for i in range(args.rounds)],
        })

    report = report_header("capture_overhead", argv, commit)
    report["results"] = results
    write_report(args.out, report, markdown_table)


def markdown_table(report) -> str:
    lines = [f"SGD step time with capture installed at trace time against without, batch "
             f"{BATCH}, {report['machine']['cpus']} CPUs, commit {report['commit']}, "
             f"{report['date']}", "",
             "| model | capture ops (clean / captured) | clean ms/step | captured ms/step | "
             "captured ÷ clean | per-round ratios |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        m = r["median_s_per_step"]
        rounds = ", ".join(f"{x:.3f}" for x in r["round_ratios"])
        ops = r["capture_ops_in_training_graph"]
        lines.append(f"| {r['model']} | {ops['clean']} / {ops['captured']} | "
                     f"{m['clean'] * 1e3:.2f} | {m['captured'] * 1e3:.2f} | "
                     f"{r['captured_over_clean']:.3f} | {rounds} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
