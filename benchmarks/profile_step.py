"""Where a training step's time goes: TensorFlow's profiler, ops grouped by the part of the step.

TENGraD's code marks its parts with name scopes (`tengrad_capture`, `tengrad_output_grads`,
`tengrad_gram`, `tengrad_cholesky`, `tengrad_project`, `tengrad_solve`, `tengrad_combine`,
`tengrad_cache`, `tengrad_kl_clip`); an op belongs to the innermost one in its name. Other ops are
the model's forward pass, its backward pass (`gradient_tape/`), or "keras" (loss, metrics, the
optimizer's variable updates, iteration counter). For each configuration the script

  1. times `--steps` steps of `model.fit` without the profiler (the median: the real step time), and
  2. profiles the same number of steps and sums, per part, the durations of the ops that ran
     (kernel time, ms per step) and counts them (ops per step).

The gap between the step time and the summed kernel time is the executor's own work (scheduling
each op, its inputs and outputs) plus Python (`fit`'s loop, callbacks), which grows with the number
of ops rather than with their size. Kernel times of concurrent ops overlap on the inter-op thread
pool, so their sum can exceed the step time.

    python benchmarks/profile_step.py                         # MLP and 3C1F, SGD and TENGraD
    python benchmarks/profile_step.py --models 3c1f --optimizers sgd tengrad-true-f100

Writes benchmarks/results/profile_step.json (and .md) and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import (  # noqa: E402
    BATCH, RESULTS, Runner, git_commit, machine, report_header, write_report)

PARTS = ["forward", "backward", "keras", "tengrad_capture", "tengrad_output_grads", "tengrad_gram",
         "tengrad_cholesky", "tengrad_cache", "tengrad_project", "tengrad_solve",
         "tengrad_combine", "tengrad_kl_clip"]
_SCOPE = re.compile(r"(tengrad_[a-z_]+?)(?:_\d+)?/")


def part_of(op_name: str, optimizer_scope: str) -> str:
    """The part of the step an op belongs to, from its full (name-scoped) name."""
    scopes = _SCOPE.findall(op_name)
    if scopes:
        return scopes[-1]
    if "gradient_tape/" in op_name:
        return "backward"
    if re.search(r"/(sequential|functional)[^/]*/", op_name) and f"/{optimizer_scope}" not in op_name:
        return "forward"
    return "keras"


def op_events(logdir: str):
    """(op name, duration in seconds) of every op kernel the profiler saw on the host's threads."""
    # The XSpace protobuf ships with TensorFlow; no TensorBoard plugin is needed to read it.
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    path = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1]
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            if not line.name.startswith("tf_Compute") and not line.name.startswith("tf_inter_op"):
                continue
            for event in line.events:
                name = names[event.metadata_id].name
                # Op kernels are named "<node name>:<op type>"; executor bookkeeping events are not.
                if ":" in name and "/" in name:
                    yield name.rsplit(":", 1)[0], event.duration_ps * 1e-12


def profile(model_name: str, opt_name: str, steps: int, warmup: int) -> dict:
    runner = Runner(model_name, opt_name, jit=False)
    runner.run(warmup)
    step_s = statistics.median(runner.run(steps))
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        runner.run(steps)
        tf.profiler.experimental.stop()
        seconds = collections.Counter()
        count = collections.Counter()
        scope = runner.model.optimizer.name
        for name, duration in op_events(logdir):
            part = part_of(name, scope)
            seconds[part] += duration
            count[part] += 1
    return {
        "model": model_name, "optimizer": opt_name, "batch": BATCH, "steps": steps,
        "median_s_per_step": step_s,
        "kernel_s_per_step": {p: seconds[p] / steps for p in PARTS if count[p]},
        "ops_per_step": {p: count[p] / steps for p in PARTS if count[p]},
    }


def markdown_table(report) -> str:
    parts = [p for p in PARTS if any(p in r["ops_per_step"] for r in report["results"])]
    short = {p: p.replace("tengrad_", "") for p in parts}
    lines = [f"Profile of one step, batch {BATCH}, {report['machine']['cpus']} CPUs, commit "
             f"{report['commit']}, {report['date']}. Each cell: kernel ms per step / ops per step.",
             "",
             "| model | optimizer | step ms | kernel ms | ops | " + " | ".join(short[p] for p in parts) + " |",
             "|---|---|---|---|---|" + "---|" * len(parts)]
    for r in report["results"]:
        ms, ops = r["kernel_s_per_step"], r["ops_per_step"]
        cells = [f"{ms[p] * 1e3:.1f} / {ops[p]:.0f}" if p in ops else "" for p in parts]
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['median_s_per_step'] * 1e3:.1f} | "
                     f"{sum(ms.values()) * 1e3:.1f} | {sum(ops.values()):.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "3c1f"], choices=["mlp", "3c1f"])
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "tengrad-empirical-f1", "tengrad-empirical-f100",
                                 "tengrad-true-f1", "tengrad-true-f100"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    results = []
    for model_name in args.models:
        for opt_name in args.optimizers:
            results.append(profile(model_name, opt_name, args.steps, args.warmup))
            print(markdown_table({"results": results[-1:], "machine": machine(), "commit": commit,
                                  "date": ""}).splitlines()[-1], flush=True)
    report = report_header("profile_step", argv, commit)
    report["results"] = results
    write_report(args.out, report, markdown_table)

if __name__ == "__main__":
    main()
