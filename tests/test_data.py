"""kdcli.data: the release-format adapters, normalisation, cleaning, splitting and `prepare_recipe`.

Small files are written here in each release's exact format; the real files in the sibling
shared/data folder are read when present and checked against the counts in its README.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from kdcli.data import load_prepared, prepare_recipe, read_examples, resolve_path
from kdcli.data.files import MAX_LINE_CHARS
from kdcli.errors import DataError
from kdcli.recipe import validate
from kdcli.rundir import RunDir

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# --------------------------------------------------------------------------- helpers


def make_recipe(task: str, seed: int = 42, name: str = "t", **data):
    return validate(
        {"name": name, "task": task, "seed": seed, "data": data, "student": {"ref": "student"}, "loss": {"alpha": 1.0}}
    )


def cfg(task: str, **data):
    return make_recipe(task, **data).data


def write_fpb(path: Path, rows: list[tuple[str, str]]) -> Path:
    """The release format: `sentence@label`, latin-1, CRLF, a CRLF after the last line."""
    path.write_bytes("".join(f"{s}@{label}\r\n" for s, label in rows).encode("latin-1"))
    return path


def write_jsonl(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def fpb_rows(n: int, labels=("negative", "neutral", "positive"), weights=(1, 2, 1)) -> list[tuple[str, str]]:
    cycle = [label for label, w in zip(labels, weights, strict=True) for _ in range(w)]
    return [(f"Sentence number {i} about profit .", cycle[i % len(cycle)]) for i in range(n)]


def wino_rows(n: int) -> list[dict]:
    return [
        {
            "qID": f"q{i}",
            "sentence": f"Ann gave Bea {i} apples because _ was kind.",
            "option1": "Ann",
            "option2": "Bea",
            "answer": str(1 + i % 2),
        }
        for i in range(n)
    ]


def prepare_fpb(tmp_path: Path, n: int = 100, **data):
    data.setdefault("path", str(write_fpb(tmp_path / "fpb.txt", fpb_rows(n))))
    return prepare_recipe(make_recipe("classify", format="fpb", **data), quiet=True)


def nothing_written(root: Path) -> bool:
    return not (root / "runs").exists()


def needs(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"real data not present: {path}")
    return path


# --------------------------------------------------------------------------- adapters on release-format files


def test_fpb_reads_latin1_crlf_and_splits_on_the_last_at(tmp_path):
    path = write_fpb(
        tmp_path / "s.txt",
        [
            ("Profit at Nokia rose to EUR 5 mn from EUR 4 mn .", "positive"),
            ("Sales in Espoo were \xe4 unchanged .", "neutral"),
        ],
    )
    parts, names = read_examples(cfg("classify", format="fpb", path=str(path)), "classify")
    rows = parts["all"]
    assert names == ["negative", "neutral", "positive"]
    assert [r.text for r in rows] == [
        "Profit at Nokia rose to EUR 5 mn from EUR 4 mn .",
        "Sales in Espoo were \xe4 unchanged .",
    ]
    assert [r.label for r in rows] == [2, 1]
    assert rows[0].options == [] and rows[0].answers == [] and rows[0].id == "s-1"


def test_fpb_label_names_set_the_class_order(tmp_path):
    path = write_fpb(tmp_path / "s.txt", [("Up .", "positive"), ("Down .", "negative")])
    parts, names = read_examples(
        cfg("classify", format="fpb", path=str(path), label_names=["positive", "negative", "neutral"]), "classify"
    )
    assert names == ["positive", "negative", "neutral"]
    assert [r.label for r in parts["all"]] == [0, 1]


def test_fpb_as_generation_answers_with_the_class_name_and_keeps_the_label_for_the_split(tmp_path):
    path = write_fpb(tmp_path / "s.txt", [("Up .", "positive"), ("Down .", "negative")])
    parts, names = read_examples(cfg("generate", format="fpb", path=str(path)), "generate")
    assert names == [] and [(r.answers, r.label) for r in parts["all"]] == [(["positive"], 2), (["negative"], 0)]


def test_winogrande_labels_from_row_from_sibling_file_and_from_labels_path(tmp_path):
    rows = wino_rows(4)
    path = write_jsonl(tmp_path / "train_xs.jsonl", rows)
    parts, names = read_examples(cfg("choice", format="winogrande", path=str(path)), "choice")
    assert names == ["1", "2"]
    assert [(r.id, r.options, r.label) for r in parts["all"]][:2] == [
        ("q0", ["Ann", "Bea"], 0),
        ("q1", ["Ann", "Bea"], 1),
    ]
    # Unlabelled rows (like test.jsonl) with the labels beside them, then at an explicit path.
    bare = [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    path = write_jsonl(tmp_path / "dev.jsonl", bare)
    write_lines(tmp_path / "dev-labels.lst", ["2", "2", "1", "1"])
    parts, _ = read_examples(cfg("choice", format="winogrande", path=str(path)), "choice")
    assert [r.label for r in parts["all"]] == [1, 1, 0, 0]
    elsewhere = write_lines(tmp_path / "gold.txt", ["1", "1", "1", "2"])
    parts, _ = read_examples(cfg("choice", format="winogrande", path=str(path), labels_path=str(elsewhere)), "choice")
    assert [r.label for r in parts["all"]] == [0, 0, 0, 1]


def test_socialiqa_joins_context_and_question(tmp_path):
    row = {
        "context": "Cameron had a barbecue.",
        "question": "How would Others feel?",
        "answerA": "happy",
        "answerB": "sad",
        "answerC": "bored",
    }
    path = write_jsonl(tmp_path / "train.jsonl", [row, row | {"question": "Why?"}])
    write_lines(tmp_path / "train-labels.lst", ["1", "3"])
    parts, names = read_examples(cfg("choice", format="socialiqa", path=str(path)), "choice")
    first, second = parts["all"]
    assert names == ["1", "2", "3"]
    assert first.text == "Cameron had a barbecue. How would Others feel?"
    assert first.options == ["happy", "sad", "bored"] and (first.label, second.label) == (0, 2)


def test_aqua_strips_option_letters_and_keeps_the_correct_text(tmp_path):
    row = {
        "question": "2 + 3 = ?",
        "options": ["A)4", "B)5", "C) 6", "D)7", "E)8"],
        "rationale": "2 + 3 = 5\nAnswer B",
        "correct": "B",
    }
    path = write_jsonl(tmp_path / "dev.json", [row])
    parts, names = read_examples(cfg("choice", format="aqua", path=str(path)), "choice")
    (ex,) = parts["all"]
    assert names == list("ABCDE")
    assert (ex.text, ex.options, ex.label, ex.answers) == ("2 + 3 = ?", ["4", "5", "6", "7", "8"], 1, ["5"])
    parts, names = read_examples(cfg("generate", format="aqua", path=str(path)), "generate")
    assert parts["all"][0].answers == ["5"] and names == []


def test_triviaqa_subset_and_hub_schema(tmp_path):
    rows = [
        {
            "context": "Question: Which river\x85flows through Cairo?\nAnswer:",
            "answer": "Nile",
            "aliases": ["The Nile", "Nile", "Nile River"],
        },
        {
            "question": "Who wrote Hamlet?",
            "question_id": "tc_1",
            "answer": {
                "value": "Shakespeare",
                "aliases": ["William Shakespeare", "Shakespeare"],
                "normalized_value": "shakespeare",
            },
        },
    ]
    path = write_jsonl(tmp_path / "tqa.jsonl", rows)
    parts, _ = read_examples(cfg("generate", format="triviaqa", path=str(path)), "generate")
    subset, hub = parts["all"]
    assert subset.text == "Which river\x85flows through Cairo?"  # U+0085 is not a line break here
    assert subset.answers == ["Nile", "The Nile", "Nile River"] and subset.label == -1
    assert (hub.id, hub.text, hub.answers) == ("tc_1", "Who wrote Hamlet?", ["Shakespeare", "William Shakespeare"])


def test_generic_csv_jsonl_parquet_with_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('sentence,sentiment\n"Good, very good",pos\nBad,neg\n"Two\nlines",pos\n', encoding="utf-8")
    parts, names = read_examples(
        cfg("classify", format="csv", path=str(csv_path), columns={"text": "sentence", "label": "sentiment"}),
        "classify",
    )
    assert names == ["neg", "pos"]  # inferred and sorted when label_names is not given
    assert [(r.text, r.label) for r in parts["all"]] == [("Good, very good", 1), ("Bad", 0), ("Two\nlines", 1)]

    jsonl = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"q": "Pick", "a": "x", "b": "y", "gold": "B", "uid": 7},
            {"q": "Again", "a": "x", "b": "y", "gold": 0, "uid": 8},
        ],
    )
    columns = {"text": "q", "options": ["a", "b"], "label": "gold", "id": "uid"}
    parts, names = read_examples(cfg("choice", format="jsonl", path=str(jsonl), columns=columns), "choice")
    assert [(r.id, r.options, r.label) for r in parts["all"]] == [("7", ["x", "y"], 1), ("8", ["x", "y"], 0)]
    assert names == ["1", "2"]

    pq_path = tmp_path / "g.parquet"
    pq.write_table(pa.table({"question": ["Capital of France?"], "answer": [["Paris", "paris"]]}), pq_path)
    parts, _ = read_examples(
        cfg("generate", format="parquet", path=str(pq_path), columns={"text": "question", "answers": "answer"}),
        "generate",
    )
    assert parts["all"][0].answers == ["Paris", "paris"] and parts["all"][0].id == "g-1"


def test_csv_fields_may_be_as_long_as_a_line(tmp_path):
    """The csv module's own cap is 131,072 characters a field; kd's is the line limit, as for every format."""
    long_text = "word " * 40_000  # 200,000 characters
    path = tmp_path / "long.csv"
    path.write_text(f'text,label\n"{long_text}",pos\nshort,neg\n', encoding="utf-8")
    parts, _ = read_examples(cfg("classify", format="csv", path=str(path)), "classify")
    assert [len(r.text) for r in parts["all"]] == [200_000, 5]

    unclosed = tmp_path / "unclosed.csv"  # every line is short, but the quoted field never ends
    unclosed.write_text('text,label\nfine,pos\n"open\n' + ("x" * 100_000 + "\n") * 11, encoding="utf-8")
    with pytest.raises(DataError, match=r"unclosed.csv:3: a quoted field runs on for more than 1,000,000 characters"):
        read_examples(cfg("classify", format="csv", path=str(unclosed)), "classify")


def test_hub_offline_is_a_data_error_with_a_local_path_hint(here, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'trivia_qa' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    recipe = make_recipe(
        "generate",
        format="hub",
        hub_name="trivia_qa",
        hub_config="rc",
        columns={"text": "question", "answers": "answer"},
    )
    with pytest.raises(DataError) as err:
        prepare_recipe(recipe, quiet=True)
    assert "trivia_qa" in err.value.message and "Couldn't reach" in err.value.message
    assert "data.path" in err.value.hint
    assert nothing_written(here)


def test_hub_rows_go_through_the_column_mapping(here, monkeypatch):
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["bad", "good"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features
    )
    test = datasets.Dataset.from_dict({"sentence": ["t1", "t2"], "label": [0, 1]}, features=features)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config=None: datasets.DatasetDict(train=train, test=test)
    )
    recipe = make_recipe("classify", format="hub", hub_name="some/dataset", columns={"text": "sentence"})
    (result,) = prepare_recipe(recipe, quiet=True)
    assert result.label_names == ["bad", "good"]  # from the ClassLabel feature
    assert result.counts == {"train": 18, "validation": 2, "test": 2}


def test_resolve_path_plain_and_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "kd_fake_pkg"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('kd must not import me')\n")
    (package / "data" / "x.txt").write_text("hi")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_path("package:kd_fake_pkg/data/x.txt").read_text() == "hi"
    assert "kd_fake_pkg" not in sys.modules
    assert resolve_path("some/file.txt") == Path("some/file.txt")
    with pytest.raises(DataError, match="no installed package 'kd_missing_pkg'"):
        resolve_path("package:kd_missing_pkg/x.txt")


# --------------------------------------------------------------------------- the real release files


def test_real_fpb_allagree(here):
    path = needs("fpb", "Sentences_AllAgree.txt")
    parts, names = read_examples(cfg("classify", format="fpb", path=str(path)), "classify")
    rows = parts["all"]
    assert len(rows) == 1887
    assert Counter(names[r.label] for r in rows) == {"negative": 249, "neutral": 1161, "positive": 477}
    assert any("\xe4" in r.text for r in rows)  # latin-1 decoded
    (result,) = prepare_recipe(make_recipe("classify", format="fpb", path=str(path)), quiet=True)
    assert result.duplicates == 5 and sum(result.counts.values()) == 1882


def test_real_fpb_50agree_conflicts(here):
    path = needs("fpb", "Sentences_50Agree.txt")
    with pytest.raises(DataError, match="different labels"):
        prepare_recipe(make_recipe("classify", format="fpb", path=str(path)), quiet=True)
    (result,) = prepare_recipe(
        make_recipe("classify", format="fpb", path=str(path), on_conflict="majority"), quiet=True
    )
    assert result.conflicts == 2


def test_real_winogrande_train_m(here):
    path = needs("winogrande", "train_m.jsonl")
    parts, _ = read_examples(cfg("choice", format="winogrande", path=str(path)), "choice")
    assert len(parts["all"]) == 2558
    assert Counter(r.label for r in parts["all"]) == {0: 1279, 1: 1279}


@pytest.mark.slow
def test_real_socialiqa_train(here):
    path = needs("socialiqa", "train.jsonl")
    parts, _ = read_examples(cfg("choice", format="socialiqa", path=str(path)), "choice")
    assert len(parts["all"]) == 33410
    assert Counter(r.label for r in parts["all"]) == {0: 11274, 1: 11176, 2: 10960}


def test_real_aqua_dev(here):
    path = needs("aqua", "dev.json")
    parts, names = read_examples(cfg("choice", format="aqua", path=str(path)), "choice")
    assert len(parts["all"]) == 254
    assert Counter(names[r.label] for r in parts["all"]) == {"A": 69, "B": 66, "C": 43, "D": 50, "E": 26}
    assert all(len(r.options) == 5 and r.answers == [r.options[r.label]] for r in parts["all"])


def test_real_triviaqa_subset(here):
    path = needs("triviaqa", "triviaqa_sm_sub.jsonl")
    parts, _ = read_examples(cfg("generate", format="triviaqa", path=str(path)), "generate")
    rows = parts["all"]
    assert len(rows) == 2000
    assert any("\x85" in r.text or any("\x85" in a for a in r.answers) for r in rows)
    assert all(r.answers and not r.text.startswith("Question:") for r in rows)


# --------------------------------------------------------------------------- bad input: one DataError, nothing written


def test_missing_file_names_the_path(here):
    with pytest.raises(DataError, match="data file not found: nowhere/fpb.txt"):
        prepare_fpb(here, path="nowhere/fpb.txt")
    assert nothing_written(here)


def test_malformed_json_line_names_file_line_and_excerpt(here):
    path = write_jsonl(here / "w.jsonl", wino_rows(3))
    with open(path, "a") as handle:
        handle.write('{"qID": "broken", "sentence": \n')
    with pytest.raises(DataError) as err:
        prepare_recipe(make_recipe("choice", format="winogrande", path=str(path)), quiet=True)
    assert f"{path}:4: not valid JSON" in err.value.message and '"qID": "broken"' in err.value.message
    assert nothing_written(here)


def test_fpb_line_without_at(here):
    path = write_fpb(here / "f.txt", fpb_rows(3))
    path.write_bytes(path.read_bytes() + b"no label on this line\r\n")
    with pytest.raises(DataError, match=r"f\.txt:4: expected `sentence@label`, got 'no label on this line'"):
        prepare_fpb(here, path=str(path))
    assert nothing_written(here)


def test_unknown_label_names_file_and_line(here):
    path = write_fpb(here / "f.txt", fpb_rows(3) + [("Odd .", "bullish")])
    with pytest.raises(DataError) as err:
        prepare_fpb(here, path=str(path))
    assert (
        "f.txt:4: unknown label 'bullish'" in err.value.message and "negative, neutral, positive" in err.value.message
    )
    assert nothing_written(here)


def test_label_file_of_another_length(here):
    path = write_jsonl(
        here / "train.jsonl", [{"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}] * 3
    )
    write_lines(here / "train-labels.lst", ["1", "2"])
    with pytest.raises(DataError, match="has 2 labels for 3 rows"):
        prepare_recipe(make_recipe("choice", format="socialiqa", path=str(path)), quiet=True)
    assert nothing_written(here)


def test_missing_and_unknown_labels_in_label_files(here):
    row = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}
    path = write_jsonl(here / "train.jsonl", [row])
    with pytest.raises(DataError, match="expected train-labels.lst beside it"):
        read_examples(cfg("choice", format="socialiqa", path=str(path)), "choice")
    write_lines(here / "train-labels.lst", ["4"])
    with pytest.raises(DataError, match=r"train-labels\.lst:1: unknown label '4'"):
        read_examples(cfg("choice", format="socialiqa", path=str(path)), "choice")
    bare = write_jsonl(here / "test.jsonl", [{k: v for k, v in r.items() if k != "answer"} for r in wino_rows(2)])
    with pytest.raises(DataError, match="no answer and no label file") as err:
        read_examples(cfg("choice", format="winogrande", path=str(bare)), "choice")
    assert "labels_path" in err.value.hint


def test_empty_file(here):
    path = here / "empty.txt"
    path.write_bytes(b"\r\n")
    with pytest.raises(DataError, match="no examples"):
        prepare_fpb(here, path=str(path))
    assert nothing_written(here)


def test_wrong_encoding_suggests_data_encoding(here):
    rows = wino_rows(2)
    rows[1]["sentence"] = "Zoë met Ann because _ was kind."
    path = write_jsonl(here / "w.jsonl", rows, encoding="latin-1")
    with pytest.raises(DataError) as err:
        prepare_recipe(make_recipe("choice", format="winogrande", path=str(path)), quiet=True)
    assert "w.jsonl:2: not valid utf-8" in err.value.message and "data.encoding" in err.value.hint
    (result,) = prepare_recipe(
        make_recipe("choice", format="winogrande", path=str(path), encoding="latin-1", split={"train": 1.0}), quiet=True
    )
    assert result.counts == {"train": 2}


def test_utf8_copy_of_fpb_is_refused_unless_encoding_is_set(here):
    path = here / "utf8.txt"
    path.write_bytes("Sales in Espoo were \xe4 flat .@neutral\r\n".encode("utf-8") * 20)
    with pytest.raises(DataError, match="looks like UTF-8") as err:
        prepare_fpb(here, path=str(path))
    assert "encoding = 'utf-8'" in err.value.hint
    assert nothing_written(here)
    parts, _ = read_examples(cfg("classify", format="fpb", path=str(path), encoding="utf-8"), "classify")
    assert parts["all"][0].text == "Sales in Espoo were \xe4 flat ."


def test_huge_line_and_binary_garbage(here):
    huge = here / "huge.jsonl"
    huge.write_text('{"sentence": "' + "x" * (MAX_LINE_CHARS + 1) + '"}\n')
    with pytest.raises(DataError, match="huge.jsonl:1: line is 1,000,0"):
        prepare_recipe(make_recipe("choice", format="winogrande", path=str(huge)), quiet=True)
    garbage = here / "garbage.txt"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(DataError, match="not a text file"):
        prepare_fpb(here, path=str(garbage))
    assert nothing_written(here)


def test_wrong_fields_and_task_mismatch(here):
    path = write_jsonl(here / "w.jsonl", [{"qID": "a", "sentence": "s _", "option1": "x", "answer": "1"}])
    with pytest.raises(DataError, match=r"w\.jsonl:1: missing field 'option2'"):
        prepare_recipe(make_recipe("choice", format="winogrande", path=str(path)), quiet=True)
    with pytest.raises(DataError, match="is a choice dataset, but the recipe's task is 'classify'"):
        prepare_recipe(make_recipe("classify", format="winogrande", path=str(path)), quiet=True)
    assert nothing_written(here)


# --------------------------------------------------------------------------- cleaning and splitting


def test_stratified_split_keeps_label_proportions(here):
    (result,) = prepare_fpb(here, n=400)  # labels 1:2:1
    assert result.counts == {"train": 320, "validation": 40, "test": 40}
    assert result.label_histograms["train"] == {"negative": 80, "neutral": 160, "positive": 80}
    assert result.label_histograms["test"] == {"negative": 10, "neutral": 20, "positive": 10}


def test_split_is_seeded(here):
    path = str(write_fpb(here / "f.txt", fpb_rows(200)))
    test_ids = []
    for seed, name in ((1, "a"), (1, "b"), (2, "c")):
        prepare_recipe(make_recipe("classify", seed=seed, name=name, format="fpb", path=path), quiet=True)
        splits, _ = load_prepared(RunDir(here / "runs" / name), "main")
        test_ids.append(splits["test"]["id"])
    assert test_ids[0] == test_ids[1] != test_ids[2]


def test_limit_keeps_at_most_n_per_split_stratified(here):
    (result,) = prepare_fpb(here, n=400, limit=20)
    assert result.counts == {"train": 20, "validation": 20, "test": 20}
    assert result.label_histograms["train"] == {"negative": 5, "neutral": 10, "positive": 5}


def test_a_limit_on_train_alone_keeps_every_validation_and_test_row(here):
    """Few labels: 20 train rows, stratified; the validation and test splits are those of the run without a limit."""
    path = str(write_fpb(here / "fpb400.txt", fpb_rows(400)))
    (whole,) = prepare_recipe(make_recipe("classify", name="whole", format="fpb", path=path), quiet=True)
    (result,) = prepare_fpb(here, path=path, limit={"train": 20})
    assert result.counts == {"train": 20, "validation": whole.counts["validation"], "test": whole.counts["test"]}
    assert result.label_histograms["train"] == {"negative": 5, "neutral": 10, "positive": 5}
    for split in ("validation", "test"):
        assert list(load_prepared(RunDir(here / "runs" / "t"), "main")[0][split]["id"]) == \
            list(load_prepared(RunDir(here / "runs" / "whole"), "main")[0][split]["id"])
    with pytest.raises(Exception, match=r"data\.limit\.train: Input should be greater than 0"):
        make_recipe("classify", format="fpb", path="f.txt", limit={"train": 0})


def test_dedupe_counts_exact_duplicates(here):
    rows = fpb_rows(50)
    path = str(write_fpb(here / "f.txt", rows + rows[:3]))
    (result,) = prepare_fpb(here, path=path)
    assert result.duplicates == 3 and sum(result.counts.values()) == 50
    (kept,) = prepare_recipe(make_recipe("classify", name="keep", format="fpb", path=path, dedupe=False), quiet=True)
    assert kept.duplicates == 0 and sum(kept.counts.values()) == 53


@pytest.mark.parametrize(
    "mode, expected_label",
    [("first", "negative"), ("majority", "positive"), ("drop", None)],
)
def test_conflict_modes(here, mode, expected_label):
    rows = fpb_rows(40, labels=("neutral",), weights=(1,))
    rows += [("Shares fell .", "negative"), ("Shares fell .", "positive"), ("Shares fell .", "positive")]
    path = str(write_fpb(here / "f.txt", rows))
    with pytest.raises(DataError) as err:
        prepare_fpb(here, path=path)
    assert "'Shares fell .' has different labels: negative, positive" in err.value.message
    assert "on_conflict" in err.value.hint and nothing_written(here)
    (result,) = prepare_fpb(here, path=path, on_conflict=mode, split={"train": 1.0})
    assert result.conflicts == 1
    splits, _ = load_prepared(RunDir(here / "runs" / "t"), "main")
    labels = [
        label
        for text, label in zip(splits["train"]["text"], splits["train"]["label"], strict=True)
        if text == "Shares fell ."
    ]
    names = ["negative", "neutral", "positive"]
    assert labels == ([] if expected_label is None else [names.index(expected_label)])


def test_named_splits_are_kept_and_missing_ones_carved_from_train(here):
    train = write_jsonl(here / "train.jsonl", wino_rows(90))
    test = write_jsonl(here / "dev.jsonl", [r | {"qID": "d" + r["qID"]} for r in wino_rows(7)])
    (result,) = prepare_recipe(
        make_recipe("choice", format="winogrande", files={"train": str(train), "test": str(test)}), quiet=True
    )
    # validation is 0.1 / (0.8 + 0.1) of train; test is the given file.
    assert result.counts == {"train": 80, "validation": 10, "test": 7}
    assert result.label_histograms["validation"] == {"1": 5, "2": 5}


def test_empty_split_is_refused_with_a_hint(here):
    with pytest.raises(DataError, match="the test split is empty") as err:
        prepare_fpb(here, n=4)
    assert "data.split.test = 0" in err.value.hint
    (result,) = prepare_fpb(here, n=4, split={"train": 0.75, "validation": 0.25})
    assert result.counts == {"train": 3, "validation": 1}


# --------------------------------------------------------------------------- prepare: outputs, no-op, re-prepare


def test_prepare_writes_datasets_and_manifest(here):
    (result,) = prepare_fpb(here, n=100)
    run = RunDir(here / "runs" / "t")
    splits, manifest = load_prepared(run, "main")
    assert result.path == run.data("main") and not result.skipped and result.reason == "first prepare"
    assert {name: len(ds) for name, ds in splits.items()} == result.counts == manifest["counts"]
    assert set(splits["train"].features) == {"id", "text", "options", "label", "answers", "messages"}
    assert (
        manifest["format"] == "fpb"
        and manifest["sources"][0]["sha256"]
        and manifest["fingerprint"] == result.fingerprint
    )
    assert manifest["label_names"] == ["negative", "neutral", "positive"] and manifest["num_options"] == 0
    assert not [p for p in (run.root / "data").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_second_run_is_a_noop_and_changes_reprepare(here):
    path = str(write_fpb(here / "f.txt", fpb_rows(100)))
    prepare_fpb(here, path=path)
    (again,) = prepare_fpb(here, path=path)
    assert again.skipped and again.reason == "up to date (no changes)" and again.counts["train"] == 80
    write_fpb(here / "f.txt", fpb_rows(101))
    (changed,) = prepare_fpb(here, path=path)
    assert not changed.skipped and changed.reason == "changed: the source files"
    (config,) = prepare_fpb(here, path=path, limit=5)
    assert config.reason == "changed: the recipe's data section" and config.counts["train"] == 5
    (forced,) = prepare_recipe(make_recipe("classify", format="fpb", path=path, limit=5), force=True, quiet=True)
    assert not forced.skipped and forced.reason == "--force"


def test_incomplete_directory_is_not_taken_as_complete(here):
    out = here / "runs" / "t" / "data" / "main"
    out.mkdir(parents=True)
    (out / "dataset_dict.json").write_text("{}")  # crash leftovers: no manifest
    (result,) = prepare_fpb(here)
    assert result.reason == "previous output incomplete"
    (out / "dataset_dict.json").unlink()  # a manifest without the saved splits is incomplete too
    (result,) = prepare_fpb(here)
    assert result.reason == "previous output incomplete"


def test_load_prepared_missing_says_run_prepare(here):
    with pytest.raises(DataError) as err:
        load_prepared(RunDir(here / "runs" / "t"), "main")
    assert "missing" in err.value.message and err.value.hint == "run kd prepare RECIPE"


def test_stages_with_their_own_data(here):
    small = write_fpb(here / "small.txt", fpb_rows(40))
    big = write_fpb(here / "big.txt", fpb_rows(80))
    raw = {
        "name": "t",
        "task": "classify",
        "student": {"ref": "s"},
        "loss": {"alpha": 1.0},
        "data": {"format": "fpb", "path": str(small)},
        "stages": [{"name": "one"}, {"name": "two", "data": {"path": str(big)}}],
    }
    one, two = prepare_recipe(validate(raw), quiet=True)
    assert (one.stage, sum(one.counts.values())) == ("one", 40)
    assert (two.stage, sum(two.counts.values())) == ("two", 80)


# --------------------------------------------------------------------------- a stage's rows, read from disk


def _stage_rows(here, n: int):
    from kdcli.data.stage import stage_data

    recipe = make_recipe("classify", format="fpb", path=str(write_fpb(here / "fpb.txt", fpb_rows(n))))
    run = RunDir.for_recipe(recipe)
    data = stage_data(recipe, run, recipe.resolved_stages()[0])
    splits, _ = load_prepared(run, "main")
    return data, splits


def test_stage_rows_are_the_prepared_rows_with_their_index_in_any_access(here, monkeypatch):
    from kdcli.data import stage

    monkeypatch.setattr(stage, "_READ_AHEAD", 7)  # passes in order cross several read-ahead chunks
    data, splits = _stage_rows(here, 100)
    for name, split in splits.items():
        expected = [dict(row, idx=i, messages=[]) for i, row in enumerate(split.to_list())]
        rows = data.rows[name]
        assert len(rows) == len(expected) > 7 and list(rows) == expected, name
        assert [rows[i] for i in range(len(rows))] == expected and rows[-1] == expected[-1], name
        assert rows[3:11] == expected[3:11] and rows[::3] == expected[::3] and rows[5:2] == [], name
        with pytest.raises(IndexError):
            rows[len(rows)]
    train = data.rows["train"]
    share = train.share([9, 2, 5])
    assert list(share) == [expected_row for expected_row in (train[9], train[2], train[5])]
    assert [row["idx"] for row in share.share([2, 0])] == [5, 9]  # a share of a share keeps the split's indices
    labels = [row["label"] for row in train]
    assert data.label_prior == [labels.count(k) / len(labels) for k in range(3)]


def test_a_stage_s_rows_are_not_held_in_memory(here):
    """A split is read from its memory-mapped file as rows are asked for: an open stage of 6,000 rows
    holds far less than the Python dicts of its rows, and nothing that grows with them."""
    import tracemalloc

    from kdcli.data.stage import stage_data

    recipe = make_recipe("classify", format="fpb", path=str(write_fpb(here / "fpb.txt", fpb_rows(6000))))
    run, stage = RunDir.for_recipe(recipe), recipe.resolved_stages()[0]
    stage_data(recipe, run, stage)  # prepares, and imports what opening a stage imports
    tracemalloc.start()
    data = stage_data(recipe, run, stage)
    opened = tracemalloc.get_traced_memory()[0]
    as_dicts = load_prepared(run, "main")[0]["train"].to_list()
    dicts = tracemalloc.get_traced_memory()[0] - opened
    tracemalloc.stop()
    assert len(data.rows["train"]) == len(as_dicts) > 4000
    assert opened < dicts / 10, (opened, dicts)
