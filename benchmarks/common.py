"""What the benchmark scripts share: the header every result records, the writers, the optimizer
names the step benchmarks use, and their models on a repeated synthetic batch.

    report = report_header("step_time", argv)       # date, commit, machine, versions, command
    report["results"] = [...]
    write_report(RESULTS, report, markdown_table)    # step_time.json, step_time.md, printed

Optimizer names (`make_optimizer`): "sgd", "adam", "kfac-<fisher>[-eigh|-cholesky]" (K-FAC's
inverse method, eigh by default), and
"tengrad-<fisher>[-f<freq>][-b<MiB>][-fixed][-jit][-metric|-identity]": TENGraD with that Fisher,
curvature every <freq> steps (default 1, the costliest), a memory_budget of <MiB> MiB, a fixed
damping with -fixed, the m × m factorization and solves compiled by XLA (jit_solve=True) with -jit,
damping_metric="inputs" with -metric and "identity" (λI, the paper's damping) with -identity;
without either, the default ("auto").
"""

from __future__ import annotations

import ast
import datetime
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tengrad_tf import KFAC, TENGraD, models  # noqa: E402
from tengrad_tf.kfac import INVERSE_METHODS  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BATCH = 128
STEP_MODELS = ["mlp", "3c1f", "3c1f_w32", "mobilenet_v2", "transformer", "text_cnn"]
VOCABULARY, LENGTH = 20000, 64


# ------------------------------------------------------------------------------ the header


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["kl_clip=1e-3", "fisher=empirical"] -> {"kl_clip": 0.001, "fisher": "empirical"}: values
    are Python literals, or strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def accepted_hparams(name: str) -> set[str]:
    """What tengrad_tf.presets.make_optimizer passes on to optimizer `name` (a presets name)."""
    if name in ("sgd", "adam"):
        return {"weight_decay"} | ({"momentum"} if name == "sgd" else set())
    cls = TENGraD if name == "tengrad" else KFAC
    return set(inspect.signature(cls.__init__).parameters) - {"self", "learning_rate"}


def git_commit() -> str:
    """HEAD's short hash. Call it when a run starts: the code measured, not HEAD at its end."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def uncommitted_changes() -> list[str] | None:
    """`git status --porcelain` lines of the code a result depends on (the library, the examples
    and the benchmarks, not their results); None without git."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "tengrad_tf", "examples",
                              "benchmarks", ":(exclude)benchmarks/results"],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")]}


def report_header(benchmark: str, argv: list[str] | None, commit: str | None = None
                  ) -> dict[str, Any]:
    """What every committed result records: date, commit (and what was uncommitted), machine,
    versions and the command. `commit`: the one read when the run started, if it ran long."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or git_commit(),
        "uncommitted_changes": uncommitted_changes(),
        "machine": machine(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "command": " ".join([f"benchmarks/{benchmark}.py"]
                            + (sys.argv[1:] if argv is None else list(argv))),
    }


# ------------------------------------------------------------------------------ the writers


def write_json(report: dict, path: Path) -> None:
    """Through a temporary file: a long run rewrites it often, and never leaves half a JSON."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def write_report(out: str | Path, report: dict, table: Callable[[dict], str]) -> Path:
    """<benchmark>.json and its Markdown table under `out`; prints the table and the path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['benchmark']}.json"
    write_json(report, path)
    markdown = table(report)
    (out / f"{report['benchmark']}.md").write_text(markdown)
    print(markdown)
    print(f"results written to {path}")
    return path


# ------------------------------------------------------------------------------ optimizers


def time_interleaved(functions: dict[str, Callable], repeats: int,
                     argument: Callable[[int], Any]) -> dict[str, list[float]]:
    """Seconds of each call of each (already traced) function, `repeats` rounds with the functions
    interleaved in each, so that machine noise hits them alike; round i calls fn(argument(i)) and
    waits for the tensor it returns."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for i in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn(argument(i)).numpy()
            times[name].append(time.perf_counter() - start)
    return times


def make_optimizer(name: str) -> keras.optimizers.Optimizer:
    """The optimizer a step benchmark names (see the module docstring). TENGraD and K-FAC take the
    paper's lr 0.003 and damping 0.1: the rate does not change a step's cost."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam()
    kind, fisher, *options = name.split("-")
    if kind == "kfac":
        # Its own schedule: factors every 20 steps, inverses every 100 (and both on the first).
        if options and (len(options) > 1 or options[0] not in INVERSE_METHODS):
            raise ValueError(f"unknown options {options} in optimizer {name!r}: expected one "
                             f"inverse method of {INVERSE_METHODS}")
        return KFAC(learning_rate=0.003, damping=0.1, fisher=fisher,
                    inverse_method=options[0] if options else "eigh")
    if kind != "tengrad":
        raise ValueError(f"unknown optimizer {name!r}")
    kwargs: dict[str, Any] = {"curvature_update_freq": 1}
    for option in options:
        if option == "fixed":
            kwargs["adaptive_damping"] = False
        elif option == "jit":
            kwargs["jit_solve"] = True
        elif option == "metric":
            kwargs["damping_metric"] = "inputs"
        elif option == "identity":
            kwargs["damping_metric"] = "identity"
        elif option[0] == "f":
            kwargs["curvature_update_freq"] = int(option[1:])
        elif option[0] == "b":
            kwargs["memory_budget"] = int(option[1:]) * 2**20
        else:
            raise ValueError(f"unknown option {option!r} in optimizer {name!r}")
    return TENGraD(learning_rate=0.003, damping=0.1, fisher=fisher, **kwargs)


# ------------------------------------------------------------------------------ models


def build(model_name: str) -> tuple[keras.Model, tuple]:
    """A step benchmark's model and its input shape (batch 128, 10 classes, logits):

    mlp           784-512-256-10
    3c1f          the paper's Fashion-MNIST CNN: 3 × [Conv 3×3, 128, 'same', ReLU], MaxPool 3,
                  Dense 500, 10
    3c1f_w32      the same at width 32 (issue #13's step time at freq 1)
    mobilenet_v2  keras.applications.MobileNetV2(alpha=0.35), 32×32×3: Conv2D, DepthwiseConv2D
                  and BatchNormalization blocks
    transformer   tengrad_tf.models.transformer_classifier: a 20k-token Embedding and positions
                  (64 × 64), one MultiHeadAttention block (4 heads) with LayerNormalization and
                  a Dense FFN (128), pooling
    text_cnn      tengrad_tf.models.text_cnn: the same Embedding (20k × 64), Conv1D(128, 5)
                  over the 64 tokens, max-pooling
    """
    if model_name == "mlp":
        model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(512, activation="relu"),
                                  keras.layers.Dense(256, activation="relu"), keras.layers.Dense(10)])
        return model, (784,)
    if model_name in ("3c1f", "3c1f_w32"):
        width = 128 if model_name == "3c1f" else 32
        layers = [keras.Input((28, 28, 1))]
        layers += [keras.layers.Conv2D(width, 3, padding="same", activation="relu")
                   for _ in range(3)]
        layers += [keras.layers.MaxPooling2D(3), keras.layers.Flatten(),
                   keras.layers.Dense(500, activation="relu"), keras.layers.Dense(10)]
        return keras.Sequential(layers), (28, 28, 1)
    if model_name == "mobilenet_v2":
        return keras.applications.MobileNetV2(alpha=0.35, input_shape=(32, 32, 3), weights=None,
                                              classes=10, classifier_activation=None), (32, 32, 3)
    if model_name == "transformer":
        return models.transformer_classifier(VOCABULARY, LENGTH, num_classes=10), (LENGTH,)
    if model_name == "text_cnn":
        return models.text_cnn(VOCABULARY, LENGTH, num_classes=10), (LENGTH,)
    raise ValueError(f"unknown model {model_name!r}")


def inputs(model_name: str, shape: tuple, rng: np.random.Generator,
           batch: int = BATCH) -> np.ndarray:
    """A synthetic batch for the model: token ids for the text models, normal noise otherwise
    (the data does not change a step's cost)."""
    if model_name in ("transformer", "text_cnn"):
        return rng.integers(0, VOCABULARY, size=(batch, *shape))
    return rng.normal(size=(batch, *shape)).astype("float32")


class StepTimer(keras.callbacks.Callback):
    """Seconds of every training step `fit` runs."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._t)


class Runner:
    """One compiled model on a repeated synthetic batch, kept across rounds (compiled and traced
    once), so that configurations can be timed interleaved. `optimizer`: a name for
    `make_optimizer`, or an optimizer."""

    def __init__(self, model_name: str, optimizer: str | keras.optimizers.Optimizer,
                 jit: bool = False):
        keras.utils.set_random_seed(0)
        self.model, shape = build(model_name)
        if isinstance(optimizer, str):
            optimizer = make_optimizer(optimizer)
        self.model.compile(optimizer=optimizer, jit_compile=jit,
                           loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = inputs(model_name, shape, rng)
        y = rng.integers(0, 10, size=BATCH)
        self.data = tf.data.Dataset.from_tensors((x, y)).repeat()

    def run(self, steps: int) -> list[float]:
        """Seconds of each of `steps` more steps.

        Python's cyclic garbage collector is run before them, off the clock, and held off during
        them: a full collection of the graphs of the configurations traced so far (Keras keeps
        each alive until one) takes seconds and would land in whichever step triggered it."""
        timer = StepTimer()
        gc.collect()
        gc.disable()
        try:
            self.model.fit(self.data, steps_per_epoch=steps, epochs=1, verbose=0,
                           callbacks=[timer])
        finally:
            gc.enable()
        return timer.times
