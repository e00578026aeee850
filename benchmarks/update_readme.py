"""Regenerate the benchmark tables of README.md and docs/*.md from the committed JSON results
(never by hand).

    python benchmarks/update_readme.py

Each table sits between `<!-- name -->` and `<!-- /name -->`, in whichever document holds them.
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

ROOT = os.path.join(os.path.dirname(__file__), "..")
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def step_time_table(report) -> str:
    from benchmarks.step_time import markdown_table
    return markdown_table(report)


def defaults_table(report) -> str:
    from benchmarks.defaults import markdown_table
    return markdown_table(report)


def damping_table(report) -> str:
    from benchmarks.damping import markdown_table
    return markdown_table(report)


def memory_table(report) -> str:
    from benchmarks.memory import markdown_table
    return markdown_table(report)


def profile_step_table(report) -> str:
    from benchmarks.profile_step import markdown_table
    return markdown_table(report)


def capture_overhead_table(report) -> str:
    from benchmarks.capture_overhead import markdown_table
    return markdown_table(report)


TABLES = {"step_time": step_time_table, "defaults": defaults_table, "memory": memory_table,
          "profile_step": profile_step_table, "capture_overhead": capture_overhead_table,
          "damping": damping_table}


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


def main():
    tables = {**TABLES, **extra_tables()}
    for path in documents():
        text = original = open(path).read()
        for name, render in tables.items():
            result = os.path.join(RESULTS, f"{name}.json")
            if not os.path.exists(result) or f"<!-- {name} -->" not in text:
                continue
            with open(result) as f:
                table = render(json.load(f))
            text = re.sub(rf"<!-- {name} -->.*?<!-- /{name} -->",
                          lambda _: f"<!-- {name} -->\n{table}<!-- /{name} -->", text, flags=re.S)
            print(f"updated table {name} in {os.path.relpath(path, ROOT)} from {result}")
        if text != original:
            with open(path, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
