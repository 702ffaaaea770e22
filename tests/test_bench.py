"""`kd bench` measurements on a tiny model, and how it finds sizes and the latest run."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import jobs
from kdcli.bench import bench_model, latest_run, size_on_disk
from kdcli.errors import KdError
from kdcli.models import load_task_model
from kdcli.recipe import ModelSpec

ROWS = [
    {"id": str(i), "text": text, "options": [], "label": i % 3, "answers": []}
    for i, text in enumerate([
        "Operating profit rose to EUR 13.1 mn.",
        "Net sales fell by 5 percent in the third quarter.",
        "Shares of the bank were unchanged after the report.",
        "The group cut 200 jobs to reduce costs and the outlook for the year was lowered again.",
        "Orders received increased by 12 percent.",
    ])
]


@pytest.fixture(scope="module")
def classifier(tiny):
    return load_task_model(ModelSpec(ref=str(tiny("bert", "sequence-classification", num_labels=3))), "classify", 3)


def test_bench_percentiles_are_positive_and_ordered(classifier):
    threads_before = torch.get_num_threads()
    result = bench_model(classifier, ROWS, batch_sizes=[4, 8, 4], warmup=1, iters=6, threads=1, max_length=32)
    assert list(result["batches"]) == ["1", "4", "8"]  # batch 1 always first; duplicates dropped
    for size, measured in result["batches"].items():
        for key in ("latency_ms_per_example", "batch_ms"):
            p = measured[key]
            assert 0 < p["p50"] <= p["p95"] and p["mean"] > 0, (size, key, p)
        assert measured["throughput"] > 0 and measured["iters"] == 6
    assert result["threads"] == 1 and torch.get_num_threads() == threads_before  # recorded, then restored
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["peak_memory_bytes"] > 0 and result["memory_kind"].startswith("rss")


class Clock:
    """Stands in for the bench module's ``time``: each forward pass of n examples takes
    1 ms + n x 2 ms, plus 1 ms more on every other pass; nothing else takes any time."""

    def __init__(self) -> None:
        self.now, self.passes = 0.0, []

    def perf_counter(self) -> float:
        return self.now

    def forward(self, real):
        def timed(batch, *rest):
            n = int(batch["input_ids"].shape[0])
            self.passes.append(n)
            self.now += (1 + 2 * n + (len(self.passes) % 2)) / 1000
            return real(batch, *rest)
        return timed


def test_bench_times_each_batch_size_and_reports_per_example_latency_and_throughput(classifier, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(sys.modules[bench_model.__module__], "time", clock)
    monkeypatch.setattr(classifier, "class_logits", clock.forward(classifier.class_logits))
    result = bench_model(classifier, ROWS, batch_sizes=[4], warmup=2, iters=4, threads=1, max_length=32)
    assert clock.passes == [1] * 6 + [4] * 6  # warm-up passes run, untimed, before the timed ones
    for size, base in ((1, 3.0), (4, 9.0)):
        # The timed passes are 3-6 and 9-12 of all: two of each four take 1 ms more.
        batch_ms = [base, base, base + 1, base + 1]
        measured = result["batches"][str(size)]
        assert measured["batch_ms"]["mean"] == pytest.approx(sum(batch_ms) / 4)
        assert measured["batch_ms"]["p50"] == pytest.approx(base + 0.5)
        assert measured["batch_ms"]["p95"] == pytest.approx(base + 1)
        assert measured["latency_ms_per_example"]["mean"] == pytest.approx(sum(batch_ms) / 4 / size)
        assert measured["throughput"] == pytest.approx(size / (sum(batch_ms) / 4 / 1000))


def test_bench_needs_inputs(classifier):
    with pytest.raises(KdError, match="no examples"):
        bench_model(classifier, [], batch_sizes=[1], warmup=0, iters=1)


def test_size_on_disk_counts_weight_files(tiny, tmp_path):
    path = tiny("bert", "sequence-classification", num_labels=3)
    assert size_on_disk(path) == (path / "model.safetensors").stat().st_size
    assert size_on_disk(None) is None and size_on_disk(tmp_path) is None


def test_latest_run_is_the_most_recently_changed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match="no runs"):
        latest_run()
    for age, name in ((100, "new"), (1000, "old")):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        jobs.write_recipe(run / "recipe.resolved.toml", {"name": name})
        then = 1_700_000_000 - age
        for path in (run / "recipe.resolved.toml", run):
            os.utime(path, (then, then))
    assert latest_run().parent.name == "new"
