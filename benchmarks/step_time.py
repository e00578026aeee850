"""Seconds per training step of TENGraD, K-FAC and Adam against SGD(momentum=0.9), in one run.

Models (batch 128, synthetic inputs of the right shape: the data does not change a step's cost):
  mlp           784-512-256-10
  3c1f          the paper's Fashion-MNIST CNN: 3 × [Conv 3×3, 128, 'same', ReLU], MaxPool 3,
                Dense 500, 10
  mobilenet_v2  keras.applications.MobileNetV2(alpha=0.35), 32×32×3, 10 classes (logits):
                Conv2D, DepthwiseConv2D and BatchNormalization blocks
  transformer   tengrad_tf.models.transformer_classifier: a 20k-token Embedding and positions
                (64 × 64), one MultiHeadAttention block (4 heads) with LayerNormalization and a
                Dense FFN (128), pooling, 10 classes

Each configuration runs `model.fit` on a repeated in-memory batch; a callback times every step.
Configurations are interleaved in rounds so that machine noise hits them alike, and the report gives
the median of each and its ratio to SGD's median. Peak memory is measured per configuration in a
fresh subprocess (peak RSS), since a process's peak only grows.

    python benchmarks/step_time.py                      # all four models, all optimizers
    python benchmarks/step_time.py --models mlp --steps 30 --rounds 3
    python benchmarks/step_time.py --models mobilenet_v2 transformer
    python benchmarks/step_time.py --jit                # also model.compile(jit_compile=True)

Writes JSON (and a Markdown table) under --out (default benchmarks/results/) and prints the path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from tengrad_tf import KFAC, TENGraD, models  # noqa: E402

BATCH = 128
MODELS = ["mlp", "3c1f", "mobilenet_v2", "transformer"]
VOCABULARY, LENGTH = 20000, 64


def build(model_name: str) -> tuple[keras.Model, tuple]:
    if model_name == "mlp":
        model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        return model, (784,)
    if model_name == "3c1f":
        layers = [keras.Input((28, 28, 1))]
        layers += [keras.layers.Conv2D(128, 3, padding="same", activation="relu") for _ in range(3)]
        layers += [keras.layers.MaxPooling2D(3), keras.layers.Flatten(),
                   keras.layers.Dense(500, activation="relu"), keras.layers.Dense(10)]
        return keras.Sequential(layers), (28, 28, 1)
    if model_name == "mobilenet_v2":
        return keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None,
                                              classes=10, classifier_activation=None), (32, 32, 3)
    if model_name == "transformer":
        return models.transformer_classifier(VOCABULARY, LENGTH, num_classes=10), (LENGTH,)
    raise ValueError(f"unknown model {model_name!r}")


def inputs(model_name: str, shape: tuple, rng) -> np.ndarray:
    """A synthetic batch for the model: token ids for the Transformer, normal noise otherwise."""
    if model_name == "transformer":
        return rng.integers(0, VOCABULARY, size=(BATCH, *shape))
    return rng.normal(size=(BATCH, *shape)).astype("float32")


def optimizer(name: str):
    """"sgd", "adam", "tengrad-<fisher>-f<freq>" (at the other defaults: adaptive damping on;
    "tengrad-<fisher>-f<freq>-fixed": a fixed damping), or "kfac-<fisher>" (its default 20/100
    schedule)."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam()
    if name.startswith("kfac"):
        return KFAC(learning_rate=0.003, damping=0.1, fisher=name.split("-")[1])
    _, fisher, freq, *rest = name.split("-")
    return TENGraD(learning_rate=0.003, damping=0.1, fisher=fisher,
                   curvature_update_freq=int(freq[1:]), adaptive_damping=rest != ["fixed"])


class StepTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


class Runner:
    """One compiled model per configuration, kept across rounds (compile and trace once)."""

    def __init__(self, model_name, opt_name, jit):
        keras.utils.set_random_seed(0)
        self.model, shape = build(model_name)
        self.model.compile(optimizer=optimizer(opt_name), jit_compile=jit,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = inputs(model_name, shape, rng)
        y = rng.integers(0, 10, size=BATCH)
        self.data = tf.data.Dataset.from_tensors((x, y)).repeat()

    def run(self, steps):
        timer = StepTimer()
        self.model.fit(self.data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
        return timer.times


def peak_memory_mib(model_name, opt_name, jit, steps) -> float:
    """Peak RSS of a fresh process that builds the model and runs `steps` steps."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            "import step_time as s, resource; "
            f"r = s.Runner({model_name!r}, {opt_name!r}, {jit}); r.run({steps}); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--optimizers", nargs="+",
                        default=["sgd", "adam", "kfac-true", "tengrad-empirical-f1",
                                 "tengrad-empirical-f100", "tengrad-true-f1", "tengrad-true-f100"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (tracing) per config")
    parser.add_argument("--jit", action="store_true", help="also run with jit_compile=True")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
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
        times = {c: [] for c in configs}
        for r in range(args.rounds):
            for c in configs:
                times[c] += runners[c].run(args.steps)
                print(f"{model_name} round {r + 1}/{args.rounds} {c[0]}{' jit' if c[1] else ''}: "
                      f"median {statistics.median(times[c]) * 1e3:.1f} ms", flush=True)
        for jit in sorted({j for _, j in configs}):
            sgd = statistics.median(times[("sgd", jit)]) if ("sgd", jit) in times else None
            for opt_name, j in configs:
                if j != jit:
                    continue
                med = statistics.median(times[(opt_name, j)])
                entry = {
                    "model": model_name, "optimizer": opt_name, "jit_compile": j, "batch": BATCH,
                    "median_s_per_step": med,
                    "p25_s": float(np.percentile(times[(opt_name, j)], 25)),
                    "p75_s": float(np.percentile(times[(opt_name, j)], 75)),
                    "steps_timed": len(times[(opt_name, j)]),
                    "ratio_to_sgd": None if sgd is None else med / sgd,
                }
                if not args.no_memory:
                    entry["peak_rss_mib"] = peak_memory_mib(model_name, opt_name, j, 3)
                results.append(entry)

    report = report_header("step_time", commit, argv)
    report["results"] = results
    write_report(args.out, report, markdown_table)


def report_header(benchmark: str, commit: str, argv) -> dict:
    """What every committed result records: date, machine, commit, versions and command."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "command": " ".join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
    }


def write_report(out: str, report: dict, table) -> None:
    """<benchmark>.json and its Markdown table under `out`; prints the table and the path."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{report['benchmark']}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, f"{report['benchmark']}.md"), "w") as f:
        f.write(table(report))
    print(table(report))
    print(f"results written to {path}")


def markdown_table(report) -> str:
    lines = [f"Step time, batch {BATCH}, {report['machine']['cpus']} CPUs, commit {report['commit']}, "
             f"{report['date']}", "",
             "| model | optimizer | jit | median ms/step | × SGD | peak RSS MiB |",
             "|---|---|---|---|---|---|"]
    for r in report["results"]:
        ratio = "" if r["ratio_to_sgd"] is None else f"{r['ratio_to_sgd']:.2f}"
        mem = f"{r['peak_rss_mib']:.0f}" if "peak_rss_mib" in r else ""
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['jit_compile']} | "
                     f"{r['median_s_per_step'] * 1e3:.1f} | {ratio} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
