"""Train the TENGraD paper's models with TENGraD and its baselines, and log accuracy against time.

    python examples/train.py                        # TENGraD, SGD, Adam, K-FAC: 3C1F, Fashion-MNIST
    python examples/train.py --optimizer tengrad    # TENGraD alone
    python examples/train.py --paper --optimizer tengrad sgd adam
    python examples/train.py --dataset cifar10 --model vgg16_bn --optimizer tengrad sgd --epochs 5

What it is for: one `model.fit` per optimizer, the same model initialisation, data order and
hyperparameter presets (the paper's, `tengrad_tf.presets`) for each, so that the curves compare
like with like. Test loss and accuracy are measured every `--eval-every` steps and at every epoch
end, with the evaluation time excluded from the training clock (the paper's convention). The
summary prints one line per optimizer: the training seconds to `--target` test accuracy and the
final accuracy. Under `--out` (default `runs/<timestamp>`) it writes:

    config.json              the resolved configuration (preset < --paper < explicit flags)
    metrics.json             every logged row of every optimizer, plus per-run summaries
    <optimizer>/log.csv      the same rows for one optimizer
    <optimizer>/tb/          TensorBoard logs (unless --no-tensorboard)
    accuracy.png             test accuracy against training seconds, one line per optimizer
    curves.png               test accuracy and train/test loss against seconds and epochs

What it is not: not a hyperparameter search, no checkpoints or resuming, no multi-GPU
strategy, and no validation split (the paper reports test curves). Without `--paper` the
default scale is a small CPU demo (3C1F width 32, one epoch); `--paper` restores full width
and the paper's epochs. Explicit flags always win.

`main(argv)` runs everything in-process and returns the metrics dict (used by the tests).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.util
import inspect
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

# Runnable from a checkout without `pip install -e .`, like benchmarks/step_time.py.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tengrad_tf  # noqa: E402
from tengrad_tf import data, models, presets  # noqa: E402

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100")
# The main job compares these by default; `--optimizer tengrad` trains TENGraD alone.
DEFAULT_OPTIMIZERS = ("tengrad", "sgd", "adam", "kfac")
DEFAULT_TARGET = 0.85

# CLI flag dest -> optimizer hyperparameter name. --freq is how often the curvature inverse is
# recomputed: TENGraD's curvature_update_freq, K-FAC's inv_update_freq (its TInv).
HPARAM_FLAGS = {"lr": "learning_rate", "momentum": "momentum", "weight_decay": "weight_decay",
                "damping": "damping", "fisher": "fisher", "kl_clip": "kl_clip",
                "damping_metric": "damping_metric",
                "freq": ("curvature_update_freq", "inv_update_freq")}

LABELS = {"sgd": "SGD", "adam": "Adam", "kfac": "K-FAC", "tengrad": "TENGraD"}
LR_DECAY = 0.1
EVAL_BATCH_SIZE = 256  # evaluation is off the clock; a larger batch only makes it finish sooner


# ------------------------------------------------------------------------------------ CLI


def _kl_clip(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "0") else float(text)


def _milestones(text: str) -> list[int]:
    return [int(m) for m in text.split(",") if m.strip()]


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS as default: only flags the user typed appear in the namespace, so they can
    # override the preset while everything else comes from it.
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Outputs go under --out (printed at the end).",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Preset values (the paper's) apply unless a flag is given; see config.json.")
    p.add_argument("--dataset", choices=DATASETS, help="default: fashion_mnist")
    p.add_argument("--model", choices=sorted(models.MODELS),
                   help="default: the preset's (3c1f for (fashion_)mnist, vgg16_bn for CIFAR)")
    p.add_argument("--optimizer", nargs="+", choices=presets.OPTIMIZERS, metavar="OPT",
                   help=f"one or several of {', '.join(presets.OPTIMIZERS)} (kfac needs "
                        f"tengrad_tf.KFAC); default: {' '.join(DEFAULT_OPTIMIZERS)}, each on a "
                        "fresh model; `--optimizer tengrad` trains TENGraD alone")
    p.add_argument("--target", type=float,
                   help=f"test accuracy whose training time the summary reports per optimizer "
                        f"(default: {DEFAULT_TARGET})")
    p.add_argument("--preset", choices=["auto", "fashion_mnist", "cifar", "none"],
                   help="hyperparameter preset; auto (default) picks it from --dataset")
    p.add_argument("--paper", action="store_true",
                   help="paper scale: full model width and the paper's epochs (10 for "
                        "Fashion-MNIST, 60 for CIFAR); default is a small CPU demo")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="default: 1 (demo) or the paper's (--paper)")
    g.add_argument("--batch-size", type=int, help="default: 128")
    g.add_argument("--steps-per-epoch", type=int,
                   help="cap each epoch at this many steps (short runs); the data then repeats "
                        "across epochs instead of restarting")
    g.add_argument("--eval-every", type=int,
                   help="also evaluate the test set every N steps (default: epoch ends only)")
    g.add_argument("--milestones", type=_milestones,
                   help="comma-separated epochs where the learning rate is multiplied by 0.1 "
                        "(CIFAR preset: 30,50; empty string: constant)")
    g.add_argument("--seed", type=int, help="default: 0")
    g.add_argument("--train-split", help="TFDS split, e.g. 'train[:10%%]' (default: train)")
    g.add_argument("--test-split", help="TFDS split (default: test)")
    g.add_argument("--verbose", type=int, choices=[0, 1, 2],
                   help="fit verbosity; default 1 on a terminal, else 2")
    o = p.add_argument_group("optimizer hyperparameters (override the preset for every "
                             "selected optimizer that has them)")
    o.add_argument("--lr", type=float, help="learning rate")
    o.add_argument("--momentum", type=float)
    o.add_argument("--weight-decay", type=float, help="decoupled weight decay; 0 disables")
    o.add_argument("--damping", type=float, help="TENGraD/K-FAC damping")
    o.add_argument("--freq", type=int, help="steps between curvature inverses: TENGraD's "
                                            "curvature_update_freq, K-FAC's inv_update_freq")
    o.add_argument("--fisher", choices=["true", "empirical"])
    o.add_argument("--kl-clip", type=_kl_clip, help="KL clip kappa, or 'none'")
    o.add_argument("--damping-metric", choices=["auto", "identity", "inputs"],
                   help="TENGraD's damping_metric (default auto; docs/step.md)")
    m = p.add_argument_group("model size")
    m.add_argument("--width", type=int, help="3C1F conv channels (paper 128, demo 32)")
    m.add_argument("--hidden", type=int, help="3C1F dense units (paper 500)")
    m.add_argument("--width-multiplier", type=float,
                   help="channel multiplier of the CIFAR nets (paper 1.0, demo 0.25); for "
                        "densenet it scales the growth rate")
    io = p.add_argument_group("input/output")
    io.add_argument("--data-dir", help="TFDS data dir (default: $TENGRAD_DATA_DIR or "
                                       "~/tensorflow_datasets)")
    io.add_argument("--out", help="output folder (default: runs/<timestamp>)")
    io.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    return p


# ------------------------------------------------------------------------------ config


def _preset_name(requested: str, dataset: str) -> str:
    return presets.preset_for(dataset) if requested == "auto" else requested


def _hparam_overrides(cli: dict) -> dict[str, Any]:
    """The optimizer hyperparameters given as flags, under the optimizers' own names."""
    overrides: dict[str, Any] = {}
    for flag, keys in HPARAM_FLAGS.items():
        if flag in cli:
            overrides.update(dict.fromkeys(keys if isinstance(keys, tuple) else (keys,),
                                           cli[flag]))
    return overrides


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Merge defaults, the preset, --paper and explicit flags into one JSON-able dict."""
    cli = vars(args)
    dataset = cli.get("dataset", "fashion_mnist")
    preset_name = _preset_name(cli.get("preset", "auto"), dataset)
    preset = presets.PRESETS[preset_name]
    # Dedupe, keep order.
    optimizers = list(dict.fromkeys(cli.get("optimizer", DEFAULT_OPTIMIZERS)))
    if "kfac" in optimizers and not hasattr(tengrad_tf, "KFAC"):
        parser.error("--optimizer kfac: this tengrad_tf has no K-FAC baseline "
                     "(tengrad_tf.KFAC is missing); use tengrad, sgd or adam")
    scale = preset["paper" if cli.get("paper") else "demo"]
    cfg: dict[str, Any] = {
        "dataset": dataset, "model": preset["model"], "optimizers": optimizers,
        "preset": preset_name, "paper": bool(cli.get("paper")),
        "epochs": scale["epochs"], "batch_size": preset["batch_size"],
        "steps_per_epoch": None, "eval_every": None, "milestones": list(preset["milestones"]),
        "seed": 0, "train_split": "train", "test_split": "test",
        "data_dir": None, "out": None, "tensorboard": True, "verbose": None,
        "target": DEFAULT_TARGET,
    }
    for key in ("model", "epochs", "batch_size", "steps_per_epoch", "eval_every", "milestones",
                "seed", "train_split", "test_split", "data_dir", "out", "tensorboard", "verbose",
                "target"):
        if key in cli:
            cfg[key] = cli[key]
    cfg["model_kwargs"] = _model_kwargs(cfg["model"], scale, cli, parser)
    overrides = _hparam_overrides(cli)
    cfg["hparams"] = {name: presets.optimizer_hparams(name, preset_name, overrides)
                      for name in optimizers}
    cfg["overridden_by_cli"] = sorted(k for k in cli if k not in ("optimizer", "dataset"))
    _check_positive(cfg, parser)
    return cfg


def _model_kwargs(model: str, scale: dict, cli: dict,
                  parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Width knobs the chosen builder understands: width/hidden for 3C1F, a multiplier else."""
    if model == "3c1f":
        if "width_multiplier" in cli:
            parser.error("--width-multiplier applies to the CIFAR nets; use --width/--hidden "
                         "for 3c1f")
        return {"width": cli.get("width", scale["width"]),
                "hidden": cli.get("hidden", scale["hidden"])}
    if "width" in cli or "hidden" in cli:
        parser.error(f"--width/--hidden apply to 3c1f only; use --width-multiplier for {model}")
    multiplier = cli.get("width_multiplier", scale["width_multiplier"])
    params = inspect.signature(models.MODELS[model]).parameters
    if "width_multiplier" in params:
        return {"width_multiplier": multiplier}
    if "growth_rate" in params:  # DenseNet has no multiplier: scale its growth rate instead
        return {"growth_rate": max(1, round(params["growth_rate"].default * multiplier))}
    return {}


def _check_positive(cfg: dict, parser: argparse.ArgumentParser) -> None:
    for key in ("epochs", "batch_size", "steps_per_epoch", "eval_every"):
        if cfg[key] is not None and cfg[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not 0 < cfg["target"] <= 1:
        parser.error(f"--target is a test accuracy in (0, 1], got {cfg['target']}")


def _default_out() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, n = Path("runs") / stamp, 1
    while out.exists():  # two runs started in the same second
        out, n = Path("runs") / f"{stamp}-{n}", n + 1
    return out


# ------------------------------------------------------------------------------ training


Schedule = keras.optimizers.schedules.LearningRateSchedule


def learning_rate_for(lr: float, milestones: Sequence[int], epochs: int,
                      steps_per_epoch: int) -> float | Schedule:
    """Constant lr, or x0.1 at each milestone epoch (in steps) that falls inside the run."""
    bounds = [m * steps_per_epoch for m in sorted(milestones) if 0 < m < epochs]
    if not bounds:
        return lr
    values = [lr * LR_DECAY**i for i in range(len(bounds) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, values)


def _current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    # float32 variable: 7 significant digits, so 0.003 is not logged as 0.0030000000260...
    return float(f"{_value(optimizer.learning_rate):.7g}")


def _value(x: Any) -> Any:
    # Keras variables and eager tensors both have .numpy(); keras.ops.convert_to_numpy on a
    # Keras variable raises NumPy 2's __array__(copy=...) DeprecationWarning (Keras 3.15).
    return x.numpy() if hasattr(x, "numpy") else x


@contextlib.contextmanager
def preserved_metric_state(model: keras.Model) -> Iterator[None]:
    """`evaluate` resets the compiled metrics, which `fit` is still averaging over the epoch.

    Restoring them keeps the epoch's train loss/accuracy what it would be without evaluation.
    """
    variables = [v for m in model.metrics for v in m.variables]
    saved = [v.numpy() for v in variables]
    try:
        yield
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)


class TrainingLog(keras.callbacks.Callback):
    """Logs train/test loss and test accuracy against a training clock that excludes evaluation.

    Rows are written at step 0 (before training), every `eval_every` steps and at every epoch
    end. `train_loss`/`train_accuracy` are Keras's running means over the current epoch.
    """

    FIELDS = ("step", "epoch", "train_seconds", "train_loss", "train_accuracy", "test_loss",
              "test_accuracy", "learning_rate", "event")

    def __init__(self, test_ds, steps_per_epoch: int, eval_every: int | None,
                 csv_path: Path, on_first_epoch=None, tb_dir: Path | None = None):
        super().__init__()
        self.tb_dir = tb_dir
        self._writer = None
        self.test_ds = test_ds
        self.steps_per_epoch = steps_per_epoch
        self.eval_every = eval_every
        self.csv_path = csv_path
        self.on_first_epoch = on_first_epoch
        self.rows: list[dict[str, Any]] = []
        self.first_step_seconds: float | None = None
        self.eval_seconds = 0.0
        self._step = 0
        self._first_epoch_done = False

    # -- the clock ---------------------------------------------------------------------
    def train_seconds(self) -> float:
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def _clock_paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - t0

    # -- keras hooks -------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writeheader()
        if self.tb_dir is not None:
            # Keras's TensorBoard callback logs per epoch only; the --eval-every rows go here.
            self._writer = tf.summary.create_file_writer(str(self.tb_dir / "eval"))
        self._start, self._paused = time.perf_counter(), 0.0
        self._record({}, "init")

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step == 1:
            # Includes tracing the train step: reported apart so it can be judged separately.
            self.first_step_seconds = self.train_seconds()
        epoch_end = self._step % self.steps_per_epoch == 0  # on_epoch_end records that one
        if self.eval_every and self._step % self.eval_every == 0 and not epoch_end:
            self._record(logs or {}, "step")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        self._record(logs, "epoch")
        last = self.rows[-1]
        # Shown by the progress bar and logged by TensorBoard, which run after this callback.
        logs["test_loss"], logs["test_accuracy"] = last["test_loss"], last["test_accuracy"]
        # Printed at the next hook, so that it comes after the progress bar's epoch line.
        self._first_epoch_done = epoch == 0

    def on_epoch_begin(self, epoch, logs=None):
        self._after_first_epoch()

    def on_train_end(self, logs=None):
        self._after_first_epoch()

    def _after_first_epoch(self) -> None:
        if self._first_epoch_done and self.on_first_epoch is not None:
            self._first_epoch_done = False
            with self._clock_paused():
                self.on_first_epoch()

    # -- rows --------------------------------------------------------------------------
    def _record(self, logs: dict, event: str) -> None:
        # Read the clock first: everything below (evaluation, I/O) is off the clock.
        seconds = self.train_seconds()
        with self._clock_paused():
            t0 = time.perf_counter()
            test = self._evaluate()
            self.eval_seconds += time.perf_counter() - t0
            row = {
                "step": self._step, "epoch": self._step / self.steps_per_epoch,
                "train_seconds": seconds, "train_loss": _maybe_float(logs.get("loss")),
                "train_accuracy": _maybe_float(logs.get("accuracy")),
                "test_loss": test[0], "test_accuracy": test[1],
                "learning_rate": _current_lr(self.model.optimizer), "event": event,
            }
            self.rows.append(row)
            self._append_csv(row)
            self._append_tensorboard(row)

    def _evaluate(self) -> tuple[float, float]:
        with preserved_metric_state(self.model):
            result = self.model.evaluate(self.test_ds, verbose=0, return_dict=True)
        return float(result["loss"]), float(result["accuracy"])

    def _append_tensorboard(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=row["step"]):
            for key in ("test_loss", "test_accuracy", "train_seconds"):
                tf.summary.scalar(key, row[key])
        self._writer.flush()

    def _append_csv(self, row: dict[str, Any]) -> None:
        # Appended row by row so that a long run's log is readable while it runs.
        with self.csv_path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)


def _maybe_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _fit_verbosity(cfg: dict) -> int:
    if cfg["verbose"] is not None:
        return cfg["verbose"]
    return 1 if sys.stdout.isatty() else 2


def load_data(cfg: dict) -> tuple[Any, int]:
    """Test pipeline and training example count; raises DataUnavailableError early."""
    n_train = data.num_examples(cfg["dataset"], cfg["train_split"], cfg["data_dir"])
    test_ds = data.load(cfg["dataset"], cfg["test_split"], EVAL_BATCH_SIZE,
                        data_dir=cfg["data_dir"], shuffle=False)
    return test_ds, n_train


def train_one(name: str, cfg: dict, test_ds, steps_per_epoch: int, out: Path) -> dict[str, Any]:
    """Fresh model (same seed for every optimizer), fit, and the run's log and summary."""
    spec = data.info(cfg["dataset"])
    keras.utils.set_random_seed(cfg["seed"])  # same initial weights for every optimizer
    # A fresh pipeline per optimizer: the same seed then gives every optimizer the same order.
    # Full batches only: every step's Fisher then has the same m, and the batch dimension is
    # static, which lets TENGraD size its Gram chunks at trace time (with a dynamic batch its
    # peak memory on 3C1F width 32 was 3.4 GB instead of 1.1 GB).
    train_ds = data.load(cfg["dataset"], cfg["train_split"], cfg["batch_size"],
                         data_dir=cfg["data_dir"], seed=cfg["seed"], drop_remainder=True)
    if cfg["steps_per_epoch"]:
        train_ds = train_ds.repeat()  # capped epochs continue through the data
    model = models.build_model(cfg["model"], spec.input_shape, spec.num_classes,
                               **cfg["model_kwargs"])
    hp = cfg["hparams"][name]
    lr = learning_rate_for(hp["learning_rate"], cfg["milestones"], cfg["epochs"], steps_per_epoch)
    optimizer = presets.make_optimizer(name, hp, lr, cfg["seed"])  # before compile: capture
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    run_dir = out / name
    summary = None
    if hasattr(optimizer, "summary"):  # TENGraD/K-FAC: which variables are preconditioned
        summary = lambda: _print_treatments(name, optimizer)  # noqa: E731
    log = TrainingLog(test_ds, steps_per_epoch, cfg["eval_every"], run_dir / "log.csv", summary,
                      tb_dir=run_dir / "tb" if cfg["tensorboard"] else None)
    callbacks: list[keras.callbacks.Callback] = [log]
    if cfg["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tb"), write_graph=False))
    print(f"\n=== {name}: {cfg['model']} on {cfg['dataset']}, {model.count_params():,} parameters, "
          f"{cfg['epochs']} epoch(s) x {steps_per_epoch} steps", flush=True)
    wall0 = time.perf_counter()
    # shuffle=False: the pipeline already shuffles (Keras would warn and ignore it anyway).
    model.fit(train_ds, epochs=cfg["epochs"], steps_per_epoch=cfg["steps_per_epoch"],
              callbacks=callbacks, verbose=_fit_verbosity(cfg), shuffle=False)
    return _run_summary(name, model, optimizer, log, time.perf_counter() - wall0, cfg["target"])


def _print_treatments(name: str, optimizer) -> None:
    print(f"\n{name}: how each variable is updated (optimizer.summary()):", flush=True)
    optimizer.summary()


def first_reaching(rows: list[dict], target: float) -> dict | None:
    """The first logged row whose test accuracy is >= target, or None."""
    return next((r for r in rows if r["test_accuracy"] >= target), None)


def _run_summary(name: str, model: keras.Model, optimizer, log: TrainingLog,
                 wall_seconds: float, target: float) -> dict[str, Any]:
    final = log.rows[-1]
    reached = first_reaching(log.rows, target)
    summary = {
        "optimizer": name, "rows": log.rows, "final": final,
        "target": {"test_accuracy": target, "reached": reached is not None,
                   **({k: reached[k] for k in ("train_seconds", "step", "epoch")}
                      if reached else {})},
        "train_seconds": final["train_seconds"], "first_step_seconds": log.first_step_seconds,
        "eval_seconds": log.eval_seconds, "wall_seconds": wall_seconds,
        "parameters": model.count_params(), "optimizer_config": _jsonable(optimizer.get_config()),
    }
    for counter in ("skipped_steps", "damping_retries"):  # TENGraD/K-FAC diagnostics
        if hasattr(optimizer, counter):
            summary[counter] = int(_value(getattr(optimizer, counter)))
    if hasattr(optimizer, "treatments"):
        summary["treatments"] = optimizer.treatments()
    return summary


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------ outputs


def plot_curves(runs: dict[str, dict], path: Path, title: str) -> None:
    """2x2: test accuracy and train/test loss, against training seconds and against epochs."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed (and none on servers)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col")
    for i, (name, run) in enumerate(runs.items()):
        color = f"C{i}"
        rows = run["rows"]
        for col, x_key in enumerate(("train_seconds", "epoch")):
            x = [r[x_key] for r in rows]
            axes[0, col].plot(x, [r["test_accuracy"] for r in rows], color=color,
                              marker=".", label=name)
            axes[1, col].plot(x, [r["test_loss"] for r in rows], color=color, marker=".",
                              label=f"{name} test")
            trained = [r for r in rows if r["train_loss"] is not None]
            axes[1, col].plot([r[x_key] for r in trained], [r["train_loss"] for r in trained],
                              color=color, linestyle="--", label=f"{name} train")
    for col, xlabel in enumerate(("training seconds (evaluation excluded)", "epoch")):
        axes[0, col].set_ylabel("test accuracy")
        axes[1, col].set_ylabel("loss")
        axes[1, col].set_xlabel(xlabel)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(runs: dict[str, dict], path: Path, title: str, target: float) -> None:
    """The story in one plot: test accuracy against training seconds, one line per optimizer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, run) in enumerate(runs.items()):
        rows = run["rows"]
        ax.plot([r["train_seconds"] for r in rows], [r["test_accuracy"] for r in rows],
                color=f"C{i}", marker=".", label=LABELS.get(name, name))
    ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    accuracies = [r["test_accuracy"] for run in runs.values() for r in run["rows"][1:]]
    # From a little below the worst trained accuracy: step 0 (chance) would flatten the curves.
    ax.set_ylim(max(0.0, min(accuracies + [target]) - 0.05), 1.0)
    ax.set_xlabel("training seconds (evaluation excluded, first step included)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(cfg: dict, runs: dict[str, dict], out: Path) -> dict[str, Any]:
    metrics = {"config": cfg, "runs": runs}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    title = (f"{cfg['model']} on {cfg['dataset']}, batch {cfg['batch_size']} "
             f"({'paper scale' if cfg['paper'] else 'demo scale'})")
    plot_accuracy(runs, out / "accuracy.png", title, cfg["target"])
    plot_curves(runs, out / "curves.png", title)
    return metrics


def print_report(runs: dict[str, dict], out: Path) -> None:
    """One line per optimizer (time to the target and final accuracy), then where files went."""
    print("\nsummary (training seconds exclude evaluation and include the first step, which "
          "traces the graph):")
    width = max(len(LABELS.get(name, name)) for name in runs)
    for name, run in runs.items():
        target, final = run["target"], run["final"]
        if target["reached"]:
            # Also without the first step: it traces the graph, a one-off cost that differs
            # between optimizers and varies with the machine's load.
            after_first = target["train_seconds"] - run["first_step_seconds"]
            reached = (f"{target['test_accuracy']:.0%} after {target['train_seconds']:5.1f} s "
                       f"({after_first:5.1f} s after the first step, step {target['step']})")
        else:
            reached = f"{target['test_accuracy']:.0%} not reached"
        print(f"  {LABELS.get(name, name):{width}s}  {reached:48s}  final test accuracy "
              f"{final['test_accuracy']:.4f} after {run['train_seconds']:.1f} s, {final['step']} "
              f"steps (first step {run['first_step_seconds']:.1f} s; evaluation "
              f"{run['eval_seconds']:.1f} s off the clock)")
    for name in runs:
        print(f"log CSV ({name}): {out / name / 'log.csv'}")
    print(f"metrics JSON: {out / 'metrics.json'}")
    print(f"config: {out / 'config.json'}")
    print(f"accuracy against time: {out / 'accuracy.png'}")
    print(f"curves: {out / 'curves.png'}")
    print(f"results in {out}")


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse `argv`, train every optimizer, write the outputs and return the metrics dict.

    Raises `data.DataUnavailableError` when the dataset cannot be found or downloaded.
    """
    parser = build_parser()
    cfg = resolve_config(parser.parse_args(argv), parser)
    # Data first: a missing dataset should fail before any output folder is created.
    test_ds, n_train = load_data(cfg)
    if n_train < cfg["batch_size"]:
        raise SystemExit(f"error: {cfg['train_split']} has {n_train} examples, fewer than one "
                         f"batch of {cfg['batch_size']}")
    steps_per_epoch = cfg["steps_per_epoch"] or n_train // cfg["batch_size"]  # full batches
    out = Path(cfg["out"]) if cfg["out"] else _default_out()
    cfg["out"] = str(out)
    cfg["train_examples"] = n_train
    cfg["steps_per_epoch_effective"] = steps_per_epoch
    if cfg["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        # TF 2.21 no longer pulls TensorBoard in, and tf.summary fails without it.
        print("note: the tensorboard package is not installed; no TensorBoard logs "
              "(`pip install tensorboard`, or pass --no-tensorboard to silence this)")
        cfg["tensorboard"] = False
    out.mkdir(parents=True, exist_ok=True)
    print("config:\n" + json.dumps(cfg, indent=1), flush=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))

    runs = {name: train_one(name, cfg, test_ds, steps_per_epoch, out)
            for name in cfg["optimizers"]}
    metrics = write_outputs(cfg, runs, out)
    print_report(runs, out)
    return metrics


def cli(argv: Sequence[str] | None = None) -> int:
    try:
        main(argv)
    except data.DataUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
