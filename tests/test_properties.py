"""Property-based tests (hypothesis): whatever bytes or lines a user feeds kd, the recipe loader and
every data adapter give a valid result or a clean KdError (error: + hint: at the CLI), never a
traceback.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import jobs
from kdcli import recipe as recipe_mod
from kdcli.data import read_examples
from kdcli.errors import KdError
from kdcli.recipe import Recipe, RecipeError, plain_name_problem, validate
from kdcli.rundir import RunDir, role_filename

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# --------------------------------------------------------------------------- recipes

VALID = {
    "name": "p", "task": "classify",
    "data": {"format": "jsonl", "path": "s.jsonl"},
    "student": {"ref": "m"},
    "loss": {"alpha": 1.0},
}

# Keys the schema knows, so that generated documents reach the validators, not just "unknown key".
KEYS = sorted(
    {name for model in (recipe_mod.Recipe, recipe_mod.DataConfig, recipe_mod.StudentConfig, recipe_mod.TeacherConfig,
                        recipe_mod.LossConfig, recipe_mod.TrainConfig, recipe_mod.Stage, recipe_mod.HiddenMap,
                        recipe_mod.Columns, recipe_mod.EvalConfig, recipe_mod.BenchConfig,
                        recipe_mod.SearchDistribution)
     for name in model.model_fields}
)
toml_scalars = st.one_of(
    st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["classify", "choice", "generate", "jsonl", "fpb", "pairs", "skip", "../x", "a/b", ""]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=8))
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)


def _ok_or_recipe_error(load):
    try:
        result = load()
    except RecipeError as exc:
        assert exc.message and exc.hint
        return None
    assert isinstance(result, Recipe)
    return result


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_as_a_recipe_file(tmp_path, raw):
    path = tmp_path / "r.toml"
    path.write_bytes(raw)
    _ok_or_recipe_error(lambda: recipe_mod.load(path))


@pytest.mark.slow
@SETTINGS
@given(st.dictionaries(keys, toml_values, max_size=8))
def test_any_toml_document_as_a_recipe(tmp_path, document):
    path = jobs.write_recipe(tmp_path / "r.toml", document)
    _ok_or_recipe_error(lambda: recipe_mod.load(path))


@SETTINGS
@given(st.sampled_from(["data", "student", "teachers", "loss", "train", "stages", "search", "eval", "bench"]),
       toml_values)
def test_any_value_in_any_section_of_a_valid_recipe(section, value):
    recipe = _ok_or_recipe_error(lambda: validate(dict(VALID, **{section: value})))
    if recipe is not None:  # what validates is usable: its run directory is one plain folder under runs/
        assert plain_name_problem(recipe.name) is None


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=3))
def test_any_set_overrides(overrides):
    _ok_or_recipe_error(lambda: validate(recipe_mod.apply_overrides(VALID, overrides)))


@SETTINGS
@given(st.text(min_size=1, max_size=30))
def test_a_name_that_validates_stays_one_folder_inside_the_run_directory(tmp_path, name):
    try:
        recipe = validate(dict(VALID, name=name, stages=[{"name": name}], teachers={name: {"ref": "m"}},
                               loss={"alpha": 0.5}))
    except RecipeError:
        return
    root = (tmp_path / "runs" / recipe.name).resolve()
    assert root.parent == (tmp_path / "runs").resolve()
    run = RunDir(root)
    for path in (run.data(name), run.cache(name, name), run.teacher(name), run.checkpoints(name),
                 run.stage_output(name, "student")):
        assert path.resolve().is_relative_to(root) and path.resolve() != root


@SETTINGS
@given(st.text(max_size=40))
def test_eval_and_bench_paths_of_any_role_stay_in_the_run(tmp_path, role):
    run = RunDir(tmp_path / "runs" / "r")
    assume(role_filename(role) not in ("", ".", ".."))
    for path in (run.eval(role), run.bench(role)):
        assert path.parent.parent == run.root


@SETTINGS
@given(st.text(max_size=60))
def test_any_template_is_accepted_or_refused_up_front(template):
    from kdcli.models import render_prompt

    recipe = _ok_or_recipe_error(lambda: validate(dict(VALID, data=dict(VALID["data"], template=template))))
    if recipe is not None:  # an accepted template always renders
        render_prompt({"text": "t", "options": ["a", "b"]}, recipe.data.template)


# --------------------------------------------------------------------------- data adapters

TASK_FOR = {"fpb": "classify", "winogrande": "choice", "socialiqa": "choice", "aqua": "choice", "triviaqa": "generate",
            "jsonl": "classify", "csv": "classify", "parquet": "classify"}


def _config(fmt: str, path: str, **extra):
    data = {"format": fmt, "path": path} | extra
    if fmt in ("jsonl", "csv", "parquet"):
        data.setdefault("columns", {"text": "text", "label": "label"})
    return validate(dict(VALID, task=TASK_FOR[fmt], data=data)).data


def _read(fmt: str, path: Path, **extra):
    try:
        parts, names = read_examples(_config(fmt, str(path), **extra), TASK_FOR[fmt])
    except KdError as exc:
        assert exc.message and exc.hint, exc
        return None
    for examples in parts.values():
        for ex in examples:
            assert isinstance(ex.text, str) and ex.text.strip()
            assert isinstance(ex.label, int) and ex.label >= -1
            assert all(isinstance(o, str) for o in ex.options) and all(isinstance(a, str) for a in ex.answers)
            if TASK_FOR[fmt] == "classify":
                assert 0 <= ex.label < len(names)
            if TASK_FOR[fmt] == "choice":
                assert 0 <= ex.label < len(ex.options)
    return parts


FILE_NAME = {"fpb": "d.txt", "csv": "d.csv", "parquet": "d.parquet"}


@SETTINGS
@given(fmt=st.sampled_from(sorted(TASK_FOR)), raw=st.binary(max_size=300))
def test_any_bytes_in_any_format(tmp_path, fmt, raw):
    path = tmp_path / FILE_NAME.get(fmt, "d.jsonl")
    path.write_bytes(raw)
    if fmt in ("winogrande", "socialiqa"):
        (tmp_path / "d-labels.lst").write_bytes(raw[::-1])
    _read(fmt, path)


lines = st.lists(st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.ascii_letters + " @{}[]\":,.\\", max_size=40),
    st.builds(lambda s, label: f"{s}@{label}", st.text(max_size=20),
              st.sampled_from(["negative", "neutral", "positive", "", "x"])),
), max_size=8)


@SETTINGS
@given(fmt=st.sampled_from(["fpb", "jsonl", "csv", "triviaqa", "aqua"]), rows=lines, crlf=st.booleans())
def test_any_lines_in_the_line_formats(tmp_path, fmt, rows, crlf):
    path = tmp_path / FILE_NAME.get(fmt, "d.jsonl")
    path.write_text(("\r\n" if crlf else "\n").join(rows), encoding="latin-1" if fmt == "fpb" else "utf-8",
                    errors="replace")
    _read(fmt, path)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=12),
                         st.sampled_from(["1", "2", "3", "A", "B)", "A)x", "Question: q?\nAnswer:", "neutral",
                                          "positive"]))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
FIELDS = ["text", "label", "qID", "sentence", "option1", "option2", "answer", "context", "question", "answerA",
          "answerB", "answerC", "options", "correct", "aliases", "question_id", "id"]
json_rows = st.lists(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8), min_size=1, max_size=6)


@pytest.mark.slow
@SETTINGS
@given(fmt=st.sampled_from(["winogrande", "socialiqa", "aqua", "triviaqa", "jsonl"]), rows=json_rows,
       labels=st.lists(st.sampled_from(["1", "2", "3", "0", "x", ""]), max_size=7))
def test_any_json_rows_in_the_json_formats(tmp_path, fmt, rows, labels):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if fmt in ("winogrande", "socialiqa"):
        (tmp_path / "d-labels.lst").write_text("\n".join(labels), encoding="utf-8")
    _read(fmt, path)


@pytest.mark.slow
@SETTINGS
@given(rows=json_rows, choice=st.booleans())
def test_any_rows_in_parquet(tmp_path, rows, choice):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    try:  # rows pyarrow itself cannot store are not a test of kd
        pq.write_table(pa.Table.from_pylist(rows), path)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        assume(False)
    extra = {"columns": {"text": "text", "label": "label", "options": ["option1", "option2"]}} if choice else {}
    if choice:
        try:
            read_examples(
                validate(dict(VALID, task="choice", data={"format": "parquet", "path": str(path)} | extra)).data,
                "choice",
            )
        except KdError as exc:
            assert exc.hint
    else:
        _read("parquet", path)


@pytest.mark.slow
@SETTINGS
@given(rows=json_rows, on_conflict=st.sampled_from(["error", "first", "majority", "drop"]), seed=st.integers(0, 3),
       split=st.sampled_from([{"train": 0.5, "validation": 0.5}, {"train": 0.8, "validation": 0.1, "test": 0.1},
                              {"train": 1.0}]))
def test_any_rows_through_cleaning_and_splitting(tmp_path, rows, on_conflict, seed, split):
    """The whole prepare pipeline short of writing: conflicts, dedupe, stratified split, limits."""
    from kdcli.data.prepare import _build

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = validate(dict(VALID, data={"format": "jsonl", "path": str(path), "on_conflict": on_conflict, "split": split,
                                      "limit": 3})).data
    try:
        prepared = _build(data, "classify", seed, lambda message: None, lambda done: None, lambda: tmp_path)
    except KdError as exc:
        assert exc.hint
        return
    prepared.store.close()
    assert set(prepared.splits) == {name for name, f in split.items() if f > 0}
    assert all(1 <= len(rows) <= 3 for rows in prepared.splits.values())


# --------------------------------------------------------------------------- resume under a changed recipe

# (--set, the key the refusal names); None: a change that only touches logging, checkpoints or eval.
CHANGES = {
    "train.lr=5e-4": "train.lr", "seed=7": "seed", "loss.alpha=0.3": "loss.alpha",
    "loss.temperature=3.0": "loss.temperature", "train.max_steps=6": "train.max_steps",
    "data.max_length=24": "data.max_length", "train.log_every=2": None, "train.checkpoint_every=16": None,
    "train.keep_last=3": None, "eval.batch_size=8": None,
}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, made to look killed after step 2."""
    import shutil

    from clirun import kd_in

    root = tmp_path_factory.mktemp("interrupted")
    bert = tiny("bert", "sequence-classification", num_labels=3, layers=2)
    jobs.write_classify_run(root, bert, name="r", rows=40, loss={"alpha": 0.5, "temperature": 2.0},
                            train={"max_steps": 4, "batch_size": 4, "lr": 1e-3, "eval_every": 10_000,
                                   "checkpoint_every": 8, "log_every": 4, "keep_last": 5})
    kd_in(root, "distill", "recipe.toml")
    run = root / "runs" / "r"
    shutil.rmtree(run / "checkpoints" / "main" / "step-00000004")
    (run / "stages" / "main" / "student" / "done.json").unlink()
    return root


def _contents(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sets(st.sampled_from(sorted(CHANGES)), max_size=3))
@example(set())
@example({"train.log_every=2", "train.keep_last=3", "eval.batch_size=8"})
@example({"seed=7", "train.checkpoint_every=16"})
def test_a_resume_under_a_changed_recipe_is_refused_or_equals_a_fresh_run(interrupted, tmp_path_factory, changes):
    """It never mixes the two: refused, naming every change that shapes the weights, and nothing
    written; or a student bit-identical to a fresh run with the new recipe."""
    import os
    import shutil

    import torch
    from safetensors.torch import load_file

    from clirun import kd

    sets = [arg for change in sorted(changes) for arg in ("--set", change)]
    named = sorted(key for change in changes if (key := CHANGES[change]))
    resumed, fresh = tmp_path_factory.mktemp("resumed"), tmp_path_factory.mktemp("fresh")
    shutil.copytree(interrupted, resumed, dirs_exist_ok=True)
    for name in ("recipe.toml", "s.jsonl"):
        shutil.copy(interrupted / name, fresh / name)
    cwd = os.getcwd()
    try:
        os.chdir(resumed)
        before = _contents(resumed / "runs" / "r")
        result = kd("distill", "recipe.toml", "--resume", *sets, code=None)
        if named:
            said = " ".join(result.stderr.split())
            assert result.exit_code == 1 and "made with another recipe; changed:" in said, result.output
            assert all(f"{key}: " in said for key in named), (named, said)
            assert _contents(resumed / "runs" / "r") == before
            return
        assert result.exit_code == 0, result.output
        os.chdir(fresh)
        kd("distill", "recipe.toml", *sets)
    finally:
        os.chdir(cwd)
    mine, theirs = (load_file(root / "runs" / "r" / "student" / "model.safetensors") for root in (resumed, fresh))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
