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
