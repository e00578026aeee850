"""The defaults study: TENGraD() at its defaults against Adam(1e-3) and SGD(0.03, momentum 0.9), at
equal wall-clock time, on four kinds of model, over several seeds.

Models (batch 128, or --batch-size):
  mlp          Fashion-MNIST, 784-256-10 (ReLU)
  cnn          Fashion-MNIST, 3C1F at width 32, hidden 128
  textcnn      synthetic text (tengrad_tf.data.synthetic_text: 4 classes, 2000 tokens, length 40),
               models.text_cnn: Embedding(64) + Conv1D(128, 5) + GlobalMaxPool + Dense
  transformer  the same task, models.transformer_classifier: one Transformer encoder block
               (token and position embeddings, 4 heads, LayerNorm, FFN 128, pooling)
  dropout_cnn  (only with --models) Fashion-MNIST, Conv(32)-BN-ReLU-pool, Conv(64)-BN-ReLU-pool,
               Dropout 0.25, global average pooling, Dense(64), Dropout 0.25, Dense: random
               layers, whose masks adaptive damping's replayed loss must draw again as the step
               did (tengrad_tf/replay.py)
  lstm         (only with --models) the text task, Embedding(64) + LSTM(32) + Dense: its LSTM
               has no Fisher block and takes the first-order step (first_order="adam")
Every run trains the same initialization (per seed) for `--seconds` of wall-clock training time,
the first step's tracing included (a user's clock includes it); the clock stops while the test set
is evaluated at the end. Within a seed the optimizers run interleaved, so machine noise hits them
alike. `--variants` adds TENGraD configurations beside the defaults (the options the study
compares: learning_rate="auto", adaptive damping, the whole-network Fisher, first-order rules,
the Fisher of several batches).

    python benchmarks/defaults.py                                  # the committed study
    python benchmarks/defaults.py --models mlp textcnn --seconds 5 --seeds 1   # quick look

Writes defaults.json (and .md) under --out (default benchmarks/results/). The goal it checks:
TENGraD() reaches a median test accuracy at least as high as the better of Adam and SGD on every
model.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import RESULTS, git_commit, report_header, write_report  # noqa: E402
from tengrad_tf import TENGraD, data, models  # noqa: E402

MODELS = ("mlp", "cnn", "textcnn", "transformer")  # the committed study
EXTRA_MODELS = ("dropout_cnn", "lstm")
TEXT = dict(vocab_size=2000, length=40, classes=4)
BASELINES = {"Adam(1e-3)": lambda: keras.optimizers.Adam(1e-3),
             "SGD(0.03, 0.9)": lambda: keras.optimizers.SGD(0.03, momentum=0.9)}
VARIANTS = {
    "TENGraD(learning_rate='auto', adaptive_damping=True)":
        dict(learning_rate="auto", momentum="auto", adaptive_damping=True),
    "TENGraD(adaptive_damping=False)": dict(adaptive_damping=False),
    "TENGraD(fisher_blocks='network')": dict(fisher_blocks="network"),
    "TENGraD(first_order='sgd')": dict(first_order="sgd"),
    "TENGraD(curvature_batches=4)": dict(curvature_batches=4),
    # The damping of batch 128 (0.1) in proportion to 128/m at batch 32: m·λ, the damping of the
    # summed Gram UᵀU, stays 12.8 (docs/step.md, "Batch size"; without damping_batch_size it is
    # 0.4·√(128/32) = 0.8: give this variant only with --batch-size 32).
    "TENGraD(damping=0.4)": dict(damping=0.4, damping_batch_size=None),
    # λ = 0.1 at every batch size: TENGraD() before damping_batch_size (default 128).
    "TENGraD(damping_batch_size=None)": dict(damping_batch_size=None),
    "TENGraD(curvature_batches=4, curvature_update_freq=20)":
        dict(curvature_batches=4, curvature_update_freq=20),
    # λ·D_A ⊗ I for Dense and convolution blocks (docs/step.md, "The damping metric"); the
    # default ("auto") since commit 768d69c, which takes it wherever this does.
    "TENGraD(damping_metric='inputs')": dict(damping_metric="inputs"),
    # λI for every block: the paper's damping, and TENGraD()'s before commit 768d69c.
    "TENGraD(damping_metric='identity')": dict(damping_metric="identity"),
}


class WallClockBudget(keras.callbacks.Callback):
    """Stop training after `seconds` of training time (steps only, tracing included)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.elapsed, self.steps = seconds, 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        seconds = time.perf_counter() - self._t
        if self.steps == 0:
            self.first_step = seconds
        self.elapsed += seconds
        self.steps += 1
        if self.elapsed >= self.seconds:
            self.model.stop_training = True


def build(model_name):
    if model_name == "mlp":
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(256, activation="relu"),
                                 keras.layers.Dense(10)])
    if model_name == "cnn":
        return models.build_model("3c1f", (28, 28, 1), 10, width=32, hidden=128)
    if model_name == "dropout_cnn":
        layers = keras.layers
        return keras.Sequential([
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
            layers.MaxPooling2D(), layers.Dropout(0.25), layers.GlobalAveragePooling2D(),
            layers.Dense(64, activation="relu"), layers.Dropout(0.25), layers.Dense(10)])
    if model_name == "lstm":
        return keras.Sequential([keras.Input((TEXT["length"],), dtype="int32"),
                                 keras.layers.Embedding(TEXT["vocab_size"], 64),
                                 keras.layers.LSTM(32), keras.layers.Dense(TEXT["classes"])])
    text = dict(vocabulary=TEXT["vocab_size"], length=TEXT["length"],
                num_classes=TEXT["classes"])
    if model_name == "textcnn":
        return models.text_cnn(**text)
    return models.transformer_classifier(**text)


def datasets(model_name, data_dir=None, batch_size=128):
    """(train, test) tf.data pipelines; the training set repeats."""
    if model_name in ("mlp", "cnn", "dropout_cnn"):
        train = data.load("fashion_mnist", "train", batch_size, data_dir=data_dir, seed=0)
        # One pass off the clock: the first reads and decodes the split into the in-memory cache
        # (data.load). In the first run of each model it took 13–15 s of that run's first step,
        # and that run was always TENGraD()'s (seed 0), which then trained 1 to 12 steps.
        for _ in train:
            pass
        return train.repeat(), data.load("fashion_mnist", "test", 1000, data_dir=data_dir)
    x, y = data.synthetic_text(20000, seed=1, **TEXT)
    x_test, y_test = data.synthetic_text(4000, seed=2, **TEXT)
    train = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(20000, seed=0).batch(batch_size)
             .repeat().prefetch(2))
    return train, tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(1000)


def run(model_name, optimizer, train, test, seconds, seed):
    # The previous runs' garbage is collected here, off the clock: a run's first step once took
    # 24 s, in a full collection of earlier runs' graphs (Keras keeps each fit's step graph alive
    # until a collection, TENGraD's with its many branch functions), charged to whichever
    # optimizer happened to be running.
    gc.collect()
    keras.utils.set_random_seed(seed)
    model = build(model_name)
    model.compile(optimizer=optimizer, metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    budget = WallClockBudget(seconds)
    model.fit(train, epochs=10**6, steps_per_epoch=50, verbose=0, callbacks=[budget])
    loss, accuracy = model.evaluate(test, verbose=0)
    return {"test_accuracy": float(accuracy), "test_loss": float(loss), "steps": budget.steps,
            "train_seconds": budget.elapsed, "first_step_seconds": budget.first_step}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + EXTRA_MODELS)
    parser.add_argument("--seconds", type=float, default=15.0, help="training seconds per run")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="TENGraD configurations beside TENGraD() (none: --variants)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()  # the code being measured, not whatever HEAD is when the run ends

    optimizers = {"TENGraD()": TENGraD, **BASELINES,
                  **{name: (lambda kw=VARIANTS[name]: TENGraD(**kw)) for name in args.variants}}
    rows = []
    for model_name in args.models:
        train, test = datasets(model_name, args.data_dir, args.batch_size)
        for seed in range(args.seeds):
            for name, make in optimizers.items():
                result = run(model_name, make(), train, test, args.seconds, seed)
                rows.append({"model": model_name, "optimizer": name, "seed": seed, **result})
                print(f"{model_name:11s} seed {seed} {name:55s} acc {result['test_accuracy']:.4f}"
                      f" steps {result['steps']}", flush=True)
    report = report_header("defaults", argv, commit)
    report.update(seconds_per_run=args.seconds, seeds=args.seeds, batch_size=args.batch_size,
                  results=rows,
                  summary=summarize(rows))
    write_report(args.out, report, markdown_table)
    return report


def summarize(rows) -> dict:
    """Per model: each optimizer's median accuracy and steps, and whether TENGraD() met the goal
    (its median ≥ the better median of the two baselines)."""
    summary = {}
    for model_name in dict.fromkeys(r["model"] for r in rows):
        ours = {}
        for name in dict.fromkeys(r["optimizer"] for r in rows if r["model"] == model_name):
            runs = [r for r in rows if r["model"] == model_name and r["optimizer"] == name]
            ours[name] = {"median_accuracy": statistics.median(r["test_accuracy"] for r in runs),
                          "accuracies": [r["test_accuracy"] for r in runs],
                          "median_steps": statistics.median(r["steps"] for r in runs)}
        best = max(ours[b]["median_accuracy"] for b in BASELINES if b in ours)
        summary[model_name] = {"optimizers": ours, "best_baseline": best,
                               "goal_met": ours["TENGraD()"]["median_accuracy"] >= best}
    return summary


def markdown_table(report) -> str:
    lines = [f"{report['seconds_per_run']:.0f} training seconds per run (first step included), "
             f"batch {report.get('batch_size', 128)}, "
             f"median of {report['seeds']} seeds, {report['machine']['cpus']} CPUs, commit "
             f"{report['commit']}, {report['date']}", "",
             "| model | optimizer | median test accuracy | accuracies | median steps |",
             "|---|---|---|---|---|"]
    for model_name, entry in report["summary"].items():
        for name, o in entry["optimizers"].items():
            accs = ", ".join(f"{a:.4f}" for a in o["accuracies"])
            lines.append(f"| {model_name} | {name} | {o['median_accuracy']:.4f} | {accs} | "
                         f"{o['median_steps']:.0f} |")
    lines += ["", "| model | TENGraD() ≥ the better of Adam and SGD |", "|---|---|"]
    lines += [f"| {m} | {'met' if e['goal_met'] else 'not met'} "
              f"({e['optimizers']['TENGraD()']['median_accuracy']:.4f} vs "
              f"{e['best_baseline']:.4f}) |" for m, e in report["summary"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
