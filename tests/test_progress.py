"""Progress in a log: a non-terminal console gets a line per task as it starts, every LOG_EVERY seconds
and when it ends; a terminal gets rich's bar."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

import jobs
from kdcli import progress as progress_mod
from kdcli import train
from kdcli.runtime import make_accelerator


def test_a_log_gets_a_line_at_the_start_while_due_and_at_the_end_once():
    out = io.StringIO()
    bars = progress_mod.phase_progress(Console(file=out, width=200), status=True)
    assert type(bars) is not Progress  # no live display: nothing would reach a log until the end
    bars.start()
    task = bars.add_task("teacher.t", total=10, status="")
    bars.advance(task, 4)  # not due: LOG_EVERY has not passed
    bars._every = 0.0
    bars.update(task, completed=6, status="loss 0.5")
    bars.update(task, completed=10)
    bars.stop()
    lines = out.getvalue().splitlines()
    assert lines[0] == "teacher.t: 0/10"
    assert lines[1].startswith("teacher.t: 6/10") and "left" in lines[1] and lines[1].endswith("loss 0.5")
    assert lines[2].startswith("teacher.t: 10/10") and "left" not in lines[2]
    assert len(lines) == 3  # stop() does not repeat a finished task


def test_a_terminal_gets_rich_s_bar():
    assert type(progress_mod.phase_progress(Console(force_terminal=True))) is Progress


def test_training_into_a_log_reports_its_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(progress_mod, "LOG_EVERY", 0.0)
    out = io.StringIO()
    job = jobs.classify_job(jobs.make_teacher_dir(tmp_path / "teacher"), tmp_path, batch_size=8, grad_accum=1,
                            max_steps=3)
    train.run_job(job, make_accelerator(), console=Console(file=out, width=200), show_progress=True)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("main")]
    assert lines[0] == "main: 0/3" and ": 3/3" in lines[-1] and "loss" in lines[-1]  # the step, its loss
    assert any(": 1/3" in line for line in lines) and any("left" in line for line in lines)


def test_preparing_into_a_log_names_each_step_and_counts_the_rows_read(tmp_path, monkeypatch, capsys):
    from kdcli import recipe
    from kdcli.data.prepare import prepare_recipe

    monkeypatch.setattr(progress_mod, "LOG_EVERY", 0.0)
    monkeypatch.chdir(tmp_path)
    jobs.write_classify_run(tmp_path, tmp_path / "no-model-needed", name="p", rows=3000, loss={"alpha": 1.0},
                            train={"max_steps": 1})
    prepare_recipe(recipe.load(tmp_path / "recipe.toml"))
    lines = capsys.readouterr().err.splitlines()
    reading = lines.index(f"stage main: reading s.jsonl ({(tmp_path / 's.jsonl').stat().st_size / 1e6:.1f} MB)")
    counts = [line for line in lines[reading + 1:] if line.startswith("stage main: reading") and "rows" in line]
    assert counts[0].startswith("stage main: reading") and ": 1,024 rows, " in counts[0] and counts[0].endswith("/s")
    assert ": 2,048 rows, " in counts[1]
    assert "stage main: cleaning and splitting" in lines
    assert any(line.startswith("stage main: saving") for line in lines)


def test_preparing_quietly_prints_nothing(tmp_path, monkeypatch, capsys):
    from kdcli import recipe
    from kdcli.data.prepare import prepare_recipe

    monkeypatch.chdir(tmp_path)
    jobs.write_classify_run(tmp_path, tmp_path / "no-model-needed", name="p", rows=50, loss={"alpha": 1.0},
                            train={"max_steps": 1})
    prepare_recipe(recipe.load(tmp_path / "recipe.toml"), quiet=True)
    assert capsys.readouterr().err == ""
