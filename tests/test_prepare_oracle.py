"""`kd prepare` out of core (issue 15) against the in-memory code it replaced: the same rows kept and
dropped, the same counts, the same splits (rows, order, ids) and the same saved datasets.

The oracle is kd's cleaning, splitting and saving before the change, kept here verbatim (from
kdcli/data/split.py and prepare.py at ``OLD_COMMIT``), fed the examples the new reader reads. The
reader itself is compared with the old one, loaded from git at that commit when the checkout has
it (skipped otherwise), on the same inputs and on generated ones, errors included.
"""

from __future__ import annotations

import json
import random
import re
import string
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcli.data import prepare_recipe, read_examples
from kdcli.data.fields import Example
from kdcli.data.files import SPLITS, excerpt
from kdcli.errors import DataError, KdError
from kdcli.recipe import DataConfig, validate
from kdcli.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]
OLD_COMMIT = "639e1bc9a4ca2b63ec0bfbd923c3ebab9c44e36a"  # the last commit with the in-memory prepare

# --------------------------------------------------------------------------- the oracle (verbatim, but names)


def old_resolve_conflicts(examples: list[Example], mode: str, names: list[str]) -> tuple[list[Example], int]:
    labels: dict[tuple, list[int]] = {}
    for ex in examples:
        labels.setdefault((ex.text, tuple(ex.options)), []).append(ex.label)
    conflicts = {key: seen for key, seen in labels.items() if len(set(seen)) > 1}
    if not conflicts:
        return examples, 0
    if mode == "error":
        (text, _), seen = next(iter(conflicts.items()))
        places = [ex.where for ex in examples if ex.text == text][:3]
        shown = ", ".join(names[i] if 0 <= i < len(names) else str(i) for i in dict.fromkeys(seen))
        more = f" (and {len(conflicts) - 1} more texts)" if len(conflicts) > 1 else ""
        raise DataError(
            f"{excerpt(text)} has different labels: {shown} ({', '.join(places)}){more}",
            "fix the source, or set data.on_conflict = 'first', 'majority' or 'drop'",
        )
    keep: dict[tuple, int | None] = {}
    for key, seen in conflicts.items():
        if mode == "first":
            keep[key] = seen[0]
        elif mode == "majority":
            counts = Counter(seen)
            keep[key] = max(dict.fromkeys(seen), key=lambda label: counts[label])
        else:
            keep[key] = None
    kept = [ex for ex in examples if keep.get((ex.text, tuple(ex.options)), ex.label) == ex.label]
    return kept, len(conflicts)


def old_key(ex: Example) -> tuple:
    turns = tuple((m["role"], m["content"]) for m in ex.messages)
    return (ex.text, tuple(ex.options), ex.label, tuple(ex.answers), turns)


def old_dedupe(examples: list[Example]) -> tuple[list[Example], int]:
    seen: set[tuple] = set()
    kept = []
    for ex in examples:
        if old_key(ex) not in seen:
            seen.add(old_key(ex))
            kept.append(ex)
    return kept, len(examples) - len(kept)


def old_apportion(total: int, fractions: dict[str, float]) -> dict[str, int]:
    scale = sum(fractions.values())
    exact = {name: total * f / scale for name, f in fractions.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    for name in sorted(exact, key=lambda n: exact[n] - sizes[n], reverse=True)[: total - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def old_stratified(examples: list, fractions: dict[str, float], rng: random.Random) -> dict[str, list]:
    groups: dict[int, list[int]] = {}
    for index, ex in enumerate(examples):
        groups.setdefault(ex.label, []).append(index)
    order: list[int] = []
    for label in sorted(groups):
        rng.shuffle(groups[label])
        order.extend(groups[label])
    sizes = old_apportion(len(order), fractions)
    chosen: dict[str, list[int]] = {name: [] for name in sizes}
    for dealt, index in enumerate(order, start=1):
        name = max(sizes, key=lambda n: sizes[n] * dealt - len(chosen[n]) * len(order))
        chosen[name].append(index)
    return {name: [examples[i] for i in sorted(indices)] for name, indices in chosen.items()}


def old_split_parts(parts: dict[str, list[Example]], data: DataConfig, rng: random.Random) -> dict[str, list[Example]]:
    wanted = {s: data.split.get(s, 0.0) for s in SPLITS if data.split.get(s, 0.0) > 0}
    if "all" in parts:
        return old_stratified(parts["all"], wanted, rng)
    splits = dict(parts)
    missing = {s: f for s, f in wanted.items() if s not in parts}
    if missing:
        carved = old_stratified(parts["train"], {"train": data.split.get("train", 0.0), **missing}, rng)
        splits.update(carved)
    return {s: splits[s] for s in SPLITS if s in splits}


def old_limit_rows(splits: dict[str, list[Example]], limit: int | None, rng: random.Random) -> dict[str, list[Example]]:
    if limit is None:
        return splits
    return {
        name: examples
        if len(examples) <= limit
        else old_stratified(examples, {"keep": limit, "rest": len(examples) - limit}, rng)["keep"]
        for name, examples in splits.items()
    }


@dataclass
class OldPrepared:
    splits: dict[str, list[Example]]
    label_names: list[str]
    rows_read: dict[str, int]
    duplicates: int
    conflicts: int
    conflict_rows_dropped: int


def old_build(data: DataConfig, task: str, seed: int) -> OldPrepared:
    parts, names = read_examples(data, task)
    rows_read = {split: len(examples) for split, examples in parts.items()}
    duplicates = conflicts = conflict_rows = 0
    for split, examples in parts.items():
        kept, found = old_resolve_conflicts(examples, data.on_conflict, names)
        conflicts += found
        conflict_rows += len(examples) - len(kept)
        if data.dedupe:
            kept, dropped = old_dedupe(kept)
            duplicates += dropped
        parts[split] = kept
    rng = random.Random(seed)
    splits = old_limit_rows(old_split_parts(parts, data, rng), data.limit, rng)
    for name, examples in splits.items():
        if not examples:
            raise DataError(
                f"the {name} split is empty "
                f"({sum(len(e) for e in parts.values())} examples after cleaning, split {data.split})",
                f"use more data, or set data.split.{name} = 0 to leave the split out",
            )
    return OldPrepared(splits, names, rows_read, duplicates, conflicts, conflict_rows)


def old_histogram(examples: list[Example], names: list[str]) -> dict[str, int]:
    counts = Counter(ex.label for ex in examples if ex.label >= 0)
    return {name: counts.get(i, 0) for i, name in enumerate(names)}


def old_save(splits: dict[str, list[Example]], folder: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "text": datasets.Value("string"),
            "options": datasets.Sequence(datasets.Value("string")),
            "label": datasets.Value("int64"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "messages": datasets.Value("string"),
        }
    )

    def column(examples: list[Example], name: str) -> list:
        if name == "messages":
            return [json.dumps(ex.messages, ensure_ascii=False) if ex.messages else "" for ex in examples]
        return [getattr(ex, name) for ex in examples]

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(
            {name: datasets.Dataset.from_dict({c: column(examples, c) for c in features}, features=features)
             for name, examples in splits.items()}
        ).save_to_disk(str(folder))
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


# --------------------------------------------------------------------------- comparing


def make_recipe(task: str, seed: int = 42, name: str = "t", **data):
    return validate(
        {"name": name, "task": task, "seed": seed, "data": data, "student": {"ref": "student"}, "loss": {"alpha": 1.0}}
    )


def arrow_files(folder: Path) -> dict[str, object]:
    """Each Arrow file of a saved split: its table (schema metadata included) and its batches' sizes."""
    import pyarrow as pa

    found = {}
    for path in sorted(folder.glob("*.arrow")):
        with pa.OSFile(str(path)) as source:
            batches = list(pa.ipc.open_stream(source))
        found[path.name] = (pa.Table.from_batches(batches), [b.num_rows for b in batches])
    return found


def same_as_oracle(recipe, root: Path) -> dict:
    """Prepare ``recipe`` (one stage), and check it against the oracle: every manifest count, and every
    file the old code saved (the Arrow shards as tables with their batches; state.json but its
    fingerprint, which datasets drew from the data in memory). Returns the manifest."""
    (result,) = prepare_recipe(recipe, quiet=True)
    old = old_build(recipe.data, recipe.task, recipe.seed)
    manifest = read_json(result.path / "manifest.json")
    expected = {
        "label_names": old.label_names,
        "num_options": max((len(ex.options) for ex in old.splits["train"]), default=0),
        "rows_read": old.rows_read,
        "duplicates_dropped": old.duplicates,
        "conflicts_resolved": old.conflicts,
        "conflict_rows_dropped": old.conflict_rows_dropped,
        "counts": {name: len(examples) for name, examples in old.splits.items()},
        "label_histogram": {name: old_histogram(examples, old.label_names) for name, examples in old.splits.items()},
    }
    assert {key: manifest[key] for key in expected} == expected
    oracle = root / "oracle"
    old_save(old.splits, oracle)
    new = result.path
    assert (new / "dataset_dict.json").read_bytes() == (oracle / "dataset_dict.json").read_bytes()
    for name in old.splits:
        assert (new / name / "dataset_info.json").read_bytes() == (oracle / name / "dataset_info.json").read_bytes()
        state, old_state = (read_json(folder / name / "state.json") for folder in (new, oracle))
        assert {**state, "_fingerprint": None} == {**old_state, "_fingerprint": None}
        mine, theirs = arrow_files(new / name), arrow_files(oracle / name)
        assert list(mine) == list(theirs), name
        for file, (table, batches) in theirs.items():
            assert mine[file][0].equals(table, check_metadata=True), (name, file)
            assert mine[file][1] == batches, (name, file)
        assert sorted(p.name for p in (new / name).iterdir()) == sorted(p.name for p in (oracle / name).iterdir())
    return manifest


def same_error(recipe) -> str:
    """Both refuse ``recipe`` with the same DataError; its message."""
    with pytest.raises(DataError) as old:
        old_build(recipe.data, recipe.task, recipe.seed)
    with pytest.raises(DataError) as new:
        prepare_recipe(recipe, quiet=True)
    assert (new.value.message, new.value.hint) == (old.value.message, old.value.hint)
    return new.value.message


# --------------------------------------------------------------------------- data with duplicates and conflicts

LABELS = ["negative", "neutral", "positive"]


def sentences(n: int, seed: int, distinct: int) -> list[tuple[str, str]]:
    """``n`` (text, label) rows over ``distinct`` texts: exact duplicates and texts with two labels."""
    rng = random.Random(seed)
    return [(f"sales {rng.choice(['rose', 'fell', 'held'])} in quarter {rng.randrange(distinct)}",
             rng.choices(LABELS, weights=(1, 3, 2))[0]) for _ in range(n)]


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


COLUMNS = {"text": "text", "label": "label"}


@pytest.mark.parametrize("mode", ["first", "majority", "drop"])
def test_csv_with_duplicates_and_conflicts_three_splits(here, mode):
    path = write_csv(here / "s.csv", sentences(600, seed=1, distinct=150))
    manifest = same_as_oracle(make_recipe("classify", format="csv", path=str(path), columns=COLUMNS,
                                          on_conflict=mode), here)
    assert manifest["conflicts_resolved"] > 10 and manifest["duplicates_dropped"] > 10


def test_csv_without_dedupe_with_label_names_limit_and_two_splits(here):
    path = write_csv(here / "s.csv", sentences(400, seed=2, distinct=120))
    same_as_oracle(make_recipe("classify", seed=7, format="csv", path=str(path), columns=COLUMNS,
                               label_names=["positive", "negative", "neutral"], dedupe=False, on_conflict="first",
                               split={"train": 0.7, "validation": 0.3}, limit=37), here)


def test_integer_labels_limit_on_every_split(here):
    rows = [(text, str(LABELS.index(label))) for text, label in sentences(300, seed=3, distinct=1000)]
    path = write_csv(here / "s.csv", rows)
    manifest = same_as_oracle(make_recipe("classify", seed=3, format="csv", path=str(path), columns=COLUMNS,
                                          on_conflict="first", limit=20), here)
    assert manifest["counts"] == {"train": 20, "validation": 20, "test": 20}
    assert manifest["label_names"] == ["0", "1", "2"]


def test_generate_named_files_answers_in_the_key_and_a_carved_split(here):
    rng = random.Random(4)
    rows = [{"id": f"q{i}", "question": f"what is {rng.randrange(40)}?", "answer": rng.choice(["a", "b", ["a", "c"]])}
            for i in range(300)]
    train = write_jsonl(here / "train.jsonl", rows[:250])
    test = write_jsonl(here / "test.jsonl", rows[250:])
    manifest = same_as_oracle(make_recipe("generate", format="jsonl", files={"train": str(train), "test": str(test)},
                                          columns={"text": "question", "answers": "answer", "id": "id"}, limit=60),
                              here)
    assert manifest["duplicates_dropped"] > 10 and set(manifest["counts"]) == {"train", "validation", "test"}


def test_chat_messages_turns_in_the_key(here):
    rng = random.Random(5)
    rows = []
    for i in range(200):
        system = [{"role": "system", "content": rng.choice(["be brief", "be kind"])}] if i % 2 else []
        rows.append({"messages": [*system, {"role": "user", "content": f"hello {rng.randrange(30)}"},
                                  {"role": "assistant", "content": rng.choice(["hi", "hey"])}]})
    path = write_jsonl(here / "chat.jsonl", rows)
    manifest = same_as_oracle(make_recipe("generate", format="messages", path=str(path)), here)
    assert manifest["duplicates_dropped"] > 10


def test_winogrande_choice_named_train_and_validation(here):
    rng = random.Random(6)
    rows = [{"qID": f"q{i}", "sentence": f"Ann gave Bea {rng.randrange(60)} apples because _ was kind.",
             "option1": "Ann", "option2": rng.choice(["Bea", "Cy"]), "answer": rng.choice(["1", "2"])}
            for i in range(260)]
    train = write_jsonl(here / "train.jsonl", rows[:220])
    dev = write_jsonl(here / "dev.jsonl", rows[220:])
    same_as_oracle(make_recipe("choice", seed=9, format="winogrande", on_conflict="majority",
                               files={"train": str(train), "validation": str(dev)}), here)


def test_fpb_as_generation(here):
    rows = sentences(300, seed=7, distinct=90)
    path = here / "fpb.txt"
    path.write_bytes("".join(f"{text} .@{label}\r\n" for text, label in rows).encode("latin-1"))
    same_as_oracle(make_recipe("generate", format="fpb", path=str(path), on_conflict="drop"), here)


def test_parquet_choice_with_an_options_column(here):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(8)
    rows = [{"q": f"pick {rng.randrange(50)}", "opts": rng.choice([["x", "y"], ["x", "y", "z"], ["y", "x"]]),
             "gold": rng.choice(["A", "B", 0, 1])} for _ in range(250)]
    path = here / "c.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, gold=str(r["gold"])) for r in rows]), path, row_group_size=40)
    same_as_oracle(make_recipe("choice", format="parquet", path=str(path), on_conflict="first",
                               columns={"text": "q", "options": ["opts"], "label": "gold"}), here)


def hub_rows(monkeypatch) -> None:
    """A Hub dataset (``load_dataset`` replaced) with text labels to infer, duplicates and conflicts."""
    import datasets

    rows = sentences(300, seed=12, distinct=80)
    loaded = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": [t for t, _ in rows[:260]], "tag": [x for _, x in rows[:260]]}),
        test=datasets.Dataset.from_dict({"sentence": [t for t, _ in rows[260:]], "tag": [x for _, x in rows[260:]]}),
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: loaded)


def test_a_hub_dataset_with_labels_to_infer(here, monkeypatch):
    hub_rows(monkeypatch)
    same_as_oracle(make_recipe("classify", format="hub", hub_name="some/data", on_conflict="majority",
                               columns={"text": "sentence", "label": "tag"}), here)


def test_large_data_spills_to_a_file_and_saves_in_shards(here, monkeypatch):
    """Rows held in a scratch file rather than memory, store batches that straddle the splits' write
    batches, and splits of several shards: what a large source does, made small."""
    import datasets

    from kdcli.data import store

    monkeypatch.setattr(store, "BATCH_ROWS", 97)
    monkeypatch.setattr(store, "SPILL_BYTES", 20_000)
    monkeypatch.setattr(datasets.config, "MAX_SHARD_SIZE", "40KB")
    monkeypatch.setattr(datasets.config, "MAX_ROW_GROUP_SIZE", "15KB")  # write batches of ~230 rows
    spilled = []
    real = store.ExampleStore._spill
    monkeypatch.setattr(store.ExampleStore, "_spill", lambda self: (spilled.append(1), real(self)))
    path = write_csv(here / "s.csv", sentences(3000, seed=10, distinct=900))
    same_as_oracle(make_recipe("classify", format="csv", path=str(path), columns=COLUMNS, on_conflict="majority"),
                   here)
    assert spilled
    assert len(list((here / "runs" / "t" / "data" / "main" / "train").glob("*.arrow"))) > 1
    assert not [p for p in (here / "runs" / "t" / "data").iterdir() if p.name.startswith(".")]  # no scratch left


def test_conflict_error_and_empty_split_are_the_same(here):
    rows = sentences(200, seed=11, distinct=50)
    path = write_csv(here / "s.csv", rows)
    message = same_error(make_recipe("classify", format="csv", path=str(path), columns=COLUMNS))
    assert "has different labels" in message and "more texts" in message
    assert not (here / "runs").exists()
    few = write_csv(here / "few.csv", [(f"text {i}", "neutral") for i in range(3)])
    assert "split is empty" in same_error(make_recipe("classify", format="csv", path=str(few), columns=COLUMNS))


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SETTINGS
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "a b"]), st.sampled_from(["x", "y", "z"]),
                               st.sampled_from([[], ["1"], ["1", "2"]])), min_size=1, max_size=60),
       mode=st.sampled_from(["error", "first", "majority", "drop"]), seed=st.integers(0, 5),
       split=st.sampled_from([{"train": 0.5, "validation": 0.5}, {"train": 0.8, "validation": 0.1, "test": 0.1},
                              {"train": 1.0}, {"train": 0.3, "validation": 0.3, "test": 0.4}]),
       limit=st.sampled_from([None, 1, 2, 5]), dedupe=st.booleans(), generate=st.booleans())
def test_any_rows_split_as_the_oracle_splits_them(tmp_path, rows, mode, seed, split, limit, dedupe, generate):
    from kdcli.data.prepare import _build

    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": label, "answers": answers or "-"}
                                               for t, label, answers in rows])
    task = "generate" if generate else "classify"
    columns = {"text": "text", "answers": "answers"} if generate else {"text": "text", "label": "label"}
    data = make_recipe(task, format="jsonl", path=str(path), columns=columns, on_conflict=mode, split=split,
                       limit=limit, dedupe=dedupe).data
    try:
        old = old_build(data, task, seed)
    except DataError as exc:
        with pytest.raises(DataError) as err:
            _build(data, task, seed, lambda message: None, lambda done: None, lambda: tmp_path)
        assert (err.value.message, err.value.hint) == (exc.message, exc.hint)
        return
    new = _build(data, task, seed, lambda message: None, lambda done: None, lambda: tmp_path)
    try:
        assert list(new.splits) == list(old.splits)
        for name, examples in old.splits.items():
            assert [ex.id for ex in new.store.examples(new.splits[name])] == [ex.id for ex in examples], name
        assert (new.rows_read, new.duplicates, new.conflicts, new.conflict_rows_dropped) == (
            old.rows_read, old.duplicates, old.conflicts, old.conflict_rows_dropped)
    finally:
        new.store.close()


def test_dealing_and_shuffling_draw_as_before():
    from array import array

    from kdcli.data.split import _deal, _shuffle

    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.randrange(0, 30) for _ in range(rng.choice([1, 2, 2, 3, 4]))]
        if not sum(sizes):
            continue
        total, chosen = sum(sizes), [0] * len(sizes)
        expected = []
        for dealt in range(1, total + 1):
            part = max(range(len(sizes)), key=lambda n: sizes[n] * dealt - chosen[n] * total)
            chosen[part] += 1
            expected.append(part)
        assert _deal(sizes).tolist() == expected, sizes
    for n in (0, 1, 2, 5, 100, 1000):
        for seed in range(3):
            values, mine = list(range(n)), array("q", range(-3, n + 2))
            theirs, ours = random.Random(seed), random.Random(seed)
            theirs.shuffle(values)
            _shuffle(mine, 3, n + 3, ours)
            assert mine.tolist() == [-3, -2, -1, *values, n, n + 1] and ours.getstate() == theirs.getstate()


# --------------------------------------------------------------------------- the reader against the old reader


@pytest.fixture(scope="module")
def old_reader(tmp_path_factory):
    """kdcli.data's readers at OLD_COMMIT, as a package of their own (``kd_old_data``)."""
    folder = tmp_path_factory.mktemp("old") / "kd_old_data"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for name in ("files", "fields", "hub", "fpb", "winogrande", "socialiqa", "aqua", "triviaqa", "messages",
                 "generic", "read"):
        done = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:kdcli/data/{name}.py"],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"this checkout does not have commit {OLD_COMMIT[:12]}: {done.stderr.strip()}")
        (folder / f"{name}.py").write_text(re.sub(r"\bkdcli\.data\.", "kd_old_data.", done.stdout))
    sys.path.insert(0, str(folder.parent))
    try:
        import kd_old_data.read

        yield kd_old_data.read.read_examples
    finally:
        sys.path.remove(str(folder.parent))
        for module in [m for m in sys.modules if m == "kd_old_data" or m.startswith("kd_old_data.")]:
            del sys.modules[module]


def outcome(read, data, task):
    """What a reader makes of a source: its examples (as plain tuples) and names, or its error."""
    try:
        parts, names = read(data, task)
    except KdError as exc:
        return ("error", type(exc).__name__, exc.message, exc.hint)
    return ({split: [(ex.id, ex.text, ex.options, ex.label, ex.answers, ex.where, ex.messages) for ex in examples]
             for split, examples in parts.items()}, names)


def same_reading(old_reader, data, task) -> object:
    result = outcome(read_examples, data, task)
    assert result == outcome(old_reader, data, task)
    return result


FORMAT_TASK = {"fpb": "classify", "winogrande": "choice", "socialiqa": "choice", "aqua": "choice",
               "triviaqa": "generate", "messages": "generate", "jsonl": "classify", "csv": "classify",
               "parquet": "classify"}


def config(fmt: str, path: Path, **extra) -> DataConfig:
    data = {"format": fmt, "path": str(path)} | extra
    if fmt in ("jsonl", "csv", "parquet"):
        data.setdefault("columns", {"text": "text", "label": "label"})
    return make_recipe(FORMAT_TASK[fmt], **data).data


def test_the_data_of_this_file_reads_as_before(old_reader, here):
    path = write_csv(here / "s.csv", sentences(300, seed=1, distinct=100))
    same_reading(old_reader, config("csv", path), "classify")
    rows = [{"id": f"q{i}", "question": f"what is {i % 7}?", "answer": ["a", "c"]} for i in range(50)]
    path = write_jsonl(here / "g.jsonl", rows)
    same_reading(old_reader, config("jsonl", path, columns={"text": "question", "answers": "answer", "id": "id"}),
                 "generate")


def test_a_hub_dataset_reads_as_before(old_reader, here, monkeypatch):
    hub_rows(monkeypatch)
    data = make_recipe("classify", format="hub", hub_name="some/data", columns={"text": "sentence", "label": "tag"})
    same_reading(old_reader, data.data, "classify")


# Inputs where the order of the errors matters: several problems in one source, the first one wins.
TRICKY = {
    "csv: bad label, then a row without text": ("csv", "text,label\nfine,pos\nok,7\n,neg\n", {}),
    "csv: row without text, then an unknown label": ("csv", "text,label\n,pos\nok,neg\n", {"label_names": ["pos"]}),
    "csv: label missing after a bad one": ("csv", "text,label\na,pos\nb,\nc,neg\n", {}),
    "csv: an integer too large, mixed with names": ("csv", "text,label\na,20000\nb,neg\n", {}),
    "csv: integers only, one too large": ("csv", "text,label\na,1\nb,20000\n", {}),
    "csv: blank rows and CRLF": ("csv", "text,label\r\n\r\na,pos\r\n\r\nb,neg\r\n", {}),
    "csv: bare CR line ends": ("csv", "text,label\ra,pos\rb,neg\r", {}),
    "csv: BOM, extra and missing fields": ("csv", "\ufefftext,label\na,pos,extra\nb\n", {}),
    "csv: a quoted newline": ("csv", 'text,label\n"a\nb",pos\nc,neg\n', {}),
    "csv: unclosed quote to the end": ("csv", 'text,label\nfine,pos\n"open\nmore,neg\n', {}),
    "jsonl: an int label among names": ("jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": 1}\n'
                                                 '{"text": "c", "label": 5}\n', {}),
    "jsonl: bad row after a bad label": ("jsonl", '{"text": "a", "label": 5}\n{"text": "b", "label": "x"}\n'
                                                  '{"text": 3, "label": "y"}\n', {}),
    "jsonl: an unparsable line after a row without text": ("jsonl", '{"label": "x"}\n{"text": "b", "label": "y"}\n'
                                                                    'not json\n', {"label_names": ["x", "y"]}),
    "jsonl: a duplicate id before a bad row": ("jsonl", '{"text": "a", "label": "x", "id": 1}\n'
                                                        '{"text": "b", "label": "x", "id": 1}\n', {}),
    "jsonl: blank and CRLF lines, U+0085": ("jsonl", '{"text": "a\\u0085b", "label": "x"}\r\n\r\n'
                                                     '{"text": "c", "label": "y"}\r\n', {}),
    "fpb: a UTF-8 copy": ("fpb", "Sales were \xe4 flat .@neutral\r\n", {}),
    "fpb: unknown label then no @": ("fpb", "Fine .@positive\r\nOdd .@bullish\r\nno label\r\n", {}),
    "winogrande: a bad line after a bad answer": ("winogrande", '{"qID": "a", "sentence": "s _", "option1": "x", '
                                                  '"option2": "y", "answer": "3"}\n{"qID": \n', {}),
}


@pytest.mark.parametrize("case", sorted(TRICKY))
def test_tricky_inputs_read_as_before(old_reader, here, case):
    fmt, text, extra = TRICKY[case]
    path = here / {"csv": "d.csv", "fpb": "d.txt"}.get(fmt, "d.jsonl")
    path.write_bytes(text.encode("utf-8"))
    if "id" in text and fmt == "jsonl":
        extra = {**extra, "columns": {"text": "text", "label": "label", "id": "id"}}
    same_reading(old_reader, config(fmt, path, **extra), FORMAT_TASK[fmt])


lines = st.lists(st.one_of(
    st.text(max_size=30),
    st.text(alphabet=string.ascii_letters + ' ,@{}[]":\\\r\n\x85', max_size=30),
    st.builds(lambda s, label: f"{s},{label}", st.text(alphabet=string.ascii_letters + ' "', max_size=12),
              st.sampled_from(["neg", "pos", "0", "3", "", '"x,y"'])),
    st.builds(lambda s, label: json.dumps({"text": s, "label": label}),
              st.text(max_size=8), st.one_of(st.sampled_from(["neg", "pos", "", " 1"]), st.integers(-2, 12000))),
), max_size=8)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=st.sampled_from(["csv", "jsonl", "fpb", "triviaqa", "aqua"]), rows=lines,
       ending=st.sampled_from(["\n", "\r\n", "\r"]), names=st.booleans())
def test_any_lines_read_as_before(old_reader, tmp_path, fmt, rows, ending, names):
    path = tmp_path / {"csv": "d.csv", "fpb": "d.txt"}.get(fmt, "d.jsonl")
    path.write_text(ending.join(["text,label", *rows] if fmt == "csv" else rows),
                    encoding="latin-1" if fmt == "fpb" else "utf-8", errors="replace", newline="")
    extra = {"label_names": ["neg", "pos", "0"]} if names and fmt in ("csv", "jsonl") else {}
    same_reading(old_reader, config(fmt, path, **extra), FORMAT_TASK[fmt])


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(FORMAT_TASK)), raw=st.binary(max_size=200))
def test_any_bytes_read_as_before(old_reader, tmp_path, fmt, raw):
    path = tmp_path / {"csv": "d.csv", "fpb": "d.txt", "parquet": "d.parquet"}.get(fmt, "d.jsonl")
    path.write_bytes(raw)
    if fmt in ("winogrande", "socialiqa"):
        (tmp_path / "d-labels.lst").write_bytes(raw[::-1])
    same_reading(old_reader, config(fmt, path), FORMAT_TASK[fmt])


def test_a_large_file_reads_as_before_in_blocks(old_reader, here, monkeypatch):
    """Blocks smaller than a line: lines, multi-byte characters and a bad byte across block ends;
    parquet batches smaller than its row groups."""
    from kdcli.data import files

    monkeypatch.setattr(files, "BLOCK_BYTES", 7)
    rows = [(f"caf\u00e9 {i} \u2014 na\u00efve", LABELS[i % 3]) for i in range(200)]
    path = write_csv(here / "s.csv", rows)
    same_reading(old_reader, config("csv", path), "classify")
    raw = path.read_bytes()
    broken = here / "b.csv"
    broken.write_bytes(raw[:1000] + b"\xff" + raw[1000:])
    assert "not valid utf-8" in same_reading(old_reader, config("csv", broken), "classify")[2]
    broken.write_bytes(raw[:1000] + b"\xe2\x80" + raw[1000:])  # a character cut short
    assert "not valid utf-8" in same_reading(old_reader, config("csv", broken), "classify")[2]
    jsonl = write_jsonl(here / "w.jsonl", [{"text": text, "label": label} for text, label in rows])
    same_reading(old_reader, config("jsonl", jsonl), "classify")
    fpb = here / "f.txt"
    fpb.write_bytes("".join(f"{t} .@{label}\r\n" for t, label in rows).encode("latin-1", "replace"))
    same_reading(old_reader, config("fpb", fpb), "classify")
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(files, "PARQUET_BATCH_ROWS", 7)
    parquet = here / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": t, "label": label} for t, label in rows]), parquet,
                   row_group_size=30)
    same_reading(old_reader, config("parquet", parquet), "classify")
