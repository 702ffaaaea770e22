"""`kd prepare`: read, clean and split every stage's data, and save it with a manifest (skipping what is up to date)."""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from kdcli import __version__
from kdcli.data.files import SourceFile, source_files, transfer_files
from kdcli.data.read import read_source
from kdcli.data.split import clean, limit_rows, split_parts
from kdcli.data.store import COLUMNS, ExampleStore
from kdcli.data.transfer import HELD_OUT, KEY, Transfer, build_transfer, store_keys, table_keys
from kdcli.errors import DataError
from kdcli.progress import Steps
from kdcli.recipe import DataConfig, Recipe, Stage, fingerprint
from kdcli.rundir import RunDir, atomic_dir, leftovers, read_json, scratch, sha256_file, write_json

if TYPE_CHECKING:
    import datasets
    import pyarrow as pa


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
    transfer: dict[str, Any] | None  # the manifest's account of the transfer set; None without one

    def to_json(self) -> dict[str, Any]:
        payload = asdict(self)
        payload["path"] = str(self.path)
        return payload


@dataclass
class _Prepared:
    """A stage's data, read into a store, cleaned and split into arrays of its rows, ready to save."""

    store: ExampleStore
    splits: dict[str, np.ndarray]  # split -> the store's rows in it, ascending
    label_names: list[str]
    rows_read: dict[str, int]
    duplicates: int
    conflicts: int
    conflict_rows_dropped: int
    nbytes: dict[str, int]  # each split's size in Arrow, as datasets counts it (its shards follow from it)
    num_options: int  # the most options a train row has
    # The train split before `data.limit`: a transfer row equal to one of them is dropped, even to one the
    # limit left out (a labelled sentence held back to simulate few labels is not unlabelled text).
    whole_train: np.ndarray


def _build(data: DataConfig, task: str, seed: int, say: Callable[[str], None], rows: Callable[[int], None],
           scratch: Callable[[], Path]) -> _Prepared:
    store = ExampleStore(scratch)
    try:
        names = read_source(data, task, store, say, rows=rows)
        rows_read = {split: end - first for split, (first, end) in store.parts.items()}
        parts, duplicates, conflicts, conflict_rows = {}, 0, 0, 0
        say("cleaning and splitting")
        for split, (first, end) in store.parts.items():
            # Per source split: a named test file is the user's choice and is not mixed with train.
            kept, found, dropped = clean(store, first, end, data.on_conflict, names, data.dedupe)
            conflicts += found
            if data.dedupe:
                conflict_rows += end - first - len(kept) - dropped
                duplicates += dropped
            else:
                conflict_rows += end - first - len(kept)
            parts[split] = kept
        store.drop_keys()
        rng = random.Random(seed)
        whole = split_parts(parts, store.labels, data, rng)
        splits = limit_rows(whole, store.labels, data.limit, rng)
        for name, rows in splits.items():
            if not len(rows):
                raise DataError(
                    f"the {name} split is empty "
                    f"({sum(len(rows) for rows in parts.values())} examples after cleaning, split {data.split})",
                    f"use more data, or set data.split.{name} = 0 to leave the split out",
                )
        nbytes, num_options = _measure(store, splits)
        return _Prepared(store, splits, names, rows_read, duplicates, conflicts, conflict_rows, nbytes, num_options,
                         whole.get("train", np.empty(0, dtype=np.int64)))
    except BaseException:
        store.close()
        raise


def _nbytes(batch: "pa.RecordBatch") -> int:
    """What ``nbytes`` says of these rows in a table of their own (as ``Dataset.from_dict`` makes one):
    4 bytes an offset, a string's bytes, 8 an int64. Reckoned from the values, so that rows taken from
    the store in pieces add up to the split's whole (``nbytes`` of a piece counts its buffers' padding)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = 0
    for column in batch.columns:
        if pa.types.is_list(column.type):
            values = column.flatten()
            total += 4 * len(column) + 4 * len(values) + (pc.sum(pc.binary_length(values)).as_py() or 0)
        elif pa.types.is_string(column.type):
            total += 4 * len(column) + (pc.sum(pc.binary_length(column)).as_py() or 0)
        else:
            total += column.nbytes
    return total


def _measure(store: ExampleStore, splits: dict[str, np.ndarray]) -> tuple[dict[str, int], int]:
    """Each split's size as one Arrow table (what datasets shards a saved split by, and sizes its
    write batches by), and the most options a train row has; one pass over the store."""
    import pyarrow as pa
    import pyarrow.compute as pc

    nbytes = dict.fromkeys(splits, 0)
    num_options = 0
    for start, batch in store.batches(COLUMNS):
        for name, rows in splits.items():
            first, end = np.searchsorted(rows, [start, start + batch.num_rows])
            if first == end:
                continue
            taken = batch.take(pa.array(rows[first:end] - start))
            nbytes[name] += _nbytes(taken)
            if name == "train":
                num_options = max(num_options, pc.max(pc.list_value_length(taken.column("options"))).as_py() or 0)
    return nbytes, num_options


def _histogram(labels: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(labels[labels >= 0], minlength=len(names))
    return {name: int(counts[i]) for i, name in enumerate(names)}


def _features() -> "datasets.Features":
    import datasets

    # Sequence rather than datasets.List: the pyproject allows datasets 3.x, which has no List.
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "label": datasets.Value("int64"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "messages": datasets.Value("string"),  # JSON: a list of turns has no stable Arrow type across datasets
        }
    )


class _SplitWriter:
    """One split saved as ``Dataset.save_to_disk`` saves it (its shards, Arrow batches, state.json
    and dataset_info.json), from its rows in order, a batch at a time."""

    def __init__(self, folder: Path, rows: int, nbytes: int, fingerprint: str) -> None:
        from datasets import config
        from datasets.utils.py_utils import convert_file_size_to_int

        self.folder, self.fingerprint = folder, fingerprint
        shards = min(rows, int(nbytes / convert_file_size_to_int(config.MAX_SHARD_SIZE)) + 1)
        # Dataset.shard(contiguous=True): the first `rows % shards` shards have one row more.
        self.sizes = [rows // shards + (1 if i < rows % shards else 0) for i in range(shards)]
        self.batch_rows = config.DEFAULT_MAX_BATCH_SIZE
        if nbytes > 0:
            try:
                from datasets.arrow_writer import get_writer_batch_size_from_data_size
            except ImportError:  # datasets before 4 writes batches of DEFAULT_MAX_BATCH_SIZE
                pass
            else:
                self.batch_rows = min(self.batch_rows, get_writer_batch_size_from_data_size(rows, nbytes))
        self.folder.mkdir()
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self._shard = -1
        self._left = 0  # rows still to write to the open shard
        self._writer = None

    def _file(self, shard: int) -> str:
        return f"data-{shard:05d}-of-{len(self.sizes):05d}.arrow"

    def write(self, batch: "pa.RecordBatch") -> None:
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self._drain(final=False)

    def _drain(self, final: bool) -> None:
        import pyarrow as pa
        from datasets.arrow_writer import ArrowWriter

        while self._pending_rows:
            if self._left == 0:
                self._shard += 1
                self._left = self.sizes[self._shard]
                self._writer = ArrowWriter(features=_features(), path=str(self.folder / self._file(self._shard)),
                                           embed_local_files=True)
            # Whole write batches (as many as there are, up to the shard's end), or the shard's last rows.
            size = min(self._pending_rows // self.batch_rows * self.batch_rows, self._left)
            if size == 0:
                if self._pending_rows < min(self.batch_rows, self._left) and not final:
                    return
                size = min(self.batch_rows, self._left, self._pending_rows)
            table = pa.Table.from_batches(self._pending)
            # In batches of batch_rows from the shard's start: what save_to_disk's one table a batch writes.
            self._writer.write_table(table.slice(0, size), writer_batch_size=self.batch_rows)
            rest = table.slice(size)
            self._pending, self._pending_rows = rest.to_batches(), rest.num_rows
            self._left -= size
            if self._left == 0:
                self._writer.finalize()
                self._writer.close()
                self._writer = None

    def close(self) -> None:
        import datasets
        from datasets.utils.py_utils import asdict as info_dict  # what save_to_disk writes: no empty fields

        self._drain(final=True)
        assert self._writer is None and self._shard == len(self.sizes) - 1, "a split's rows did not fill its shards"
        state = {
            "_data_files": [{"filename": self._file(i)} for i in range(len(self.sizes))],
            "_fingerprint": self.fingerprint,
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        features = _features()
        info = info_dict(datasets.Dataset.from_dict({name: [] for name in features}, features=features).info)
        with open(self.folder / "state.json", "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2, sort_keys=True)
        with open(self.folder / "dataset_info.json", "w", encoding="utf-8") as handle:
            json.dump({key: info[key] for key in sorted(info)}, handle, indent=2)


def _save(pending: "_Pending", folder: Path, print_id: str) -> None:
    """The splits as ``DatasetDict.save_to_disk(folder)`` saved them, in one pass over each store (the
    labelled splits', then the transfer set's): each batch of it gives each split its rows."""
    import pyarrow as pa

    prepared, transfer = pending.prepared, pending.transfer
    stores = [(prepared.store, prepared.splits, prepared.nbytes)]
    if transfer is not None:
        stores.append((transfer.store, {"transfer": transfer.rows}, {"transfer": pending.transfer_nbytes}))
    with open(folder / "dataset_dict.json", "w", encoding="utf-8") as handle:
        json.dump({"splits": [name for _, splits, _ in stores for name in splits]}, handle)
    for store, splits, nbytes in stores:
        writers = {
            name: _SplitWriter(folder / name, len(rows), nbytes[name],
                               fingerprint({"prepared": print_id, "split": name}))
            for name, rows in splits.items()
        }
        for start, batch in store.batches(COLUMNS):
            for name, rows in splits.items():
                first, end = np.searchsorted(rows, [start, start + batch.num_rows])
                if first < end:
                    writers[name].write(batch.take(pa.array(rows[first:end] - start)))
        for writer in writers.values():
            writer.close()


def _file(split: str, path: Path) -> dict[str, Any]:
    return {"split": split, "path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _identity(recipe: Recipe, data: DataConfig, sources: list[SourceFile]) -> dict[str, Any]:
    """Everything that shapes a stage's labelled splits; its hash is the fingerprint of a stage without a
    transfer set (the same as before there were transfer sets)."""
    return {
        "task": recipe.task,
        "seed": recipe.seed,
        "kd_version": __version__,
        "data": data.model_dump(mode="json", exclude={"transfer"}),
        "sources": [_file(source.split, path) for source in sources
                    for path in (source.path, source.labels) if path is not None],
    }


def _with_transfer(identity: dict[str, Any], data: DataConfig, held_out: list[str]) -> dict[str, Any]:
    """A stage's identity with its transfer set: its settings and files, and the labelled data of every
    stage (``held_out``: their fingerprints), whose validation and test rows decide which rows it keeps."""
    files = [{**_file("transfer", source.path), "source": source.split} for source in transfer_files(data)]
    return {**identity, "data": data.model_dump(mode="json"), "sources": identity["sources"] + files,
            "held_out": held_out}


def _fingerprint(identity: dict[str, Any]) -> str:
    # Paths and sizes are left out: moving the data or the checkout does not change it.
    return fingerprint({**identity, "sources": [f["sha256"] for f in identity["sources"]]})


def complete_manifest(path: Path) -> dict[str, Any] | None:
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
    if "held_out" in old and "held_out" in identity and old["held_out"] != identity["held_out"]:
        changed.append("the data of a stage the transfer set is checked against")
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
        transfer=manifest.get("transfer"),
    )


@contextmanager
def _status(quiet: bool) -> Iterator[Steps]:
    """The current step on stderr (a transient spinner on a terminal, lines in a log); silent when quiet (--json)."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    if quiet or not console.is_terminal:
        yield Steps(console, None)
        return
    with console.status("preparing data") as status:
        yield Steps(console, status)


@dataclass
class _Pending:
    """A stage to write: its output directory, manifest and data."""

    out: Path
    manifest: dict[str, Any]
    prepared: _Prepared
    started: float
    transfer: Transfer | None = None  # read once every stage is planned (see _read_transfers)
    transfer_nbytes: int = 0


def _plan_stage(
    recipe: Recipe, stage: Stage, labelled: dict[str, Any], held_out: list[str], run: RunDir, force: bool,
    built: dict[str, _Prepared], say: Steps, replace: bool, scratch: Callable[[], Path],
) -> PrepareResult | _Pending:
    """Skip an up-to-date stage, or read, check and split its labelled data (out of core: see ``_build``);
    ``labelled``: its identity without the transfer set, ``held_out``: every stage's labelled fingerprint."""
    started = time.perf_counter()
    out = run.data(stage.name)
    identity = _with_transfer(labelled, stage.data, held_out) if stage.data.transfer else labelled
    print_id = _fingerprint(identity)
    old = complete_manifest(out)
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
    data_print = _fingerprint(labelled)
    if data_print not in built:  # stages with the same labelled data read it once
        built[data_print] = _build(
            stage.data, recipe.task, recipe.seed, lambda message: say(f"stage {stage.name}: {message}"), say.rows,
            scratch,
        )
    prepared = built[data_print]
    manifest = {
        "kd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stage": stage.name,
        "format": stage.data.format,
        "reason": reason,
        **identity,
        "fingerprint": print_id,
        "label_names": prepared.label_names,
        "num_options": prepared.num_options,
        "rows_read": prepared.rows_read,
        "duplicates_dropped": prepared.duplicates,
        "conflicts_resolved": prepared.conflicts,
        "conflict_rows_dropped": prepared.conflict_rows_dropped,
        "counts": {name: len(rows) for name, rows in prepared.splits.items()},
        "label_histogram": {
            name: _histogram(prepared.store.labels[rows], prepared.label_names)
            for name, rows in prepared.splits.items()
        },
    }
    return _Pending(out, manifest, prepared, started)


def _read_transfers(recipe: Recipe, stages: list[Stage], plans: list[PrepareResult | _Pending], run: RunDir,
                    say: Steps, scratch: Callable[[], Path]) -> None:
    """Read the transfer set of each stage being prepared, checked against the validation and test rows
    of every stage (from its store when it is being prepared too, else from its saved splits) and its
    own train rows; each is added to its plan and manifest."""
    wanting = [(stage, plan) for stage, plan in zip(stages, plans)
               if isinstance(plan, _Pending) and stage.data.transfer]
    if not wanting:
        return
    held_out: dict[str, np.ndarray] = {}
    train: dict[str, np.ndarray] = {}
    for stage, plan in zip(stages, plans):
        if isinstance(plan, _Pending):
            splits = {**plan.prepared.splits, "train": plan.prepared.whole_train}
            wanted = [*HELD_OUT, "train"] if stage.data.transfer else HELD_OUT
            keys = store_keys(plan.prepared.store, {name: splits[name] for name in wanted if name in splits})
        else:
            saved, _ = load_prepared(run, stage.name)
            keys = {name: table_keys(saved[name].data.table) for name in HELD_OUT if name in saved}
        train[stage.name] = keys.pop("train", np.empty(0, dtype=KEY))
        held_out.update({f"{stage.name}/{name}": found for name, found in keys.items()})
    for stage, plan in wanting:
        transfer = plan.transfer = build_transfer(
            stage.data, transfer_files(stage.data), recipe.task, recipe.seed, held_out, train[stage.name],
            plan.prepared.num_options, lambda message, name=stage.name: say(f"stage {name}: {message}"), say.rows,
            scratch,
        )
        plan.transfer_nbytes = _measure(transfer.store, {"transfer": transfer.rows})[0]["transfer"]
        files = {f["source"]: {"path": f["path"], "sha256": f["sha256"]}
                 for f in plan.manifest["sources"] if f["split"] == "transfer"}  # none from the Hub
        plan.manifest["counts"]["transfer"] = len(transfer.rows)
        plan.manifest["transfer"] = {
            "sources": [{**part, **files.get(part["source"], {})} for part in transfer.parts],
            "rows_read": transfer.read,
            "kept": len(transfer.rows),
            "dropped": transfer.dropped,
            "leaked_from": transfer.leaked_from,
        }


def _write_stage(pending: _Pending) -> PrepareResult:
    manifest = pending.manifest
    with atomic_dir(pending.out) as tmp:
        _save(pending, tmp, manifest["fingerprint"])
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
    manifest = complete_manifest(plan.out)
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
    stages = recipe.resolved_stages()
    # A large source's rows wait in a scratch folder beside the prepared data until they are saved.
    work = scratch(run.data(stages[0].name).parent, "prepare", run.data(stages[0].name))
    plans: list[PrepareResult | _Pending] = []
    with _status(quiet) as say, work as folder:
        try:
            labelled = []
            for stage in stages:
                say(f"stage {stage.name}: checking sources")
                labelled.append(_identity(recipe, stage.data, source_files(stage.data)))
            held_out = sorted({_fingerprint(identity) for identity in labelled})
            plans = [_plan_stage(recipe, stage, identity, held_out, run, force, built, say, replace, folder)
                     for stage, identity in zip(stages, labelled)]
            _read_transfers(recipe, stages, plans, run, say, folder)
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
        finally:
            for prepared in built.values():
                prepared.store.close()
            for plan in plans:
                if isinstance(plan, _Pending) and plan.transfer is not None:
                    plan.transfer.store.close()


def load_prepared(run: RunDir, stage: str) -> tuple["datasets.DatasetDict", dict[str, Any]]:
    """A stage's prepared splits and manifest; DataError when they are missing, incomplete or damaged."""
    path = run.data(stage)
    manifest = complete_manifest(path)
    if manifest is None:
        state = "incomplete" if path.exists() else "missing"
        raise DataError(f"prepared data for stage '{stage}' is {state} ({path})", "run kd prepare RECIPE")
    splits, damage = _read_splits(path)
    if splits is None:  # `prepare` would have found it; this is damage done since
        raise DataError(f"the prepared data in {path} is damaged ({damage})", "run `kd prepare RECIPE --force`")
    return splits, manifest
