"""`kd bench`: round-robin timing and its intervals (on a fake clock and on tiny models), what a result records,
and how it finds sizes and the latest run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import jobs
from clirun import kd
from kdcli import bench as bench_module
from kdcli import recipe
from kdcli.bench import Timed, bench_roles, latest_run, size_on_disk, time_round_robin
from kdcli.errors import KdError
from kdcli.report import collect_run
from kdcli.roles import Role
from kdcli.timing import Timing, median_interval, pooled, ratio


class Clock:
    """Stands in for the bench module's ``time``: a model's call takes its own milliseconds, times
    ``load`` (a burst of other work on the machine slows every call while it lasts)."""

    def __init__(self) -> None:
        self.now, self.load, self.calls = 0.0, 1.0, []

    def perf_counter(self) -> float:
        return self.now

    def model(self, name: str, ms: float):
        def call(batch):
            self.calls.append(name)
            self.now += ms * self.load * len(batch) / 1000
        return call


def fake(clock: Clock, name: str, ms: float) -> Timed:
    return Timed(name, clock.model(name, ms), {1: [[0]], 4: [[0] * 4]})


def test_rounds_interleave_the_models_each_led_by_the_next_and_blocks_last_50_ms(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench_module, "time", clock)
    models = [fake(clock, "a", 1.0), fake(clock, "b", 2.0), fake(clock, "c", 4.0)]
    for model in models:
        model.warm_up(2, sync=lambda: None)
        for size, calls in model.calls.items():  # the fewest calls that last 50 ms
            once = {"a": 1, "b": 2, "c": 4}[model.name] * size / 1000
            assert calls * once >= 0.05 - 1e-9 and (calls - 1) * once < 0.05
    clock.calls.clear()
    done = time_round_robin(models, rounds=4, precision=0.01, max_seconds=60)
    assert done == 4  # every round took the same time: the intervals are points at once
    per_round = sum(sum(m.calls.values()) for m in models)
    leaders = [clock.calls[r * per_round] for r in range(4)]
    assert leaders == ["a", "b", "c", "a"]
    assert models[1].seconds[4] == [pytest.approx(0.008)] * 4  # 4 examples of 2 ms, per call


def test_a_burst_of_load_slows_the_models_of_a_round_alike_and_their_ratio_holds(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench_module, "time", clock)
    slow, fast = fake(clock, "slow", 3.0), fake(clock, "fast", 1.0)
    for model in (slow, fast):
        model.warm_up(0, sync=lambda: None)
    bursts = iter([1.0, 1.0, 2.5, 1.0, 1.0, 1.7, 1.0, 1.0, 1.0, 1.0, 3.0, 1.0])

    def next_round(done: int) -> None:
        clock.load = next(bursts)

    done = time_round_robin([slow, fast], rounds=12, precision=0.01, max_seconds=1.0, on_round=next_round)
    one = lambda model: Timing(*median_interval(model.seconds[1]), tuple(model.seconds[1]), "s")  # noqa: E731
    speedup, low, high = ratio(one(slow), one(fast))
    assert done == 12 and (speedup, low, high) == pytest.approx((3.0, 3.0, 3.0))  # paired: the bursts cancel
    unpaired = ratio(Timing(*median_interval(slow.seconds[1])), Timing(*median_interval(fast.seconds[1])))
    assert unpaired[2] - unpaired[1] > 1.0  # the same timings unpaired: the bursts widen the interval


def test_timing_stops_when_the_intervals_are_tight_or_the_time_is_up(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(bench_module, "time", clock)
    noisy = fake(clock, "noisy", 1.0)
    noisy.warm_up(0, sync=lambda: None)
    loads = iter([1.0, 1.5] * 1000)
    done = time_round_robin([noisy], rounds=3, precision=0.01, max_seconds=2.0,
                            on_round=lambda done: setattr(clock, "load", next(loads)))
    assert 3 < done < 30  # never tight: rounds of about 0.1 s until 2 s had passed
    calm = fake(clock, "calm", 1.0)
    calm.warm_up(0, sync=lambda: None)
    assert time_round_robin([calm], rounds=6, precision=0.01, max_seconds=2.0) == 6


def test_the_median_interval_covers_the_true_median_95_times_in_100():
    import random

    rng = random.Random(0)
    for n in (8, 15, 40):
        covered = 0
        for _ in range(2000):
            values = [rng.lognormvariate(0, 1) for _ in range(n)]  # skewed, like timings; its median is 1
            median, low, high = median_interval(values)
            assert min(values) <= low <= median <= high <= max(values)
            covered += low <= 1.0 <= high
        assert 0.94 <= covered / 2000 <= 0.995, (n, covered)
    assert median_interval([3.0, 1.0, 2.0])[1:] == (1.0, 3.0)  # too few values for 95%: the whole range


def test_intervals_that_share_a_value_overlap_and_pooled_rounds_are_their_means():
    a = Timing(2.0, 1.8, 2.2, (2.0, 2.1, 1.9), "s")
    b = Timing(2.1, 2.15, 2.4, (2.2, 2.1, 2.0), "s")
    assert a.overlaps(b) and not a.overlaps(Timing(3.0, 2.5, 3.5)) and not a.overlaps(Timing(2.0))
    assert pooled([a, b]).by_round == pytest.approx((2.1, 2.1, 1.95))
    assert pooled([a, Timing(2.4, 2.0, 2.6)]) == Timing(pytest.approx(2.2), 1.8, 2.6)  # not paired: widest


def bench_recipe(root: Path, tiny, **bench) -> Path:
    """Teachers a and b: two copies of one tiny BERT; c: the same with four times the layers."""
    jobs.write_sentences(root / "s.jsonl", 60)
    copies = {}
    for name in ("a", "b"):
        copies[name] = root / name
        shutil.copytree(tiny("bert", "sequence-classification", num_labels=3, layers=2), copies[name])
    deeper = tiny("bert", "sequence-classification", num_labels=3, layers=8)
    return jobs.write_recipe(root / "recipe.toml", {
        "name": "bench", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"from_teacher": "a", "layers": [0]},
        "teachers": {"a": {"ref": str(copies["a"])}, "b": {"ref": str(copies["b"])}, "c": {"ref": str(deeper)}},
        "bench": {"batch_sizes": [4], "warmup": 2, "iters": 12, "precision": 0.03, "max_seconds": 6, "threads": 1,
                  **bench},
    })


def test_two_copies_of_a_model_agree_and_four_times_the_layers_is_slower(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench_recipe(tmp_path, tiny)
    for attempt in range(3):  # the same verdict three times over, on a machine other tests are using
        shown = json.loads(kd("bench", "recipe.toml", "--model", "teacher:a,teacher:b,teacher:c", "--json").stdout)
        results = {r["role"]: r for r in shown["results"]}
        assert len({r["session"]["id"] for r in results.values()}) == 1  # timed together
        one = {role: results[role]["batches"]["1"]["latency_ms_per_example"]["ci95"] for role in results}
        assert one["teacher:a"][0] <= one["teacher:b"][1] and one["teacher:b"][0] <= one["teacher:a"][1], one
        rows = {row["role"]: row for row in collect_run(tmp_path / "runs" / "bench").rows}
        assert rows["teacher:a"]["same_speed_as"] == ["teacher:b"] and rows["teacher:c"]["same_speed_as"] == []
        assert rows["teacher:a"]["ms_per_example"] == rows["teacher:b"]["ms_per_example"]  # one speed, pooled
        for copy in ("teacher:a", "teacher:b"):  # faster than the deeper model, the interval clear of 1x
            low, high = rows[copy]["speedup_ci95"]
            assert 1.0 < low <= rows[copy]["speedup"] <= high and rows[copy]["speedup_measurable"], (attempt, rows)


def test_a_bench_result_says_how_it_was_measured(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = recipe.load(bench_recipe(tmp_path, tiny, iters=6, batch_sizes=[4, 8, 4]))
    threads_before = torch.get_num_threads()
    (result,) = bench_roles(loaded, [Role.parse("teacher:a")])
    assert json.loads(Path(result["path"]).read_text()) == {k: v for k, v in result.items() if k != "path"}
    assert list(result["batches"]) == ["1", "4", "8"]  # batch 1 always first; each size once
    for size, measured in result["batches"].items():
        assert measured["rounds"] == len(measured["ms_per_example_by_round"]) >= 6 and measured["calls_per_round"] >= 1
        for key in ("latency_ms_per_example", "batch_ms"):
            p = measured[key]
            assert 0 < p["ci95"][0] <= p["p50"] <= p["ci95"][1] and p["iqr"][0] <= p["p50"] <= p["iqr"][1], (size, p)
        assert measured["batch_ms"]["p50"] == pytest.approx(measured["latency_ms_per_example"]["p50"] * int(size))
        assert measured["throughput"] == pytest.approx(int(size) * 1000 / measured["batch_ms"]["p50"])
    assert result["threads"] == 1 and torch.get_num_threads() == threads_before  # recorded, then restored
    assert result["device"] == "cpu" and result["dtype"] == "float32"
    assert result["architecture"] == "BertForSequenceClassification"
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a")
    assert result["weight_bytes"] == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert result["call_memory_bytes"] >= 0 and result["memory_kind"] == "rss"
    assert result["peak_memory_bytes"] == result["weight_bytes"] + result["call_memory_bytes"]
    session = result["session"]
    assert session["roles"] == ["teacher:a"] and session["order"] == "round-robin" and session["seconds"] > 0
    assert set(session["load_average_1m"]) == {"before", "after"} and result["env"]["cpu"]


def test_bench_needs_inputs(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loaded = recipe.load(bench_recipe(tmp_path, tiny, max_examples=1))
    monkeypatch.setattr(bench_module, "stage_data", lambda *a, **k: type("D", (), {"rows": {"test": []},
                                                                                   "num_classes": 3})())
    with pytest.raises(KdError, match="no examples"):
        bench_roles(loaded, [Role.parse("teacher:a")])


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
