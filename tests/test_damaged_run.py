"""A run directory damaged, or laid out unusually, on disk (issue 13): prepared data whose files were
changed, a file where kd keeps a folder, `runs` as a symlink loop, checkpoints on a symlinked scratch
disk, a read-only run directory (permissions, or a read-only file system), and damaged eval, bench
and recipe files under `kd compare`.

Each case either works (prepared data is prepared again; a symlinked checkpoint folder is used as a
folder) or is a clean error: `error:` naming the path and `hint:` on stderr, exit 1, no traceback.
`kd compare` leaves a damaged file out with a `warning:` naming it and prints the rest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from test_bad_input import check_clean_failure

import jobs
from clirun import kd, kd_in
from kdcli.errors import DataError
from kdcli.rundir import RunDir, file_error, write_json


@pytest.fixture(scope="module")
def bert(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=2)


def write_run(root: Path, bert: Path) -> Path:
    """A 2-step distillation of the tiny BERT into itself, checkpointed at its end, evaluated and benched small."""
    root.mkdir(parents=True, exist_ok=True)
    jobs.write_sentences(root / "s.jsonl", 40)
    return jobs.write_recipe(root / "recipe.toml", {
        "name": "f", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"ref": str(bert)},
        "teachers": {"t": {"ref": str(bert)}},
        "loss": {"alpha": 0.5, "temperature": 2.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "eval_every": 400, "checkpoint_every": 2,
                  "log_every": 400, "eval_batch_size": 32},
        "eval": {"examples": 0},
        "bench": {"batch_sizes": [1], "warmup": 0, "iters": 2, "max_seconds": 1, "threads": 1, "max_examples": 4},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bert) -> Path:
    """A finished run: data prepared, teacher cached, student distilled (checkpoint step 2), evaluated, benched."""
    root = tmp_path_factory.mktemp("trained")
    write_run(root, bert)
    for command in ("distill", "eval", "bench"):
        kd_in(root, command, "recipe.toml")
    return root


@pytest.fixture
def work(trained, tmp_path, monkeypatch) -> Path:
    """A copy of the trained run to damage, as the current directory."""
    root = tmp_path / "work"
    shutil.copytree(trained, root, symlinks=True)
    monkeypatch.chdir(root)
    monkeypatch.delenv("KD_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps nothing the asserts read
    return root


def run_dir(root: Path) -> Path:
    return (root / "runs" / "f").resolve()


# --------------------------------------------------------------------------- T3: damaged prepared data


DATA_DAMAGE = {
    "state.json with other keys": ("train/state.json", '{"x": 1}', "KeyError: '_data_files'"),
    "state.json not JSON": ("train/state.json", "{", "JSONDecodeError"),
    "state.json a list": ("validation/state.json", "[]", "TypeError"),
    "arrow file truncated": ("test/data-00000-of-00001.arrow", b"\xff\xff\xff\xff", ""),
}


def damage_data(root: Path, damage: str) -> None:
    name, content, _ = DATA_DAMAGE[damage]
    path = run_dir(root) / "data" / "main" / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DATA_DAMAGE))
def test_damaged_prepared_data_is_prepared_again_by_the_next_command(damage, work):
    """The prepared data comes from the sources alone: damaged, it is not whole, and is written again."""
    damage_data(work, damage)
    result = kd("eval", "recipe.toml")  # eval reads the data through prepare, which finds the damage
    assert "accuracy" in result.stdout.lower()
    damage_data(work, damage)
    prepared = kd("prepare", "recipe.toml")
    assert f"prepared (previous output damaged ({DATA_DAMAGE[damage][2]}" in prepared.stdout
    assert "up to date" in kd("prepare", "recipe.toml").stdout


def test_damaged_prepared_data_read_directly_is_a_clean_error(work):
    """Damage done after `prepare` checked it (another process, say) stops the reader with a DataError."""
    from kdcli.data import load_prepared

    damage_data(work, "state.json with other keys")
    run = RunDir(run_dir(work))
    with pytest.raises(DataError) as error:
        load_prepared(run, "main")
    assert error.value.message == (f"the prepared data in {run.data('main')} is damaged (KeyError: '_data_files')")
    assert error.value.hint == "run `kd prepare RECIPE --force`"


# --------------------------------------------------------------------------- T4, T10: paths that are not folders


@pytest.mark.parametrize("blocked", ["runs/f/data", "runs/f"])
def test_a_file_where_kd_keeps_a_folder_is_a_clean_error(blocked, bert, here):
    write_run(here, bert)
    (here / blocked).parent.mkdir(parents=True, exist_ok=True)
    (here / blocked).write_text("not a folder")
    result = kd("prepare", "recipe.toml", code=None)
    check_clean_failure(result, f"{(here / blocked).resolve()} is a file, but kd keeps a folder there")
    assert "move or delete the file" in result.stderr
    assert (here / blocked).read_text() == "not a folder"


def test_a_checkpoint_link_to_a_missing_scratch_folder_is_a_clean_error(work, tmp_path):
    """A scratch disk that is not mounted: the link is there, the folder it points to is not."""
    checkpoints = run_dir(work) / "checkpoints" / "main"
    shutil.rmtree(checkpoints)
    checkpoints.symlink_to(tmp_path / "unmounted" / "ckpt")
    (run_dir(work) / "stages" / "main" / "student" / "done.json").unlink()
    result = kd("distill", "recipe.toml", code=None)
    check_clean_failure(result, f"{checkpoints} is a symlink to {tmp_path / 'unmounted' / 'ckpt'}, which does not "
                                "exist")


@pytest.mark.parametrize("command", ["prepare", "check", "distill"])
def test_runs_as_a_symlink_loop_is_a_clean_error(command, bert, here):
    write_run(here, bert)
    (here / "runs").symlink_to("runs")
    result = kd(command, "recipe.toml", code=None)
    check_clean_failure(result, "runs is a symlink loop: following it leads back to itself")
    assert (here / "runs").is_symlink()


# --------------------------------------------------------------------------- T11: checkpoints on a scratch disk


@pytest.mark.slow
def test_checkpoints_on_a_symlinked_scratch_folder_are_replaced_and_resumed_there(work, tmp_path):
    run = run_dir(work)
    checkpoints = run / "checkpoints" / "main"
    scratch = tmp_path / "scratch" / "ckpt"
    scratch.parent.mkdir()
    shutil.move(checkpoints, scratch)  # an earlier run's checkpoints, now on the scratch disk
    checkpoints.symlink_to(scratch)
    (scratch / "step-00000099").mkdir()  # a checkpoint of an earlier, longer training
    (scratch / "step-00000099" / "state.json").write_text('{"step": 99}')
    done = run / "stages" / "main" / "student" / "done.json"

    done.unlink()
    kd("distill", "recipe.toml")  # a fresh run: the old checkpoints go, the link stays
    assert checkpoints.is_symlink() and checkpoints.resolve() == scratch.resolve()
    assert "step-00000099" not in os.listdir(scratch) and (scratch / "step-00000002" / "state.json").is_file()

    done.unlink()
    resumed = kd("distill", "recipe.toml", "--resume")
    assert "resuming main from step-00000002" in resumed.output
    assert checkpoints.is_symlink() and (scratch / "step-00000002" / "state.json").is_file()


# --------------------------------------------------------------------------- T12: a read-only run directory


def _chmod_tree(root: Path, writable: bool) -> None:
    for folder, _, files in os.walk(root):
        for path in [Path(folder), *(Path(folder) / name for name in files)]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.fixture
def read_only(work):
    """`chmod -R a-w` on the run directory, undone afterwards so that pytest can clean up."""
    run = run_dir(work)
    _chmod_tree(run, writable=False)
    try:
        try:
            (run / "probe").write_text("")
        except PermissionError:
            pass
        else:
            (run / "probe").unlink()
            pytest.skip(f"file permissions are not enforced for this user (euid {os.geteuid()}: root ignores them)")
        yield run
    finally:
        _chmod_tree(run, writable=True)


# Every one of them writes, so each takes the run lock first: a read-only run stops there, before any work.
READ_ONLY_COMMANDS = {
    "prepare --force": ["prepare", "recipe.toml", "--force"],
    "cache-teachers --force": ["cache-teachers", "recipe.toml", "--force"],
    "distill": ["distill", "recipe.toml"],
    "eval": ["eval", "recipe.toml"],
    "bench": ["bench", "recipe.toml"],
    "compare --plots": ["compare", "--plots"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(READ_ONLY_COMMANDS))
def test_a_read_only_run_directory_is_a_clean_error_naming_the_path(command, read_only):
    before = {p: p.stat().st_mtime_ns for p in read_only.rglob("*")}
    result = kd(*READ_ONLY_COMMANDS[command], code=None)
    check_clean_failure(result, f"cannot write {read_only}: permission denied")
    assert "make it writable" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in read_only.rglob("*")} == before


def _erofs(path: object) -> OSError:
    return OSError(errno.EROFS, "Read-only file system", str(path))


def test_a_read_only_file_system_stops_prepare_and_distill_at_the_run_lock(work, monkeypatch):
    """A read-only mount refuses even root: the run lock, written first, fails and names the run directory."""
    import filelock

    def refuse(self, *args, **kwargs):
        raise _erofs(self.lock_file)

    monkeypatch.setattr(filelock.FileLock, "acquire", refuse)
    for command in ("prepare", "distill"):
        result = kd(command, "recipe.toml", code=None)
        check_clean_failure(result, f"cannot write {run_dir(work)}: read-only file system")


@pytest.mark.slow
def test_a_read_only_file_system_while_writing_results_names_the_result(work, monkeypatch):
    import tempfile

    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if "/eval/" in str(dst) or "/bench/" in str(dst):
            raise _erofs(src)  # the temporary sibling: the error must name the result instead
        return real_replace(src, dst, *args, **kwargs)

    def mkdtemp(*args, **kwargs):
        raise _erofs(Path(kwargs["dir"]) / f"{kwargs['prefix']}xyz")

    monkeypatch.setattr(os, "replace", replace)
    for command, name in (("eval", "eval/student.json"), ("bench", "bench/student.json")):
        result = kd(command, "recipe.toml", code=None)
        check_clean_failure(result, f"cannot write {run_dir(work) / name}: read-only file system")
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    result = kd("prepare", "recipe.toml", "--force", code=None)
    check_clean_failure(result, f"cannot write {run_dir(work) / 'data' / 'main'}: read-only file system")


def test_file_error_says_what_the_user_can_fix_and_leaves_the_rest_alone(tmp_path):
    (tmp_path / "data").write_text("")
    readable = tmp_path / "plots"
    assert file_error(_erofs(readable)).message == f"cannot write {readable}: read-only file system"
    assert file_error(OSError(errno.EACCES, "Permission denied", str(readable))).message == (
        f"cannot write {readable}: permission denied")
    assert file_error(OSError(errno.ENOTDIR, "Not a directory", str(tmp_path / "data" / "main"))).message == (
        f"{tmp_path / 'data'} is a file, but kd keeps a folder there")
    assert file_error(OSError(errno.EEXIST, "File exists", str(tmp_path / "data"))).message == (
        f"{tmp_path / 'data'} is a file, but kd keeps a folder there")
    assert file_error(OSError(errno.ENOENT, "No such file or directory", str(readable))) is None  # a bug, or a race
    assert file_error(OSError(errno.EEXIST, "File exists", str(readable))) is None  # nothing in the way: not ours
    assert file_error(ValueError("a bug")) is None


# --------------------------------------------------------------------------- T13: kd compare with damaged files


def write_results(root: Path) -> Path:
    """A run directory as eval and bench leave it, for one teacher and the student."""
    jobs.write_recipe(root / "recipe.resolved.toml", {
        "name": root.name, "task": "classify", "student": {"ref": "tiny"}, "teachers": {"t": {"ref": "big"}},
    })
    for role, accuracy, ms in (("teacher:t", 0.9, 40.0), ("student", 0.85, 10.0)):
        name = role.replace(":", "-")
        write_json(root / "eval" / f"{name}.json", {"role": role, "model": role, "parameters": 1000,
                                                    "metrics": {"accuracy": accuracy, "f1": accuracy - 0.1}})
        write_json(root / "bench" / f"{name}.json", {"role": role, "model": role, "parameters": 1000, "batches": {
            "1": {"latency_ms_per_example": {"p50": ms, "p95": ms, "mean": ms}}}})
    return root


RESULT_DAMAGE = {
    "eval not JSON": ("eval/student.json", "{\"role\": \"stu", "not valid JSON (Unterminated string"),
    "eval not text": ("eval/student.json", b"\xff\xfe\x00garbage", "not valid JSON ("),
    "eval a list": ("eval/student.json", "[1, 2]", "not a kd eval result (the file is a list, not an object)"),
    "eval a string": ("eval/student.json", '"student"', "not a kd eval result (the file is a string, not an object)"),
    "eval metrics a string": ("eval/student.json", '{"role": "student", "metrics": "good"}',
                              "not a kd eval result (metrics is a string, not an object)"),
    "eval accuracy a string": ("eval/student.json", '{"role": "student", "metrics": {"accuracy": "0.9"}}',
                               "not a kd eval result (metrics.accuracy is a string, not a number)"),
    "eval without a role": ("eval/student.json", '{"metrics": {}}', "not a kd eval result (it names no role)"),
    "bench not JSON": ("bench/student.json", "", "not valid JSON (Expecting value"),
    "bench a list": ("bench/student.json", "[]", "not a kd bench result (the file is a list, not an object)"),
    "bench latency a list": ("bench/student.json",
                             '{"role": "student", "batches": {"1": {"latency_ms_per_example": [10]}}}',
                             "not a kd bench result (batches.1.latency_ms_per_example is a list, not an object)"),
    "bench batch size not a number": ("bench/student.json", '{"role": "student", "batches": {"one": {}}}',
                                      "not a kd bench result (batch size 'one' is not a number)"),
}


@pytest.mark.parametrize("damage", list(RESULT_DAMAGE))
def test_compare_leaves_a_damaged_result_out_with_a_warning_and_prints_the_rest(damage, here, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps nothing the asserts read
    name, content, why = RESULT_DAMAGE[damage]
    run = write_results(here / "runs" / "fin")
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    result = kd("compare", "--format", "json")
    assert f"warning: skipped {Path('runs/fin') / name}: {why}" in result.stderr
    rows = {row["role"]: row for row in json.loads(result.stdout)[0]["rows"]}
    assert rows["teacher:t"]["accuracy"] == 0.9 and rows["teacher:t"]["ms_per_example"] == 40.0
    measured = "accuracy" if name.startswith("eval") else "ms_per_example"
    kept = "ms_per_example" if measured == "accuracy" else "accuracy"
    assert rows["student"][measured] is None and rows["student"][kept] is not None
    assert f"student: no {name.split('/')[0]}, run" in result.stdout  # the hint to write it again
    table = kd("compare")  # the rich table, too
    assert "warning: skipped" in table.stderr and "teacher:t" in table.stdout


@pytest.mark.parametrize("recipe", ["name = \n", "not toml at all [", "task = 3\n",
                                    'task = "classify"\nteachers = "t"\n'])
def test_compare_leaves_a_run_with_a_damaged_recipe_out_and_compares_the_others(recipe, here):
    write_results(here / "runs" / "good")
    bad = write_results(here / "runs" / "bad")
    (bad / "recipe.resolved.toml").write_text(recipe)
    result = kd("compare", "--format", "json")
    assert f"warning: skipped the run {Path('runs/bad')}: {Path('runs/bad/recipe.resolved.toml')} is not " in (
        result.stderr)
    assert [table["run"] for table in json.loads(result.stdout)] == ["good"]
    alone = kd("compare", "runs/bad", code=None)
    check_clean_failure(alone, "no run left to compare: every one was skipped")
    assert "warning: skipped the run runs/bad" in alone.stderr
