"""The transfer set (`[data.transfer]`, issue 16, data side): the schema, what `kd prepare` keeps and
drops (no leakage: a transfer row equal to a validation or test row of any stage is dropped), the
manifest's account of it, and its part in a stage's fingerprint."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest

from kdcli import recipe as recipe_mod
from kdcli.data import load_prepared, prepare_recipe
from kdcli.errors import DataError, KdError, RecipeError
from kdcli.rundir import RunDir

LABELS = ("negative", "neutral", "neutral", "positive")


def write_fpb(path: Path, sentences: list[str], labels: list[str] | None = None) -> Path:
    labels = labels or [LABELS[i % len(LABELS)] for i in range(len(sentences))]
    path.write_bytes("".join(f"{s}@{label}\r\n" for s, label in zip(sentences, labels)).encode("latin-1"))
    return path


def write_csv(path: Path, texts: list[str]) -> Path:
    """A transfer file with no label column."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "source"])
        writer.writerows([text, "news"] for text in texts)
    return path


def labelled(n: int, stem: str = "Sentence") -> list[str]:
    return [f"{stem} number {i} about profit ." for i in range(n)]


def raw_recipe(data: dict[str, Any], **top: Any) -> dict[str, Any]:
    """A recipe whose stages have a teacher (only teachers teach from transfer rows); nothing is loaded here."""
    return {"name": "t", "task": "classify", "seed": 42, "student": {"ref": "s"}, "teachers": {"t": {"ref": "t"}},
            "loss": {"alpha": 0.5}, "data": data, **top}


def prepare(raw: dict[str, Any], **options: Any):
    return prepare_recipe(recipe_mod.validate(copy.deepcopy(raw)), quiet=True, **options)


def split_texts(stage: str = "main") -> dict[str, list[str]]:
    splits, _ = load_prepared(RunDir(Path("runs") / "t"), stage)
    return {name: list(split["text"]) for name, split in splits.items()}


def transfer_column(name: str, stage: str = "main") -> list:
    splits, _ = load_prepared(RunDir(Path("runs") / "t"), stage)
    return list(splits["transfer"][name])


def manifest(stage: str = "main") -> dict[str, Any]:
    return load_prepared(RunDir(Path("runs") / "t"), stage)[1]


# --------------------------------------------------------------------------- schema


def problems_of(transfer: Any, **data: Any) -> list[str]:
    with pytest.raises(RecipeError) as info:
        recipe_mod.validate(raw_recipe({"format": "fpb", "path": "s.txt", "transfer": transfer, **data}))
    return info.value.problems


def test_transfer_schema_defaults():
    recipe = recipe_mod.validate(raw_recipe({"format": "fpb", "path": "s.txt", "transfer": {"files": ["a", "b"]}}))
    transfer = recipe.data.transfer
    assert (transfer.files, transfer.share, transfer.limit, transfer.format, transfer.columns) == (
        ["a", "b"], 0.5, None, None, None)
    assert recipe_mod.validate(raw_recipe({"format": "fpb", "path": "s.txt"})).data.transfer is None


@pytest.mark.parametrize(("transfer", "problem"), [
    ({"path": "a", "files": ["b"]}, "data.transfer: give exactly one of `path` (one file), `files` (a list of files) "
                                    "or `hub_name` (with format = 'hub'); path and files given"),
    ({}, "data.transfer: give exactly one of `path` (one file), `files` (a list of files) or `hub_name` "
         "(with format = 'hub'); none given"),
    ({"path": "a", "share": 1.0}, "data.transfer.share: Input should be less than 1"),
    ({"path": "a", "share": 0}, "data.transfer.share: Input should be greater than 0"),
    ({"path": "a", "limit": 0}, "data.transfer.limit: Input should be greater than 0"),
    ({"path": "a", "shares": 0.3}, "data.transfer.shares: unknown key (did you mean 'share'?)"),
    ({"files": {"train": "a"}}, "data.transfer.files: expected a list"),
    ({"files": ["a", "a"]}, "data.transfer: files lists 'a' more than once"),
    ({"hub_name": "x"}, "data.transfer: hub_name needs format = 'hub' in this table"),
])
def test_transfer_schema_errors_by_path(transfer, problem):
    assert problems_of(transfer) == [problem]


def test_a_hub_recipe_s_transfer_files_need_their_own_format():
    (problem,) = problems_of({"path": "a.csv"}, path=None, format="hub", hub_name="x")
    assert problem.startswith("data: transfer.format: [data] reads the Hub")


def test_stages_inherit_the_transfer_set_unless_they_name_their_own_source():
    raw = raw_recipe({"format": "fpb", "path": "s.txt", "transfer": {"files": ["a", "b"], "share": 0.3}}, stages=[
        {"name": "same"},
        {"name": "other", "data": {"path": "o.txt"}},
        {"name": "own", "data": {"path": "o.txt", "transfer": {"path": "c"}}},
        {"name": "path", "data": {"transfer": {"path": "c"}}},
    ])
    same, other, own, path = recipe_mod.validate(raw).resolved_stages()
    assert (same.data.transfer.files, same.data.transfer.share) == (["a", "b"], 0.3)
    assert other.data.transfer is None  # in-domain for the top-level source only
    assert (own.data.transfer.path, own.data.transfer.share) == ("c", 0.5)
    # The stage's transfer source replaces the top-level one whole; its other keys are merged.
    assert (path.data.transfer.path, path.data.transfer.files, path.data.transfer.share) == ("c", [], 0.3)


# --------------------------------------------------------------------------- no leakage


def test_a_transfer_row_equal_to_a_held_out_row_is_dropped_and_counted(here):
    """A CSV without a label column, for classify: rows equal to a test or validation row (also in
    another case and spacing) or to a train row are dropped, and so are duplicates; each counted."""
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(60)))}
    prepare(raw_recipe(data))
    before = split_texts()
    test, validation, train = before["test"][0], before["validation"][0], before["train"][0]
    texts = [
        "A new sentence about costs .",
        test,
        "  " + test.upper().replace(" ", "   ") + "\t",  # the same text to a casefold and collapsed whitespace
        validation,
        train,
        "Another new sentence about sales .",
        "A new sentence about costs .",  # a duplicate of the first
        "A NEW sentence about costs .",  # not a duplicate (only exact ones are), nor held out
    ]
    data["transfer"] = {"format": "csv", "path": str(write_csv(here / "transfer.csv", texts))}
    (result,) = prepare(raw_recipe(data))
    after = split_texts()
    assert {name: after[name] for name in before} == before  # the labelled splits are untouched
    assert after["transfer"] == ["A new sentence about costs .", "Another new sentence about sales .",
                                 "A NEW sentence about costs ."]  # in source order
    assert not set(after["transfer"]) & set(before["test"] + before["validation"])
    block = manifest()["transfer"]
    assert block["dropped"] == {"test": 2, "validation": 1, "train": 1, "duplicates": 1, "limit": 0}
    assert block["leaked_from"] == {"main/test": 2, "main/validation": 1}
    assert (block["rows_read"], block["kept"]) == (8, 3)
    assert result.counts == {**manifest()["counts"]} and result.counts["transfer"] == 3
    assert result.transfer == block
    assert manifest()["label_histogram"].keys() == {"train", "validation", "test"}


def test_equal_to_another_stage_s_held_out_row_is_dropped(here):
    """Stage two's transfer set is checked against stage one's validation and test rows too, read from
    its saved splits when stage one is up to date, and re-read when stage one's data changes."""
    one = write_fpb(here / "one.txt", labelled(40, "Alpha"))
    two = write_fpb(here / "two.txt", labelled(40, "Beta"))
    stages = [{"name": "one"}, {"name": "two", "data": {"path": str(two)}}]
    raw = raw_recipe({"format": "fpb", "path": str(one)}, stages=stages)
    prepare(raw)
    held = split_texts("one")
    transfer = write_fpb(here / "transfer.txt", [held["validation"][0], held["test"][1].lower(), "Gamma news ."],
                         labels=["bullish", "?", ""])  # labels are not read
    stages[1]["data"]["transfer"] = {"path": str(transfer)}
    first, second = prepare(raw)
    assert first.skipped and not second.skipped
    assert split_texts("two")["transfer"] == ["Gamma news ."]
    assert second.transfer["leaked_from"] == {"one/test": 1, "one/validation": 1}
    assert "transfer" not in split_texts("one")
    assert transfer_column("label", "two") == [-1] and transfer_column("answers", "two") == [[]]
    write_fpb(one, labelled(41, "Alpha"))
    first, second = prepare(raw)
    assert second.reason == "changed: the data of a stage the transfer set is checked against"


def test_a_transfer_set_of_held_out_rows_only_is_an_error(here):
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40)))}
    prepare(raw_recipe(data))
    data["transfer"] = {"format": "csv", "path": str(write_csv(here / "t.csv", split_texts()["test"][:2]))}
    with pytest.raises(DataError) as error:
        prepare(raw_recipe(data))
    assert error.value.message == "no transfer rows are left: 2 read, every one dropped (2 test)"
    assert "remove [data.transfer]" in error.value.hint


# --------------------------------------------------------------------------- sources, limit, fingerprint


def test_several_files_are_counted_by_source_in_the_manifest(here):
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40)))}
    news = [f"News item {i} ." for i in range(6)]
    files = [write_fpb(here / "a.txt", news[:4]), write_fpb(here / "b.txt", news[2:])]  # b repeats two of a's
    data["transfer"] = {"files": [str(path) for path in files]}
    (result,) = prepare(raw_recipe(data))
    block = manifest()["transfer"]
    assert [(s["source"], s["rows_read"], s["kept"]) for s in block["sources"]] == [
        (str(files[0]), 4, 4), (str(files[1]), 4, 2)]
    assert [s["path"] for s in block["sources"]] == [str(path.resolve()) for path in files]
    assert all(len(s["sha256"]) == 64 for s in block["sources"])
    assert block["dropped"]["duplicates"] == 2 and split_texts()["transfer"] == news
    transfer_files = [f for f in manifest()["sources"] if f["split"] == "transfer"]
    assert [f["source"] for f in transfer_files] == [str(path) for path in files]


def test_limit_is_a_seeded_draw(here):
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40))),
            "transfer": {"path": str(write_fpb(here / "t.txt", [f"News item {i} ." for i in range(30)])), "limit": 7}}
    prepare(raw_recipe(data))
    kept = split_texts()["transfer"]
    assert len(kept) == 7 and manifest()["transfer"]["dropped"]["limit"] == 23
    assert kept == sorted(kept, key=lambda text: int(text.split()[2]))  # in source order
    prepare(raw_recipe(data), force=True)
    assert split_texts()["transfer"] == kept


def test_the_transfer_set_is_part_of_the_fingerprint(here):
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40)))}
    (plain,) = prepare(raw_recipe(data))
    transfer = write_csv(here / "t.csv", ["News one .", "News two ."])
    data["transfer"] = {"format": "csv", "path": str(transfer)}
    (with_transfer,) = prepare(raw_recipe(data))
    assert with_transfer.fingerprint != plain.fingerprint and with_transfer.reason.startswith("changed:")
    write_csv(transfer, ["News one .", "News three ."])
    (changed,) = prepare(raw_recipe(data))
    assert changed.reason == "changed: the source files" and changed.fingerprint != with_transfer.fingerprint
    assert split_texts()["transfer"] == ["News one .", "News three ."]
    data["transfer"]["share"] = 0.25
    (share,) = prepare(raw_recipe(data))
    assert share.reason == "changed: the recipe's data section"
    del data["transfer"]
    (again,) = prepare(raw_recipe(data))
    assert again.fingerprint == plain.fingerprint and "transfer" not in split_texts()


# --------------------------------------------------------------------------- other formats and tasks


def test_unlabelled_sources_of_every_task(here):
    """Label files, answers and label columns are not read: a WinoGrande file without answers (choice),
    TriviaQA questions without answers, a jsonl without an answers column and conversations without
    the assistant's answer (generate)."""
    import json

    def jsonl(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path

    wino = [{"qID": f"q{i}", "sentence": f"Ann met Bea {i} times because _ was kind.", "option1": "Ann",
             "option2": "Bea", "answer": str(1 + i % 2)} for i in range(30)]
    jsonl(here / "wino.jsonl", wino)
    unlabelled = jsonl(here / "test.jsonl", [{"qID": "x", "sentence": "Cy met Di because _ was kind.",
                                              "option1": "Cy", "option2": "Di"}])
    prepare(raw_recipe({"format": "winogrande", "path": str(here / "wino.jsonl"),
                        "transfer": {"path": str(unlabelled)}}, task="choice"))
    assert transfer_column("options") == [["Cy", "Di"]] and transfer_column("label") == [-1]

    trivia = jsonl(here / "trivia.jsonl", [{"context": f"Question: What is {i}?\nAnswer:", "answer": str(i),
                                            "aliases": []} for i in range(30)])
    questions = jsonl(here / "q.jsonl", [{"context": "Question: Who wrote it?\nAnswer:"}])
    prepare(raw_recipe({"format": "triviaqa", "path": str(trivia), "transfer": {"path": str(questions)}},
                       task="generate"))
    assert split_texts()["transfer"] == ["Who wrote it?"]
    prompts = jsonl(here / "p.jsonl", [{"prompt": "Who painted it?"}])
    prepare(raw_recipe({"format": "triviaqa", "path": str(trivia), "transfer": {
        "format": "jsonl", "path": str(prompts), "columns": {"text": "prompt", "answers": "answer"}}},
        task="generate"))
    assert transfer_column("text") == ["Who painted it?"] and transfer_column("answers") == [[]]

    chats = jsonl(here / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Say {i}."},
                                                       {"role": "assistant", "content": str(i)}]} for i in range(30)])
    asked = jsonl(here / "asked.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]},
        {"messages": [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "Bye."}]},
    ])
    prepare(raw_recipe({"format": "messages", "path": str(chats), "transfer": {"path": str(asked)}}, task="generate"))
    assert transfer_column("text") == ["Say hi.", "Say bye."] and transfer_column("answers") == [[], []]
    assert [json.loads(turns) for turns in transfer_column("messages")] == [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "Say bye."}]]  # the answer a conversation has is not read


def test_a_hub_transfer_set_reads_every_split(here, monkeypatch):
    import datasets

    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40)))}
    prepare(raw_recipe(data))
    test = split_texts()["test"][0]
    hub = datasets.DatasetDict(train=datasets.Dataset.from_dict({"sentence": ["Hub one .", test]}),
                               test=datasets.Dataset.from_dict({"sentence": ["Hub two ."]}))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: hub)
    data["transfer"] = {"format": "hub", "hub_name": "some/news", "columns": {"text": "sentence"}}
    (result,) = prepare(raw_recipe(data))
    assert split_texts()["transfer"] == ["Hub one .", "Hub two ."]
    assert result.transfer["sources"] == [{"source": "some/news[train]", "rows_read": 2, "kept": 1},
                                          {"source": "some/news[test]", "rows_read": 1, "kept": 1}]
    assert result.transfer["leaked_from"] == {"main/test": 1}


def test_an_empty_transfer_file_is_an_error(here):
    empty = here / "empty.txt"
    empty.write_bytes(b"")
    data = {"format": "fpb", "path": str(write_fpb(here / "fpb.txt", labelled(40))),
            "transfer": {"files": [str(empty)]}}
    with pytest.raises(DataError) as error:
        prepare(raw_recipe(data))
    assert error.value.message == f"{empty}: no examples in this transfer file"
    assert not (here / "runs" / "t" / "data" / "main").exists()


def test_eval_refuses_the_transfer_split(here):
    from kdcli.evaluate import evaluate_role
    from kdcli.roles import Role

    recipe = recipe_mod.validate(raw_recipe({"format": "fpb", "path": "fpb.txt"}))
    with pytest.raises(KdError) as error:
        evaluate_role(recipe, Role.parse("baseline"), "transfer")
    assert "unlabelled" in error.value.message and "--split test" in error.value.hint


def test_a_transfer_set_needs_a_teacher():
    from kdcli.recipe import validate

    def recipe(task: str, teachers: dict) -> dict:
        data = {"format": "jsonl", "path": "l.jsonl", "transfer": {"path": "u.jsonl"}}
        if task == "generate":
            data["columns"] = {"text": "text", "label": "", "answers": "answer"}
        return {"name": "t", "task": task, "data": data, "student": {"ref": "s"}, "teachers": teachers,
                "loss": {"alpha": 1.0 if not teachers else 0.5}}

    with pytest.raises(RecipeError, match=r"data\.transfer: transfer rows have no labels, only teachers teach"):
        validate(recipe("classify", {}))
    assert validate(recipe("classify", {"t": {"ref": "t"}})).data.transfer.share == 0.5
    labels_only = dict(recipe("generate", {"t": {"ref": "t"}}), loss={"alpha": 1.0})
    with pytest.raises(RecipeError, match=r"loss\.alpha: transfer rows have no labels and teach only through"):
        validate(labels_only)
