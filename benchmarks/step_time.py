"""Seconds per training step of TENGraD, K-FAC and Adam against SGD(momentum=0.9), in one run.

Models: mlp, 3c1f (and 3c1f_w32), mobilenet_v2, transformer and text_cnn at batch 128, on
synthetic inputs of the right shape (the data does not change a step's cost);
benchmarks/common.py's `build` describes them.
Optimizer names: benchmarks/common.py's `make_optimizer`.

Each configuration runs `model.fit` on a repeated in-memory batch; a callback times every step.
Configurations are interleaved in rounds so that machine noise hits them alike, and the report gives
the median of each and its ratio to SGD's median, and the mean (amortized: curvature updates,
damping adaptations and K-FAC's inversions included) and its ratio to SGD's mean. Peak memory is
measured per configuration in a fresh subprocess (peak RSS), since a process's peak only grows.

    python benchmarks/step_time.py                      # every model, all optimizers
    python benchmarks/step_time.py --models mlp --steps 30 --rounds 3
    python benchmarks/step_time.py --models mobilenet_v2 transformer
    python benchmarks/step_time.py --jit                # also model.compile(jit_compile=True)

Writes JSON (and a Markdown table) under --out (default benchmarks/results/) and prints the path.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import (  # noqa: E402
    BATCH, RESULTS, STEP_MODELS, Runner, git_commit, report_header, write_report)


def peak_memory_mib(model_name, opt_name, jit, steps) -> float:
    """Peak RSS (VmHWM) of a fresh process that builds the model and runs `steps` steps.

    Not ru_maxrss: Linux carries a child's ru_maxrss over from its parent across exec, so every
    configuration read this (much larger) process's peak. VmHWM belongs to the new address space.
    """
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    code = (f"import sys; sys.path.insert(0, {root!r}); "
            "from benchmarks.common import Runner; "
            f"Runner({model_name!r}, {opt_name!r}, {jit}).run({steps}); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024  # kB → MiB


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=STEP_MODELS, choices=STEP_MODELS)
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "adam", "kfac-true", "tengrad-empirical-f1",
                                 "tengrad-empirical-f100", "tengrad-true-f1", "tengrad-true-f100"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (tracing) per config")
    parser.add_argument("--jit", action="store_true", help="also run with jit_compile=True")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()  # the code being measured, not whatever HEAD is when the run ends

    results = []
    for model_name in args.models:
        configs = [(o, False) for o in args.optimizers]
        if args.jit:
            configs += [(o, True) for o in args.optimizers]
        runners = {}
        for opt_name, jit in configs:
            runners[(opt_name, jit)] = Runner(model_name, opt_name, jit)
            runners[(opt_name, jit)].run(args.warmup)
        # Once every configuration is traced, one more untimed step each: the first call of a
        # step function after other functions were traced in the process pays a one-off
        # re-instantiation (graph optimization again: 0.5 s for TENGraD on the MLP, 2 s for SGD
        # and 40 s for TENGraD on MobileNetV2), which would land in the first timed round.
        for runner in runners.values():
            runner.run(1)
        times = {c: [] for c in configs}
        for r in range(args.rounds):
            for c in configs:
                times[c] += runners[c].run(args.steps)
                print(f"{model_name} round {r + 1}/{args.rounds} {c[0]}{' jit' if c[1] else ''}: "
                      f"median {statistics.median(times[c]) * 1e3:.1f} ms", flush=True)
        for jit in sorted({j for _, j in configs}):
            sgd = statistics.median(times[("sgd", jit)]) if ("sgd", jit) in times else None
            sgd_mean = statistics.mean(times[("sgd", jit)]) if ("sgd", jit) in times else None
            for opt_name, j in configs:
                if j != jit:
                    continue
                med = statistics.median(times[(opt_name, j)])
                mean = statistics.mean(times[(opt_name, j)])
                entry = {
                    "model": model_name, "optimizer": opt_name, "jit_compile": j, "batch": BATCH,
                    "median_s_per_step": med,
                    # Amortized: every timed step, curvature updates, damping adaptations (and
                    # K-FAC's inversions) included; over a whole update period when
                    # steps × rounds covers one (e.g. 20 × 5 for freq 100).
                    "mean_s_per_step": mean,
                    "mean_ratio_to_sgd": None if sgd_mean is None else mean / sgd_mean,
                    "p25_s": float(np.percentile(times[(opt_name, j)], 25)),
                    "p75_s": float(np.percentile(times[(opt_name, j)], 75)),
                    "steps_timed": len(times[(opt_name, j)]),
                    "ratio_to_sgd": None if sgd is None else med / sgd,
                }
                if not args.no_memory:
                    entry["peak_rss_mib"] = peak_memory_mib(model_name, opt_name, j, 3)
                results.append(entry)

    report = report_header("step_time", argv, commit)
    report["results"] = results
    write_report(args.out, report, markdown_table)


def markdown_table(report) -> str:
    lines = [f"Step time, batch {BATCH}, {report['machine']['cpus']} CPUs, commit {report['commit']}, "
             f"{report['date']}", "",
             "| model | optimizer | jit | median ms/step | × SGD | mean ms/step | × SGD "
             "| peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        ratio = "" if r["ratio_to_sgd"] is None else f"{r['ratio_to_sgd']:.2f}"
        # Results from before the mean was recorded show blanks there.
        mean = "" if "mean_s_per_step" not in r else f"{r['mean_s_per_step'] * 1e3:.1f}"
        mean_ratio = ("" if r.get("mean_ratio_to_sgd") is None
                      else f"{r['mean_ratio_to_sgd']:.2f}")
        mem = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else ""
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['jit_compile']} | "
                     f"{r['median_s_per_step'] * 1e3:.1f} | {ratio} | {mean} | {mean_ratio} | "
                     f"{mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
