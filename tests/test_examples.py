"""Tests for examples/train.py (the main job): one tiny end-to-end run on real Fashion-MNIST, plus
its parts.

The end-to-end test prepares Fashion-MNIST offline from Debian's files into a temporary TFDS
data dir (skipped when they are absent) and trains 3C1F (width 4) with TENGraD and SGD for two
5-step epochs. The other tests need no data.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import keras
import numpy as np
import pytest

import tengrad_tf
from examples import train
from tengrad_tf import data

DEBIAN_DIR = Path(os.environ.get(data.ENV_FASHION_MNIST_DEBIAN_DIR)
                  or data.DEBIAN_FASHION_MNIST_DIR)
HAVE_FASHION_MNIST = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()


def _config(*argv: str) -> dict:
    parser = train.build_parser()
    return train.resolve_config(parser.parse_args(list(argv)), parser)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not HAVE_FASHION_MNIST:
        pytest.skip(f"Fashion-MNIST Debian files not found in {DEBIAN_DIR}: "
                    "`apt-get install -y dataset-fashion-mnist`")
    root = tmp_path_factory.mktemp("train_py")
    out = root / "out"
    argv = ["--dataset", "fashion_mnist", "--model", "3c1f", "--width", "4", "--hidden", "16",
            "--optimizer", "tengrad", "sgd", "--target", "0.3", "--steps-per-epoch", "5",
            "--epochs", "2",
            "--eval-every", "3", "--data-dir", str(root / "data"), "--out", str(out),
            "--train-split", "train[:2%]", "--test-split", "test[:5%]", "--verbose", "2"]
    metrics = train.main(argv)
    return out, metrics


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", ["tengrad", "sgd"])
def test_csv_log_is_sane(tiny_run, name):
    out, _ = tiny_run
    rows = _read_csv(out / name / "log.csv")
    # Step 0 before training, every 3 steps, and both epoch ends (steps 5 and 10).
    assert [int(r["step"]) for r in rows] == [0, 3, 5, 6, 9, 10]
    assert [r["event"] for r in rows] == ["init", "step", "epoch", "step", "step", "epoch"]
    assert [float(r["epoch"]) for r in rows] == pytest.approx([0, 0.6, 1, 1.2, 1.8, 2])
    seconds = [float(r["train_seconds"]) for r in rows]
    assert seconds[0] < 0.1 and all(b > a for a, b in zip(seconds, seconds[1:]))
    for r in rows:
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0
        assert math.isfinite(float(r["test_loss"])) and float(r["test_loss"]) > 0
    assert rows[0]["train_loss"] == ""  # nothing trained yet
    assert all(math.isfinite(float(r["train_loss"])) for r in rows[1:])


def test_metrics_json_config_and_plot(tiny_run):
    out, metrics = tiny_run
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk["runs"]) == {"tengrad", "sgd"}
    config = json.loads((out / "config.json").read_text())
    assert config["hparams"]["tengrad"]["learning_rate"] == 0.003  # the paper's preset
    assert config["model_kwargs"] == {"width": 4, "hidden": 16}
    for figure in ("accuracy.png", "curves.png"):
        png = (out / figure).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (out / "tengrad" / "tb").exists() == bool(config["tensorboard"])


def test_runs_share_initialisation_and_exclude_evaluation(tiny_run):
    _, metrics = tiny_run
    runs = metrics["runs"]
    # Same seed, fresh model per optimizer: identical test loss before the first step.
    assert runs["tengrad"]["rows"][0]["test_loss"] == runs["sgd"]["rows"][0]["test_loss"]
    for run in runs.values():
        # The clock stops while evaluating: training seconds + evaluation fit into the wall time.
        assert run["train_seconds"] + run["eval_seconds"] <= run["wall_seconds"] + 1e-6
        assert run["eval_seconds"] > 0
    assert runs["tengrad"]["skipped_steps"] == 0
    treatments = runs["tengrad"]["treatments"]  # 3C1F: every variable is preconditioned
    assert len(treatments) == 10
    assert not any(t.startswith("first-order") for t in treatments.values())


def test_time_to_target_is_the_first_logged_row_at_or_above_it(tiny_run):
    _, metrics = tiny_run
    for run in metrics["runs"].values():
        first = train.first_reaching(run["rows"], 0.3)
        assert run["target"]["test_accuracy"] == 0.3
        assert run["target"]["reached"] == (first is not None)
        if first is not None:
            assert (run["target"]["train_seconds"], run["target"]["step"]) == (
                first["train_seconds"], first["step"])


def test_prints_one_line_per_optimizer_and_where_results_went(tiny_run, capsys):
    out, metrics = tiny_run
    train.print_report(metrics["runs"], out)
    lines = capsys.readouterr().out.strip().splitlines()
    for label in ("TENGraD", "SGD"):
        (line,) = [x for x in lines if x.strip().startswith(label + " ")]
        assert "30%" in line and "final test accuracy" in line
    assert lines[-1] == f"results in {out}"
    assert any(str(out / "accuracy.png") in line for line in lines)
    assert any(str(out / "curves.png") in line for line in lines)


# ----------------------------------------------------------------------------- pieces


def test_evaluate_inside_fit_keeps_the_epoch_metrics():
    keras.utils.set_random_seed(0)
    x = np.random.randn(64, 4).astype("float32")
    y = np.random.randint(0, 3, 64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    before = [v.numpy() for m in model.metrics for v in m.variables]

    with train.preserved_metric_state(model):
        model.evaluate(x[:8], y[:8], verbose=0)
    after = [v.numpy() for m in model.metrics for v in m.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)

    model.evaluate(x[:8], y[:8], verbose=0)  # without it, evaluate would overwrite them
    changed = [v.numpy() for m in model.metrics for v in m.variables]
    assert any(not np.array_equal(a, b) for a, b in zip(before, changed))


def _fit_tiny(callbacks: list) -> keras.Model:
    keras.utils.set_random_seed(0)
    x = np.random.randn(64, 4).astype("float32")
    y = np.random.randint(0, 3, 64)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False, callbacks=callbacks)
    return model


def test_training_log_rows_when_eval_and_epoch_end_coincide(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    test_ds = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16))).batch(8)
    log = train.TrainingLog(test_ds, steps_per_epoch=4, eval_every=2,
                            csv_path=tmp_path / "log.csv")
    logged = _fit_tiny([log])
    # Steps 4 and 8 are both eval steps and epoch ends: one row each, from the epoch end.
    rows = _read_csv(tmp_path / "log.csv")
    assert [(int(r["step"]), r["event"]) for r in rows] == [
        (0, "init"), (2, "step"), (4, "epoch"), (6, "step"), (8, "epoch")]
    assert [r["step"] for r in log.rows] == [0, 2, 4, 6, 8]
    # Evaluating mid-epoch changes neither the training nor Keras's epoch means.
    plain = _fit_tiny([])
    assert logged.history.history["loss"] == pytest.approx(plain.history.history["loss"])
    assert logged.history.history["accuracy"] == pytest.approx(plain.history.history["accuracy"])
    epoch_rows = [r for r in log.rows if r["event"] == "epoch"]
    assert [r["train_loss"] for r in epoch_rows] == pytest.approx(plain.history.history["loss"])


def test_compares_every_optimizer_by_default_and_tengrad_alone_on_request():
    cfg = _config()
    assert cfg["optimizers"] == ["tengrad", "sgd", "adam", "kfac"]
    assert cfg["target"] == 0.85
    assert _config("--optimizer", "tengrad")["optimizers"] == ["tengrad"]
    with pytest.raises(SystemExit) as e:
        _config("--target", "1.5")
    assert e.value.code == 2


def test_first_reaching():
    rows = [{"test_accuracy": a, "step": s} for s, a in [(0, 0.1), (5, 0.86), (10, 0.84)]]
    assert train.first_reaching(rows, 0.85)["step"] == 5
    assert train.first_reaching(rows, 0.9) is None


def test_preset_then_cli_overrides():
    cfg = _config("--optimizer", "sgd", "tengrad", "adam")
    assert cfg["hparams"]["sgd"] == {"learning_rate": 0.03, "momentum": 0.9, "weight_decay": 1e-3}
    tengrad = cfg["hparams"]["tengrad"]
    assert (tengrad["learning_rate"], tengrad["damping"], tengrad["weight_decay"],
            tengrad["curvature_update_freq"]) == (0.003, 0.1, 1e-3, 100)
    assert cfg["hparams"]["adam"]["learning_rate"] == 1e-3
    assert (cfg["batch_size"], cfg["epochs"], cfg["model_kwargs"]["width"]) == (128, 1, 32)

    cfg = _config("--optimizer", "sgd", "tengrad", "--lr", "0.5", "--kl-clip", "none",
                  "--freq", "7")
    assert cfg["hparams"]["sgd"]["learning_rate"] == 0.5
    assert cfg["hparams"]["tengrad"]["learning_rate"] == 0.5
    assert cfg["hparams"]["tengrad"]["kl_clip"] is None
    assert cfg["hparams"]["tengrad"]["curvature_update_freq"] == 7
    assert "kl_clip" not in cfg["hparams"]["sgd"]
    metric = _config("--optimizer", "sgd", "tengrad", "--damping-metric", "inputs")
    assert metric["hparams"]["tengrad"]["damping_metric"] == "inputs"
    assert "damping_metric" not in metric["hparams"]["sgd"]


def test_paper_scale_and_cifar_preset():
    cfg = _config("--paper")
    assert cfg["epochs"] == 10 and cfg["model_kwargs"] == {"width": 128, "hidden": 500}
    assert _config("--paper", "--epochs", "3")["epochs"] == 3  # explicit flags win

    cfg = _config("--dataset", "cifar10", "--paper", "--optimizer", "sgd")
    assert (cfg["preset"], cfg["model"], cfg["epochs"], cfg["milestones"]) == (
        "cifar", "vgg16_bn", 60, [30, 50])
    assert cfg["model_kwargs"] == {"width_multiplier": 1.0}
    assert _config("--dataset", "cifar10", "--model", "densenet",
                   "--width-multiplier", "0.1")["model_kwargs"] == {"growth_rate": 10}


def test_bad_combinations_exit_with_usage_error(monkeypatch):
    with pytest.raises(SystemExit) as e:
        _config("--dataset", "cifar10", "--width", "8")  # --width is 3C1F's
    assert e.value.code == 2
    monkeypatch.delattr(tengrad_tf, "KFAC", raising=False)
    with pytest.raises(SystemExit):
        _config("--optimizer", "kfac")


def test_step_schedule_in_steps():
    assert train.learning_rate_for(0.1, [], 60, 10) == 0.1
    assert train.learning_rate_for(0.1, [30, 50], 20, 10) == 0.1  # milestones after the run
    schedule = train.learning_rate_for(0.1, [30, 50], 60, 10)
    values = [float(schedule(step)) for step in (0, 299, 301, 499, 501)]
    assert values == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_missing_data_exits_2_without_traceback(monkeypatch, capsys, tmp_path):
    def unavailable(*args, **kwargs):
        raise data.DataUnavailableError("mnist is not prepared and the network is down")

    monkeypatch.setattr(data, "num_examples", unavailable)
    assert train.cli(["--dataset", "mnist", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "mnist is not prepared" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written for a run that could not start


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        train.build_parser().parse_args(["--help"])
    assert e.value.code == 0
    assert "--optimizer" in capsys.readouterr().out
