"""Hostile files and recipes: kd never unpickles what it did not write, never runs a model's or a
dataset's own code unless the recipe says so, never writes outside the run directory, and never
treats a recipe string as code.

Every payload here would leave a marker file if it ran; each test first shows that the payload is
live (run deliberately, outside kd) and then that kd leaves the marker absent.
"""

from __future__ import annotations

import ast
import json
import os
import runpy
from pathlib import Path

import pytest
import torch

import jobs
from clirun import kd
from kdcli.errors import KdError
from kdcli.recipe import validate
from kdcli.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "kdcli"


@pytest.fixture(scope="module")
def bert(tiny) -> Path:
    return tiny("bert", "sequence-classification", num_labels=3, layers=2)


@pytest.fixture
def here(here: Path) -> Path:
    """conftest's empty working directory, with 40 sentences in s.jsonl."""
    jobs.write_sentences(here / "s.jsonl", 40, seed=4)
    return here


class Payload:
    """Unpickling this runs ``touch MARKER`` (pickle calls os.system with the argument)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Replace a checkpoint file by a torch.save archive whose pickle runs a command."""
    torch.save({"state": Payload(marker), "param_groups": []}, path)


def recipe(bert: Path, **top) -> Path:
    """Three steps of labels-only training of ``bert``; ``top``: tables that replace the recipe's."""
    return jobs.write_recipe("recipe.toml", {
        "name": "sec", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": jobs.LABELS},
        "student": {"ref": str(bert)},
        "loss": {"alpha": 1.0},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "eval_every": 400, "checkpoint_every": 4,
                  "log_every": 400},
    } | top)


# --------------------------------------------------------------------------- pickles


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "RAN"
    plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)  # what kd must never do with a checkpoint
    assert marker.exists()


@pytest.mark.slow
def test_a_pickle_planted_in_a_checkpoint_is_not_run_and_kd_says_so(bert, here):
    marker = here / "PWNED"
    kd("distill", str(recipe(bert)))
    checkpoints = here / "runs" / "sec" / "checkpoints" / "main"
    newest, older = sorted(checkpoints.glob("step-*"), reverse=True)[:2]
    plant(newest / "optimizer.pt", marker)

    # A run killed before it recorded the stage as done continues from its newest loadable checkpoint.
    done = here / "runs" / "sec" / "stages" / "main" / "student" / "done.json"
    done.unlink()
    resumed = kd("distill", "recipe.toml", "--resume")
    assert f"checkpoint {newest.name} cannot be loaded" in resumed.output
    assert f"resuming main from {older.name}" in resumed.output
    assert not marker.exists()

    # Every checkpoint poisoned (a different file in each): a clear error, still nothing run.
    newest, older = sorted(checkpoints.glob("step-*"), reverse=True)[:2]
    plant(newest / "scheduler.pt", marker)
    plant(older / "rng-0.pt", marker)
    done.unlink()
    failed = kd("distill", "recipe.toml", "--resume", code=1)
    assert isinstance(failed.exception, SystemExit), failed.output
    assert "error: no checkpoint in" in failed.stderr and "could be loaded" in failed.stderr
    assert "hint:" in failed.stderr
    assert not marker.exists()


def test_a_pickled_model_file_is_not_run(bert, here, tmp_path):
    """A model directory whose weights are a pytorch_model.bin with a payload instead of tensors."""
    model = tmp_path / "evil-model"
    model.mkdir()
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        if (bert / name).exists():
            (model / name).write_bytes((bert / name).read_bytes())
    marker = here / "PWNED"
    torch.save({"bert.embeddings.word_embeddings.weight": Payload(marker)}, model / "pytorch_model.bin")
    path = recipe(bert)
    result = kd("distill", str(path), "--set", f'student.ref="{model}"', code=1)
    assert not marker.exists()
    # A clean refusal (test_bad_input has the same case for a teacher), not a crash in the unpickler.
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, result.output
    assert result.stderr.startswith(f"error: model {model}: its weights are a pickle that holds more than tensors")
    assert "\nhint: " in result.stderr and "weights_only" in result.stderr


@pytest.mark.slow
def test_everything_kd_writes_is_data_not_code(bert, here):
    """Caches are safetensors; the only pickles are kd's own checkpoint files, which load with weights_only."""
    path = recipe(bert, teachers={"t": {"ref": str(bert)}}, loss={"alpha": 0.5})
    for command in ("cache-teachers", "distill"):
        kd(command, str(path))
    run = here / "runs" / "sec"
    cache_files = {p.suffix for p in (run / "cache").rglob("*") if p.is_file()}
    assert cache_files == {".safetensors", ".json"}
    pickles = [p for p in run.rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle")]
    assert pickles and all(p.parent.parent.parent.name == "checkpoints" for p in pickles)
    for p in pickles:
        torch.load(p, weights_only=True)  # plain tensors and containers only


# --------------------------------------------------------------------------- remote code


def _remote_code_model(path: Path, marker: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "kd-evil", "architectures": ["EvilForSequenceClassification"], "num_labels": 3,
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"},
    }))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (path / "configuration_evil.py").write_text(code)
    (path / "modeling_evil.py").write_text(code)
    return path


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_model_that_needs_its_own_code_is_refused_unless_the_recipe_trusts_it(bert, here, tmp_path, role):
    marker = tmp_path / "REMOTE_CODE_RAN"
    evil = _remote_code_model(tmp_path / "evil", marker)
    runpy.run_path(str(evil / "configuration_evil.py"))  # the payload is live...
    assert marker.exists()
    marker.unlink()
    path = recipe(bert)
    key = "teachers.t.ref" if role == "teacher" else "student.ref"
    extra = ["--set", "loss.alpha=0.5", "--set", f'teachers.t.ref="{bert}"'] if role == "teacher" else []
    result = kd("distill", str(path), *extra, "--set", f'{key}="{evil}"', code=1)
    assert "needs the code in its repository to run" in result.stderr
    assert "trust_remote_code = true" in result.stderr
    assert not marker.exists()  # ...and kd did not run it
    assert validate({"name": "x", "task": "classify", "data": {"format": "jsonl", "path": "s.jsonl"},
                     "student": {"ref": "m"}, "loss": {"alpha": 1.0}}).student.trust_remote_code is False


def test_a_hub_dataset_name_that_points_at_a_script_does_not_run_it(here, bert):
    marker = here / "DATASET_CODE_RAN"
    folder = here / "evil_data"
    folder.mkdir()
    (folder / "evil_data.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    path = recipe(bert)
    result = kd("prepare", str(path), "--set", "data.path=''", "--set", 'data.format="hub"',
                "--set", f'data.hub_name="{folder}"', code=None)
    assert not marker.exists()
    assert result.exit_code == 1 and "error:" in result.stderr, result.output


# --------------------------------------------------------------------------- the run directory


def _recipe(**top):
    return validate({"name": "r", "task": "classify", "data": {"format": "jsonl", "path": "s.jsonl"},
                     "student": {"ref": "m"}, "loss": {"alpha": 1.0}} | top)


@pytest.mark.parametrize("top", [
    {"output_dir": "/tmp/kd-outside"},
    {"output_dir": ".."},
    {"output_dir": "runs/../../x"},
])
def test_a_run_directory_outside_the_current_directory_is_refused(here, top):
    with pytest.raises(KdError, match="outside the current directory"):
        RunDir.for_recipe(_recipe(**top))
    assert RunDir.for_recipe(_recipe(**top, allow_outside=True)).root.name == "r"  # unless the recipe says so


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "/etc", "a\\b", ".hidden", "x\ny"])
def test_a_run_name_is_one_plain_folder_name_even_when_outside_is_allowed(here, name):
    with pytest.raises(KdError, match="name"):
        _recipe(name=name, allow_outside=True)


def test_a_symlink_out_of_the_current_directory_is_refused(here, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (here / "runs").symlink_to(outside, target_is_directory=True)
    with pytest.raises(KdError, match="outside the current directory"):
        RunDir.for_recipe(_recipe())


def test_stage_and_teacher_names_cannot_climb_out_of_the_run(here):
    with pytest.raises(KdError, match="stages.0.name"):
        _recipe(stages=[{"name": "../../../x"}])
    with pytest.raises(KdError, match="teacher name"):
        _recipe(teachers={"../../x": {"ref": "m"}}, loss={"alpha": 0.5})


@pytest.mark.parametrize("role",
                         ["../../../etc/passwd", "/abs/model", "teacher:../../x", "..", "a\\..\\b", "teacher:a/b:c"])
def test_eval_and_bench_files_of_any_role_stay_in_the_run(here, role):
    run = RunDir.for_recipe(_recipe())
    for path in (run.eval(role), run.bench(role)):
        assert path.parent.parent == run.root and path.resolve().is_relative_to(run.root.resolve())


# --------------------------------------------------------------------------- recipes are data


PAYLOAD = "__import__('os').system('touch RECIPE_CODE_RAN')"


def test_recipe_strings_are_never_evaluated(here, bert):
    text = {
        "name": "inert", "task": "classify",
        "data": {"format": "jsonl", "path": "s.jsonl", "label_names": ["negative", "neutral", "positive"],
                 "template": "{text} " + PAYLOAD.replace("{", "{{").replace("}", "}}"), "encoding": "utf-8"},
        "student": {"ref": str(bert), "revision": PAYLOAD},
        "teachers": {"t": {"ref": PAYLOAD}},
        "loss": {"alpha": 0.5},
        "search": {"train.lr": {"choice": [PAYLOAD]}},
    }
    jobs.write_recipe("recipe.toml", text)
    kd("check", "recipe.toml")  # a valid recipe: strings are just strings
    kd("prepare", "recipe.toml")
    distill = kd("distill", "recipe.toml", code=1)
    assert "could not be downloaded" in distill.stderr  # the "code" is a Hub id
    bad = kd("check", "recipe.toml", "--set", f"train.scheduler={PAYLOAD}", code=1)
    assert "train.scheduler" in bad.stderr
    assert not (here / "RECIPE_CODE_RAN").exists()


BUILTINS = {"eval", "exec", "compile", "__import__"}  # bare calls; `model.eval()` and `re.compile` are fine
MODULE_CALLS = {("importlib", "import_module"), ("os", "system"), ("os", "popen"), ("runpy", "run_path"),
                ("runpy", "run_module")}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def test_the_package_has_no_eval_no_dynamic_imports_and_no_unsafe_unpickling():
    problems = []
    for source in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node, owner, name in _calls(tree):
            where = f"{source.name}:{node.lineno}"
            if (isinstance(node.func, ast.Name) and name in BUILTINS) or (owner, name) in MODULE_CALLS:
                problems.append(f"{where}: {owner + '.' if owner else ''}{name}()")
            if owner == "pickle" or (owner in ("np", "numpy") and any(k.arg == "allow_pickle" for k in node.keywords)):
                problems.append(f"{where}: {owner}.{name}()")
            if owner == "torch" and name == "load":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    problems.append(f"{where}: torch.load without weights_only=True")
            if any(k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords):
                problems.append(f"{where}: trust_remote_code=True hard-coded")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                # `import pickle` for its exception type is fine (calls on it are caught above);
                # these modules exist to deserialise code-carrying objects.
                if any(n in ("dill", "cloudpickle", "marshal", "shelve") for n in names):
                    problems.append(f"{source.name}:{node.lineno}: imports {names}")
                if isinstance(node, ast.ImportFrom) and node.module == "pickle":
                    problems.append(f"{source.name}:{node.lineno}: from pickle import {[a.name for a in node.names]}")
    assert not problems, "\n".join(problems)
