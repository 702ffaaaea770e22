"""The README's numbers are the results files' numbers: its quickstart table and wall time are checked
against `benchmarks/results/quickstart.json` (the file the README names), not against a new run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results" / "quickstart.json"
START, END = "<!-- quickstart-table:start -->", "<!-- quickstart-table:end -->"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md has lost its {START} ... {END} block"
    return text[text.index(START) + len(START) : text.index(END)]


def parse_table(text: str) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, cells (bold markers stripped) and which rows were bold, of the one markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])] for line in lines]
    header, rows = split[0], split[2:]
    assert all(re.fullmatch(r"-{3}:?", cell) for cell in split[1]), lines[1]
    bold = [all(cell.startswith("**") and cell.endswith("**") for cell in row if cell) for row in rows]
    return header, [[cell.removeprefix("**").removesuffix("**") for cell in row] for row in rows], bold


def number(cell: str, suffix: str = "") -> float:
    assert cell.endswith(suffix), f"{cell!r} should end with {suffix!r}"
    return float(cell.removesuffix(suffix))


def decimals(cell: str) -> int:
    digits = re.sub(r"[^0-9.]", "", cell)
    return len(digits.split(".")[1]) if "." in digits else 0


def agrees(cell: str, value, key: str) -> bool:
    """Does the formatted ``cell`` show ``value`` (the raw number of column ``key``), to the digits it shows?"""
    if key in ("role", "model"):
        return cell == value
    if key == "parameters":
        units = {"B": 1e9, "M": 1e6, "K": 1e3}
        unit = cell[-1] if cell[-1] in units else ""
        scale = units.get(unit, 1)
        return abs(number(cell, unit) * scale - value) <= 0.5 * 10 ** -decimals(cell) * scale + 1e-9
    suffix = {"kept_pct": "%", "speedup": "x", "size_ratio": "x"}.get(key, "")
    return abs(number(cell, suffix) - value) <= 0.5 * 10 ** -decimals(cell) + 1e-12


@pytest.fixture(scope="module")
def results() -> dict:
    summary = json.loads(RESULTS.read_text(encoding="utf-8"))
    assert summary["benchmark"] == "quickstart" and summary["quick"] is False, "the README shows the real quickstart"
    return summary


def test_readme_names_the_results_file_it_shows():
    assert "benchmarks/results/quickstart.json" in readme_block()


def test_readme_quickstart_table_is_the_results_files_table(results):
    """Same roles in the same order, same columns, every cell the file's number as kd compare formats it."""
    (table,) = results["compare"]
    header, rows, bold = parse_table(readme_block())
    assert header == [c["title"] for c in table["columns"]]
    assert [row[0] for row in rows] == [r["role"] for r in table["rows"]]
    for row, raw in zip(rows, table["rows"]):
        for cell, column in zip(row, table["columns"]):
            value = raw[column["key"]]
            assert (cell == "") == (value is None), f"{raw['role']} {column['key']}: {cell!r} vs {value!r}"
            if value is not None:
                where = f"{raw['role']} {column['key']}: README {cell!r}, file {value!r}"
                if column["key"] in ("role", "model"):
                    assert cell == value, where
                    continue
                shown = re.fullmatch(r"(\S+)(?: \[(\S+), (\S+)\])?(?: ([=≈]))?", cell)
                assert shown, where
                main, low, high, mark = shown.groups()
                assert agrees(main, value, column["key"]), where
                interval = raw.get(f"{column['key']}_ci95")
                assert (low is None) == (interval is None), where  # a timing shows its 95% interval
                if low is not None:
                    assert agrees(low, interval[0], column["key"]) and agrees(high, interval[1], column["key"]), where
                if mark == "=":  # one speed for one architecture, as the file says
                    assert raw["same_speed_as"], where
                if mark == "≈":
                    assert raw["speedup_measurable"] is False, where
    assert [r["role"] for r, b in zip(table["rows"], bold) if b] == [table["best"]]


def test_readme_quickstart_table_is_what_kd_compare_printed(results):
    """Byte for byte the table lines of the `kd compare --format md` output the file keeps."""
    printed = [line for line in results["compare_md"].splitlines() if line.startswith("|")]
    shown = [line for line in readme_block().splitlines() if line.startswith("|")]
    assert shown == printed


def test_readme_wall_time_and_load_are_the_results_files(results):
    block = " ".join(readme_block().split())  # the sentence is wrapped
    seconds = round(results["wall_seconds"])
    shown = f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    assert re.search(rf"\b{shown}\b", block), f"README should state the measured wall time {shown}"
    load = results["load_average_1m"]
    assert f"load average {load['before']} when it started and {load['after']} when it ended" in block
    threads = results["env"]["torch_threads"]
    assert f"torch on {threads} thread" in block


@pytest.mark.parametrize("cell, value, key, ok", [
    ("17.4M", 17390979, "parameters", True), ("17.5M", 17390979, "parameters", False),
    ("0.8696", 0.869565, "accuracy", True), ("0.8697", 0.869565, "accuracy", False),
    ("98.4%", 98.36, "kept_pct", True), ("1.80x", 1.7983, "speedup", True), ("1.81x", 1.7983, "speedup", False),
])
def test_the_comparison_bites(cell, value, key, ok):
    assert agrees(cell, value, key) is ok


def test_readme_quickstart_data_sizes_are_the_results_files(results):
    """The sentence counts the quickstart section states are those `kd prepare` recorded in that run."""
    text = README.read_text(encoding="utf-8")
    section = " ".join(text[text.index("## Quickstart") : text.index(START)].split())
    total, test = sum(results["data"]["rows_read"].values()), results["data"]["counts"]["test"]
    assert f"on {total} finance-news sentences" in section
    assert f"The test split has {test} sentences, so one sentence is {100 / test:.1f} points" in section
