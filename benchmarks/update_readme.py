"""Regenerate the benchmark tables of README.md and docs/*.md from the committed JSON results
(never by hand).

    python benchmarks/update_readme.py

Each table sits between `<!-- name -->` and `<!-- /name -->`, in whichever document holds the
pair (a table may stand in several); it is rendered from benchmarks/results/<name>.json by
benchmarks/<name>.py's `markdown_table`, or, for a configuration whose results have a folder of
their own (`FOLDER_TABLES`), from that folder's JSON by its benchmark's renderer. A result with no
marker pair anywhere, or a marker pair with no result, is reported, so that a section moved without
its markers is noticed.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.join(os.path.dirname(__file__), "..")
RESULTS = os.path.join(os.path.dirname(__file__), "results")
MARKER = re.compile(r"<!-- ([a-z0-9_]+) -->.*?<!-- /\1 -->", re.S)


def _renderer(name: str):
    # Imported when a table is rendered: one benchmark that fails to import costs only its table.
    return lambda report: importlib.import_module(f"benchmarks.{name}").markdown_table(report)


TABLES = {name: _renderer(name) for name in
          ("step_time", "defaults", "memory", "profile_step", "capture_overhead", "damping",
           "first_step", "kfac_inverse", "lagged_curvature")}
# Configurations written to a folder of their own (--out): table name → (benchmark, its JSON under
# benchmarks/results/).
FOLDER_TABLES = {
    "time_to_accuracy_paper": ("time_to_accuracy", "time_to_accuracy_paper/time_to_accuracy.json"),
    "time_to_accuracy_paper_metric": (
        "time_to_accuracy", "damping_metric_rows/time_to_accuracy_paper/time_to_accuracy.json"),
    "time_to_accuracy_cifar10": ("time_to_accuracy",
                                 "time_to_accuracy_cifar10/time_to_accuracy.json"),
    "time_to_accuracy_cifar100": ("time_to_accuracy",
                                  "time_to_accuracy_cifar100/time_to_accuracy.json"),
}
TABLES.update({name: _renderer(benchmark) for name, (benchmark, _) in FOLDER_TABLES.items()})


def result_path(name: str) -> str:
    """The JSON a table is rendered from."""
    folder = FOLDER_TABLES.get(name)
    return os.path.join(RESULTS, folder[1] if folder else f"{name}.json")


def extra_tables() -> dict:
    """Tables that other benchmark modules add (e.g. time to accuracy), if present."""
    try:
        from benchmarks.time_to_accuracy import markdown_table as tta
        return {"time_to_accuracy": tta}
    except ImportError:
        return {}


def documents() -> list[str]:
    """README.md and the pages under docs/: wherever a table's markers are."""
    docs = os.path.join(ROOT, "docs")
    return [os.path.join(ROOT, "README.md")] + sorted(
        os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


def markers(text: str) -> set[str]:
    """The names of the complete marker pairs in a document."""
    return {m.group(1) for m in MARKER.finditer(text)}


def main():
    tables = {**TABLES, **extra_tables()}
    found: set[str] = set()
    for path in documents():
        text = original = open(path).read()
        names = markers(text)
        found |= names
        for name in sorted(names):
            result = result_path(name)
            if name not in tables or not os.path.exists(result):
                print(f"no table {name}: {os.path.relpath(path, ROOT)} has its markers, but "
                      f"there is no renderer or no {os.path.relpath(result, ROOT)}")
                continue
            with open(result) as f:
                table = tables[name](json.load(f))
            text = re.sub(rf"<!-- {name} -->.*?<!-- /{name} -->",
                          lambda _: f"<!-- {name} -->\n{table}<!-- /{name} -->", text, flags=re.S)
            print(f"updated table {name} in {os.path.relpath(path, ROOT)} from {result}")
        if text != original:
            with open(path, "w") as f:
                f.write(text)
    for name in sorted(set(tables) - found):
        if os.path.exists(result_path(name)):
            print(f"not shown: {os.path.relpath(result_path(name), ROOT)} has no <!-- {name} --> "
                  "markers in README.md or docs/*.md")


if __name__ == "__main__":
    main()
