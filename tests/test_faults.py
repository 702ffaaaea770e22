"""Faults: kd killed with SIGKILL mid-step, mid-save and mid-write; files truncated or poisoned on
disk; a NaN in a loss term; a full disk; two kd processes on one run. A crash must cost minutes,
never the run, and nothing half written may ever be read as whole.

The kill tests run the real `kd` in a subprocess (``python -m kdcli.cli``), watch its run
directory and SIGKILL it at the moment they wait for; the rest run in process through typer's
CliRunner, where a fault can be injected with monkeypatch. docs/reliability.md has the table.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch
from safetensors.torch import load_file

import jobs
from clirun import kd, kd_in
from kdcli.errors import KdError
from kdcli.rundir import RunDir, atomic_dir, clean_leftovers, leftovers, read_json, write_json

ENV = {k: v for k, v in os.environ.items() if k != "KD_DEBUG"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 60


@pytest.fixture(scope="module")
def bert(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=2)


def write_run(root: Path, bert: Path, rows: int = 80, **train) -> Path:
    """A distillation with dropout on (BERT's 0.1) and a live teacher: resuming must restore the RNG."""
    return jobs.write_classify_run(
        root, bert, name="f", rows=rows, loss={"alpha": 0.5, "temperature": 2.0},
        train={"max_steps": STEPS, "batch_size": 4, "lr": 1e-3, "eval_every": 40, "checkpoint_every": 20,
               "log_every": 4, "keep_last": 2, "eval_batch_size": 32, "metric": "loss"} | train,
    )


# --------------------------------------------------------------------------- subprocess helpers


def start(root: Path, *args: str) -> subprocess.Popen:
    log = root / f"kd-{time.monotonic_ns()}.log"
    with open(log, "w") as handle:
        # SIGINT as a terminal would deliver it: a pytest-xdist worker ignores it, and a Python started with
        # SIGINT ignored keeps ignoring it (no KeyboardInterrupt), as a background job should.
        proc = subprocess.Popen([sys.executable, "-m", "kdcli.cli", *args], cwd=root, env=ENV, stdout=handle,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen) -> str:
    """What ``proc`` printed (stdout and stderr) so far."""
    return proc.log.read_text()  # type: ignore[attr-defined]


def kd_process(root: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`kd ARGS` in a subprocess in ``root`` (the in-process form is clirun.kd)."""
    return subprocess.run([sys.executable, "-m", "kdcli.cli", *args], cwd=root, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 180,
              signum: int = signal.SIGKILL) -> bool:
    """Send ``signum`` (SIGKILL) to ``proc`` as soon as ``condition()`` holds; False if it finished first."""
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                hit = condition()
            except (OSError, ValueError):
                hit = False
            if hit:
                proc.send_signal(signum)
                proc.wait(timeout=60)
                return True
            time.sleep(0.0005)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def train_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count('"kind": "train"') if path.exists() else 0


def tmp_entries(folder: Path, prefix: str = "") -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith("." + prefix) and ".tmp-" in n] if folder.is_dir() else []


def final_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "last checkpoint": load_file(run / "checkpoints" / "main" / f"step-{STEPS:08d}" / "model.safetensors"),
        "student": load_file(run / "student" / "model.safetensors"),
    }


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def no_partial_outputs(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- kill -9 during distill


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bert) -> Path:
    """The same distillation, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    write_run(root, bert)
    done = kd_process(root, "distill", "recipe.toml")
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "runs" / "f"


KILL_POINTS: dict[str, Callable[[Path], Callable[[], bool]]] = {
    # Before the first checkpoint: nothing to resume from, the run starts again.
    "before the first checkpoint": lambda run: lambda: train_lines(run) >= 2,
    # At a random step between checkpoints: the steps since the last checkpoint are redone.
    "at a random step": lambda run: (lambda target: lambda: train_lines(run) >= target)(
        random.Random(os.getpid()).randint(8, STEPS - 8)
    ),
    # While a checkpoint is being written (its temporary step-N folder exists), an earlier one complete.
    "during a checkpoint save": lambda run: lambda: bool(tmp_entries(run / "checkpoints" / "main", "step-"))
    and _complete_checkpoints(run) != [],
    # While the best student so far is being replaced by a better one.
    "during the best-student write": lambda run: lambda: bool(tmp_entries(run / "stages" / "main", "student"))
    and (run / "stages" / "main" / "student").exists(),
}


def _complete_checkpoints(run: Path) -> list[str]:
    folder = run / "checkpoints" / "main"
    return sorted(p.name for p in folder.glob("step-*") if (p / "state.json").exists()) if folder.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_during_distill_then_resume_equals_the_uninterrupted_run(point, reference, bert, tmp_path):
    root = tmp_path / "work"
    write_run(root, bert)
    run = root / "runs" / "f"
    for attempt in range(4):  # a save lasts milliseconds: the moment may be missed, then try again
        shutil.rmtree(root / "runs", ignore_errors=True)
        if kill_when(start(root, "distill", "recipe.toml"), KILL_POINTS[point](run)):
            break
    else:
        pytest.fail(f"the run finished {attempt + 1} times before it could be killed {point}")
    killed_at = train_lines(run)
    leftover = [p.name for p in no_partial_outputs(run)]
    complete = _complete_checkpoints(run)
    resumed = kd_process(root, "distill", "recipe.toml", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    print(f"\nKILLED {point}: attempt {attempt + 1}, after {killed_at} logged steps, "
          f"checkpoints {complete}, partial {leftover}")
    if complete:
        assert f"resuming main from {complete[-1]}" in resumed.stdout, resumed.stdout
    for what, tensors in final_weights(run).items():
        expected = final_weights(reference)[what]
        assert jobs.max_difference(tensors, expected) == 0.0, f"{what} differs after a kill {point} (step {killed_at})"
    assert not no_partial_outputs(run), no_partial_outputs(run)
    assert json.loads((run / "student" / "done.json").read_text())["steps"] == STEPS


@contextmanager
def distilling(root: Path) -> Iterator[Path]:
    """A `kd distill` of the run in ``root`` that holds the lock (it trains on) until SIGKILLed on exit."""
    run = root / "runs" / "f"
    first = start(root, "distill", "recipe.toml")
    try:
        deadline = time.monotonic() + 120
        while train_lines(run) < 1 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, output(first)
        yield run
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


@pytest.mark.slow
def test_sigkill_leaves_no_stale_lock_and_a_second_kd_on_the_same_run_refuses(bert, tmp_path):
    root = tmp_path / "work"
    write_run(root, bert, max_steps=100_000, checkpoint_every=100_000, eval_every=100_000)
    with distilling(root) as run:
        for command in ("distill", "prepare", "cache-teachers"):
            second = kd_process(root, command, "recipe.toml")
            assert second.returncode == 1, second.stdout + second.stderr
            assert f"error: another kd process is working on {run}" in second.stderr
            assert "hint:" in second.stderr and "Traceback" not in second.stderr
    # The kernel released the dead process's lock: the next command runs.
    after = kd_process(root, "prepare", "recipe.toml")
    assert after.returncode == 0, after.stdout + after.stderr


@pytest.mark.slow
def test_readers_take_the_lock_too_and_never_rewrite_the_run(bert, tmp_path, monkeypatch):
    root = tmp_path / "work"
    write_run(root, bert, max_steps=100_000, checkpoint_every=100_000, eval_every=100_000)
    monkeypatch.chdir(root)
    run = root / "runs" / "f"
    kd("prepare", "recipe.toml")
    kept = {p: p.read_bytes() for p in (run / "data" / "main" / "manifest.json", run / "recipe.resolved.toml")}
    with distilling(root):
        for args in (["eval", "recipe.toml", "--model", "teacher:t", "--set", "seed=5"],
                     ["bench", "recipe.toml", "--model", "teacher:t"], ["compare", "runs/f", "--plots"]):
            busy = kd(*args, code=1)
            assert f"error: another kd process is working on {run}" in busy.stderr, args
    # With the run free, a reader with a recipe that would prepare other data refuses instead.
    other = kd("eval", "recipe.toml", "--model", "teacher:t", "--set", "seed=5", code=1)
    assert "was made from another recipe (changed: seed)" in " ".join(other.stderr.split())
    assert "accuracy" in kd("eval", "recipe.toml", "--model", "teacher:t", "--set", "eval.batch_size=8").output
    assert {p: p.read_bytes() for p in kept} == kept  # neither the data nor the recorded recipe changed


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_distill_says_where_it_stopped_and_how_to_go_on(signum, bert, tmp_path):
    root = tmp_path / "work"
    write_run(root, bert, checkpoint_every=8, eval_every=100_000)
    run = root / "runs" / "f"
    proc = start(root, "distill", "recipe.toml")
    assert kill_when(proc, lambda: _complete_checkpoints(run), signum=signum), output(proc)
    said = " ".join(output(proc).split())
    assert proc.returncode == 130, said
    assert re.search(rf"error: main: interrupted at step \d+ of {STEPS}", said), said
    assert f"hint: the last checkpoint is {run / 'checkpoints' / 'main'}/step-" in said and "--resume" in said
    assert "Traceback" not in said


# --------------------------------------------------------------------------- kill -9 during prepare and cache-teachers


@pytest.mark.slow
def test_sigkill_during_prepare_keeps_the_old_data_and_the_next_prepare_rebuilds(bert, tmp_path, monkeypatch):
    root = tmp_path / "work"
    write_run(root, bert)
    monkeypatch.chdir(root)
    kd("prepare", "recipe.toml")
    run = RunDir(root / "runs" / "f")
    old_fingerprint = read_json(run.data("main") / "manifest.json")["fingerprint"]
    with open(root / "s.jsonl", "w") as handle:  # a new, larger source: the next prepare rewrites the data
        for i in range(100_000):
            handle.write(json.dumps({"text": f"sentence {i} about sales", "label": jobs.LABELS[i % 3]}) + "\n")
    assert kill_when(start(root, "prepare", "recipe.toml"), lambda: bool(tmp_entries(run.root / "data", "main")))
    # The partial copy is there, but nothing reads it: the old data is still whole.
    assert tmp_entries(run.root / "data", "main")
    from kdcli.data import load_prepared

    splits, manifest = load_prepared(run, "main")
    assert manifest["fingerprint"] == old_fingerprint and len(splits["train"]) == manifest["counts"]["train"]

    again = kd("prepare", "recipe.toml", "--json")
    (result,) = json.loads(again.stdout)
    assert "changed: the source files" in result["reason"] and "interrupted" in result["reason"]
    assert "partial output of an interrupted kd process" in again.stderr
    assert sum(result["counts"].values()) == 100_000
    assert not tmp_entries(run.root / "data")


@pytest.mark.slow
def test_sigkill_during_cache_teachers_keeps_the_old_cache_and_the_next_run_rebuilds(bert, tmp_path, monkeypatch):
    from kdcli import teachers
    from kdcli.cache import check_cache
    from kdcli.data.stage import stage_data
    from kdcli.recipe import load

    root = tmp_path / "work"
    recipe_path = write_run(root, bert, rows=3000)
    monkeypatch.chdir(root)
    kd("cache-teachers", "recipe.toml")
    run = RunDir(root / "runs" / "f")
    cache = run.cache("main", "t")
    before = {p.name: p.read_bytes() for p in cache.iterdir()}

    assert kill_when(start(root, "cache-teachers", "recipe.toml", "--force"),
                     lambda: bool(tmp_entries(cache.parent, "t")))
    assert tmp_entries(cache.parent, "t")
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # the complete cache, untouched
    recipe = load(recipe_path)
    stage = recipe.resolved_stages()[0]
    identity, _ = teachers.cache_identity(recipe, run, stage, "t", stage_data(recipe, run, stage))
    check_cache(cache, identity, "t")  # still valid: distill keeps using it

    # A kill on a first build: no cache at all, and `distill` would say so and use the live teacher.
    shutil.rmtree(cache)
    assert kill_when(start(root, "cache-teachers", "recipe.toml"), lambda: bool(tmp_entries(cache.parent, "t")))
    assert not cache.exists()
    rebuilt = kd("cache-teachers", "recipe.toml")
    assert "partial output of an interrupted kd process" in rebuilt.output and "built" in rebuilt.output
    check_cache(cache, identity, "t")
    assert not tmp_entries(cache.parent)


def test_a_write_killed_between_its_two_renames_puts_the_previous_output_back(tmp_path):
    final = tmp_path / "student"
    with atomic_dir(final) as tmp:
        (tmp / "model.safetensors").write_text("v1")
    dead = _dead_pid()
    tag = leftovers.__globals__["_HOST"]
    parked = final.with_name(f".student.old-{dead}.{tag}")
    final.rename(parked)  # what a SIGKILL between `final -> old` and `tmp -> final` leaves
    (tmp_path / f".student.tmp-{dead}.{tag}-x").mkdir()  # ...and the new copy it never moved into place
    said: list[str] = []
    assert len(clean_leftovers(tmp_path, said.append)) == 2
    assert (final / "model.safetensors").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["student"]
    assert any("restored" in s for s in said) and any("removed" in s for s in said)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_live_processes_and_other_machines_are_not_touched(tmp_path):
    tag = leftovers.__globals__["_HOST"]
    mine = tmp_path / f".x.tmp-{os.getpid()}.{tag}-a"
    other_host = tmp_path / f".x.tmp-{_dead_pid()}.00000000-a"
    mine.mkdir()
    other_host.mkdir()
    assert clean_leftovers(tmp_path, lambda s: None) == []
    assert mine.exists() and other_host.exists()


# --------------------------------------------------------------------------- damaged checkpoints, through the CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert) -> Path:
    """A finished 8-step run with checkpoints at steps 6 and 8 (keep_last = 2)."""
    root = tmp_path_factory.mktemp("trained")
    write_run(root, bert, max_steps=8, checkpoint_every=8, eval_every=400, log_every=400)
    kd_in(root, "distill", "recipe.toml")
    assert sorted(p.name for p in (root / "runs/f/checkpoints/main").iterdir()) == ["step-00000006", "step-00000008"]
    return root


def _copy(trained: Path, tmp_path: Path, monkeypatch) -> Path:
    """The trained run as if killed after its last checkpoint, before it recorded the stage as done."""
    root = tmp_path / "work"
    shutil.copytree(trained, root, symlinks=True)
    (root / "runs" / "f" / "stages" / "main" / "student" / "done.json").unlink()
    monkeypatch.chdir(root)
    return root / "runs" / "f" / "checkpoints" / "main"


DAMAGE: dict[str, Callable[[Path], None]] = {
    "model.safetensors truncated": lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:2000]
    ),
    "model.safetensors missing": lambda d: (d / "model.safetensors").unlink(),
    "optimizer.pt truncated": lambda d: (d / "optimizer.pt").write_bytes((d / "optimizer.pt").read_bytes()[:500]),
    "optimizer.pt empty": lambda d: (d / "optimizer.pt").write_bytes(b""),
    "scheduler.pt garbage": lambda d: (d / "scheduler.pt").write_bytes(os.urandom(300)),
    "rng-0.pt truncated": lambda d: (d / "rng-0.pt").write_bytes((d / "rng-0.pt").read_bytes()[:100]),
    "state.json truncated": lambda d: (d / "state.json").write_text((d / "state.json").read_text()[:10]),
    "state.json with unknown keys": lambda d: (d / "state.json").write_text('{"stepp": 6}'),
    "state.json with a string step": lambda d: (d / "state.json").write_text(
        '{"step": "6", "best": null, "best_step": null, "bad_evals": 0, "stopped_early": false}'
    ),
    "projections.safetensors garbage": lambda d: (d / "projections.safetensors").write_bytes(
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "[:12]
    ),
}
@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_past_a_damaged_checkpoint_falls_back_and_says_which(damage, trained, tmp_path, monkeypatch):
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    DAMAGE[damage](checkpoints / "step-00000008")
    result = kd("distill", "recipe.toml", "--resume")
    assert "checkpoint step-00000008 cannot be loaded" in result.output
    assert "resuming main from step-00000006 (6 steps done)" in result.output
    assert json.loads((checkpoints.parent.parent / "student" / "done.json").read_text())["steps"] == 8


def test_resume_with_every_checkpoint_damaged_stops_with_a_clear_error(trained, tmp_path, monkeypatch):
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    DAMAGE["optimizer.pt truncated"](checkpoints / "step-00000008")
    DAMAGE["state.json truncated"](checkpoints / "step-00000006")
    result = kd("distill", "recipe.toml", "--resume", code=1)
    assert isinstance(result.exception, SystemExit), result.output
    assert f"error: no checkpoint in {checkpoints.resolve()} could be loaded" in result.stderr
    assert "hint:" in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000006", "step-00000008"]  # nothing deleted


@pytest.mark.slow
def test_resume_after_the_recipe_changed_is_refused_naming_the_keys(trained, tmp_path, monkeypatch):
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    run = checkpoints.parent.parent
    before = {p: p.read_bytes() for p in (run / "recipe.resolved.toml", run / "student" / "model.safetensors",
                                          run / "student" / "done.json")}
    result = kd("distill", "recipe.toml", "--resume", "--set", "train.lr=0.5", "--set", "train.max_steps=12", code=1)
    assert "made with another recipe" in result.stderr and "train.lr: 0.001 -> 0.5" in result.stderr
    assert "train.max_steps: 8 -> 12" in result.stderr and "hint:" in result.stderr
    assert {p: p.read_bytes() for p in before} == before  # the records still describe the training that happened
    # Without --resume the changed recipe trains from the start, and says nothing of resuming.
    fresh = kd("distill", "recipe.toml", "--set", "train.lr=0.5")
    assert "resuming" not in fresh.output


FINETUNE = "teachers.t.finetune={epochs = 1, batch_size = 8, lr = 1e-3}"


@pytest.fixture
def finetuned(bert, tmp_path, monkeypatch) -> Path:
    """A run (in the current directory) whose teacher was fine-tuned with --set FINETUNE."""
    root = tmp_path / "work"
    write_run(root, bert, max_steps=2, eval_every=400, log_every=400)
    monkeypatch.chdir(root)
    kd("cache-teachers", "recipe.toml", "--set", FINETUNE)
    return root


@pytest.mark.slow
def test_a_teacher_fine_tuned_under_another_recipe_is_fine_tuned_again_not_resumed(finetuned):
    root, finetune = finetuned, FINETUNE
    weights = root / "runs" / "f" / "teachers" / "t" / "model.safetensors"
    first = weights.read_bytes()
    again = " ".join(kd("cache-teachers", "recipe.toml", "--set", finetune.replace("1e-3", "5e-2")).output.split())
    assert "resuming teacher.t" not in again
    assert "made with another recipe" in again and "lr: 0.001 -> 0.05" in again
    assert weights.read_bytes() != first


def test_deleted_outputs_are_put_back_from_the_checkpoint_that_holds_the_best_model(trained, tmp_path, monkeypatch):
    """The last checkpoint (step 8) is also the best model: a resume after `rm -rf stages student` saves it again."""
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    run = checkpoints.parent.parent
    shutil.rmtree(run / "stages")
    shutil.rmtree(run / "student")
    kd("distill", "recipe.toml", "--resume")
    assert same_weights(run / "student", trained / "runs" / "f" / "student")
    assert "accuracy" in kd("eval", "recipe.toml").output


@pytest.mark.slow
def test_a_resume_that_cannot_recover_the_best_model_is_refused_not_reported_as_done(trained, tmp_path, monkeypatch):
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    run = checkpoints.parent.parent
    state = json.loads((checkpoints / "step-00000008" / "state.json").read_text())
    write_json(checkpoints / "step-00000008" / "state.json", state | {"best": 0.5, "best_step": 6})
    shutil.rmtree(run / "stages")
    shutil.rmtree(run / "student")
    result = kd("distill", "recipe.toml", "--resume", code=1)
    assert "the best model so far (step 6) is no longer in" in result.stderr
    assert "without --resume" in result.stderr
    assert not (run / "student").exists() and not (run / "stages" / "main" / "student" / "done.json").exists()
    kd("distill", "recipe.toml")  # as the hint says: from the start
    assert (run / "student" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["config.json deleted", "a weight byte flipped"])
def test_a_damaged_stage_output_is_not_up_to_date(damage, trained, tmp_path, monkeypatch):
    root = tmp_path / "work"
    shutil.copytree(trained, root, symlinks=True)
    monkeypatch.chdir(root)
    stage = root / "runs" / "f" / "stages" / "main" / "student"
    if damage == "config.json deleted":
        (root / "runs" / "f" / "student" / "config.json").unlink()
        (stage / "config.json").unlink()
        why = "config.json is missing"
    else:
        weights = bytearray((stage / "model.safetensors").read_bytes())
        weights[-3] ^= 0xFF
        (stage / "model.safetensors").write_bytes(bytes(weights))
        why = "model.safetensors has changed since it was written"
    said = " ".join(kd("distill", "recipe.toml").output.split())  # rich wraps long lines
    assert "up to date" not in said
    assert f"is not whole ({why}); training it again" in said
    assert same_weights(root / "runs" / "f" / "student", trained / "runs" / "f" / "student")  # trained again
    assert "up to date" in kd("distill", "recipe.toml").output


@pytest.mark.slow
def test_a_damaged_fine_tuned_teacher_is_fine_tuned_again(finetuned):
    finetune = FINETUNE
    teacher = finetuned / "runs" / "f" / "teachers" / "t"
    (teacher / "config.json").unlink()
    again = "".join(kd("cache-teachers", "recipe.toml", "--set", finetune).output.split())  # rich wraps anywhere
    assert "".join(f"the fine-tuned teacher t in {teacher} is not whole (config.json is missing)".split()) in again
    assert (teacher / "config.json").is_file()
    assert "fine-tuning" not in kd("cache-teachers", "recipe.toml", "--set", finetune).output


def test_a_checkpoint_without_state_json_is_incomplete_and_ignored(trained, tmp_path, monkeypatch):
    """state.json is written last: a step folder without it (and a dead process's temporary one) are skipped."""
    checkpoints = _copy(trained, tmp_path, monkeypatch)
    (checkpoints / "step-00000008" / "state.json").unlink()
    partial = checkpoints / f".step-00000008.tmp-{_dead_pid()}.{leftovers.__globals__['_HOST']}-zz"
    shutil.copytree(checkpoints / "step-00000006", partial)
    result = kd("distill", "recipe.toml", "--resume")
    assert "resuming main from step-00000006 (6 steps done)" in result.output
    assert not partial.exists()  # cleaned up by the next checkpoint save


# --------------------------------------------------------------------------- NaN, through the CLI


@pytest.mark.slow
def test_a_nan_in_a_loss_term_stops_naming_step_and_term_and_the_last_checkpoint_resumes(bert, tmp_path, monkeypatch):
    from kdcli import losses

    root = tmp_path / "work"
    write_run(root, bert, max_steps=8, checkpoint_every=8, eval_every=400, log_every=400)
    monkeypatch.chdir(root)
    real, calls = losses.kd_term, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 5 else value  # step 5's KD term

    monkeypatch.setattr(losses, "kd_term", poisoned)
    failed = kd("distill", "recipe.toml", code=1)
    assert isinstance(failed.exception, SystemExit), failed.output
    assert "step 5" in failed.stderr and "kd" in failed.stderr.split("\n")[0]
    assert "step-00000004" in failed.stderr  # the hint names the last good checkpoint
    monkeypatch.setattr(losses, "kd_term", real)
    resumed = kd("distill", "recipe.toml", "--resume")
    assert "resuming main from step-00000004" in resumed.output


# --------------------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_is_a_clear_error_and_the_earlier_checkpoint_resumes(bert, tmp_path,
                                                                                             monkeypatch):
    root = tmp_path / "work"
    write_run(root, bert, max_steps=8, checkpoint_every=8, eval_every=400, log_every=400)
    monkeypatch.chdir(root)
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt") and ".step-00000008.tmp-" in str(path):  # steps 2-6 are saved, 8 is not
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed: No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    failed = kd("distill", "recipe.toml", code=1)
    assert isinstance(failed.exception, SystemExit), failed.output
    checkpoints = root / "runs" / "f" / "checkpoints" / "main"
    assert failed.stderr.startswith(f"error: no space left on the device writing {checkpoints.resolve()}/step-00000008")
    assert "hint:" in failed.stderr and "--resume" in failed.stderr
    assert sorted(os.listdir(checkpoints)) == ["step-00000004", "step-00000006"]  # no half checkpoint beside them
    monkeypatch.setattr(torch, "save", real_save)
    resumed = kd("distill", "recipe.toml", "--resume")
    assert "resuming main from step-00000006" in resumed.output


def test_a_full_disk_while_preparing_keeps_the_previous_data(bert, tmp_path, monkeypatch):
    from datasets.arrow_writer import ArrowWriter

    root = tmp_path / "work"
    write_run(root, bert)
    monkeypatch.chdir(root)
    kd("prepare", "recipe.toml")
    data = root / "runs" / "f" / "data" / "main"
    before = {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    monkeypatch.setattr(ArrowWriter, "write_table", _enospc)
    result = kd("prepare", "recipe.toml", "--force", code=1)
    assert isinstance(result.exception, SystemExit), result.output
    error = result.stderr[result.stderr.index("error: "):]  # after the steps kd prepare logs as it goes
    assert error.startswith(f"error: no space left on the device writing {data.resolve()}")
    assert {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert not tmp_entries(data.parent)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    OSError(errno.EDQUOT, "Disk quota exceeded"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                 "message: \"No space left on device\" })"),
])
def test_atomic_writers_turn_a_full_disk_into_a_kd_error_and_keep_the_old_file(tmp_path, monkeypatch, error):
    path = tmp_path / "eval" / "student.json"
    write_json(path, {"accuracy": 0.9})

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(os, "replace", fail) if isinstance(error, OSError) else None
    if isinstance(error, OSError):
        with pytest.raises(KdError, match=r"no space left on the device writing .*student\.json"):
            write_json(path, {"accuracy": 0.1})
        monkeypatch.undo()
        assert read_json(path) == {"accuracy": 0.9} and os.listdir(path.parent) == ["student.json"]
    with pytest.raises(KdError, match=r"no space left on the device writing .*cache"):
        with atomic_dir(tmp_path / "cache") as tmp:
            (tmp / "part").write_text("x")
            raise error
    assert not (tmp_path / "cache").exists() and not tmp_entries(tmp_path)


def test_other_errors_inside_an_atomic_write_are_not_mistaken_for_a_full_disk(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with atomic_dir(tmp_path / "out"):
            raise ValueError("a bug")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_while_logging_metrics_is_a_clear_error(bert, tmp_path, monkeypatch):
    from kdcli import train

    root = tmp_path / "work"
    write_run(root, bert, max_steps=2, eval_every=400, log_every=4)
    monkeypatch.chdir(root)

    def full_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(train, "open", full_open, raising=False)
    result = kd("distill", "recipe.toml", code=1)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "no space left on the device" in result.stderr
