"""`kd prepare`: read, clean and split every stage's data, and save it with a manifest (skipping what is up to date)."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kdcli import __version__
from kdcli.data.fields import Example
from kdcli.data.files import SourceFile, source_files
from kdcli.data.read import read_examples
from kdcli.data.split import dedupe, limit_rows, resolve_conflicts, split_parts
from kdcli.errors import DataError
from kdcli.recipe import DataConfig, Recipe, Stage, fingerprint
from kdcli.rundir import RunDir, atomic_dir, leftovers, read_json, sha256_file, write_json

if TYPE_CHECKING:
    import datasets


MANIFEST = "manifest.json"


@dataclass
class PrepareResult:
    stage: str
    path: Path
    skipped: bool
    reason: str
    counts: dict[str, int]
    label_histograms: dict[str, dict[str, int]]
    label_names: list[str]
    rows_read: int
    duplicates: int
    conflicts: int
    seconds: float
    fingerprint: str

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["path"] = str(self.path)
        return payload


@dataclass
class _Prepared:
    """A stage's data, read, cleaned and split in memory, ready to save."""

    splits: dict[str, list[Example]]
    label_names: list[str]
    rows_read: dict[str, int]
    duplicates: int
    conflicts: int
    conflict_rows_dropped: int


def _build(data: DataConfig, task: str, seed: int, say: Callable[[str], None]) -> _Prepared:
    parts, names = read_examples(data, task, say)
    rows_read = {split: len(examples) for split, examples in parts.items()}
    duplicates = conflicts = conflict_rows = 0
    for split, examples in parts.items():
        # Per source split: a named test file is the user's choice and is not mixed with train.
        kept, found = resolve_conflicts(examples, data.on_conflict, names)
        conflicts += found
        conflict_rows += len(examples) - len(kept)
        if data.dedupe:
            kept, dropped = dedupe(kept)
            duplicates += dropped
        parts[split] = kept
    rng = random.Random(seed)
    splits = limit_rows(split_parts(parts, data, rng), data.limit, rng)
    for name, examples in splits.items():
        if not examples:
            raise DataError(
                f"the {name} split is empty "
                f"({sum(len(e) for e in parts.values())} examples after cleaning, split {data.split})",
                f"use more data, or set data.split.{name} = 0 to leave the split out",
            )
    return _Prepared(splits, names, rows_read, duplicates, conflicts, conflict_rows)


def _histogram(examples: list[Example], names: list[str]) -> dict[str, int]:
    counts = Counter(ex.label for ex in examples if ex.label >= 0)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def _to_datasets(splits: dict[str, list[Example]]) -> "datasets.DatasetDict":
    import datasets

    # Sequence rather than datasets.List: the pyproject allows datasets 3.x, which has no List.
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "label": datasets.Value("int64"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "messages": datasets.Value("string"),  # JSON: a list of turns has no stable Arrow type across datasets
        }
    )

    def column(examples: list[Example], name: str) -> list:
        if name == "messages":
            return [json.dumps(ex.messages, ensure_ascii=False) if ex.messages else "" for ex in examples]
        return [getattr(ex, name) for ex in examples]

    return datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict({c: column(examples, c) for c in features}, features=features)
            for name, examples in splits.items()
        }
    )


def _identity(recipe: Recipe, data: DataConfig, sources: list[SourceFile]) -> dict[str, Any]:
    """Everything that shapes the prepared data; its hash is the fingerprint."""
    files = []
    for source in sources:
        for path in (source.path, source.labels):
            if path is not None:
                files.append(
                    {
                        "split": source.split,
                        "path": str(path.resolve()),
                        "bytes": path.stat().st_size,
                        "sha256": sha256_file(path),
                    }
                )
    return {
        "task": recipe.task,
        "seed": recipe.seed,
        "kd_version": __version__,
        "data": data.model_dump(mode="json"),
        "sources": files,
    }


def _fingerprint(identity: dict[str, Any]) -> str:
    # Paths and sizes are left out: moving the data or the checkout does not change it.
    return fingerprint({**identity, "sources": [f["sha256"] for f in identity["sources"]]})


def _complete_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared directory, else None.

    The manifest is written last, inside the temporary directory that is renamed into place,
    so its presence (with the saved splits beside it) means the directory is whole.
    """
    try:
        manifest = read_json(path / MANIFEST)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest or not (path / "dataset_dict.json").is_file():
        return None
    return manifest


def _read_splits(path: Path) -> tuple["datasets.DatasetDict | None", str | None]:
    """The saved splits in ``path``, or None and why they cannot be read.

    kd renames them into place whole, so a failure here means a file was changed or lost since
    (edited, truncated, copied in part). Whatever datasets raises for that is the damage.
    """
    import datasets
    import pyarrow

    try:
        return datasets.load_from_disk(str(path)), None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, pyarrow.ArrowException) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _why_prepare(old: dict[str, Any] | None, identity: dict[str, Any], force: bool, exists: bool) -> str:
    if force:
        return "--force"
    if old is None:
        return "previous output incomplete" if exists else "first prepare"
    changed = [
        what
        for what, key in (
            ("the recipe's data section", "data"),
            ("task", "task"),
            ("seed", "seed"),
            ("kd version", "kd_version"),
        )
        if old.get(key) != identity[key]
    ]
    if [f["sha256"] for f in old.get("sources", [])] != [f["sha256"] for f in identity["sources"]]:
        changed.append("the source files")
    return "changed: " + ", ".join(changed or ["fingerprint"])


def _result(
    stage: str, path: Path, manifest: dict[str, Any], skipped: bool, reason: str, seconds: float
) -> PrepareResult:
    return PrepareResult(
        stage=stage,
        path=path,
        skipped=skipped,
        reason=reason,
        counts=manifest["counts"],
        label_histograms=manifest["label_histogram"],
        label_names=manifest["label_names"],
        rows_read=sum(manifest["rows_read"].values()),
        duplicates=manifest["duplicates_dropped"],
        conflicts=manifest["conflicts_resolved"],
        seconds=round(seconds, 3),
        fingerprint=manifest["fingerprint"],
    )


@contextmanager
def _status(quiet: bool) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr with the current step; silent when quiet (--json)."""
    if quiet:
        yield lambda message: None
        return
    from rich.console import Console

    with Console(stderr=True).status("preparing data") as status:
        yield status.update


@contextmanager
def _no_datasets_bars() -> Iterator[None]:
    """save_to_disk draws its own tqdm bars; kd shows one status of its own instead."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@dataclass
class _Pending:
    """A stage to write: its output directory, manifest and data."""

    out: Path
    manifest: dict[str, Any]
    prepared: _Prepared
    started: float


def _plan_stage(
    recipe: Recipe, stage: Stage, run: RunDir, force: bool, built: dict[str, _Prepared], say: Callable[[str], None],
    replace: bool,
) -> PrepareResult | _Pending:
    """Skip an up-to-date stage, or read, check and split its data in memory."""
    started = time.perf_counter()
    out = run.data(stage.name)
    say(f"stage {stage.name}: checking sources")
    identity = _identity(recipe, stage.data, source_files(stage.data))
    print_id = _fingerprint(identity)
    old = _complete_manifest(out)
    damage = None
    if not force and old is not None and old["fingerprint"] == print_id:
        # Up to date, if it still reads: damaged prepared data is prepared again (it comes from the sources).
        damage = _read_splits(out)[1]
        if damage is None:
            return _result(stage.name, out, old, True, "up to date (no changes)", time.perf_counter() - started)
    reason = f"previous output damaged ({damage})" if damage else _why_prepare(old, identity, force, out.exists())
    if old is not None and not damage and not replace:
        raise DataError(
            f"the prepared data of stage '{stage.name}' in {out} was made from another recipe ({reason})",
            "eval and bench read the data the run was made with and never rewrite it: drop the change, "
            "or run `kd prepare` (or `kd distill`) with it first",
        )
    if leftovers(out.parent, out.name):  # a prepare killed while writing: its partial copy is removed below
        reason = f"{reason}; an earlier prepare was interrupted, its partial output is discarded"
    if print_id not in built:  # stages with the same data are read once
        built[print_id] = _build(
            stage.data, recipe.task, recipe.seed, lambda message: say(f"stage {stage.name}: {message}")
        )
    prepared = built[print_id]
    manifest = {
        "kd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": stage.name,
        "format": stage.data.format,
        "reason": reason,
        **identity,
        "fingerprint": print_id,
        "label_names": prepared.label_names,
        "num_options": max((len(ex.options) for ex in prepared.splits["train"]), default=0),
        "rows_read": prepared.rows_read,
        "duplicates_dropped": prepared.duplicates,
        "conflicts_resolved": prepared.conflicts,
        "conflict_rows_dropped": prepared.conflict_rows_dropped,
        "counts": {name: len(examples) for name, examples in prepared.splits.items()},
        "label_histogram": {
            name: _histogram(examples, prepared.label_names) for name, examples in prepared.splits.items()
        },
    }
    return _Pending(out, manifest, prepared, started)


def _write_stage(pending: _Pending) -> PrepareResult:
    manifest = pending.manifest
    with atomic_dir(pending.out) as tmp, _no_datasets_bars():
        _to_datasets(pending.prepared.splits).save_to_disk(str(tmp))
        manifest["seconds"] = round(time.perf_counter() - pending.started, 3)
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks the directory complete
    return _result(manifest["stage"], pending.out, manifest, False, manifest["reason"], manifest["seconds"])


@contextmanager
def _writing(out: Path) -> Iterator[None]:
    """One writer per prepared folder: under torchrun/accelerate every process of a job prepares
    the data; the first writes it, the others wait here and then find it done."""
    from filelock import FileLock

    run_root = out.parent.parent  # runs/NAME/data/STAGE
    run_root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_root / ".prepare.lock")):
        yield


def _written_meanwhile(plan: _Pending, planned_at: float) -> PrepareResult | None:
    """The result of another process that wrote this very data while we waited for the lock, else None."""
    manifest = _complete_manifest(plan.out)
    if manifest is None or manifest["fingerprint"] != plan.manifest["fingerprint"]:
        return None
    if (plan.out / MANIFEST).stat().st_mtime < planned_at:
        return None  # the copy from before this command, which --force or its damage has us write again
    return _result(plan.manifest["stage"], plan.out, manifest, True, "up to date (prepared by another process)",
                   time.perf_counter() - plan.started)


def prepare_recipe(recipe: Recipe, force: bool = False, quiet: bool = False,
                   replace: bool = True) -> list[PrepareResult]:
    """Prepare every stage's data under the run directory; a stage whose data is up to date is skipped.

    Every stage is read and checked before anything is written, so bad input writes nothing.
    ``replace=False`` (readers: eval, bench) prepares data that is missing but refuses to replace
    data prepared from another recipe.
    """
    run = RunDir.for_recipe(recipe)
    built: dict[str, _Prepared] = {}
    planned_at = time.time()
    with _status(quiet) as say:
        plans = [_plan_stage(recipe, stage, run, force, built, say, replace) for stage in recipe.resolved_stages()]
        results = []
        for plan in plans:
            if isinstance(plan, _Pending):
                with _writing(plan.out):
                    done = _written_meanwhile(plan, planned_at)
                    if done is None:
                        say(f"stage {plan.manifest['stage']}: saving {plan.out}")
                        plan = _write_stage(plan)
                    else:
                        plan = done
            results.append(plan)
    return results


def load_prepared(run: RunDir, stage: str) -> tuple["datasets.DatasetDict", dict[str, Any]]:
    """A stage's prepared splits and manifest; DataError when they are missing, incomplete or damaged."""
    path = run.data(stage)
    manifest = _complete_manifest(path)
    if manifest is None:
        state = "incomplete" if path.exists() else "missing"
        raise DataError(f"prepared data for stage '{stage}' is {state} ({path})", "run kd prepare RECIPE")
    splits, damage = _read_splits(path)
    if splits is None:  # `prepare` would have found it; this is damage done since
        raise DataError(f"the prepared data in {path} is damaged ({damage})", "run `kd prepare RECIPE --force`")
    return splits, manifest
