"""Lagged curvature: is a step better preconditioned by its own batch's Fisher or by the previous
update's? Equal steps, so equal cost: the two differ only in which cached curvature a curvature
update's step takes (TENGraD(lagged_curvature=...), docs/step.md, "Lagged curvature").

The models and data of the defaults study (benchmarks/defaults.py: an MLP and 3C1F on
Fashion-MNIST, a text CNN and a Transformer on the synthetic sequence task), TENGraD at its
defaults but for `curvature_update_freq` and `lagged_curvature`. Every run trains the same
initialization on the same batches for `--steps` steps (per model), in `--chunks` epochs, and
records the mean training loss of the last epoch and the test accuracy at the end.

    python benchmarks/lagged_curvature.py
    python benchmarks/lagged_curvature.py --models mlp --freqs 1 --seeds 1    # quick look

Writes lagged_curvature.json (and .md) under --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.common import RESULTS, git_commit, report_header, write_report  # noqa: E402
from benchmarks.defaults import build, datasets  # noqa: E402
from tengrad_tf import TENGraD  # noqa: E402

STEPS = {"mlp": 3000, "cnn": 400, "textcnn": 600, "transformer": 300}
LAGS = {"own batch": False, "lagged": True}


def run(model_name, freq, lagged, steps, chunks, train, test, seed):
    gc.collect()
    keras.utils.set_random_seed(seed)
    model = build(model_name)
    model.compile(optimizer=TENGraD(curvature_update_freq=freq, lagged_curvature=lagged),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(train, epochs=chunks, steps_per_epoch=steps // chunks, verbose=0)
    loss, accuracy = model.evaluate(test, verbose=0)
    return {"train_loss_last_epoch": float(history.history["loss"][-1]),
            "train_losses": [float(v) for v in history.history["loss"]],
            "test_accuracy": float(accuracy), "test_loss": float(loss)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(STEPS), choices=list(STEPS))
    parser.add_argument("--freqs", nargs="+", type=int, default=[1, 10, 100])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default: per model, %s)" % STEPS)
    parser.add_argument("--chunks", type=int, default=10, help="epochs the steps are split into")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    rows = []
    for model_name in args.models:
        train, test = datasets(model_name, args.data_dir)
        steps = args.steps or STEPS[model_name]
        for seed in range(args.seeds):
            for freq in args.freqs:
                for label, lagged in LAGS.items():
                    result = run(model_name, freq, lagged, steps, args.chunks, train, test, seed)
                    rows.append({"model": model_name, "freq": freq, "curvature": label,
                                 "seed": seed, "steps": steps, **result})
                    print(f"{model_name:11s} seed {seed} freq {freq:3d} {label:9s} loss "
                          f"{result['train_loss_last_epoch']:.4f} acc "
                          f"{result['test_accuracy']:.4f}", flush=True)
    report = report_header("lagged_curvature", argv, commit)
    report.update(seeds=args.seeds, chunks=args.chunks, results=rows, summary=summarize(rows))
    write_report(args.out, report, markdown_table)
    return report


def summarize(rows) -> list[dict]:
    """Per model and freq: each curvature's median last-epoch training loss and test accuracy."""
    out = []
    for key in dict.fromkeys((r["model"], r["freq"]) for r in rows):
        entry = {"model": key[0], "freq": key[1]}
        for label in LAGS:
            runs = [r for r in rows if (r["model"], r["freq"]) == key and r["curvature"] == label]
            if runs:
                entry[label] = {
                    "median_train_loss": statistics.median(r["train_loss_last_epoch"]
                                                           for r in runs),
                    "median_test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
                    "steps": runs[0]["steps"]}
        out.append(entry)
    return out


def markdown_table(report) -> str:
    lines = [f"Median of {report['seeds']} seeds, equal steps, TENGraD() but for the frequency, "
             f"{report['machine']['cpus']} CPUs, commit {report['commit']}, {report['date']}", "",
             "| model | freq | steps | train loss, own batch | train loss, lagged | "
             "test acc, own batch | test acc, lagged |", "|---|---|---|---|---|---|---|"]
    for e in report["summary"]:
        own, lag = e.get("own batch"), e.get("lagged")
        if own is None or lag is None:
            continue
        lines.append(f"| {e['model']} | {e['freq']} | {own['steps']} | "
                     f"{own['median_train_loss']:.4f} | {lag['median_train_loss']:.4f} | "
                     f"{own['median_test_accuracy']:.4f} | {lag['median_test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
