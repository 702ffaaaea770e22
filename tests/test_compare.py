"""`kd compare` from run-directory files, its exports and plots; and eval -> bench -> compare end to end."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

import jobs
from clirun import kd
from kdcli.report import (
    collect_run,
    compare_csv,
    compare_json,
    compare_markdown,
    plot_losses,
    plot_quality_speed,
    print_compare,
    read_metrics,
    render_compare,
)
from kdcli.rundir import write_json
from kdcli.timing import median_interval

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, evals: dict[str, float], benches: dict[str, tuple[int, float]],
              task: str = "classify") -> Path:
    """A run directory as eval/bench would leave it: {role: accuracy}, {role: (parameters, ms/example)}."""
    root.mkdir(parents=True)
    jobs.write_recipe(root / "recipe.resolved.toml", {
        "name": root.name, "task": task, "student": {"from_teacher": "big", "layers": [0, 2]},
        "teachers": {"big": {"ref": "bert-base-uncased"}, "small": {"ref": "/models/tiny-bert"}},
    })
    for role, accuracy in evals.items():
        metrics = {"accuracy": accuracy, "f1": accuracy - 0.1, "precision": accuracy - 0.05, "recall": accuracy - 0.15}
        write_json(root / "eval" / f"{role.replace(':', '-')}.json",
                   {"role": role, "model": f"model of {role}", "parameters": benches.get(role, (1000, 0))[0],
                    "metrics": metrics})
    for role, (parameters, ms) in benches.items():
        write_json(root / "bench" / f"{role.replace(':', '-')}.json",
                   {"role": role, "model": f"model of {role}", "parameters": parameters,
                    "batches": {"1": {"latency_ms_per_example": {"p50": ms, "p95": ms * 1.2, "mean": ms * 1.1}}}})
    return root


@pytest.fixture
def run(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return write_run(
        tmp_path / "runs" / "fin",
        evals={"teacher:big": 0.90, "teacher:small": 0.80, "student": 0.882},
        benches={"teacher:big": (110_000_000, 40.0), "teacher:small": (4_400_000, 8.0),
                 "student": (66_000_000, 20.0), "baseline": (66_000_000, 21.0)},
    )


def test_collect_run_relates_every_row_to_the_teachers(run):
    table = collect_run(run)
    assert [r["role"] for r in table.rows] == ["teacher:big", "teacher:small", "baseline", "student"]
    assert [c.key for c in table.columns] == ["role", "model", "parameters", "accuracy", "f1", "ms_per_example",
                                              "kept_pct", "speedup", "size_ratio"]
    student = table.rows[3]
    assert student["kept_pct"] == pytest.approx(98.0)  # 0.882 of the best teacher's 0.90
    assert student["speedup"] == pytest.approx(2.0)  # the slowest teacher takes 40 ms, the student 20
    assert student["size_ratio"] == pytest.approx(0.6)  # 66M of the largest teacher's 110M
    assert table.best == 3
    baseline = table.rows[2]
    assert baseline["accuracy"] is None and baseline["kept_pct"] is None and baseline["parameters"] == 66_000_000
    assert table.hints == ["baseline: no eval, run `kd eval runs/fin/recipe.resolved.toml --model baseline`"]


def test_rich_table_shows_missing_values_as_blanks(run):
    out = io.StringIO()
    print_compare([collect_run(run)], Console(file=out, width=220, color_system=None))
    text = out.getvalue()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.startswith("│")}
    assert set(lines) == {"teacher:big", "teacher:small", "baseline", "student"}
    assert "0.8820" in lines["student"] and "98.0%" in lines["student"] and "2.00x" in lines["student"]
    assert "0.0000" not in lines["baseline"] and "21.000" in lines["baseline"]
    assert "kd eval runs/fin/recipe.resolved.toml --model baseline" in text


@pytest.mark.parametrize("width", [80, 120])
def test_a_narrow_terminal_gets_whole_rows_and_names_what_it_left_out(run, width):
    """At 80 columns the table used to cut every header and cell ("Accu…", "0.88…") and wrap rows onto 7
    lines; at 120 the role names were cut ("teacher:m…"). Now every line fits, every row is one line, role
    names and numbers are whole, and what did not fit is named, with --wide to see it."""
    bench = json.loads((run / "bench" / "student.json").read_text())
    bench["batches"]["32"] = {"latency_ms_per_example": {"p50": 2.5, "p95": 3.0, "mean": 2.6}}
    write_json(run / "bench" / "student.json", bench)
    out = io.StringIO()
    print_compare([collect_run(run)], Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines() if line.startswith(("│", "┃", "┏", "└"))) <= width
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["teacher:big", "teacher:small", "baseline", "student"]
    student = rows[3]
    assert "0.8820" in student and "98.0%" in student and "2.00x" in student and "…" not in text
    if width == 80:
        assert "left out at 80 columns:" in text and "--wide" in text
        wide = io.StringIO()
        print_compare([collect_run(run)], Console(file=wide, width=width, color_system=None), wide=True)
        assert "left out" not in wide.getvalue() and "model of student" in wide.getvalue()
    assert "kept = % of the best teacher's accuracy" in text


def test_markdown_csv_and_json_agree(run, tmp_path):
    second = write_run(tmp_path / "runs" / "choice", evals={"teacher:big": 0.7, "student": 0.6},
                       benches={"student": (10, 5.0)}, task="choice")
    tables = [collect_run(run), collect_run(second)]
    documents = compare_json(tables)
    csv_rows = list(csv.DictReader(io.StringIO(compare_csv(tables))))
    md_rows = [
        [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        for line in compare_markdown(tables).splitlines()
        if line.startswith("| ") and not line.startswith("| Role")
    ]
    assert len(md_rows) == len(csv_rows) == sum(len(d["rows"]) for d in documents) == 8
    position = 0
    for table, document in zip(tables, documents):
        assert document["best"] == "student"
        for row in document["rows"]:
            md, flat = md_rows[position], csv_rows[position]
            position += 1
            assert flat["run"] == document["run"] and (flat["best"] == "True") == (row["role"] == "student")
            for column, md_cell in zip(table.columns, md):
                value = row[column.key]
                assert md_cell == ("" if value is None else column.fmt(value)), (column.key, row["role"])
                assert flat[column.key] == ("" if value is None else str(value)), (column.key, row["role"])
    # The choice run's table is Table 5's shape: accuracy and seconds per question.
    assert [c["key"] for c in documents[1]["columns"]][3:5] == ["accuracy", "s_per_question"]
    assert documents[1]["rows"][-1]["s_per_question"] == pytest.approx(0.005)


def test_mean_of_runs_averages_role_by_role_with_the_spread(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    benches = {"teacher:big": (110_000_000, 40.0), "teacher:small": (4_400_000, 8.0), "student": (66_000_000, 20.0)}
    for seed, (big, student, dataset) in {1: (0.90, 0.88, 0.85), 2: (0.80, 0.80, 0.84)}.items():
        evals = {"teacher:big": big, "teacher:small": 0.5, "student": student}
        if seed == 1:
            evals["student:big"] = 0.87  # trained in one run only
        write_run(tmp_path / "runs" / f"fin-s{seed}", evals=evals, benches=dict(benches, dataset=(66_000_000, 20.0)))
        write_json(tmp_path / "runs" / f"fin-s{seed}" / "eval" / "dataset.json",
                   {"role": "dataset", "model": "m", "parameters": 66_000_000,
                    "metrics": {"accuracy": dataset, "f1": 0.5}})
    result = kd("compare", "runs/fin-s1", "runs/fin-s2", "--mean", "--format", "json")
    [table] = json.loads(result.stdout)
    assert table["run"] == "mean of 2 runs (fin-s1, fin-s2)"
    rows = {r["role"]: r for r in table["rows"]}
    assert "student:big" not in rows and table["hints"] == ["student:big: not in every run, left out of the mean"]
    assert rows["student"]["accuracy"] == pytest.approx(0.84)
    assert rows["student"]["accuracy_std"] == pytest.approx(0.0565685, rel=1e-5)  # sample std of 0.88 and 0.80
    assert rows["student"]["kept_pct"] == pytest.approx((100 * 0.88 / 0.90 + 100) / 2)  # each run's ratio, averaged
    assert rows["student"]["speedup"] == pytest.approx(2.0) and rows["student"]["speedup_std"] == 0.0
    assert table["best"] == "dataset"  # 0.845 on average beats the student's 0.84
    markdown = kd("compare", "runs/fin-s1", "runs/fin-s2", "--mean", "--format", "md").stdout
    assert "| 0.8400 ± 0.0566 |" in markdown and "| 2.00x |" in markdown  # no spread shown where there is none
    assert "batch 32" not in markdown  # only batch 1 was measured


def test_the_largest_batch_benched_gets_a_column_beside_batch_1(run):
    bench = json.loads((run / "bench" / "student.json").read_text())
    bench["batches"]["32"] = {"latency_ms_per_example": {"p50": 2.5, "p95": 3.0, "mean": 2.6}}
    write_json(run / "bench" / "student.json", bench)
    table = collect_run(run)
    keys = [c.key for c in table.columns]
    assert keys[keys.index("ms_per_example") + 1] == "ms_per_example_batched"
    assert table.columns[keys.index("ms_per_example_batched")].title == "ms/example (batch 32)"
    rows = {r["role"]: r for r in table.rows}
    assert rows["student"]["ms_per_example_batched"] == 2.5 and rows["teacher:big"]["ms_per_example_batched"] is None


def test_mean_refuses_runs_of_different_tasks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "runs" / "a", evals={"student": 0.8}, benches={})
    write_run(tmp_path / "runs" / "b", evals={"student": 0.8}, benches={}, task="choice")
    result = kd("compare", "runs/a", "runs/b", "--mean", code=1)
    assert "one task" in result.output


def test_read_metrics_keeps_the_latest_attempt(tmp_path):
    lines = [
        {"stage": "main", "kind": "train", "step": s, "samples": 8 * s, "loss": 1.0} for s in (1, 2, 3, 4)
    ] + [
        {"stage": "main", "kind": "train", "step": s, "samples": 8 * s, "loss": 0.5} for s in (3, 4, 5)  # resumed at 2
    ] + [
        {"stage": "t", "kind": "train", "step": s, "samples": s, "loss": 2.0} for s in (1, 2)
    ] + [
        {"stage": "t", "kind": "train", "step": 1, "samples": 1, "loss": 3.0},  # started again from scratch
    ]
    path = tmp_path / "metrics.jsonl"
    others = ["[1, 2]", '"text"', '{"stage": "main"}', '{"stage": "main", "step": "3"}']  # JSON, but not records
    path.write_text("\n".join([json.dumps(line) for line in lines] + others)
                    + "\n{\"stage\": \"main\", \"ki")  # a torn last line
    jobs = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in jobs["main"]] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5), (5, 0.5)]
    assert [(r["step"], r["loss"]) for r in jobs["t"]] == [(1, 3.0)]


@pytest.mark.slow
def test_plots_are_written_as_png(run):
    records = []
    for step in range(1, 7):
        records.append({"stage": "main", "kind": "train", "step": step, "samples": 8 * step,
                        "loss": 1 / step, "ce": 1.5 / step})
        if step % 2 == 0:
            records.append({"stage": "main", "kind": "eval", "step": step, "samples": 8 * step,
                            "val_loss": 0.5 + abs(step - 4) / 10, "val_accuracy": 0.7, "best": step <= 4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = collect_run(run)
    written = plot_losses(table) + plot_quality_speed([table])
    assert written == [run / "plots" / "loss-main.png", run / "plots" / "accuracy-latency.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


# --------------------------------------------------------------------------- end to end

def write_tiny_recipe(teacher: Path) -> Path:
    return jobs.write_recipe("tiny.toml", {
        "name": "tiny", "task": "classify",
        "data": {"format": "jsonl", "path": "data.jsonl", "label_names": ["positive", "negative", "neutral"],
                 "max_length": 32},
        "teachers": {"t": {"ref": str(teacher), "finetune": {"epochs": 1, "batch_size": 8}}},
        "student": {"from_teacher": "t", "layers": [0, 2]},
        "train": {"epochs": 1, "batch_size": 8, "eval_every": 16, "log_every": 8, "eval_batch_size": 16},
        "eval": {"examples": 2},
        "bench": {"batch_sizes": [1, 4], "warmup": 1, "iters": 3, "max_seconds": 1, "threads": 1,
                  "max_examples": 8},
    })


@pytest.mark.slow
def test_eval_bench_compare_end_to_end(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = {"positive": "profit rose strongly", "negative": "losses widened again", "neutral": "shares were unchanged"}
    with open("data.jsonl", "w") as handle:
        for i in range(40):
            label = list(words)[i % 3]
            handle.write(json.dumps({"text": f"Report {i}: {words[label]} in quarter {i % 4}", "label": label}) + "\n")
    write_tiny_recipe(tiny("bert", "sequence-classification", num_labels=3))
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps nothing the asserts read

    kd("distill", "tiny.toml")
    student = json.loads(kd("eval", "tiny.toml", "--model", "student", "--json").stdout)
    assert student["role"] == "student" and student["split"] == "test" and student["n"] == 4
    assert 0 <= student["metrics"]["accuracy"] <= 1 and student["parameters"] > 0
    assert set(student["agreement"]) == {"t"}
    assert len(student["disagreements"]) == min(2, round(4 * (1 - student["agreement"]["t"])))
    saved = json.loads(Path("runs/tiny/eval/student.json").read_text())
    assert saved["metrics"] == student["metrics"] and saved["data_fingerprint"] == student["data_fingerprint"]

    teacher = kd("eval", "tiny.toml", "--model", "teacher:t")
    assert "teacher:t on test (4 examples)" in teacher.stdout and "confusion" in teacher.stdout
    assert json.loads(Path("runs/tiny/eval/teacher-t.json").read_text())["agreement"] == {}  # not with itself
    kd("eval", "tiny.toml", "--model", "baseline")

    benched = json.loads(kd("bench", "tiny.toml", "--model", "all", "--json").stdout)
    assert [r["role"] for r in benched["results"]] == ["teacher:t", "baseline", "student"]
    assert all(list(r["batches"]) == ["1", "4"] and r["threads"] == 1 for r in benched["results"])
    monkeypatch.setattr("kdcli.runtime.busy_cores", lambda: 64.0)  # other processes keep every core busy
    latest = kd("bench", "--model", "student", "--json")  # no recipe: the latest run
    assert "the machine is busy (load 64" in latest.stderr
    result = json.loads(latest.stdout)["results"][0]
    assert result["size_bytes"] == Path("runs/tiny/student/model.safetensors").stat().st_size
    assert result["env"]["load_average_1m"] == 64.0  # the result says what it was measured beside

    table = kd("compare", "--format", "md", "--plots").stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Role" not in line]
    assert [row.split("|")[1].strip(" *") for row in rows] == ["teacher:t", "baseline", "student"]
    assert "no eval" not in table and "no bench" not in table
    plots = [Path(line.removeprefix("plot: ")) for line in kd("compare", "--plots").stdout.splitlines()
             if line.startswith("plot: ")]
    assert {p.name for p in plots} == {"loss-teacher.t.png", "loss-main.png", "accuracy-latency.png"}
    assert all(p.read_bytes()[:8] == PNG for p in plots)


def timed_bench(root: Path, role: str, parameters: int, rounds: list[float], session: str = "s1") -> None:
    """A bench result as `kd bench` writes it: the rounds of a round-robin session and their median and interval."""
    median, low, high = median_interval(rounds)
    write_json(root / "bench" / f"{role.replace(':', '-')}.json", {
        "role": role, "model": f"model of {role}", "parameters": parameters, "architecture": "BertModel",
        "dtype": "float32", "session": {"id": session},
        "batches": {"1": {"latency_ms_per_example": {"p50": median, "ci95": [low, high], "iqr": [low, high]},
                          "ms_per_example_by_round": rounds}}})


def test_compare_gives_speed_ups_intervals_and_one_speed_to_one_architecture_in_the_noise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = write_run(tmp_path / "runs" / "fin", evals={"teacher:big": 0.9, "student": 0.88, "dataset": 0.85},
                     benches={})
    burst = [1.0] * 8 + [1.6, 1.0, 1.0, 2.0]  # two rounds the machine was busy: every model slowed alike
    timed_bench(root, "teacher:big", 110_000_000, [40 * b for b in burst])
    timed_bench(root, "teacher:small", 4_400_000,
                [40 * b * (1.01 if i % 3 == 0 else 0.97) for i, b in enumerate(burst)])
    timed_bench(root, "dataset", 66_000_000, [20 * b * (1.03 if i % 2 else 0.97) for i, b in enumerate(burst)])
    timed_bench(root, "student", 66_000_000, [20.5 * b for b in burst])
    table = collect_run(root)
    rows = {row["role"]: row for row in table.rows}
    # Paired round by round, the bursts cancel: the student is 40/20.5 faster, with a narrow interval.
    assert rows["student"]["speedup"] == pytest.approx(40 / ((20.5 + 20) / 2), rel=0.02)
    assert rows["student"]["speedup_measurable"] and rows["student"]["speedup_ci95"][0] > 1.9
    # dataset and student: one architecture, overlapping intervals: shown as one speed.
    assert rows["dataset"]["same_speed_as"] == ["student"] and rows["student"]["same_speed_as"] == ["dataset"]
    assert rows["dataset"]["ms_per_example"] == rows["student"]["ms_per_example"]
    # teacher:small is 1% slower or 3% faster than teacher:big, round by round: no measurable difference.
    low, high = rows["teacher:small"]["speedup_ci95"]
    assert low <= 1.0 <= high and rows["teacher:small"]["speedup_measurable"] is False
    assert rows["teacher:big"]["speedup"] == 1.0 and rows["teacher:big"]["speedup_ci95"] is None  # the reference
    assert "dataset, student: one architecture whose timings overlap, shown as one speed (=)" in table.hints
    assert any(hint.startswith("≈: the speed-up's 95% interval holds 1x") for hint in table.hints)

    md = compare_markdown([table])
    small = next(line for line in md.splitlines() if line.startswith("| teacher:small"))
    assert re.search(r"\d\.\d\dx \[\d\.\d\dx, \d\.\d\dx\] ≈", small) and re.search(r"\d+\.\d{3} \[", small)
    assert " = " in next(line for line in md.splitlines() if line.startswith("| dataset"))
    shown = json.loads(render_compare([table], "json"))[0]["rows"]
    student = next(row for row in shown if row["role"] == "student")
    assert student["speedup_ci95"] == rows["student"]["speedup_ci95"] and student["same_speed_as"] == ["dataset"]
    assert len(student["ms_per_example_ci95"]) == 2 and student["speedup_measurable"] is True
    header = render_compare([table], "csv").splitlines()[0].split(",")
    assert {"speedup_ci95_low", "speedup_ci95_high", "ms_per_example_ci95_low"} <= set(header)
    out = io.StringIO()
    print_compare([table], Console(file=out, width=200, color_system=None))
    terminal = out.getvalue()
    assert "≈" in terminal and "[" in next(line for line in terminal.splitlines() if "│ student" in line)
