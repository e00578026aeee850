"""Tests for benchmarks/time_to_accuracy.py: the --quick mode end to end on real Fashion-MNIST,
plus its summary arithmetic and table on hand-made runs (no data needed).

The end-to-end test reads Fashion-MNIST from the default TFDS data dir when it is already prepared
there, else prepares it offline from Debian's files into a temporary data dir; it is skipped when
neither is available.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from benchmarks import time_to_accuracy as tta
from tengrad_tf import data

DEBIAN_DIR = Path(os.environ.get(data.ENV_FASHION_MNIST_DEBIAN_DIR)
                  or data.DEBIAN_FASHION_MNIST_DIR)
HAVE_DEBIAN_FILES = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()


def _prepared_default_dir() -> Path | None:
    d = data.default_data_dir()
    return d if any((d / "fashion_mnist").glob("*/dataset_info.json")) else None


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    data_dir = _prepared_default_dir()
    if data_dir is None:
        if not HAVE_DEBIAN_FILES:
            pytest.skip(f"Fashion-MNIST is not prepared in {data.default_data_dir()} and the "
                        f"Debian files are not in {DEBIAN_DIR}: "
                        "`apt-get install -y dataset-fashion-mnist`")
        data_dir = tmp_path_factory.mktemp("tfds")
    out = tmp_path_factory.mktemp("tta") / "out"
    report = tta.main(["--quick", "--data-dir", str(data_dir), "--out", str(out)])
    return out, report


def test_quick_writes_json_png_and_markdown(quick_run):
    out, report = quick_run
    on_disk = json.loads((out / "time_to_accuracy.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("date", "machine", "commit", "uncommitted_changes", "command", "config", "runs",
                "summary", "ratios", "goal"):
        assert key in on_disk
    assert on_disk["complete"] is True
    assert "--quick" in on_disk["command"]
    cfg = on_disk["config"]
    assert cfg["name"] == "quick" and cfg["width"] == 8 and cfg["train_examples"] == 60000
    assert cfg["hparams"]["tengrad"]["learning_rate"] == 0.003  # the paper preset, via train.py
    assert cfg["hparams"]["sgd"] == {"learning_rate": 0.03, "momentum": 0.9, "weight_decay": 1e-3}
    png = (out / "time_to_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    md = (out / "time_to_accuracy.md").read_text()
    assert md == tta.markdown_table(on_disk)
    for label in ("SGD", "Adam", "K-FAC", "TENGraD"):
        assert f"| {label} |" in md
    assert "s to 88%" in md


def test_quick_runs_curves_and_clock(quick_run):
    _, report = quick_run
    runs = report["runs"]
    assert [r["optimizer"] for r in runs] == ["sgd", "adam", "kfac", "tengrad"]
    init_losses = {r["rows"][0]["test_loss"] for r in runs}
    assert len(init_losses) == 1  # same seed: same initial weights for every optimizer
    for run in runs:
        rows = run["rows"]
        assert run["steps"] == 120  # the step budget
        # Every 20 steps up to step 60, then every 40; step 0 before training; no duplicates.
        assert [r["step"] for r in rows] == [0, 20, 40, 60, 80, 120]
        for clock in ("seconds", "train_seconds"):
            seconds = [r[clock] for r in rows]
            assert seconds == sorted(seconds)
        assert rows[0]["seconds"] == 0.0
        assert rows[-1]["train_seconds"] - rows[-1]["seconds"] == pytest.approx(
            run["first_step_seconds"])
        assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
        assert run["train_seconds"] + run["eval_seconds"] <= run["wall_seconds"] + 1e-6
        assert run["final_accuracy"] == rows[-1]["test_accuracy"] > 0.5  # it learned something
        for key, hit in run["time_to_target"].items():
            first = next((r for r in rows if r["test_accuracy"] >= float(key)), None)
            assert (hit is None) == (first is None)
            if hit is not None:
                assert hit["seconds"] == first["seconds"]
                assert hit["train_seconds"] == first["train_seconds"]
    for name in ("kfac", "tengrad"):
        run = next(r for r in runs if r["optimizer"] == name)
        assert run["skipped_steps"] == 0


# ----------------------------------------------------------------------------- pieces


def _rows(points, first_step=0.5):
    return [{"step": s, "epoch": s / 100, "seconds": t,
             "train_seconds": t + first_step if s else 0.0, "test_accuracy": a,
             "test_loss": 1.0, "train_loss": None} for s, t, a in points]


def test_time_to_target_takes_the_first_evaluation_at_or_above():
    rows = _rows([(0, 0.0, 0.1), (10, 2.0, 0.86), (20, 4.0, 0.85), (30, 6.0, 0.885)], 1.5)
    assert tta.time_to_target(rows, 0.85) == {
        "seconds": 2.0, "train_seconds": 3.5, "epochs": 0.1, "step": 10}
    assert tta.time_to_target(rows, 0.88)["step"] == 30
    assert tta.time_to_target(rows, 0.90) is None


def test_spread_counts_misses_as_infinity():
    assert tta.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                           "reached": 3, "runs": 3}
    assert tta.spread([3.0, None, 1.0]) == {"median": 3.0, "min": 1.0, "max": None,
                                            "reached": 2, "runs": 3}
    assert tta.spread([None, None, 1.0])["median"] is None
    assert tta.spread([None])["min"] is None


def _fake_report(times88: dict[str, list[float | None]]) -> dict:
    cfg = {"name": "cpu", "width": 16, "hidden": 128, "batch_size": 128, "epochs": 10,
           "max_seconds": 150.0, "max_steps": None, "eval_every": 25, "eval_switch_step": 1000,
           "eval_every_later": 100, "test_split": "test", "seeds": 3,
           "targets": [0.85, 0.88, 0.9], "optimizers": list(times88)}
    runs = []
    for name, times in times88.items():
        for seed, t in enumerate(times):
            points = [(0, 0.0, 0.1), (100, 1.0, 0.86)]
            if t is not None:
                points.append((200, t, 0.885))
            points.append((300, 200.0, 0.87 if t is None else 0.895))
            rows = _rows(points)
            runs.append({
                "optimizer": name, "seed": seed, "rows": rows, "steps": 300, "epochs": 3.0,
                "seconds": 200.0, "train_seconds": 200.5, "first_step_seconds": 0.5,
                "eval_seconds": 1.0,
                "final_accuracy": rows[-1]["test_accuracy"], "best_accuracy": 0.895,
                "time_to_target": {tta._key(x): tta.time_to_target(rows, x)
                                   for x in cfg["targets"]}})
    summary = tta.summarize(runs, cfg)
    ratios = tta.ratios(summary, cfg)
    return {"config": cfg, "runs": runs, "summary": summary, "ratios": ratios,
            "goal": tta.goal(summary, ratios), "machine": {"cpus": 2, "gpus": []},
            "commit": "abc1234", "date": "2026-01-01T00:00:00+00:00", "complete": True}


def test_ratios_goal_and_table():
    report = _fake_report({"sgd": [20.0, 22.0, 30.0], "adam": [None, None, 50.0],
                           "kfac": [40.0, 40.0, None], "tengrad": [10.0, 11.0, 12.0]})
    r = report["ratios"]["0.88"]["seconds"]
    assert math.isclose(r["tengrad/sgd"], 11.0 / 22.0)
    assert math.isclose(r["tengrad/kfac"], 11.0 / 40.0)
    assert r["tengrad/adam"] is None  # Adam's median is a miss
    assert math.isclose(report["ratios"]["0.88"]["train_seconds"]["tengrad/kfac"], 11.5 / 40.5)
    goal = report["goal"]["seconds"]
    assert goal["kfac"]["met"] and goal["sgd"]["met"]
    assert goal["adam"]["met"]  # TENGraD got there, Adam's median run did not
    slow = _fake_report({"sgd": [10.0] * 3, "kfac": [12.0] * 3, "tengrad": [10.0] * 3})
    assert not slow["goal"]["seconds"]["kfac"]["met"]  # 0.83 > 0.6
    assert not slow["goal"]["seconds"]["sgd"]["met"]  # 1.0 > 0.9
    md = tta.markdown_table(report)
    assert "| TENGraD | 1.0 [1.0–1.0] | 11.0 [10.0–12.0] | — (0/3) |" in md
    assert "| Adam | 1.0 [1.0–1.0] | — [50.0–∞] (1/3) | — (0/3) |" in md
    assert "÷ K-FAC 0.28 (goal ≤ 0.6: met)" in md
    assert "÷ Adam n/a, Adam's median run never reached it (goal ≤ 0.9: met)" in md
    assert len({line.count("|") for line in md.splitlines() if line.startswith("|")}) == 1


def test_plot_writes_a_png(tmp_path):
    report = _fake_report({"sgd": [20.0, None, 30.0], "tengrad": [10.0, 11.0, 12.0]})
    tta.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        tta.build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_from_json_rerenders_table_and_plot(tmp_path):
    report = _fake_report({"sgd": [20.0, 22.0, 30.0], "tengrad": [10.0, 11.0, 12.0]})
    path = tmp_path / "time_to_accuracy.json"
    path.write_text(json.dumps(report))
    assert tta.main(["--from-json", str(path)]) == report
    assert (tmp_path / "time_to_accuracy.md").read_text() == tta.markdown_table(report)
    assert (tmp_path / "time_to_accuracy.png").read_bytes().startswith(b"\x89PNG")


def test_update_readme_finds_the_table():
    from benchmarks import update_readme
    assert update_readme.extra_tables()["time_to_accuracy"] is tta.markdown_table


def test_every_committed_result_has_its_table_markers_in_the_readme_or_docs():
    """update_readme.py writes a table wherever its marker pair stands; a section moved without
    its markers would silently leave its table unwritten."""
    from benchmarks import update_readme
    found = set()
    for path in update_readme.documents():
        found |= update_readme.markers(Path(path).read_text())
    tables = {**update_readme.TABLES, **update_readme.extra_tables()}
    committed = {n for n in tables if Path(update_readme.result_path(n)).exists()}
    assert committed <= found, committed - found
    assert found <= set(tables), found - set(tables)  # every marker pair has a renderer
    assert any(Path(p).name == "performance.md" for p in update_readme.documents())  # docs/


# ----------------------------------------------------------------------------- memory.py


def test_memory_benchmark_offers_every_step_model():
    from benchmarks import common, memory

    assert sorted(memory.MODELS) == sorted(common.STEP_MODELS)


def test_memory_benchmark_quick_run_writes_json_and_table(tmp_path):
    """benchmarks/memory.py on a small MLP, one configuration, one step: the worker subprocess,
    the JSON fields and the README table (the real run is 3C1F at batch 128, see its docstring)."""
    from benchmarks import memory, update_readme

    report = memory.main(["--model", "mlp", "--optimizers", "tengrad-empirical", "--warmup", "1",
                          "--steps", "1", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "memory.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("date", "machine", "commit", "command", "method", "model", "batch", "results"):
        assert key in on_disk
    (row,) = on_disk["results"]
    assert row["optimizer"] == "tengrad-empirical" and row["skipped_steps"] == 0
    # Building the model already holds hundreds of MiB (TensorFlow); the step's state is on top.
    assert row["baseline_rss_mib"] > 100 and row["peak_mib"] > 0
    assert row["peak_mib"] >= max(row["first_steps_peak_mib"], row["rss_after_mib"]) - 1e-9
    md = (tmp_path / "memory.md").read_text()
    assert md == memory.markdown_table(on_disk) and "| tengrad-empirical |" in md
    assert update_readme.TABLES["memory"](on_disk) == md


def test_profile_step_groups_ops_by_part(tmp_path):
    """benchmarks/profile_step.py on the MLP, two steps: TENGraD's parts are found by their name
    scopes, and SGD has none of them."""
    from benchmarks import profile_step

    profile_step.main(["--models", "mlp", "--optimizers", "sgd", "tengrad-empirical-f1",
                       "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "profile_step.json").read_text())
    sgd, tengrad = report["results"]
    assert not any(p.startswith("tengrad_") for p in sgd["ops_per_step"])
    for part in ("forward", "backward", "tengrad_gram", "tengrad_cholesky", "tengrad_project",
                 "tengrad_solve", "tengrad_combine"):
        assert tengrad["ops_per_step"].get(part, 0) > 0, part
    assert profile_step.part_of("a/tengrad_solve/tengrad_combine/MatMul", "TENGraD") == \
        "tengrad_combine"
    assert (tmp_path / "profile_step.md").read_text().startswith("Profile of one step")


# ----------------------------------------------------------------------------- tuned presets


def _tuned_json(tmp_path, width=16, chosen=None) -> Path:
    chosen = chosen or {"sgd": 0.09, "adam": 0.003, "kfac": 0.01, "tengrad": 0.03}
    path = tmp_path / "tune_presets.json"
    path.write_text(json.dumps({
        "config": {"width": width, "hidden": 128, "batch_size": 128},
        "commit": "abc1234", "date": "2026-01-01T00:00:00+00:00",
        "chosen": {n: {"learning_rate": lr} for n, lr in chosen.items()}}))
    return path


def _resolve(argv):
    return tta.resolve_config(tta.build_parser().parse_args(argv))


def test_cpu_config_takes_tuned_learning_rates_and_nothing_else(tmp_path):
    path = _tuned_json(tmp_path)
    cfg = _resolve(["--tuned-json", str(path)])
    paper = _resolve(["--presets", "paper"])
    assert cfg["presets"] == "tuned" and paper["presets"] == "paper"
    for name, lr in {"sgd": 0.09, "adam": 0.003, "kfac": 0.01, "tengrad": 0.03}.items():
        assert cfg["hparams"][name] == {**paper["hparams"][name], "learning_rate": lr}
    assert cfg["tuned_from"]["paper_learning_rates"]["tengrad"] == 0.003
    line = tta.presets_line(cfg)
    assert "tuned on held-out training data" in line and "TENGraD 0.03" in line
    assert "TENGraD 0.003" in tta.presets_line(paper) and "paper's presets" in tta.presets_line(
        paper)
    assert _resolve(["--quick"])["presets"] == "paper"


def test_time_to_accuracy_sets_one_optimizers_hyperparameters_beside_its_preset(tmp_path):
    path = _tuned_json(tmp_path)
    plain = _resolve(["--tuned-json", str(path)])
    cfg = _resolve(["--tuned-json", str(path), "--set", "tengrad.curvature_batches=4",
                    "tengrad.curvature_update_freq=20"])
    assert cfg["overrides"] == {"tengrad": {"curvature_batches": 4, "curvature_update_freq": 20}}
    assert cfg["hparams"]["tengrad"] == {**plain["hparams"]["tengrad"], "curvature_batches": 4,
                                         "curvature_update_freq": 20}
    assert cfg["hparams"]["kfac"] == plain["hparams"]["kfac"]
    assert "TENGraD also with curvature_batches=4, curvature_update_freq=20." in tta.presets_line(
        cfg)
    assert "also with" not in tta.presets_line(plain)
    for bad, message in (("curvature_batches=4", "OPT.KEY=VALUE"),
                         ("lbfgs.x=1", "OPT.KEY=VALUE"),
                         ("kfac.curvature_batches=4", "not a hyperparameter of kfac")):
        with pytest.raises(SystemExit, match=message):
            _resolve(["--tuned-json", str(path), "--set", bad])


def test_cifar10_config_names_its_data_model_presets_and_goal():
    cfg = _resolve(["--config", "cifar10"])
    assert (cfg["dataset"], cfg["model"], cfg["width_multiplier"]) == ("cifar10", "vgg16_bn", 0.25)
    assert cfg["targets"] == [0.6, 0.7, 0.8] and cfg["goal_target"] == 0.7
    assert cfg["goal_ratios"] == {"kfac": 0.8, "sgd": 1.0, "adam": 1.0}
    # The `cifar` presets, not Fashion-MNIST's.
    assert cfg["hparams"]["sgd"] == {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert cfg["hparams"]["tengrad"]["damping"] == 0.03
    assert tta.model_kwargs(cfg) == {"width_multiplier": 0.25}
    assert tta.describe(cfg) == "CIFAR-10 (augmented), vgg16_bn width ×0.25"
    assert _resolve(["--config", "cifar10", "--width-multiplier", "0.5"])["width_multiplier"] == 0.5
    with pytest.raises(SystemExit, match="for the CIFAR network"):
        _resolve(["--width-multiplier", "0.5"])
    with pytest.raises(SystemExit, match="must include the goal's target 0.7"):
        _resolve(["--config", "cifar10", "--targets", "0.6"])
    # Fashion-MNIST reports, including those written before configurations named their goal.
    fmnist = _resolve(["--presets", "paper"])
    assert tta.describe(fmnist) == "Fashion-MNIST, 3C1F width 16 / Dense 128"
    assert tta.goal_of({}) == (0.88, tta.GOAL_RATIOS) == tta.goal_of(fmnist)


def test_cifar100_config_takes_its_targets_from_sgds_curve():
    cfg = _resolve(["--config", "cifar100", "--optimizers", "tengrad", "sgd"])
    assert (cfg["dataset"], cfg["model"], cfg["width_multiplier"]) == (
        "cifar100", "mobilenet_v2_dense", 0.125)
    assert cfg["optimizers"] == ["sgd", "tengrad"]  # SGD first: its runs set the targets
    assert cfg["targets"] == [] and cfg["targets_from_sgd"] == [0.5, 0.75, 0.9]
    assert cfg["hparams"]["sgd"]["learning_rate"] == 0.1  # the `cifar` presets
    with pytest.raises(SystemExit, match="keep sgd"):
        _resolve(["--config", "cifar100", "--optimizers", "tengrad"])
    explicit = _resolve(["--config", "cifar100", "--targets", "0.1", "0.2"])
    assert explicit["targets"] == [0.1, 0.2] and "targets_from_sgd" not in explicit
    assert explicit["goal_target"] == 0.2

    # SGD's best accuracies 0.30 and 0.42 (median 0.36): targets 18 / 27 / 32 %, goal on 27 %,
    # and every run's time to them from its own curve.
    runs = [{"optimizer": "sgd", "best_accuracy": best,
             "rows": _rows([(0, 0.0, 0.01), (78, 5.0, 0.2), (156, 10.0, best)])}
            for best in (0.30, 0.42)]
    runs.append({"optimizer": "tengrad", "best_accuracy": 0.4,
                 "rows": _rows([(0, 0.0, 0.01), (78, 7.0, 0.28), (156, 14.0, 0.4)])})
    tta.derive_targets(runs, cfg)
    assert cfg["targets"] == [0.18, 0.27, 0.32] and cfg["goal_target"] == 0.27
    assert [r["time_to_target"]["0.27"] and r["time_to_target"]["0.27"]["seconds"]
            for r in runs] == [10.0, 10.0, 7.0]
    assert runs[0]["time_to_target"]["0.32"] is None  # that SGD run peaked at 0.30


def test_cifar10_goal_is_judged_on_its_own_target_and_ratios():
    report = _fake_report({"sgd": [20.0] * 3, "kfac": [12.0] * 3, "tengrad": [10.0] * 3})
    cfg = {**report["config"], "goal_target": 0.88, "goal_ratios": {"kfac": 0.9, "sgd": 1.0}}
    goal = tta.goal(report["summary"], report["ratios"], cfg)["seconds"]
    assert goal["kfac"]["met"] and goal["sgd"]["met"]  # 0.83 ≤ 0.9; under the FMNIST goal, not
    assert not tta.goal(report["summary"], report["ratios"])["seconds"]["kfac"]["met"]
    report["config"], report["goal"] = cfg, tta.goal(report["summary"], report["ratios"], cfg)
    assert "÷ K-FAC 0.83 (goal ≤ 0.9: met)" in tta.markdown_table(report)


def test_cifar10_config_end_to_end_on_the_shared_npz(tmp_path, monkeypatch):
    """A few steps of the real CIFAR-10 pipeline (npz → TFDS → augmented batches), SGD and
    TENGraD on a narrow VGG16-BN: the configuration runs, and writes what the others write."""
    npz = Path(os.environ.get(data.ENV_CIFAR_NPZ_DIR)
               or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (npz / "cifar10.npz").is_file():
        pytest.skip(f"cifar10.npz not found in {npz} (set {data.ENV_CIFAR_NPZ_DIR})")
    monkeypatch.setenv(data.ENV_CIFAR_NPZ_DIR, str(npz))
    prepared = any((data.default_data_dir() / "cifar10").glob("*/dataset_info.json"))
    data_dir = data.default_data_dir() if prepared else tmp_path / "tfds"
    report = tta.main(["--config", "cifar10", "--optimizers", "sgd", "tengrad", "--seeds", "1",
                       "--max-seconds", "0", "--max-steps", "3", "--eval-every", "2",
                       "--width-multiplier", "0.0625", "--test-split", "test[:200]",
                       "--data-dir", str(data_dir), "--out", str(tmp_path / "out")])
    cfg = report["config"]
    assert cfg["dataset"] == "cifar10" and cfg["train_examples"] == 50000
    assert [r["steps"] for r in report["runs"]] == [3, 3]
    md = (tmp_path / "out" / "time_to_accuracy.md").read_text()
    assert "CIFAR-10 (augmented), vgg16_bn width ×0.0625" in md and "s to 70%" in md


@pytest.mark.parametrize("problem, message", [
    ("missing", "run benchmarks/tune_presets.py first"),
    ("width", "was tuned for"),
    ("optimizer", "no tuned learning rate for tengrad"),
])
def test_tuned_presets_refuse_a_result_that_does_not_fit(tmp_path, problem, message):
    if problem == "missing":
        path = tmp_path / "absent.json"
    elif problem == "width":
        path = _tuned_json(tmp_path, width=32)
    else:
        path = _tuned_json(tmp_path, chosen={"sgd": 0.1})
    with pytest.raises(SystemExit, match=message):
        _resolve(["--optimizers", "sgd", "tengrad", "--tuned-json", str(path)])


def test_tune_presets_chooses_fewest_steps_then_final_accuracy():
    from benchmarks import tune_presets

    def run(lr, step, final):
        hit = None if step is None else {"step": step}
        return {"learning_rate": lr, "final_accuracy": final, "time_to_target": {"0.88": hit}}

    runs = [run(0.01, 300, 0.90), run(0.03, 200, 0.89), run(0.1, 200, 0.91), run(0.3, None, 0.5)]
    chosen = tune_presets.choose(runs, 0.88)
    assert chosen["learning_rate"] == 0.1  # ties with 0.03 on steps, better final accuracy
    assert [s["learning_rate"] for s in chosen["scores"]] == [0.1, 0.03, 0.01, 0.3]
    assert chosen["scores"][-1]["median_steps_to_target"] is None  # never reached: last
    # Over seeds: the median, with a miss as +infinity.
    seeds = [run(0.01, 100, 0.9), run(0.01, None, 0.9), run(0.01, None, 0.9),
             run(0.03, 400, 0.9), run(0.03, 400, 0.9), run(0.03, 500, 0.9)]
    assert tune_presets.choose(seeds, 0.88)["learning_rate"] == 0.03


def test_tune_presets_overrides_are_parsed_and_checked():
    from benchmarks import common, tune_presets

    assert common.parse_overrides(["kl_clip=1e-3", "fisher=empirical", "x=None"]) == {
        "kl_clip": 1e-3, "fisher": "empirical", "x": None}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        common.parse_overrides(["kl_clip"])
    assert "curvature_update_freq" in common.accepted_hparams("tengrad")
    assert "curvature_update_freq" not in common.accepted_hparams("kfac")
    with pytest.raises(SystemExit, match="not a hyperparameter of sgd"):
        tune_presets.main(["--optimizers", "sgd", "--set", "damping=0.1"])


# ----------------------------------------------------------------------------- capture_overhead.py


def test_capture_overhead_counts_capture_ops_and_writes_a_table(tmp_path):
    """The clean trace has no capture op and the captured one has some: the measurement compares
    what it says it compares."""
    from benchmarks import capture_overhead, update_readme

    capture_overhead.main(["--models", "mlp", "--steps", "2", "--rounds", "1", "--warmup", "1",
                           "--out", str(tmp_path)])
    report = json.loads((tmp_path / "capture_overhead.json").read_text())
    (row,) = report["results"]
    assert row["capture_ops_in_training_graph"]["clean"] == 0
    assert row["capture_ops_in_training_graph"]["captured"] > 0
    assert update_readme.TABLES["capture_overhead"](report) == (
        tmp_path / "capture_overhead.md").read_text()


# ----------------------------------------------------------------------------- lagged_curvature.py


def test_lagged_curvature_runs_both_curvatures_at_equal_steps_and_writes_a_table(tmp_path):
    """benchmarks/lagged_curvature.py on the text CNN, 6 steps at freq 1: one run per curvature,
    the same steps, a summary of both, and the table update_readme renders."""
    from benchmarks import lagged_curvature, update_readme

    report = lagged_curvature.main(["--models", "textcnn", "--freqs", "1", "--seeds", "1",
                                    "--steps", "6", "--chunks", "2", "--out", str(tmp_path)])
    rows = report["results"]
    assert sorted(r["curvature"] for r in rows) == ["lagged", "own batch"]
    assert {r["steps"] for r in rows} == {6} and all(len(r["train_losses"]) == 2 for r in rows)
    (entry,) = report["summary"]
    assert entry["lagged"]["median_train_loss"] == rows[1]["train_loss_last_epoch"]
    on_disk = json.loads((tmp_path / "lagged_curvature.json").read_text())
    assert update_readme.TABLES["lagged_curvature"](on_disk) == (
        tmp_path / "lagged_curvature.md").read_text()


# ----------------------------------------------------------------------------- first_step.py


def test_first_step_times_the_first_batch_and_writes_json_and_table(tmp_path):
    """benchmarks/first_step.py on the MLP (real Fashion-MNIST), one repetition of two
    optimizers: the JSON fields, the ratio to SGD and the table."""
    from benchmarks import first_step

    report = first_step.main(["--models", "mlp", "--reps", "1", "--optimizers",
                              "SGD(0.03, 0.9)", "TENGraD()", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "first_step.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    for key in ("date", "machine", "commit", "command", "reps", "results", "summary"):
        assert key in on_disk
    mlp = on_disk["summary"]["mlp"]
    assert mlp["SGD(0.03, 0.9)"]["vs_sgd"] == 1.0
    sgd, ours = mlp["SGD(0.03, 0.9)"]["median_seconds"], mlp["TENGraD()"]["median_seconds"]
    assert 0 < sgd < 60 and 0 < ours < 60
    assert mlp["TENGraD()"]["vs_sgd"] == pytest.approx(ours / sgd)
    # The traced step's nodes: TENGraD's curvature, solve and damping check are many times SGD's.
    assert 100 < mlp["SGD(0.03, 0.9)"]["graph_nodes"] < mlp["TENGraD()"]["graph_nodes"] / 3
    assert "goal" not in on_disk["summary"]  # the goal is 3C1F's
    assert (tmp_path / "first_step.md").read_text() == first_step.markdown_table(on_disk)


def test_first_step_goal_is_tengrads_ratio_to_sgd_on_3c1f():
    from benchmarks import first_step

    rows = [{"model": "3c1f", "optimizer": name, "rep": rep, "seconds": s}
            for rep, (a, b) in enumerate([(1.0, 1.1), (2.0, 1.3), (1.0, 5.0)])
            for name, s in (("SGD(0.03, 0.9)", a), ("TENGraD()", b))]
    summary = first_step.summarize(rows)
    assert summary["3c1f"]["TENGraD()"]["median_seconds"] == 1.3
    assert summary["goal"] == {"model": "3c1f", "tengrad_vs_sgd": 1.3, "max_ratio": 1.2,
                               "met": False}


# ----------------------------------------------------------------------------- step_time.py


def test_step_time_reports_median_and_amortized_mean_against_sgd(tmp_path):
    """benchmarks/step_time.py on the MLP, two steps per configuration: the median and the mean
    (amortized) with their ratios to SGD's, and the table."""
    from benchmarks import step_time

    step_time.main(["--models", "mlp", "--optimizers", "sgd", "tengrad-true-f100", "--steps", "2",
                    "--rounds", "1", "--warmup", "1", "--no-memory", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "step_time.json").read_text())
    rows = {r["optimizer"]: r for r in report["results"]}
    assert rows["sgd"]["ratio_to_sgd"] == 1.0 and rows["sgd"]["mean_ratio_to_sgd"] == 1.0
    ours = rows["tengrad-true-f100"]
    assert ours["steps_timed"] == 2
    assert ours["mean_ratio_to_sgd"] == pytest.approx(
        ours["mean_s_per_step"] / rows["sgd"]["mean_s_per_step"])
    md = (tmp_path / "step_time.md").read_text()
    assert md == step_time.markdown_table(report) and "| mlp | tengrad-true-f100 | False |" in md


# ----------------------------------------------------------------------------- gpu.sh

GPU_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.sh"


def test_gpu_script_quick_runs_every_optimizer_and_the_time_to_accuracy(tmp_path):
    """benchmarks/gpu.sh --quick, as CI runs it on a CPU: the step time of every optimizer (jit_solve
    off and on) and a time-to-accuracy run, written under the given folder."""
    data_dir = _prepared_default_dir()
    if data_dir is None:
        if not HAVE_DEBIAN_FILES:
            pytest.skip("Fashion-MNIST is neither prepared nor available from Debian's files")
        data_dir = tmp_path / "tfds"
    out = tmp_path / "gpu"
    env = {**os.environ, data.ENV_DATA_DIR: str(data_dir)}
    done = subprocess.run(["bash", str(GPU_SCRIPT), "--quick", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = json.loads((out / "step_time" / "step_time.json").read_text())
    assert {r["optimizer"] for r in steps["results"]} == {
        "sgd", "adam", "kfac-true", "kfac-true-cholesky", "tengrad-true-f1", "tengrad-true-f1-jit",
        "tengrad-true-f100", "tengrad-true-f100-jit"}
    assert all(r["ratio_to_sgd"] > 0 for r in steps["results"])
    tta_report = json.loads((out / "time_to_accuracy" / "time_to_accuracy.json").read_text())
    assert tta_report["config"]["name"] == "quick"
    assert set(tta_report["summary"]) == set(tta.OPTIMIZERS)
    assert "done in" in done.stdout


def test_gpu_script_refuses_to_run_at_full_scale_without_a_gpu(tmp_path):
    import tensorflow as tf
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    done = subprocess.run(["bash", str(GPU_SCRIPT), str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "no GPU" in done.stderr
    assert not list(tmp_path.iterdir())  # nothing was run


# ----------------------------------------------------------------------------- kfac_inverse.py


def test_kfac_inverse_methods_agree_and_are_timed(tmp_path):
    from benchmarks import kfac_inverse

    report = kfac_inverse.main(["--sizes", "24", "--repeats", "1", "--out", str(tmp_path)])
    (row,) = json.loads((tmp_path / "kfac_inverse.json").read_text())["results"]
    assert row["size"] == 24 and row["faster"] in ("eigh", "cholesky")
    assert row["max_relative_difference"] < 1e-4  # the same inverse, float32
    assert all(len(t) == 1 and t[0] > 0 for t in row["seconds"].values())
    assert (tmp_path / "kfac_inverse.md").read_text() == kfac_inverse.markdown_table(report)


# ----------------------------------------------------------------------------- refactor_cost.py


def test_refactor_cost_times_each_rule_for_which_blocks_keep_their_inverse(tmp_path):
    """The Transformer encoder at batch 128: of its 11 blocks, 3 have d ≤ 1,024 and 2 of them
    d ≤ 4m; "none" keeps no inverse. The module's rules are restored afterwards."""
    from benchmarks import refactor_cost
    from tengrad_tf.blocks import base, cost

    report = refactor_cost.main(["--models", "transformer", "--repeats", "1", "--out",
                                 str(tmp_path)])
    rows = json.loads((tmp_path / "refactor_cost.json").read_text())["results"]
    kinds = {r["rule"]: r["blocks"] for r in rows}
    assert kinds["d<=1024"] == {"inverse": 3, "factored": 8}
    assert kinds["d<=4m"] == {"inverse": 2, "factored": 9}
    assert kinds["none"] == {"factored": 11}
    assert all(len(r["seconds"]) == 1 and r["median_seconds"] > 0 for r in rows)
    assert (tmp_path / "refactor_cost.md").read_text() == refactor_cost.markdown_table(report)
    assert (base.DIRECT_MAX_DIM, cost.ADAPTIVE_INVERSE_RATIO) == (0, 4)  # conftest's, and 4
