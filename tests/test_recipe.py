"""The recipe schema: shipped recipes, strict validation, cross-field rules, --set, stages, TOML, reference."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from kdcli import recipe as recipe_mod
from kdcli.errors import RecipeError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
SHARED = REPO.parent / "shared"


def minimal() -> dict[str, Any]:
    """A small valid raw recipe: one teacher with a hidden map, so every loss term is allowed."""
    return {
        "name": "t",
        "task": "classify",
        "data": {"format": "fpb", "path": "sentences.txt"},
        "student": {"ref": "student-model"},
        "teachers": {"big": {"ref": "teacher-model", "hidden": {"map": "skip"}}},
    }


def problems_of(raw: dict[str, Any], overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_mod.validate(recipe_mod.apply_overrides(raw, overrides or []))
    return info.value.problems


def with_(path: str, value: Any) -> dict[str, Any]:
    """minimal() with one dotted key set (tables created as needed)."""
    raw = minimal()
    *parents, last = path.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


# --------------------------------------------------------------------------- shipped recipes


def test_the_study_recipes_are_shipped():
    assert {"finance", "trivia", "commonsense", "math"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    recipe = recipe_mod.load(path)
    assert recipe.name == path.stem


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_data_files_exist(path, monkeypatch):
    """Recipe paths are relative to the directory kd runs from: the repository root, shared/ beside it."""
    if not SHARED.is_dir():
        pytest.skip("shared/ data is not beside the repository")
    monkeypatch.chdir(REPO)
    for stage in recipe_mod.load(path).resolved_stages():
        sources = [stage.data.path, *stage.data.files.values()]
        for source in filter(None, sources):
            assert source.startswith("package:") or Path(source).is_file(), f"{stage.name}: {source}"


# --------------------------------------------------------------------------- keys and types


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("train.lrr", 1e-4, "train.lrr: unknown key (did you mean 'lr'?)"),
        ("teachers.big.hidden.mapp", "skip", "teachers.big.hidden.mapp: unknown key (did you mean 'map'?)"),
        ("loss.temprature", 2.0, "loss.temprature: unknown key (did you mean 'temperature'?)"),
        ("colour", "blue", "colour: unknown key"),
    ],
)
def test_unknown_key_is_rejected_with_a_suggestion(path, value, expected):
    assert problems_of(with_(path, value)) == [expected]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("teachers.big.load_in_8bit", "yes", "teachers.big.load_in_8bit: expected a boolean"),
        ("data.dedupe", 1, "data.dedupe: expected a boolean"),
        ("train.epochs", "3", "train.epochs: expected a number"),
        ("train.batch_size", "16", "train.batch_size: expected an integer"),
        ("train.batch_size", 16.0, "train.batch_size: expected an integer"),
        ("name", 3, "name: expected a string"),
        ("bench.batch_sizes", 1, "bench.batch_sizes: expected a list"),
        ("teachers.big.finetune", 3, "teachers.big.finetune: expected a table"),
    ],
)
def test_types_are_strict(path, value, expected):
    (problem,) = problems_of(with_(path, value))
    assert problem.startswith(expected)


def test_every_problem_is_reported_at_once():
    raw = minimal()
    raw["train"] = {"lrr": 1e-4, "batch_size": "16"}
    raw["loss"] = {"alpha": 2.0}
    raw["teachers"]["big"]["load_in_8bit"] = "yes"
    with pytest.raises(RecipeError) as info:
        recipe_mod.validate(raw, source="r.toml")
    paths = sorted(p.split(":")[0] for p in info.value.problems)
    assert paths == ["loss.alpha", "teachers.big.load_in_8bit", "train.batch_size", "train.lrr"]
    assert info.value.message.startswith("r.toml: 4 problems")


def test_missing_required_keys_are_named():
    raw = minimal()
    del raw["student"], raw["data"]["format"]
    assert sorted(problems_of(raw)) == ["data.format: required key is missing", "student: required key is missing"]


# --------------------------------------------------------------------------- cross-field rules


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("loss.alpha", 1.5, "loss.alpha:"),
        ("loss.alpha", -0.1, "loss.alpha:"),
        ("loss.temperature", 0.0, "loss.temperature:"),
        ("data.split", {"train": 0.5, "test": 0.1}, "data: split fractions sum to 0.6, not 1"),
        ("data.split", {"train": 1.2, "test": -0.2}, "data: split fractions must be >= 0"),
        ("data.files", {"train": "a.txt"}, "data: give exactly one of `path`"),
        ("student.head", "seq2seq", "student.head: 'seq2seq' cannot do task 'classify'"),
        ("teachers.big.head", "causal", "teachers.big.head: 'causal' cannot do task 'classify'"),
        ("student.from_teacher", "big", "student: give exactly one of `ref`"),
        ("teachers.big.hidden", {"map": "pairs"}, "teachers.big.hidden: map = 'pairs' needs pairs"),
        ("seed", -1, "seed: Input should be greater than or equal to 0"),
        ("seed", 2**32, "seed: Input should be less than or equal to 4294967295"),
        ("train.epochs", float("inf"), "train.epochs: expected a finite number, got inf"),
        ("teachers.big.weight", float("nan"), "teachers.big.weight: expected a finite number, got nan"),
        ("data.split", {"train": float("nan")}, "data.split.train: expected a finite number, got nan"),
        ("search", {"train.lr": {"uniform": [1e-5, float("inf")]}}, "search.train.lr.uniform.1: expected a finite"),
    ],
)
def test_field_rules(path, value, expected):
    assert any(p.startswith(expected) for p in problems_of(with_(path, value))), expected


def test_8bit_and_4bit_together_are_refused():
    raw = minimal()
    raw["teachers"]["big"].update(load_in_8bit=True, load_in_4bit=True)
    assert problems_of(raw) == ["teachers.big: choose one of load_in_8bit and load_in_4bit"]


def test_task_decides_which_heads_fit():
    raw = minimal()
    raw["task"] = "generate"
    raw["data"] = {"format": "triviaqa", "path": "q.jsonl"}
    raw["teachers"]["big"]["head"] = "seq2seq"
    raw["student"]["head"] = "sequence-classification"
    assert problems_of(raw) == [
        "student.head: 'sequence-classification' cannot do task 'generate' (use one of ['auto', 'causal', 'seq2seq'])"
    ]


def test_stage_names_are_unique():
    raw = minimal()
    raw["stages"] = [{"name": "a"}, {"name": "a"}]
    assert problems_of(raw) == ["stages: stage name 'a' is used twice"]


def test_stage_cannot_use_an_unknown_teacher():
    raw = minimal()
    raw["stages"] = [{"name": "a", "teachers": ["big", "ghost"]}]
    assert problems_of(raw) == ["stages.0.teachers: no teacher named 'ghost' in [teachers]"]


def test_beta_needs_a_hidden_map():
    raw = minimal()
    del raw["teachers"]["big"]["hidden"]
    raw["loss"] = {"beta": 1.0}
    assert problems_of(raw) == ["loss.beta: hidden MSE needs a teacher with a `hidden` layer map in this stage"]


def test_alpha_below_one_needs_a_teacher():
    raw = minimal()
    raw["teachers"] = {}
    raw["loss"] = {"alpha": 0.5}
    assert problems_of(raw) == [
        "loss.alpha: 0.5 gives weight to a teacher term, but the stage has no teachers "
        "(set alpha = 1 to train on labels only)"
    ]
    raw["loss"] = {"alpha": 1.0}
    assert recipe_mod.validate(raw).resolved_stages()[0].teachers == []


def test_a_recipe_without_teachers_trains_on_labels_unless_it_sets_alpha():
    raw = minimal()
    raw["teachers"] = {}
    raw["loss"] = {"temperature": 3.0}
    assert recipe_mod.validate(raw).loss.alpha == 1.0  # nothing to distil from: not an error
    del raw["loss"]
    assert recipe_mod.validate(raw).resolved_stages()[0].loss.alpha == 1.0
    raw["teachers"] = {"t": {"ref": "t"}}
    assert recipe_mod.validate(raw).loss.alpha == 0.5  # with a teacher the default stays


def test_stage_rules_name_the_stage():
    raw = minimal()
    raw["stages"] = [{"name": "warmup", "teachers": [], "loss": {"alpha": 1.0}}, {"name": "labels", "teachers": []}]
    (problem,) = problems_of(raw)
    assert problem.startswith("stages.1.loss.alpha: 0.5 gives weight to a teacher term")


def test_student_from_teacher():
    raw = minimal()
    raw["student"] = {"from_teacher": "big", "layers": [0, 2, 4]}
    assert recipe_mod.validate(raw).student.layers == [0, 2, 4]
    raw["student"] = {"from_teacher": "ghost", "layers": [0, 2]}
    assert problems_of(raw) == ["student.from_teacher: no teacher named 'ghost' in [teachers]"]
    raw["student"] = {"from_teacher": "big"}
    assert problems_of(raw) == ["student: from_teacher needs layers, e.g. layers = [0, 2, 4]"]


def test_search_space():
    raw = minimal()
    raw["search"] = {
        "train.lr": {"log_uniform": [1e-5, 1e-3]},
        "loss.temperature": {"choice": [1.0, 2.0, 4.0]},
        "train.batch_size": {"int_uniform": [8, 32]},
    }
    assert set(recipe_mod.validate(raw).search) == {"train.lr", "loss.temperature", "train.batch_size"}


def test_search_reaches_one_stage_by_index():
    """docs/tune.md's `stages.N.train.lr`: a key into one stage is a recipe key; a stage that is not there is not."""
    raw = minimal() | {"stages": [{"name": "a"}, {"name": "b"}]}
    raw["search"] = {"stages.1.train.lr": {"log_uniform": [1e-5, 1e-4]}}
    assert list(recipe_mod.validate(raw).search) == ["stages.1.train.lr"]
    raw["search"] = {"stages.2.train.lr": {"log_uniform": [1e-5, 1e-4]}}
    assert problems_of(raw) == ["search.stages.2.train.lr: no such recipe key"]


@pytest.mark.parametrize(
    ("key", "distribution", "expected"),
    [
        ("train.lrx", {"uniform": [0.0, 1.0]}, "search.train.lrx: no such recipe key"),
        ("train", {"uniform": [0.0, 1.0]}, "search.train: no such recipe key"),
        ("train.lr", {"uniform": [1.0, 0.0]}, "search.train.lr: uniform needs low < high"),
        ("train.lr", {"log_uniform": [0.0, 1.0]}, "search.train.lr: log_uniform needs low > 0"),
        ("train.lr", {"uniform": [0.0, 1.0], "choice": [1.0]}, "search.train.lr: give exactly one of"),
        ("train.lr", {}, "search.train.lr: give exactly one of"),
        ("train.batch_size", {"choice": []}, "search.train.batch_size: choice needs at least one value"),
        ("train.lr", {"uniform": [0.0, 1.0, 2.0]}, "search.train.lr.uniform:"),
    ],
)
def test_bad_search_is_refused(key, distribution, expected):
    (problem,) = problems_of(with_("search", {key: distribution}))
    assert problem.startswith(expected)


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize(
    ("override", "read", "expected"),
    [
        ("train.lr=3e-5", lambda r: r.train.lr, 3e-5),
        ("train.batch_size=8", lambda r: r.train.batch_size, 8),
        ("data.dedupe=false", lambda r: r.data.dedupe, False),
        ("data.path=../shared/data/fpb/x.txt", lambda r: r.data.path, "../shared/data/fpb/x.txt"),
        ("student.ref=google/flan-t5-small", lambda r: r.student.ref, "google/flan-t5-small"),
        ('name="quoted name"', lambda r: r.name, "quoted name"),
        ("bench.batch_sizes=[1, 8, 64]", lambda r: r.bench.batch_sizes, [1, 8, 64]),
        ("data.split={train=0.6, validation=0.2, test=0.2}", lambda r: r.data.split["validation"], 0.2),
        ("teachers.big.finetune.epochs=2", lambda r: r.teachers["big"].finetune.epochs, 2),
        ("teachers.big.load_in_8bit=true", lambda r: r.teachers["big"].load_in_8bit, True),
    ],
)
def test_override_sets_a_typed_value(override, read, expected):
    recipe = recipe_mod.validate(recipe_mod.apply_overrides(minimal(), [override]))
    assert read(recipe) == expected


def test_overrides_leave_the_raw_recipe_alone():
    raw = minimal()
    before = copy.deepcopy(raw)
    recipe_mod.apply_overrides(raw, ["train.lr=1e-3", "teachers.big.ref=other"])
    assert raw == before


def test_override_addresses_a_stage_by_index():
    raw = minimal()
    raw["stages"] = [{"name": "one"}, {"name": "two"}]
    recipe = recipe_mod.validate(recipe_mod.apply_overrides(raw, ["stages.1.train.lr=1e-5"]))
    first, second = recipe.resolved_stages()
    assert (first.train.lr, second.train.lr) == (5e-5, 1e-5)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr", "--set 'train.lr': expected KEY.PATH=VALUE"),
        ("=1", "--set '=1': empty key"),
        ("train..lr=1", "--set 'train..lr=1': empty key"),
        ("name.first=x", "--set name.first=x: name is a value, not a table"),
        ("stages.2.train.lr=1e-5", "--set stages.2.train.lr=1e-5: stages.2 is not a stage index"),
        ("stages.one.train.lr=1e-5", "--set stages.one.train.lr=1e-5: stages.one is not a stage index"),
        ("stages.0={}", "--set stages.0={}: cannot replace a whole stage"),
    ],
)
def test_malformed_override_is_refused(override, expected):
    raw = minimal()
    raw["stages"] = [{"name": "one"}, {"name": "two"}]
    with pytest.raises(RecipeError) as info:
        recipe_mod.apply_overrides(raw, [override])
    assert info.value.problems == [expected]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrx=1e-5", "train.lrx: unknown key (did you mean 'lr'?)"),
        ("loss.alpha=2", "loss.alpha:"),
        ("train.batch_size=eight", "train.batch_size: expected an integer, got 'eight'"),
    ],
)
def test_override_that_breaks_the_recipe_is_reported_by_path(tmp_path, override, expected):
    path = tmp_path / "r.toml"
    path.write_text(recipe_mod.to_toml(recipe_mod.validate(minimal())), encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        recipe_mod.load(path, [override])
    (problem,) = info.value.problems
    assert problem.startswith(f"--set {override}: {expected}")  # the override is blamed, not the file
    assert info.value.message == problem


def test_a_bad_top_level_key_is_reported_once_not_once_more_per_stage(tmp_path):
    raw = minimal()
    raw["stages"] = [{"name": "a"}, {"name": "b"}]
    raw["train"] = {"learning_rate": 1e-4}
    assert problems_of(raw) == ["train.learning_rate: unknown key (did you mean 'lr'?)"]


@pytest.mark.parametrize(("typed", "meant"), [("num_train_epochs", "epochs"), ("gradient_accumulation_steps",
                         "grad_accum"), ("save_total_limit", "keep_last"), ("per_device_train_batch_size",
                                                                            "batch_size")])
def test_hugging_face_names_suggest_kd_s(typed, meant):
    raw = minimal()
    raw["train"] = {typed: 1}
    assert problems_of(raw) == [f"train.{typed}: unknown key (did you mean '{meant}'?)"]


def test_a_teacher_name_in_another_case_is_suggested():
    raw = minimal()
    raw["stages"] = [{"name": "a", "teachers": ["BIG"]}]
    assert problems_of(raw) == ["stages.0.teachers: no teacher named 'BIG' in [teachers] (did you mean 'big'?)"]


# --------------------------------------------------------------------------- stages


def test_no_stages_means_one_main_stage_with_every_teacher():
    raw = minimal()
    raw["teachers"]["small"] = {"ref": "other-teacher"}
    raw["train"] = {"lr": 1e-4}
    (stage,) = recipe_mod.validate(raw).resolved_stages()
    assert (stage.name, stage.teachers, stage.train.lr) == ("main", ["big", "small"], 1e-4)


def test_stage_sections_are_merged_over_the_top_level():
    raw = minimal()
    raw["teachers"]["small"] = {"ref": "other-teacher"}
    raw["train"] = {"lr": 1e-4, "batch_size": 8}
    raw["loss"] = {"temperature": 4.0}
    raw["data"]["limit"] = 100
    raw["stages"] = [
        {"name": "first", "teachers": ["small"]},
        {
            "name": "second",
            "data": {"path": "other.txt"},
            "train": {"lr": 1e-5},
            "loss": {"alpha": 0.2},
        },
    ]
    first, second = recipe_mod.validate(raw).resolved_stages()
    assert first.teachers == ["small"]
    assert (first.train.lr, first.train.batch_size, first.data.path) == (1e-4, 8, "sentences.txt")
    assert second.teachers == ["big", "small"]  # unset = every teacher
    assert (second.train.lr, second.train.batch_size) == (1e-5, 8)
    assert (second.loss.alpha, second.loss.temperature) == (0.2, 4.0)
    assert (second.data.path, second.data.format, second.data.limit) == ("other.txt", "fpb", 100)


def test_stage_source_replaces_the_top_level_source():
    raw = minimal()
    raw["data"] = {"format": "winogrande", "files": {"train": "wino-train.jsonl", "test": "wino-dev.jsonl"}}
    raw["stages"] = [
        {"name": "wino"},
        {"name": "siqa-files", "data": {"format": "socialiqa", "files": {"train": "siqa.jsonl"}}},
        {"name": "siqa-path", "data": {"format": "socialiqa", "path": "siqa.jsonl"}},
    ]
    wino, siqa_files, siqa_path = recipe_mod.validate(raw).resolved_stages()
    assert wino.data.files == {"train": "wino-train.jsonl", "test": "wino-dev.jsonl"}
    assert siqa_files.data.files == {"train": "siqa.jsonl"}
    assert (siqa_path.data.path, siqa_path.data.files) == ("siqa.jsonl", {})


def test_stage_split_replaces_the_top_level_split():
    raw = minimal()
    raw["stages"] = [{"name": "a", "data": {"split": {"train": 0.9, "test": 0.1}}}]
    (stage,) = recipe_mod.validate(raw).resolved_stages()
    assert stage.data.split == {"train": 0.9, "test": 0.1}


# --------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_to_toml_round_trip(path, tmp_path):
    recipe = recipe_mod.load(path)
    written = tmp_path / "resolved.toml"
    written.write_text(recipe_mod.to_toml(recipe), encoding="utf-8")
    assert recipe_mod.load(written) == recipe


def test_missing_file_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="no recipe file at"):
        recipe_mod.load(tmp_path / "nope.toml")


def test_invalid_toml_is_a_recipe_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "t"\n[train\nlr = 1\n', encoding="utf-8")
    with pytest.raises(RecipeError, match="invalid TOML") as info:
        recipe_mod.load(path)
    assert "TOML syntax" in info.value.hint


def test_non_utf8_file_is_a_recipe_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        recipe_mod.load(path)


def test_a_byte_order_mark_is_not_a_toml_error(tmp_path):
    """Windows editors may save UTF-8 with a BOM; the recipe and a params overlay read the same without it."""
    import tomli_w

    path, params = tmp_path / "bom.toml", tmp_path / "best.toml"
    path.write_bytes(b"\xef\xbb\xbf" + tomli_w.dumps(minimal()).encode("utf-8"))
    params.write_bytes(b"\xef\xbb\xbf" + b"[train]\nlr = 0.001\n")
    recipe = recipe_mod.load(path, params=[params])
    assert (recipe.name, recipe.train.lr) == ("t", 0.001)


# --------------------------------------------------------------------------- README reference


def test_readme_recipe_reference_is_current():
    spec = importlib.util.spec_from_file_location("update_reference", REPO / "docs" / "update_reference.py")
    updater = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(updater)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert updater.render(readme) == readme, (
        "README.md's recipe reference differs from the schema: run `python docs/update_reference.py`"
    )


def test_a_role_naming_a_teacher_in_another_case_is_told_the_right_name():
    from kdcli.errors import ModelError
    from kdcli.roles import require_teacher

    with pytest.raises(ModelError, match=r"no teacher named 'BIG' in the recipe \(did you mean 'big'\?\)"):
        require_teacher(recipe_mod.validate(minimal()), "BIG")
