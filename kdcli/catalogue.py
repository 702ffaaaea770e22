"""`kd recipes`: the recipes kd ships, what each one needs, and copying one out to edit (torchtune's `tune cp`).

The recipes are the repository's ``recipes/`` folder, and ``kdcli/recipes`` is a link to it: a wheel
carries the files as package data, a checkout reads them where they are, and there is one copy of
each. A recipe's name is its path under that folder without ``.toml``: ``finance``, ``local/fpb``.

What a recipe needs is read from the recipe itself, not from a table kept beside it:

- the network: a model reference that is a Hub id (not ``package:``, not a path), or Hub data;
- a GPU: mixed precision (``train.mixed_precision`` bf16 or fp16, in any stage) or a model loaded in
  8 or 4 bits (bitsandbytes). The shipped recipes turn mixed precision on exactly where their models
  are too large for a CPU, and say "use 'no' on CPU" beside it;
- Python packages: those its ``package:`` references point into, and ``gguf`` for a ``gguf_file``;
- data files: sources given as plain paths, which are relative to the directory kd runs from.

A recipe's summary is its first comment paragraph: the lines up to the first empty ``#`` line.
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from kdcli.errors import KdError
from kdcli.recipe import DataConfig, Recipe, TransferConfig, load_raw, model_source, validate
from kdcli.rundir import write_text_atomic

FOLDER = Path(__file__).parent / "recipes"
# The study's own dataset adapters: the format names the dataset.
DATASET_FORMATS = ("fpb", "winogrande", "socialiqa", "aqua", "triviaqa")


@dataclass
class Needs:
    gpu: list[str] = field(default_factory=list)  # the settings that ask for one, as `KEY = VALUE`
    network: list[str] = field(default_factory=list)  # the Hub models and datasets read, as `KEY = VALUE`
    packages: list[str] = field(default_factory=list)  # Python packages it reads models or data from
    files: list[str] = field(default_factory=list)  # data files outside any package, as `KEY = PATH`

    def short(self) -> str:
        return ("GPU" if self.gpu else "CPU") + ", " + ("network" if self.network else "offline")


@dataclass
class Entry:
    name: str
    path: Path
    summary: str
    recipe: Recipe
    needs: Needs

    def to_json(self) -> dict[str, Any]:
        recipe = self.recipe
        return {
            "name": self.name,
            "path": str(self.path),
            "summary": self.summary,
            "task": recipe.task,
            "teachers": {name: teacher.ref for name, teacher in recipe.teachers.items()},
            "student": recipe.student.ref or {"from_teacher": recipe.student.from_teacher,
                                              "layers": recipe.student.layers},
            "data": [{"stage": stage.name, "format": stage.data.format, "sources": _sources(stage.data),
                      **({"transfer": _sources(stage.data.transfer)} if stage.data.transfer else {})}
                     for stage in recipe.resolved_stages()],
            "needs": {"gpu": self.needs.gpu, "network": self.needs.network, "packages": self.needs.packages,
                      "files": self.needs.files},
        }


@dataclass
class Copied:
    name: str
    source: Path
    dest: Path
    files: list[str]  # the copy's data files, as `KEY = PATH`: relative to the directory kd runs from
    missing_packages: list[str]

    @property
    def next_command(self) -> str:
        return f"kd run {shlex.quote(str(self.dest))}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": str(self.source), "dest": str(self.dest), "files": self.files,
                "missing_packages": self.missing_packages, "next": self.next_command}


def names() -> list[str]:
    """Every shipped recipe's name: the study's first, then those in subfolders."""
    if not FOLDER.is_dir():
        raise KdError(f"kd's recipes are not at {FOLDER}",
                      "reinstall kd; in a git checkout kdcli/recipes is a link to ../recipes, which needs "
                      "symbolic links (git config core.symlinks true, then check out again)")
    found = [path.relative_to(FOLDER).with_suffix("").as_posix() for path in FOLDER.rglob("*.toml")]
    return sorted(found, key=lambda name: (name.count("/"), name))


def path_of(name: str) -> Path:
    """The shipped recipe called ``name`` (``finance``, ``finance.toml`` or ``local/fpb``)."""
    known = names()
    wanted = name.removesuffix(".toml")
    if wanted not in known:
        raise KdError(f"no recipe named '{name}' ships with kd",
                      f"give one of: {', '.join(known)} (`kd recipes` describes them)")
    return FOLDER / f"{wanted}.toml"


def entry(name: str) -> Entry:
    path = path_of(name)
    raw = load_raw(path)
    recipe = validate(raw, source=str(path))
    return Entry(name.removesuffix(".toml"), path, summary(path.read_text(encoding="utf-8")), recipe,
                 needs_of(recipe, raw))


def entries() -> list[Entry]:
    return [entry(name) for name in names()]


def summary(text: str) -> str:
    """The recipe's first comment paragraph, on one line."""
    lines = []
    for line in text.splitlines():
        body = line.removeprefix("#").strip()
        if not line.startswith("#") or not body:
            break
        lines.append(body)
    return " ".join(lines)


def needs_of(recipe: Recipe, raw: dict[str, Any]) -> Needs:
    """What ``recipe`` needs; ``raw`` is its TOML as written, so data files are named by the key that sets them."""
    needs = Needs()
    models = [("student", recipe.student), *((f"teachers.{name}", t) for name, t in recipe.teachers.items())]
    for where, spec in models:
        for key in ("ref", "tokenizer", "adapter"):
            ref = getattr(spec, key, None)
            if ref is None:
                continue
            source = model_source(ref)
            if source == "hub":
                needs.network.append(f"{where}.{key} = {ref}")
            elif source == "package":
                _add(needs.packages, _package(ref))
        if spec.gguf_file:
            _add(needs.packages, "gguf")  # transformers reads GGUF weights through it
        for key in ("load_in_8bit", "load_in_4bit"):
            if getattr(spec, key):
                needs.gpu.append(f"{where}.{key} = true")
    for stage in recipe.resolved_stages():
        if stage.train.mixed_precision != "no":
            _add(needs.gpu, f"train.mixed_precision = {stage.train.mixed_precision}")
    for key, value in _data_keys(raw):
        if key.endswith(".hub_name"):
            needs.network.append(f"{key} = {value}")
        elif value.startswith("package:"):
            if _package(value) != "kdcli":  # kd's own data is always there
                _add(needs.packages, _package(value))
        else:
            needs.files.append(f"{key} = {value}")
    return needs


def _data_keys(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Every data source the recipe's TOML sets, as (key, value): paths, files and Hub datasets, transfer sets
    and stages' own data included."""
    tables = [("data", raw.get("data", {}))]
    tables += [(f"stages.{i}.data", stage["data"]) for i, stage in enumerate(raw.get("stages", [])) if "data" in stage]
    tables += [(f"{key}.transfer", table["transfer"]) for key, table in list(tables) if "transfer" in table]
    found = []
    for key, table in tables:
        for name in ("path", "labels_path", "hub_name"):
            if name in table:
                found.append((f"{key}.{name}", table[name]))
        files = table.get("files", [])
        for split, value in files.items() if isinstance(files, dict) else enumerate(files):
            found.append((f"{key}.files.{split}", value))
    return found


def copy(name: str, dest: Path | None = None, force: bool = False) -> Copied:
    """Copy the shipped recipe ``name`` to ``dest`` (a file, or an existing folder; default: the current
    folder, under the recipe's file name); an existing file is replaced only with ``force``."""
    source = path_of(name)
    if dest is None or dest.is_dir():
        dest = (dest or Path()) / source.name
    elif not dest.suffix:
        dest = dest.with_suffix(".toml")
    if dest.exists() and not force:
        raise KdError(f"{dest} already exists", "give another destination, or pass --force to replace it")
    found = entry(name)
    write_text_atomic(dest, source.read_text(encoding="utf-8"))
    missing = [package for package in found.needs.packages if importlib.util.find_spec(package) is None]
    return Copied(found.name, source, dest, found.needs.files, missing)


def print_catalogue(found: list[Entry], console: Console) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="Recipes shipped with kd", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    # Sized to fit 80 columns: the models get the room; `needs` wraps after its comma.
    table.add_column("recipe", no_wrap=True)
    table.add_column("task", no_wrap=True)
    table.add_column("teachers → student", overflow="fold", min_width=23)
    table.add_column("data", overflow="fold", max_width=14)
    table.add_column("needs", min_width=7, max_width=7)
    for item in found:
        table.add_row(item.name, item.recipe.task, _models(item.recipe), _data(item.recipe), item.needs.short())
    console.print(table)
    console.print("Copy one to edit it: kd recipes copy NAME [DEST]. Data paths are relative to the directory "
                  "kd runs from; `kd recipes --json` lists each recipe's files, models and packages.", markup=False)


def print_copied(copied: Copied, console: Console) -> None:
    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)  # paths are the user's: no markup in them

    say(f"copied {copied.name} to {copied.dest}")
    if copied.files:
        say("its data paths are relative to the directory kd runs from; edit them to point at your copy of "
            "the data:")
        for path in copied.files:
            say(f"  {path}")
    for package in copied.missing_packages:
        say(f"it reads the package '{package}', which is not installed: pip install {package.replace('_', '-')}")
    say(f"next: {copied.next_command}")


def _sources(data: DataConfig | TransferConfig) -> list[str]:
    """The files a data or transfer table reads, as written (a Hub dataset by its id)."""
    if data.hub_name:
        return [data.hub_name]
    files = data.files.values() if isinstance(data.files, dict) else data.files
    labels = [data.labels_path] if isinstance(data, DataConfig) and data.labels_path else []
    return [source for source in (data.path, *files, *labels) if source]


def _package(ref: str) -> str:
    return ref.removeprefix("package:").partition("/")[0]


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _models(recipe: Recipe) -> str:
    student = recipe.student
    made = _short(student.ref) if student.ref else f"{len(student.layers)}-layer {student.from_teacher}"
    return f"{', '.join(recipe.teachers) or 'labels only'} → {made}"


def _short(ref: str) -> str:
    """A model reference without its organisation or folder: `flan-t5-small`, a package's name."""
    return _package(ref) if model_source(ref) == "package" else ref.rstrip("/").rpartition("/")[2]


def _data(recipe: Recipe) -> str:
    shown: list[str] = []
    for stage in recipe.resolved_stages():
        data = stage.data
        sources = _sources(data)
        if data.hub_name or data.format in DATASET_FORMATS:
            label = data.hub_name or data.format
        else:
            label = ", ".join(Path(source).name for source in sources)
        if any(source.startswith("package:") for source in sources):
            label += " (shipped)"
        if data.transfer:
            label += " + transfer"
        _add(shown, label)
    return ", ".join(shown)
