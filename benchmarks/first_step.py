"""The first step of `fit`: how long each optimizer's first training step takes (tracing, graph
optimization and the step itself), on the defaults study's models and the headline 3C1F.

The first step is what a user waits for before anything trains, and in a short run it is a real
share of the wall clock (docs/step.md). It is measured as `fit` sees it, from the first batch's
begin to its end (the data pipeline is warmed beforehand by a throwaway run, so it is not
counted). Optimizers run interleaved within each repetition, in one process, with a garbage
collection between runs, off the clock (docs/performance.md, "The first step").

    python benchmarks/first_step.py                       # the committed result
    python benchmarks/first_step.py --models 3c1f --reps 5

Models: `3c1f` is the cpu configuration of the time-to-accuracy benchmark (width 16, Dense 128);
mlp, cnn, textcnn and transformer are the defaults study's (benchmarks/defaults.py). Writes
first_step.json (and .md) under --out; the goal it checks (issue "Wall clock where the paper
claims it"): TENGraD()'s first step ≤ 1.2× SGD's on 3C1F. Beside the seconds, each row has the
graph nodes of the step (`graph_nodes`), which do not depend on the machine's load.
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
from benchmarks import defaults  # noqa: E402
from benchmarks.common import RESULTS, git_commit, report_header, write_report  # noqa: E402
from tengrad_tf import KFAC, TENGraD, models  # noqa: E402

MODELS = ("3c1f", *defaults.MODELS)
OPTIMIZERS = {
    "SGD(0.03, 0.9)": lambda: keras.optimizers.SGD(0.03, momentum=0.9),
    "Adam(1e-3)": lambda: keras.optimizers.Adam(1e-3),
    "TENGraD()": TENGraD,
    "TENGraD(adaptive_damping=False)": lambda: TENGraD(adaptive_damping=False),
    "KFAC()": KFAC,
}
GOAL_MODEL, GOAL_RATIO = "3c1f", 1.2


class FirstBatch(keras.callbacks.Callback):
    """The first training batch's seconds, then stop."""

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds = time.perf_counter() - self._start
        self.model.stop_training = True


def build(model_name):
    if model_name == "3c1f":
        return models.build_model("3c1f", (28, 28, 1), 10, width=16, hidden=128)
    return defaults.build(model_name)


def first_step(model_name, make, train) -> float:
    gc.collect()  # earlier runs' graphs, collected off the clock
    model = build(model_name)
    model.compile(optimizer=make(), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = FirstBatch()
    model.fit(train, epochs=1, steps_per_epoch=2, verbose=0, callbacks=[timer])
    return timer.seconds


def graph_nodes(model_name, make, train) -> int:
    """Nodes of a train step (forward pass, loss, apply_gradients) traced with a dynamic batch,
    the functions it calls (tf.cond branches, loops, shared functions) counted once each: what
    the first step traces and grappler optimizes, free of the machine's noise."""
    model = build(model_name)
    optimizer = make()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    graph_def = step.get_concrete_function(*train.element_spec).graph.as_graph_def()
    return len(graph_def.node) + sum(len(f.node_def) for f in graph_def.library.function)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    commit = git_commit()
    rows = []
    for model_name in args.models:
        train, _ = defaults.datasets("mlp" if model_name == "3c1f" else model_name, args.data_dir)
        first_step(model_name, OPTIMIZERS["SGD(0.03, 0.9)"], train)  # warms the input pipeline
        for rep in range(args.reps):
            for name in args.optimizers:
                seconds = first_step(model_name, OPTIMIZERS[name], train)
                rows.append({"model": model_name, "optimizer": name, "rep": rep,
                             "seconds": seconds})
                print(f"{model_name:11s} rep {rep} {name:33s} {seconds:.2f} s", flush=True)
        for name in args.optimizers:
            nodes = graph_nodes(model_name, OPTIMIZERS[name], train)
            for row in rows:
                if row["model"] == model_name and row["optimizer"] == name:
                    row["graph_nodes"] = nodes
    report = report_header("first_step", argv, commit)
    report.update(reps=args.reps, results=rows, summary=summarize(rows))
    write_report(args.out, report, markdown_table)
    return report


def summarize(rows) -> dict:
    """Per model: each optimizer's median first step, and its ratio to SGD's (if measured)."""
    summary = {}
    for model_name in dict.fromkeys(r["model"] for r in rows):
        medians = {name: statistics.median(r["seconds"] for r in rows
                                           if r["model"] == model_name and r["optimizer"] == name)
                   for name in dict.fromkeys(r["optimizer"] for r in rows)}
        nodes = {r["optimizer"]: r.get("graph_nodes") for r in rows if r["model"] == model_name}
        sgd = medians.get("SGD(0.03, 0.9)")
        summary[model_name] = {name: {"median_seconds": s, "graph_nodes": nodes[name],
                                      "vs_sgd": None if sgd is None else s / sgd}
                               for name, s in medians.items()}
    goal = summary.get(GOAL_MODEL, {}).get("TENGraD()", {}).get("vs_sgd")
    if goal is not None:
        summary["goal"] = {"model": GOAL_MODEL, "tengrad_vs_sgd": goal,
                           "max_ratio": GOAL_RATIO, "met": goal <= GOAL_RATIO}
    return summary


def markdown_table(report) -> str:
    lines = [f"First `fit` step, median of {report['reps']} interleaved repetitions, "
             f"{report['machine']['cpus']} CPUs, commit {report['commit']}, {report['date']}", "",
             "| model | optimizer | first step (s) | × SGD | graph nodes |",
             "|---|---|---|---|---|"]
    for model_name, entry in report["summary"].items():
        if model_name == "goal":
            continue
        for name, o in entry.items():
            ratio = "" if o["vs_sgd"] is None else f"{o['vs_sgd']:.2f}"
            nodes = "" if o.get("graph_nodes") is None else f"{o['graph_nodes']:,}"
            lines.append(f"| {model_name} | {name} | {o['median_seconds']:.2f} | {ratio} "
                         f"| {nodes} |")
    goal = report["summary"].get("goal")
    if goal:
        lines += ["", f"Goal: TENGraD()'s first step ≤ {goal['max_ratio']}× SGD's on "
                      f"{goal['model']}: **{'met' if goal['met'] else 'not met'}** "
                      f"({goal['tengrad_vs_sgd']:.2f}×)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
