"""`kd prepare` through the CLI: tables, --json, --force, exit codes and error/hint lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jobs
from clirun import kd


def write_recipe(path: Path, data: str) -> Path:
    return jobs.write_recipe(path, {"name": "fin", "task": "classify", "data": {"format": "fpb", "path": data},
                                    "student": {"ref": "bert-base-uncased"}, "loss": {"alpha": 1.0}})


@pytest.fixture
def recipe(tmp_path, monkeypatch) -> Path:
    """A recipe over 60 release-format PhraseBank lines, run from tmp_path."""
    monkeypatch.chdir(tmp_path)
    labels = ["negative", "neutral", "neutral", "positive"]
    lines = [f"Line {i} about sales .@{labels[i % 4]}\r\n" for i in range(60)]
    (tmp_path / "fpb.txt").write_bytes("".join(lines).encode("latin-1"))
    return write_recipe(tmp_path / "fin.toml", "fpb.txt")


def test_prepare_prints_a_table_then_a_noop(recipe):
    first = kd("prepare", str(recipe))
    assert "stage main" in first.stdout and "first prepare" in first.stdout
    assert "negative: 12" in first.stdout and "48" in first.stdout  # train: 48 of 60 rows
    assert 'name = "fin"' in (recipe.parent / "runs" / "fin" / "recipe.resolved.toml").read_text()
    second = kd("prepare", str(recipe))
    assert "up to date (no changes)" in second.stdout
    forced = kd("prepare", str(recipe), "--force")
    assert "--force" in forced.stdout


def test_prepare_json(recipe):
    result = kd("prepare", str(recipe), "--json", "--set", "data.limit=10")
    (stage,) = json.loads(result.stdout)
    assert stage["stage"] == "main" and stage["counts"] == {"train": 10, "validation": 6, "test": 6}
    train = stage["label_histograms"]["train"]  # 12/24/12 in train, cut to 10 keeping the proportions
    assert train["neutral"] == 5 and sorted([train["negative"], train["positive"]]) == [2, 3]


def test_bad_data_is_error_and_hint_without_traceback(recipe, tmp_path):
    with open(tmp_path / "fpb.txt", "ab") as handle:
        handle.write(b"A sentence .@bullish\r\n")
    result = kd("prepare", str(recipe), code=1)
    assert "error: " in result.stderr and "fpb.txt:61: unknown label 'bullish'" in result.stderr
    assert "hint: " in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_missing_data_file(recipe, tmp_path):
    write_recipe(recipe, "nope/fpb.txt")
    result = kd("prepare", str(recipe), code=1)
    assert "data file not found: nope/fpb.txt" in result.stderr


def test_missing_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = kd("prepare", "absent.toml", code=1)
    assert "error:" in result.stderr


def test_prepare_and_check_show_the_transfer_set(recipe, tmp_path):
    """`kd check` names the transfer set and, once prepared, what was kept and dropped; `kd prepare`
    shows it as a split and says where its rows came from."""
    news = [f"News {i} about costs .@neutral\r\n" for i in range(5)]
    (tmp_path / "news.txt").write_bytes("".join(news + ["Line 3 about sales .@whatever\r\n"]).encode("latin-1"))
    jobs.write_recipe(recipe, {"name": "fin", "task": "classify", "student": {"ref": "bert-base-uncased"},
                               "teachers": {"t": {"ref": "bert-base-uncased"}}, "loss": {"alpha": 0.5},
                               "data": {"format": "fpb", "path": "fpb.txt", "transfer": {"files": ["news.txt"]}}})
    wide = {"COLUMNS": "200"}  # no line wrapped
    checked = kd("check", str(recipe), env=wide)
    assert "+ transfer set" in checked.stdout and "transfer set: news.txt; 0.5 of each step" in checked.stdout
    assert "not prepared yet" in checked.stdout
    prepared = kd("prepare", str(recipe), env=wide)
    assert "transfer: 5 of 6 rows kept; dropped 1 equal to a" in prepared.stdout  # Line 3 is a labelled row
    assert "news.txt: 6 read, 5 kept" in prepared.stdout
    assert any(line.split()[1:3] == ["transfer", "│"] and line.split()[3] == "5"
               for line in prepared.stdout.splitlines() if line.startswith("│"))
    checked = kd("check", str(recipe), env=wide)
    assert "last prepared: 5 of 6 rows kept" in checked.stdout and "news.txt: 6 read, 5 kept" in checked.stdout
    document = json.loads(kd("check", str(recipe), "--json").stdout)
    assert document["transfer"]["main"]["kept"] == 5
    (stage,) = json.loads(kd("prepare", str(recipe), "--json").stdout)
    assert stage["counts"]["transfer"] == 5 and stage["transfer"]["rows_read"] == 6
    assert sum(stage["transfer"]["dropped"].values()) == 1
