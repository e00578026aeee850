"""Peak host memory of training steps: SGD, TENGraD (true and empirical Fisher) and K-FAC.

Model: the paper's 3C1F (benchmarks/common.py: 3 × [Conv 3×3, 128, 'same', ReLU], MaxPool 3,
Dense 500, 10) on 28 × 28 × 1 inputs, batch 128, synthetic data (the data does not change memory).

Method. Each configuration runs in its own fresh Python process (a process's high-water mark only
grows, and TensorFlow's allocator keeps what it once took). The process imports TensorFlow, builds
and compiles the model and creates the batch; then it reads its resident set size (VmRSS in
/proc/self/status) as the baseline and resets the kernel's RSS high-water mark (writing "5" to
/proc/self/clear_refs, Linux ≥ 4.0). It runs `--warmup` steps (tracing the train step, creating
the optimizer's state, running them), records VmRSS, resets the mark again and runs `--steps` more:

  peak_mib           the highest VmHWM over both phases − baseline: what training this model
                     needs on top of the built model (the number to compare)
  later_growth_mib   VmHWM of the later steps − VmRSS at their start: > 0 if later steps needed
                     more memory than the first ones left in the allocator (a leak would show here)
  rss_after_mib      VmRSS after all steps − baseline: held state plus what the allocators keep
                     for reuse (freed memory is not necessarily returned to the system)

TENGraD recomputes its curvature on every step (curvature_update_freq=1): its worst case for
memory. K-FAC keeps its own schedule (factors and inverses on the first step, which is its costliest
in memory; inverses every step would take minutes per step on a CPU).

tracemalloc would not see TensorFlow's C++ allocations, and ru_maxrss cannot be reset, which is
why the step-time benchmark's per-process ru_maxrss was dominated by the import and came out the
same for every optimizer.

    python benchmarks/memory.py                 # 3C1F, batch 128; ~8 minutes on 2 CPUs
    python benchmarks/memory.py --model mlp --steps 1 --warmup 1 --out /tmp/m   # quick
    python benchmarks/memory.py --model mobilenet_v2 --batch 32 --optimizers sgd tengrad-true \
        tengrad-exact --out benchmarks/results/memory_exact/b32    # the exact Fisher's memory

Writes memory.json (and memory.md) under --out (default benchmarks/results/) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# benchmarks.common.STEP_MODELS, named here: this parent process does not import TensorFlow.
MODELS = ["3c1f", "mlp", "3c1f_w32", "mobilenet_v2", "transformer", "text_cnn"]
OPTIMIZERS = ["sgd", "tengrad-true", "tengrad-empirical", "tengrad-true-b64", "kfac-true"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _build(model_name: str, batch: int):
    import keras
    import numpy as np
    import tensorflow as tf

    from benchmarks.common import build, inputs

    if model_name == "mlp":  # small: what the tests run
        model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(10)])
        shape = (784,)
    else:
        model, shape = build(model_name)
    rng = np.random.default_rng(0)
    x = inputs(model_name, shape, rng, batch)
    y = rng.integers(0, 10, size=batch)
    return model, tf.data.Dataset.from_tensors((x, y)).repeat()


def worker(model_name: str, opt_name: str, batch: int, warmup: int, steps: int) -> dict:
    """Runs in the fresh subprocess: the measurements of one configuration, in MiB."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks.common import make_optimizer

    keras.utils.set_random_seed(0)
    model, data = _build(model_name, batch)
    # TENGraD refreshes its curvature every step (the worst case). K-FAC keeps its own schedule:
    # factors and inverses on the first step (its costliest), factors every 20 steps. Inverses
    # every step would mean an eigendecomposition of the 10369 × 10369 input factor of 3C1F's
    # Dense layer per step: minutes per step on a CPU.
    model.compile(optimizer=make_optimizer(opt_name),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    baseline = _status_kib("VmRSS")
    _reset_high_water_mark()
    model.fit(data, steps_per_epoch=warmup, epochs=1, verbose=0)
    first_peak = _status_kib("VmHWM") - baseline
    before_steps = _status_kib("VmRSS")
    _reset_high_water_mark()
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    later_peak = _status_kib("VmHWM")
    rss_after = _status_kib("VmRSS") - baseline
    skipped = int(getattr(model.optimizer, "skipped_steps", 0))
    return {"optimizer": opt_name, "baseline_rss_mib": baseline / 1024,
            "peak_mib": max(first_peak, later_peak - baseline) / 1024,
            "first_steps_peak_mib": first_peak / 1024,
            "later_growth_mib": (later_peak - before_steps) / 1024,
            "rss_after_mib": rss_after / 1024, "skipped_steps": skipped}


def measure(model_name, opt_name, batch, warmup, steps) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, opt_name,
           str(batch), str(warmup), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory worker {opt_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown_table(report) -> str:
    lines = [f"Peak host memory above the built model (MiB), {report['model']} at batch "
             f"{report['batch']}, TENGraD curvature refreshed every step (K-FAC: its default "
             f"schedule), {report['warmup_steps']} + "
             f"{report['steps']} steps, {report['machine']['cpus']} CPUs, commit "
             f"{report['commit']}, {report['date']}", "",
             "| optimizer | peak | × SGD | growth after the first steps | resident after |",
             "|---|---|---|---|---|"]
    sgd = next((r["peak_mib"] for r in report["results"] if r["optimizer"] == "sgd"), None)
    for r in report["results"]:
        ratio = f"{r['peak_mib'] / sgd:.1f}" if sgd else ""
        lines.append(f"| {r['optimizer']} | {r['peak_mib']:.0f} | {ratio} | "
                     f"{r['later_growth_mib']:.0f} | {r['rss_after_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        model_name, opt_name, batch, warmup, steps = argv[1:6]
        print(json.dumps(worker(model_name, opt_name, int(batch), int(warmup), int(steps))))
        return None
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="3c1f", choices=MODELS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    parser.add_argument("--warmup", type=int, default=2, help="first steps (tracing included)")
    parser.add_argument("--steps", type=int, default=3, help="steady-state steps measured")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(HERE))
    from benchmarks.common import git_commit, report_header, write_report

    commit = git_commit()  # the code being measured, not whatever HEAD is when the run ends
    results = []
    for opt_name in args.optimizers:
        results.append(measure(args.model, opt_name, args.batch, args.warmup, args.steps))
        print(f"{opt_name}: {results[-1]}", flush=True)
    report = {
        **report_header("memory", argv, commit),
        "method": ("fresh process per configuration; baseline = VmRSS after building and "
                   "compiling the model; peaks = VmHWM after resetting it via "
                   "/proc/self/clear_refs; curvature refreshed every step; "
                   "tengrad-<fisher>-b<N>: memory_budget N MiB"),
        "model": args.model, "batch": args.batch, "warmup_steps": args.warmup,
        "steps": args.steps, "results": results,
    }
    write_report(args.out, report, markdown_table)
    return report


if __name__ == "__main__":
    main()
