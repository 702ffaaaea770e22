"""Every benchmark script runs in its --quick mode (tiny models), so none of them can rot, and what it
reports is sane: the fields a reader of its result file relies on are there, finite, and in range."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))  # _common.py is shared code


def numbers(value: Any, where: str = "") -> list[tuple[str, float]]:
    """Every number in a JSON document, with its path."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(where, value)]
    items = value.items() if isinstance(value, dict) else enumerate(value)
    return [found for key, item in items for found in numbers(item, f"{where}.{key}" if where else str(key))]


def positive(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


def share(value: float) -> bool:
    return 0.0 <= value <= 1.0


def rates(summary: dict, runs_key: str = "all_runs") -> None:
    """samples/s: positive, one per timed repeat, and the reported one the median of them."""
    for name, rate in summary["samples_per_second"].items():
        runs = summary[runs_key][name]
        assert len(runs) == summary["repeats"] and positive(rate, *runs), (name, rate, runs)
        assert rate == pytest.approx(statistics.median(runs), abs=0.011), name


def ratio(summary: dict, key: str, top: float, bottom: float) -> None:
    assert summary[key] == pytest.approx(top / bottom, rel=0.01, abs=0.002), key


def check_cache_payoff(s: dict) -> None:
    speed, epoch = s["samples_per_second"], s["epoch_seconds"]
    assert set(speed) == set(epoch) == {"cached", "live"} and positive(s["cache_seconds"], *speed.values())
    for kind in speed:
        assert epoch[kind] == pytest.approx(s["train_rows"] / speed[kind], rel=0.02, abs=0.01), kind
    assert list(s["total_seconds"]) == ["1", "3", "10"]
    for n, total in s["total_seconds"].items():
        assert total["live"] == pytest.approx(int(n) * epoch["live"], rel=0.02, abs=0.1)
        assert total["cached"] == pytest.approx(s["cache_seconds"] + int(n) * epoch["cached"], rel=0.02, abs=0.1)
    if s["break_even_epochs"] is not None:  # None when the cache does not pay off at all
        assert positive(s["break_even_epochs"]) and epoch["live"] > epoch["cached"]


def check_distill_speed(s: dict) -> None:
    assert set(s["samples_per_second"]) == {"plain", "cached", "live"} and s["rows"] > 0 and s["steps"] > 0
    rates(s)
    speed = s["samples_per_second"]
    ratio(s, "cached_vs_plain", speed["cached"], speed["plain"])
    ratio(s, "live_vs_plain", speed["live"], speed["plain"])
    ratio(s, "cached_vs_live", speed["cached"], speed["live"])
    assert positive(s["cache_build_seconds"])


def check_teacher_8bit(s: dict) -> None:
    modes = s["causal_lm"]["modes"]
    fp32, int8 = modes["fp32"], modes["8-bit"]
    assert int8["weights_bytes"] < fp32["weights_bytes"] and positive(int8["weights_bytes"])
    assert s["weights_smaller_8bit"] == pytest.approx(fp32["weights_bytes"] / int8["weights_bytes"], abs=0.01)
    assert s["target_weights_met"] == (s["weights_smaller_8bit"] >= 2)
    for m in modes.values():
        assert positive(m["load_peak_bytes"], m["tokens"]) and share(m["top1_agreement"]) and m["kl"] >= 0
        assert m["peak_bytes"] >= m["load_peak_bytes"]  # the peak over loading and a pass includes the load's
    assert fp32["kl"] == pytest.approx(0, abs=1e-6) and fp32["top1_agreement"] == 1  # fp32 against itself
    assert int8["kl"] < 0.1 and int8["top1_agreement"] >= 0.5  # 8 bits barely move the distributions
    timing = s["causal_lm"]["timing"]
    assert set(timing["ms_per_batch"]) == set(modes) and timing["rounds"] >= 3
    for mode, sizes in timing["ms_per_batch"].items():
        assert set(sizes) == {"1", "16"} and all(b["ci95"][0] <= b["p50"] <= b["ci95"][1] for b in sizes.values())
    assert all(positive(*ratios.values()) for ratios in timing["paired_ratio_to_fp32"].values())
    clf = s["classifier"]
    assert share(clf["teacher_accuracy_fp32"]) and set(clf["teacher"]) == set(modes) - {"fp32"}
    for t in clf["teacher"].values():
        assert share(t["accuracy"]) and share(t["agreement"]) and t["units"] == clf["test_rows"]
        assert abs(t["accuracy"] - clf["teacher_accuracy_fp32"]) <= 1 - t["agreement"] + 1e-9
    students = clf["student"]
    assert clf["student_gap_points"] == pytest.approx(
        100 * (students["8bit_cache"]["accuracy"] - students["fp32_cache"]["accuracy"]), abs=0.01)
    assert s["target_student_met"] == (abs(clf["student_gap_points"]) <= 0.5)


def check_lowlabel_teacher(s: dict) -> None:
    assert s["split"] == "validation" and s["results"]
    for r in s["results"]:
        assert set(r["per_seed"]) == {str(seed) for seed in s["seeds"]}
        for m in ("accuracy", "macro_f1"):
            assert r[f"{m}_mean"] == pytest.approx(statistics.mean(x[m] for x in r["per_seed"].values()))
    best = max(s["results"], key=lambda r: r["macro_f1_mean"])
    assert s["best"] == {"epochs": best["epochs"], "lr": best["lr"]}


def check_topk_cache(s: dict) -> None:
    assert s["vocab_size"] > 0 and s["answer_tokens"] > 0 and s["dense_fp16_bytes_per_token"] == 2 * s["vocab_size"]
    assert s["results"]
    for r in s["results"]:
        assert 0 < r["k"] <= s["vocab_size"] and positive(r["temperature"])
        stored = [v for k, v in r.items() if k.endswith("bytes_per_token")]
        # top-k is smaller than dense
        assert stored and positive(*stored) and max(stored) < s["dense_fp16_bytes_per_token"], r
        assert share(r["tail_mass_mean"]) and share(r["tail_mass_p95"]), r
        assert r["kl_reconstruction_mean"] >= 0 and r["kl_collapsed_mean"] >= -1e-6, r
        for key, value in r.items():
            if key.endswith("_grad_cosine"):
                assert -1 - 1e-6 <= value <= 1 + 1e-6, (key, value)
            elif key.endswith(("_dense", "_topk")) or key.endswith("_rel_error"):
                assert value >= -1e-6, (key, value)  # divergences and their errors are not negative
    per_k = s["student_per_k"]["results"]
    assert per_k[0]["k"] == "none (untrained)" and len(per_k) > 1
    for r in per_k:
        assert r["kl_to_teacher"] >= 0 and share(r["top1_agreement"]), r


def check_trainer_baseline(s: dict) -> None:
    assert set(s["samples_per_second"]) == {
        "trainer_live", "kd_live_steps", "kd_live_wall", "kd_cached_steps", "kd_cached_wall"
    }
    rates(s)
    speed = s["samples_per_second"]
    ratio(s, "kd_live_vs_trainer", speed["kd_live_wall"], speed["trainer_live"])
    ratio(s, "kd_cached_vs_trainer", speed["kd_cached_wall"], speed["trainer_live"])
    # Wall-clock rates include validation and checkpoints: never above the optimizer steps' own rate.
    assert (speed["kd_live_wall"] <= speed["kd_live_steps"] * 1.01
            and speed["kd_cached_wall"] <= speed["kd_cached_steps"] * 1.01)


def check_bench_repeat(s: dict) -> None:
    assert s["verdicts"]["of"] == len(s["repeats"]) == 2
    for verdict in ("same_one_speed", "speedup_excludes_1"):
        assert s["verdicts"][verdict] == sum(
            r["same_shown_as_one_speed"] if verdict == "same_one_speed" else r["speedup"]["excludes_1"]
            for r in s["repeats"])
    for r in s["repeats"]:
        assert set(r["models"]) == {"teacher:tiny", "baseline", "dataset", "student", "export:student-torch-int8"}
        for role, m in r["models"].items():
            for size in ("1", "8"):
                low, high = m[f"ms_batch_{size}_ci95"]
                assert 0 < low <= m[f"ms_batch_{size}"] <= high, role
            assert role not in m["same_speed_as"] and "export:student-torch-int8" not in m["same_speed_as"], role
        speedup = r["speedup"]
        assert speedup["ci95"][0] <= speedup["value"] <= speedup["ci95"][1]
        assert speedup["excludes_1"] == (not speedup["ci95"][0] <= 1 <= speedup["ci95"][1])
        assert r["same_shown_as_one_speed"] == all(
            sorted([role, *r["models"][role]["same_speed_as"]]) == sorted(s["same"]) for role in s["same"])
        assert r["session"]["rounds"] >= 6


def check_fresh_install(s: dict) -> None:
    names = [step["step"] for step in s["steps"]]
    assert names == (["kd run"] if s["quick"] else ["python -m venv", "pip install torch", "pip install kd", "kd run"])
    assert positive(*(step["seconds"] for step in s["steps"]))
    assert s["total_seconds"] == pytest.approx(sum(step["seconds"] for step in s["steps"]), abs=0.1)
    assert s["met"] == (s["total_seconds"] < s["target_seconds"])


def check_quickstart(s: dict) -> None:
    assert positive(s["wall_seconds"], *s["all_wall_seconds"]) and len(s["all_wall_seconds"]) == s["repeats"]
    assert s["wall_seconds"] == pytest.approx(statistics.median(s["all_wall_seconds"]), abs=0.1)
    assert sum(s["data"]["counts"].values()) + s["data"]["duplicates_dropped"] <= sum(s["data"]["rows_read"].values())
    (table,) = s["compare"]
    rows = {row["role"]: row for row in table["rows"]}
    assert list(rows) == ["teacher:minilm", "baseline", "dataset", "student"] and table["best"] in rows
    for role, row in rows.items():
        assert share(row["accuracy"]) and share(row["f1"]) and positive(row["ms_per_example"], row["parameters"]), role
    assert rows["teacher:minilm"]["kept_pct"] == pytest.approx(100.0)
    assert all(f"| {role} |" in s["compare_md"] or f"| **{role}** |" in s["compare_md"] for role in rows)


def check_cache_verify(s: dict) -> None:
    for kind in ("check", "load"):
        runs = s[f"all_{kind}_seconds"]
        assert len(runs) == s["repeats"] and positive(*runs), kind
        assert s[f"{kind}_seconds"] == pytest.approx(statistics.median(runs), abs=1e-4), kind
    assert positive(s["megabytes"], s["rows"], s["shards"])
    ratio(s, "check_vs_load", s["check_seconds"], s["load_seconds"])
    assert s["check_megabytes_per_second"] == pytest.approx(s["megabytes"] / s["check_seconds"], rel=0.02)


def check_cache_memory(s: dict) -> None:
    assert list(s["caches"]) == ["classify", "generate"] and s["target_megabytes"] == 100
    assert positive(s["batches"], s["batch_size"]) and s["top_k"] == 32 and s["old_reader"] is None
    for kind, sizes in s["caches"].items():
        assert list(sizes) == ["small", "large"], kind
        small, large = sizes["small"], sizes["large"]
        assert 0 < small["rows"] < large["rows"] and 0 < small["megabytes"] < large["megabytes"], kind
        assert 1 <= small["shards"] <= large["shards"] and (small["tokens"] is None) == (kind == "classify"), kind
        for size in (small, large):
            # a peak never falls: after imports <= once the cache is open <= after the batches
            assert 0 < size["start_rss_megabytes"] <= size["opened_rss_megabytes"] <= size["peak_rss_megabytes"]
            assert positive(size["open_seconds"], size["read_ms_per_batch"]), (kind, size)
        growth = large["peak_rss_megabytes"] - small["peak_rss_megabytes"]
        assert s["growth_megabytes"][kind] == pytest.approx(growth, abs=0.11), kind
        assert s["within_target"][kind] == (s["growth_megabytes"][kind] < 100), kind
    # The quick caches are small, but the large ones are 10x the small: reading them must not show.
    assert all(s["within_target"].values()), s["growth_megabytes"]


def check_prepare_scale(s: dict) -> None:
    runs = s["runs"]
    assert [r["rows"] for r in runs] == sorted(r["rows"] for r in runs) and len(runs) >= 2 and "commit" in s
    for r in runs:
        assert positive(r["csv_megabytes"], r["wall_seconds"], r["prepare_seconds"], r["peak_rss_megabytes"],
                        r["ru_maxrss_megabytes"]), r
        assert r["prepare_seconds"] <= r["wall_seconds"] and sum(r["counts"].values()) == r["rows"], r
        assert r["rows_per_second"] == pytest.approx(r["rows"] / r["wall_seconds"], abs=1), r
        assert r["prepare_rows_per_second"] == pytest.approx(r["rows"] / r["prepare_seconds"], abs=1), r
        # VmHWM is the process's own; ru_maxrss also counts the small parent's memory at the fork.
        assert r["peak_rss_megabytes"] <= r["ru_maxrss_megabytes"] + 1, r
        assert r["target_megabytes"] == (500 if r["rows"] <= 1_000_000 else 1000)
        assert r["memory_within_target"] == (r["peak_rss_megabytes"] < r["target_megabytes"]), r
        assert r["speed_within_target"] is None if r["rows"] < 1_000_000 else isinstance(r["speed_within_target"], bool)
    assert [(m["from_rows"], m["to_rows"]) for m in s["marginal"]] == [(a["rows"], b["rows"]) for a, b in
                                                                        zip(runs, runs[1:])]
    assert all(r["memory_within_target"] for r in runs)  # the quick sizes are far below the targets


def check_llm_step_cost(s: dict) -> None:
    kinds = ["sft", "token_cached", "token_live", "on_policy"]
    assert list(s["seconds_per_step"]) == kinds
    for kind in kinds:
        runs = s["all_seconds_per_step"][kind]
        assert len(runs) == s["rounds"] and positive(*runs), kind
        assert s["seconds_per_step"][kind] == pytest.approx(statistics.median(runs), abs=0.0011), kind
        assert s["tokens_per_second"][kind] == pytest.approx(
            s["student_tokens_per_example"] * s["batch_size"] / s["seconds_per_step"][kind], rel=0.02), kind
    assert s["vs_sft"]["sft"] == 1.0 and positive(s["student_tokens_per_example"], s["teacher_parameters"])


def check_fpb_generate(s: dict) -> None:
    rows = ["teacher:smollm2", "baseline", "dataset", "student", "on_policy", "sequence"]
    assert list(s["table"]) == rows and s["seeds"] == ["0"]
    for role in rows:
        mean, std = s["table"][role]["accuracy"]
        assert share(mean) and std == 0.0 and share(s["table"][role]["macro_f1"][0]), role
        assert positive(s["table"][role]["answers_per_s_batch_1"][0], s["table"][role]["parameters"][0]), role
        assert s["per_seed"]["0"]["rows"][role]["n"] > 0, role
    assert s["best_distilled"] in ("student", "on_policy", "sequence") and s["speedup_batch_1"] > 0


def check_trivia_chat(s: dict) -> None:
    rows = list(s["table"])
    variants = rows[4:]  # quick mode: sequence-level only; the full run adds on-policy
    assert rows[:4] == ["teacher:smollm2", "baseline", "dataset", "student"] and "sequence" in variants
    assert set(variants) <= {"sequence", "on_policy"}
    for role in rows:
        r = s["table"][role]
        assert share(r["f1"]) and share(r["exact_match"]) and share(r["agreement"]) and share(r["f1_vs_teacher"]), role
        assert positive(r["gold_loss"], r["parameters"], r["n"]), role
    teacher = s["table"]["teacher:smollm2"]
    assert teacher["agreement"] == 1.0 and teacher["f1_vs_teacher"] == 1.0
    distilled = {"student", *variants}
    assert set(s["agrees_more_than_sft"]) == distilled == set(s["lower_gold_loss_than_sft"])
    sft = s["table"]["dataset"]
    assert s["lower_gold_loss_than_sft"] == {d: s["table"][d]["gold_loss"] < sft["gold_loss"] for d in distilled}


def check_trl_gkd(s: dict) -> None:
    assert s["steps"] > 0 and s["train_rows"] >= s["steps"] * s["batch_size"] and s["trl"]
    assert s["prompts_longer_than_max_length"]["train"] == 0  # both sides read whole prompts
    # Both sides start from the SFT student (quick mode makes its own), trained on fpb_generate's very rows.
    assert s["start"] in ("sft", "cut") and s["start_model"] and s["same_rows_as_fpb_generate"] is not False
    assert not s["quick"] or (s["start"] == "sft" and s["same_rows_as_fpb_generate"] is True)
    for side in ("kd", "trl"):
        runs = s["all_seconds_per_step"][side]
        assert len(runs) == s["steps"] and positive(*runs), side
        assert s["seconds_per_step"][side] == pytest.approx(statistics.median(runs[1:]), abs=0.0011), side
        assert s["loop_seconds"][side] == pytest.approx(sum(runs), abs=0.02), side
        assert positive(s["step_only_seconds_per_step"][side], s["command_seconds"][side]), side
    assert list(s["quality"]) == ["start", "kd", "trl"]  # the starting student, evaluated alike
    for side, quality in s["quality"].items():
        assert quality["n"] == s["quality"]["kd"]["n"] > 0, side
        assert all(share(quality[k]) for k in ("accuracy", "macro_f1", "agreement_with_teacher")), side
    ratio(s, "kd_speedup", s["seconds_per_step"]["trl"], s["seconds_per_step"]["kd"])
    ratio(s, "kd_speedup_step_only", s["step_only_seconds_per_step"]["trl"], s["step_only_seconds_per_step"]["kd"])
    kd_only, trl_only = s["discordant"]["kd_right_trl_wrong"], s["discordant"]["trl_right_kd_wrong"]
    assert s["accuracy_difference"] == pytest.approx((kd_only - trl_only) / s["quality"]["kd"]["n"], abs=1e-4)
    assert share(s["mcnemar_p"]) and (kd_only != trl_only or s["mcnemar_p"] == 1.0)


def check_sorted_batches(s: dict) -> None:
    orders = {"cache": ["data_order", "characters", "sorted"], "eval": ["data_order", "sorted"]}
    assert list(s["seconds"]) == list(s["speedup"]) == list(orders) and s["batch_size"] > 1 and s["rounds"] >= 1
    for p, names in orders.items():
        assert list(s["seconds"][p]) == names and s["rows"][p] > s["batch_size"], p  # more than one batch
        for o in names:
            runs = s["all_seconds"][p][o]
            assert len(runs) == s["rounds"] and positive(*runs), (p, o)
            assert s["seconds"][p][o] == pytest.approx(statistics.median(runs), abs=1e-3), (p, o)
            assert s["ms_per_example"][p][o] == pytest.approx(1000 * s["seconds"][p][o] / s["rows"][p], rel=0.01)
        ratio(s["speedup"], p, s["seconds"][p]["data_order"], s["seconds"][p]["sorted"])
        assert s["meets_target"][p] == (s["speedup"][p] >= s["target_speedup"])
        tokens = s["padded_tokens"][p]
        # No order feeds fewer tokens than the rows hold; on shuffled rows sorting feeds fewer than data order.
        assert list(tokens) == [*names, "unpadded"] and 0 < tokens["unpadded"] <= min(tokens[o] for o in names)
        assert tokens["sorted"] < tokens["data_order"], (p, tokens)
        assert s["token_ratio"][p] == pytest.approx(tokens["data_order"] / tokens["sorted"], abs=0.001)
        assert s["length_seconds"][p] >= 0
    ratio(s, "cache_speedup_vs_characters", s["seconds"]["cache"]["characters"], s["seconds"]["cache"]["sorted"])
    # Every order answers alike: the same predictions, cache rows equal to rounding.
    assert s["same_predictions"] is True and s["same_cache_argmax"] is True
    assert 0 <= s["cache_max_abs_difference"] < 1e-4


def check_parallel_cache(s: dict) -> None:
    configs = ["1x1", "1x2", "2x1"]
    assert list(s["configs"]) == list(s["build_seconds"]) == list(s["command_seconds"]) == configs
    assert [(c["processes"], c["threads_per_process"]) for c in s["configs"].values()] == [(1, 1), (1, 2), (2, 1)]
    rows = sum(s["rows"].values())
    assert set(s["rows"]) == {"train", "validation"} and rows > s["batch_size"] > 1 and s["rounds"] >= 1
    for c in configs:
        for kind in ("build", "command"):
            runs = s[f"all_{kind}_seconds"][c]
            assert len(runs) == s["rounds"] and positive(*runs), (c, kind)
            assert s[f"{kind}_seconds"][c] == pytest.approx(statistics.median(runs), abs=1e-3), (c, kind)
        # The build is part of the command (start-up, imports and loading the teacher are not in it).
        assert all(b < w for b, w in zip(s["all_build_seconds"][c], s["all_command_seconds"][c])), c
        assert s["rows_per_second"][c] == pytest.approx(rows / s["build_seconds"][c], rel=0.01), c
    for key in ("speedup", "command_speedup"):
        seconds = s["build_seconds" if key == "speedup" else "command_seconds"]
        assert list(s[key]) == ["2x1_vs_1x1", "2x1_vs_1x2", "1x2_vs_1x1"]
        for pair, value in s[key].items():
            first, second = pair.split("_vs_")
            assert value == pytest.approx(seconds[second] / seconds[first], rel=0.01, abs=0.002), (key, pair)
    # Two processes write the files one process writes, byte for byte (1x2 may round otherwise: not checked).
    assert s["identical_to_1x1"]["1x1"] is True and s["identical_to_1x1"]["2x1"] is True


def check_scale(s: dict) -> None:
    phases = ["prepare", "cache", "distill", "eval"]
    for task in ("classify", "generate"):
        runs = [r for r in s["runs"] if r["task"] == task and "distill" in r]
        assert len(runs) >= 2 and [r["rows"] for r in runs] == sorted(r["rows"] for r in runs), task
        for r in runs:
            assert all(positive(r[p]["seconds"], r[p]["peak_megabytes"]) for p in phases), r
            assert 0.85 * r["rows"] <= r["train_rows"] <= 0.93 * r["rows"], r  # the recipe's 89 % train split
        grown = runs[-1]["distill"]["peak_megabytes"] - runs[0]["distill"]["peak_megabytes"]
        growth = s["distill_growth"][task]
        assert (growth["from_rows"], growth["to_rows"]) == (runs[0]["rows"], runs[-1]["rows"]), task
        assert growth["distill_peak_growth_megabytes"] == pytest.approx(grown, abs=0.11), task
        assert growth["within_target"] == (growth["distill_peak_growth_megabytes"] < s["target_megabytes"]), task
        assert growth["within_target"], growth  # four times the rows must not show in the quick runs
    assert s["steps"] == 5 and s["plot"] is None


def check_fpb_lowlabel(s: dict) -> None:
    rows = ["teacher", "dataset", "no_transfer", "transfer"]
    assert list(s["settings"]) == ["low", "full"]
    for setting, result in s["settings"].items():
        assert list(result["table"]) == rows and result["seeds"] == ["0"], setting
        run = result["per_seed"]["0"]
        assert run["teacher_finetune"] == result["teacher_finetune"] and result["teacher_finetune"]["epochs"] == 2
        for role in rows:
            mean, std = result["table"][role]["accuracy"]
            assert share(mean) and std == 0.0 and share(result["table"][role]["macro_f1"][0]), (setting, role)
            assert mean == run["rows"][role]["accuracy"], (setting, role)
        assert len({run["rows"][role]["n"] for role in rows}) == 1, setting  # every row scored on the same test rows
        table = result["table"]
        assert result["transfer_minus_dataset_points"] == pytest.approx(
            100 * (table["transfer"]["accuracy"][0] - table["dataset"]["accuracy"][0]), abs=0.006), setting
        assert result["kept_pct"] == pytest.approx(
            100 * table["transfer"]["accuracy"][0] / table["teacher"]["accuracy"][0], abs=0.06), setting
        assert run["counts"]["transfer"] > 0, setting
        # The quick transfer file holds every labelled sentence too: each one in test or validation is dropped.
        dropped = run["transfer"]["dropped"]
        assert dropped["test"] == run["counts"]["test"] and dropped["validation"] == run["counts"]["validation"]
    low, full = (s["settings"][k]["per_seed"]["0"]["counts"] for k in ("low", "full"))
    assert low["train"] == 30 < full["train"] and low["test"] == full["test"]  # a limit on train alone
    assert set(s["targets"]) == {"beats_dataset_by_points", "kept_pct", "met"}


def check_export(s: dict) -> None:
    rows = ["teacher:minilm", "student", "export:student-onnx", "export:student-onnx-int8", "export:student-torch-int8"]
    assert s["rows"] == list(s["table"]) == rows and s["seeds"] == ["42"]
    run = s["per_seed"]["42"]["rows"]
    for role in rows:
        r = run[role]
        assert share(r["accuracy"]) and share(r["macro_f1"]), role
        assert positive(r["ms_batch_1"], r["ms_batch_32"], r["size_megabytes"], r["parameters"], r["n"]), role
        assert s["table"][role]["accuracy"] == [r["accuracy"], 0.0], role
    assert len({run[role]["parameters"] for role in rows[1:]}) == 1  # an export counts its student's parameters
    assert run["export:student-onnx"]["accuracy"] == run["student"]["accuracy"]  # fp32 ONNX: the same answers
    assert run["export:student-onnx-int8"]["size_megabytes"] < run["export:student-onnx"]["size_megabytes"]
    checks = s["per_seed"]["42"]["export_checks"]
    assert list(checks) == ["onnx", "onnx-int8", "torch-int8"] and checks["onnx"]["max_abs_difference"] < 1e-3
    for fmt, check in checks.items():
        assert check["rows"] == check["compared"] > 0 and share(check["argmax_agreement"]), fmt
    for role, drop in s["accuracy_drop_points"].items():
        assert drop == pytest.approx(100 * (run["student"]["accuracy"] - run[role]["accuracy"]), abs=0.006), role
    seed = s["per_seed"]["42"]
    for role, value in s["speedup_vs_teacher_batch_1"].items():  # the median of the rounds' ratios, in its interval
        paired, low, high = seed["speedup_vs_teacher_batch_1"][role]
        assert value == pytest.approx(paired, abs=0.006) and 0 < low <= paired <= high, role
    every = seed["every_role"]
    assert set(seed["bench_session"]["roles"]) == set(every) >= set(rows) | {"dataset"}  # one session, every model
    assert seed["bench_session"]["rounds"] >= s["iters"]
    for role, r in every.items():
        assert share(r["accuracy"]), role
        for size in ("1", "32"):
            low, high = r[f"ms_batch_{size}_ci95"]
            assert 0 < low <= r[f"ms_batch_{size}"] <= high, role
        speedup, low, high = r["speedup_vs_teacher_batch_1"]
        assert low <= speedup <= high, role
    assert every["teacher:minilm"]["speedup_vs_teacher_batch_1"] == [1.0, 1.0, 1.0]
    met = s["targets"]["met"]
    assert list(met) == ["export:student-onnx-int8", "export:student-torch-int8"]
    assert all(met[r] == (s["accuracy_drop_points"][r] <= 0.5 and s["speedup_vs_teacher_batch_1"][r] >= 3) for r in met)


CHECKS: dict[str, Callable[[dict], None]] = {
    "bench_repeat.py": check_bench_repeat,
    "cache_memory.py": check_cache_memory,
    "cache_payoff.py": check_cache_payoff,
    "cache_verify.py": check_cache_verify,
    "parallel_cache.py": check_parallel_cache,
    "fresh_install.py": check_fresh_install,
    "quickstart.py": check_quickstart,
    "scale.py": check_scale,
    "sorted_batches.py": check_sorted_batches,
    "distill_speed.py": check_distill_speed,
    "export.py": check_export,
    "fpb_generate.py": check_fpb_generate,
    "fpb_lowlabel.py": check_fpb_lowlabel,
    "llm_step_cost.py": check_llm_step_cost,
    "prepare_scale.py": check_prepare_scale,
    "teacher_8bit.py": check_teacher_8bit,
    "lowlabel_teacher.py": check_lowlabel_teacher,
    "topk_cache.py": check_topk_cache,
    "trainer_baseline.py": check_trainer_baseline,
    "trivia_chat.py": check_trivia_chat,
    "trl_gkd.py": check_trl_gkd,
}
# Scripts that compare kd with another library, which CI does not install: skipped without it.
NEEDS = {"trl_gkd.py": "trl", "teacher_8bit.py": "bitsandbytes"}


def test_every_benchmark_has_a_check():
    assert sorted(CHECKS) == SCRIPTS


@pytest.mark.slow  # each script loads models and trains or times them: tens of seconds
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_runs_in_quick_mode_and_reports_sane_numbers(script, tmp_path):
    if script in NEEDS:
        pytest.importorskip(NEEDS[script])
    out = tmp_path / "result.json"
    # PYTHONPATH: the scripts import the kdcli of this checkout, not whichever one is installed.
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    args = ["--out", str(out)] if "--out" in (BENCHMARKS / script).read_text() else []
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    written = out if args else BENCHMARKS / "results" / f"{summary['benchmark']}-quick.json"
    assert json.loads(written.read_text()) == summary  # the file says what the output's last line says
    assert summary["quick"] is True and summary["benchmark"] == script.removesuffix(".py")
    assert summary["env"]["cpu_count"] > 0 and summary["env"]["torch"]
    bad = [(where, value) for where, value in numbers(summary) if not math.isfinite(value)]
    assert not bad, bad
    CHECKS[script](summary)
