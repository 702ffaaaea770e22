"""The bad-input catalogue: every mistake a user can make in a recipe, a data file or a model
reference gives `error:` and `hint:` on stderr, exit 1, no traceback, and writes nothing.

One table, run through the real CLI (typer's CliRunner on ``kdcli.cli.app``) in an empty
directory. Recipe and data cases run `kd prepare` (or `kd check` where the recipe alone is at
fault); model cases run `kd distill` after the data has been prepared, and must leave the run
directory exactly as it was (the run lock's `.lock` file aside).

docs/reliability.md lists the cases and what kd says for each.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import jobs
from clirun import kd

LABELS = ["negative", "neutral", "positive"]


def _sentences(n: int = 40) -> str:
    return "".join(json.dumps({"text": r["text"], "label": LABELS[r["label"]]}) + "\n" for r in jobs.rows(n, seed=5))


def _wino(n: int = 30, answer: bool = True) -> str:
    rows = [
        {"qID": f"q{i}", "sentence": f"Ann gave Bea {i} apples because _ was kind.", "option1": "Ann", "option2": "Bea"}
        | ({"answer": str(1 + i % 2)} if answer else {})
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _siqa(n: int = 30) -> str:
    return "".join(
        json.dumps({"context": f"Tracy went to shop {i}.", "question": "Why?",
                    "answerA": "milk", "answerB": "bread", "answerC": "eggs"}) + "\n"
        for i in range(n)
    )


def _aqua(n: int = 30, options: list[str] | None = None, correct: str = "B") -> str:
    opts = options or ["A)1", "B)2", "C)3", "D)4", "E)5"]
    return "".join(
        json.dumps({"question": f"What is {i} + 1?", "options": opts, "rationale": "", "correct": correct}) + "\n"
        for i in range(n)
    )


def _trivia(n: int = 30) -> str:
    return "".join(
        json.dumps({"context": f"Question: what is number {i}?\nAnswer:", "answer": str(i), "aliases": [str(i)]}) + "\n"
        for i in range(n)
    )


def _fpb(n: int = 30, label: str | None = None) -> bytes:
    cycle = ["negative", "neutral", "positive"]
    return "".join(f"Sentence {i} about profit .@{label or cycle[i % 3]}\r\n" for i in range(n)).encode("latin-1")


def _csv(n: int = 30) -> str:
    return "text,label\n" + "".join(f"sentence {i} about sales,{LABELS[i % 3]}\n" for i in range(n))


BASE: dict[str, Any] = {
    "name": "bad",
    "task": "classify",
    "data": {"format": "jsonl", "path": "s.jsonl", "label_names": LABELS},
    "student": {"ref": "@bert3"},
    "teachers": {"t": {"ref": "@bert3"}},
    "loss": {"alpha": 0.5},
    "train": {"max_steps": 2, "batch_size": 4, "eval_every": 8, "checkpoint_every": 8},
}


def _set(path: str, value: Any) -> Callable[[dict], dict]:
    """A recipe edit: set (or, with value DELETE, remove) one dotted key."""

    def edit(recipe: dict) -> dict:
        *parents, last = path.split(".")
        node = recipe
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
        return recipe

    return edit


DELETE = object()


def _edits(*edits: Callable[[dict], dict]) -> Callable[[dict], dict]:
    def edit(recipe: dict) -> dict:
        for e in edits:
            recipe = e(recipe)
        return recipe

    return edit


@dataclass
class Case:
    id: str
    expect: str  # a fragment of the error line
    recipe: Callable[[dict], dict] | str | bytes | None = None  # an edit of BASE, or the raw recipe file
    files: dict[str, str | bytes] = field(default_factory=dict)
    command: str = "prepare"
    args: tuple[str, ...] = ()


RECIPE_CASES = [
    Case("unknown top-level key", "nmae: unknown key (did you mean 'name'?)", _set("nmae", "x")),
    Case("unknown nested key", "train.lrr: unknown key (did you mean 'lr'?)", _set("train.lrr", 1e-4)),
    Case("string for an integer", "train.batch_size: expected an integer, got '16'", _set("train.batch_size", "16")),
    Case("string for a boolean", "data.dedupe: expected a boolean", _set("data.dedupe", "yes")),
    Case("negative learning rate", "train.lr", _set("train.lr", -1.0)),
    Case("alpha above one", "loss.alpha", _set("loss.alpha", 1.5)),
    Case("zero batch size", "train.batch_size", _set("train.batch_size", 0)),
    Case("split fractions not summing to one", "split fractions sum to 1.1",
         _set("data.split", {"train": 0.8, "validation": 0.2, "test": 0.1})),
    Case("missing name", "name: required key is missing", _set("name", DELETE)),
    Case("missing data table", "data: required key is missing", _set("data", DELETE)),
    Case("unknown task", "task", _set("task", "summarise")),
    Case("unknown data format", "data.format", _set("data.format", "xlsx")),
    Case("student with ref and from_teacher", "give exactly one of `ref`", _set("student.from_teacher", "t")),
    Case("from_teacher names no teacher", "no teacher named 'ghost'",
         _edits(_set("student.ref", DELETE), _set("student.from_teacher", "ghost"), _set("student.layers", [0]))),
    Case("stage uses an unknown teacher", "stages.0.teachers: no teacher named 'ghost'",
         _set("stages", [{"name": "one", "teachers": ["ghost"]}])),
    Case("duplicated stage names", "stage name 'one' is used twice",
         _set("stages", [{"name": "one"}, {"name": "one"}])),
    Case("duplicated student layers", "layers must be distinct",
         _edits(_set("student.ref", DELETE), _set("student.from_teacher", "t"), _set("student.layers", [0, 0]))),
    Case("negative layer in a layer map", "layer indices are 0-based",
         _set("teachers.t.hidden", {"map": "pairs", "pairs": [[0, -1]]})),
    Case("hidden loss without a layer map", "hidden MSE needs a teacher with a `hidden` layer map",
         _set("loss.beta", 1.0)),
    Case("teacher term without teachers", "gives weight to a teacher term", _set("teachers", {})),
    Case("head that cannot do the task", "student.head: 'causal' cannot do task 'classify'",
         _set("student.head", "causal")),
    Case("8-bit and 4-bit at once", "choose one of load_in_8bit and load_in_4bit",
         _edits(_set("teachers.t.load_in_8bit", True), _set("teachers.t.load_in_4bit", True))),
    Case("GGUF teacher in 8-bit, not fine-tuned", "gguf_file with load_in_8bit: transformers dequantises a GGUF file",
         _edits(_set("teachers.t.gguf_file", "model.gguf"), _set("teachers.t.load_in_8bit", True)), command="check"),
    Case("search key that does not exist", "search.train.lrr: no such recipe key",
         _set("search", {"train.lrr": {"uniform": [0.1, 0.2]}})),
    Case("run name with '..'", "name: '../elsewhere' is not a plain name", _set("name", "../elsewhere")),
    Case("run name with a slash", "name: 'a/b' is not a plain name", _set("name", "a/b")),
    Case("stage name that climbs out of the run", "stages.0.name: '../../../x' is not a plain name",
         _set("stages", [{"name": "../../../x"}])),
    Case("teacher name with a slash", "the teacher name '../t' is not a plain name",
         _edits(_set("teachers", {"../t": {"ref": "@bert3"}}))),
    Case("output_dir outside the current directory", "is outside the current directory",
         _set("output_dir", "/tmp/kd-elsewhere")),
    Case("template with an unknown placeholder", "data.template: unknown placeholder {question}",
         _set("data.template", "Q: {question}")),
    Case("template with an unbalanced brace", "data.template: expected '}' before end of string",
         _set("data.template", "Q: {text")),
    Case("invalid TOML", "invalid TOML", 'name = "x"\ntask = \n'),
    Case("duplicated TOML key", "invalid TOML", 'name = "x"\nname = "y"\n'),
    Case("recipe not UTF-8", "not UTF-8 text", b'name = "caf\xe9"\n'),
    Case("empty recipe", "required key is missing", ""),
    Case("recipe file missing", "no recipe file at", None, args=("nowhere.toml",)),
    Case("--set without '='", "expected KEY.PATH=VALUE", None, args=("recipe.toml", "--set", "train.lr")),
    Case("--set of an unknown key", "train.lrr: unknown key", None, args=("recipe.toml", "--set", "train.lrr=1e-4")),
    Case("--set into a value", "train.batch_size is a value, not a table", None,
         args=("recipe.toml", "--set", "train.batch_size.x=1")),
    Case("negative seed", "seed: Input should be greater than or equal to 0", _set("seed", -1)),
    Case("seed above 2**32 - 1", "seed: Input should be less than or equal to 4294967295",
         _set("seed", 99999999999999999999)),
    Case("infinite epochs", "train.epochs: expected a finite number, got inf",
         _edits(_set("train.epochs", float("inf")), _set("train.max_steps", DELETE))),
    Case("nan in a search space", "search.train.lr.uniform.1: expected a finite number, got nan",
         _set("search", {"train.lr": {"uniform": [0.1, float("nan")]}})),
    Case("--set of inf", "loss.temperature: expected a finite number, got inf", None,
         args=("recipe.toml", "--set", "loss.temperature=inf")),
]

DATA_CASES = [
    Case("data file missing", "data file not found: missing.jsonl", _set("data.path", "missing.jsonl")),
    Case("integer labels far beyond a class index", "label 1000000000000 would make 1,000,000,000,001 classes",
         _set("data.label_names", DELETE),
         files={"s.jsonl": "".join(json.dumps({"text": f"row {i}", "label": i % 3}) + "\n" for i in range(30))
                + json.dumps({"text": "an amount", "label": 10**12}) + "\n"}),
    Case("files without a train split", "files needs a train split",
         _edits(_set("data.path", DELETE), _set("data.files", {"test": "s.jsonl"}))),
    Case("hub without hub_name", "format = 'hub' needs hub_name",
         _edits(_set("data.path", DELETE), _set("data.format", "hub"))),
    Case("wrong encoding", "not valid utf-8 text (byte 0xe9)", None,
         files={"s.jsonl": '{"text": "caf\xe9", "label": "neutral"}\n'.encode("latin-1")}),
    Case("unknown encoding name", "unknown text encoding 'klingon'", _set("data.encoding", "klingon")),
    Case("binary file", "is not a text file (it contains NUL bytes)", None,
         files={"s.jsonl": b"\x00\x01\x02PK\x03\x04" * 50}),
    Case("malformed JSON line", "s.jsonl:2: not valid JSON", None,
         files={"s.jsonl": '{"text": "a", "label": "neutral"}\n{"text": "b", "label"\n'}),
    Case("JSON line that is not an object", "s.jsonl:1: expected a JSON object, got list", None,
         files={"s.jsonl": '["a", "neutral"]\n'}),
    Case("unknown label", "unknown label 'bullish'", None,
         files={"s.jsonl": _sentences().replace('"neutral"', '"bullish"')}),
    Case("empty data file", "no examples in the source file", None, files={"s.jsonl": ""}),
    Case("data file of blank lines", "no examples in the source file", None, files={"s.jsonl": "\n  \n\r\n"}),
    Case("huge line", "characters long (limit 1,000,000)", None,
         files={"s.jsonl": '{"text": "' + "x" * 1_000_100 + '", "label": "neutral"}\n'}),
    Case("missing text column", "no value in column 'text'", None,
         files={"s.jsonl": '{"sentence": "a", "label": "neutral"}\n'}),
    Case("text that is not a string", "column 'text' should be non-empty text", None,
         files={"s.jsonl": '{"text": 42, "label": "neutral"}\n'}),
    Case("duplicated ids", "id '7' is already used", _set("data.columns", {"id": "id"}),
         files={"s.jsonl": '{"id": 7, "text": "a", "label": "neutral"}\n{"id": 7, "text": "b", "label": "neutral"}\n'}),
    Case("one text with two labels", "has different labels", None,
         files={"s.jsonl": '{"text": "a", "label": "neutral"}\n{"text": "a", "label": "positive"}\n'}),
    Case("class listed twice in label_names", "lists a class twice", _set("data.label_names", ["a", "b", "a"])),
    Case("too little data for the splits", "split is empty", None,
         files={"s.jsonl": '{"text": "only one", "label": "neutral"}\n'}),
    Case("fpb line without '@'", "expected `sentence@label`",
         _edits(_set("data.format", "fpb"), _set("data.path", "f.txt"), _set("data.label_names", DELETE)),
         files={"f.txt": b"no separator here\r\n"}),
    Case("fpb unknown label", "unknown label 'bullish'",
         _edits(_set("data.format", "fpb"), _set("data.path", "f.txt"), _set("data.label_names", DELETE)),
         files={"f.txt": _fpb(label="bullish")}),
    Case("fpb re-encoded as UTF-8", "looks like UTF-8",
         _edits(_set("data.format", "fpb"), _set("data.path", "f.txt"), _set("data.label_names", DELETE)),
         files={"f.txt": "Sales in Espoo were \xe4 up .@positive\r\n".encode("utf-8")}),
    Case("format that does not fit the task", "is a choice dataset",
         _edits(_set("data.format", "winogrande"), _set("data.path", "w.jsonl"), _set("data.label_names", DELETE)),
         files={"w.jsonl": _wino()}),
    Case("label file of the wrong length", "has 29 labels for 30 rows",
         _edits(_set("task", "choice"), _set("data.format", "winogrande"), _set("data.path", "w.jsonl"),
                _set("data.label_names", DELETE), _set("data.labels_path", "w-l.lst"),
                _set("teachers.t.head", "multiple-choice"), _set("student.head", "multiple-choice")),
         files={"w.jsonl": _wino(answer=False), "w-l.lst": "1\n" * 29}),
    Case("label file disagrees with the answers", "disagrees with",
         _edits(_set("task", "choice"), _set("data.format", "winogrande"), _set("data.path", "w.jsonl"),
                _set("data.label_names", DELETE), _set("data.labels_path", "w-l.lst")),
         files={"w.jsonl": _wino(), "w-l.lst": "2\n1\n" * 15}),
    Case("social iqa without its label file", "no label file for",
         _edits(_set("task", "choice"), _set("data.format", "socialiqa"), _set("data.path", "q.jsonl"),
                _set("data.label_names", DELETE)),
         files={"q.jsonl": _siqa()}),
    Case("social iqa label out of range", "unknown label '4' (expected one of 1, 2, 3)",
         _edits(_set("task", "choice"), _set("data.format", "socialiqa"), _set("data.path", "q.jsonl"),
                _set("data.label_names", DELETE)),
         files={"q.jsonl": _siqa(), "q-labels.lst": "1\n2\n4\n" * 10}),
    Case("aqua option without its letter", "option 2 should start with 'B)'",
         _edits(_set("task", "choice"), _set("data.format", "aqua"), _set("data.path", "a.jsonl"),
                _set("data.label_names", DELETE)),
         files={"a.jsonl": _aqua(options=["A)1", "2", "C)3"])}),
    Case("aqua answer letter out of range", "unknown label 'F'",
         _edits(_set("task", "choice"), _set("data.format", "aqua"), _set("data.path", "a.jsonl"),
                _set("data.label_names", DELETE)),
         files={"a.jsonl": _aqua(correct="F")}),
    Case("triviaqa row of another dataset", "not a TriviaQA row",
         _edits(_set("task", "generate"), _set("data.format", "triviaqa"), _set("data.path", "t.jsonl"),
                _set("data.label_names", DELETE), _set("student.head", "seq2seq"), _set("teachers", {}),
                _set("loss.alpha", 1.0)),
         files={"t.jsonl": _sentences()}),
    Case("choice label out of range", "unknown label 5 for 2 options",
         _edits(_set("task", "choice"), _set("data.columns", {"options": ["a", "b"]}),
                _set("data.label_names", DELETE)),
         files={"s.jsonl": '{"text": "q", "a": "x", "b": "y", "label": 5}\n'}),
    Case("choice without option columns", "data.columns.options is empty",
         _edits(_set("task", "choice"), _set("data.label_names", DELETE))),
    Case("generate row without an answer", "no value in column 'answer'",
         _edits(_set("task", "generate"), _set("data.columns", {"answers": "answer"}), _set("data.label_names", DELETE),
                _set("student.head", "seq2seq"), _set("teachers", {}), _set("loss.alpha", 1.0)),
         files={"s.jsonl": '{"text": "q"}\n'}),
    Case("parquet file that is not parquet", "not a readable parquet file",
         _edits(_set("data.format", "parquet"), _set("data.path", "p.parquet")),
         files={"p.parquet": b"PAR1 but not really"}),
    Case("csv with an unknown label", "unknown label 'bullish'",
         _edits(_set("data.format", "csv"), _set("data.path", "c.csv")),
         files={"c.csv": _csv().replace("neutral", "bullish")}),
    Case("labels_path for a format without label files", "data.labels_path is not read for format 'jsonl'",
         _set("data.labels_path", "s.jsonl")),
    Case("package: path to a package that is not installed", "no installed package 'kd_no_such_pkg'",
         _set("data.path", "package:kd_no_such_pkg/data.jsonl")),
    Case("data path is a directory", "data file not found", _set("data.path", ".")),
    Case("csv field over the line limit", "c.csv:2: line is 1,000,100 characters long (limit 1,000,000)",
         _edits(_set("data.format", "csv"), _set("data.path", "c.csv")),
         files={"c.csv": "text,label\n" + "x" * 1_000_092 + ",neutral\n" + _csv()[len("text,label\n"):]}),
    Case("lone surrogate in JSON text", "s.jsonl:41: text contains a lone surrogate (\\ud800)", None,
         files={"s.jsonl": _sentences() + '{"text": "caf\\ud800", "label": "neutral"}\n'}),
    Case("JSON nested 100,000 levels deep", "s.jsonl:41: JSON nested too deeply to read", None,
         files={"s.jsonl": _sentences() + '{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}\n"}),
    Case("label number with 5000 digits", "s.jsonl:41: a number with more than 4,300 digits", None,
         files={"s.jsonl": _sentences() + '{"text": "a", "label": ' + "1" * 5000 + "}\n"}),
    Case("label string of 5000 digits", "s.jsonl:41: unknown label '11111", None,
         files={"s.jsonl": _sentences() + '{"text": "a", "label": "' + "1" * 5000 + '"}\n'}),
]

MODEL_CASES = [
    Case("teacher directory missing", "model ./nope: nope is not a directory", _set("teachers.t.ref", "./nope"),
         command="distill"),
    Case("student directory missing", "is not a directory", _set("student.ref", "./no-student"), command="distill"),
    Case("model directory without config.json", "has no config.json", _set("teachers.t.ref", "@noconfig"),
         command="distill"),
    Case("config.json that is not JSON", "is not a valid JSON file", _set("teachers.t.ref", "@badconfig"),
         command="distill"),
    Case("weights file truncated", "damaged", _set("teachers.t.ref", "@truncated"), command="distill"),
    Case("weights file that is a pickle with code", "weights", _set("teachers.t.ref", "@pickled"), command="distill"),
    Case("teacher with a head for another task", "has no trained sequence-classification head",
         _set("teachers.t.ref", "@t5"), command="distill"),
    Case("teacher head with too few labels", "its classification head has 2 labels, the task has 3",
         _set("teachers.t.ref", "@bert2"), command="distill"),
    Case("student layers out of range", "student.layers [7]",
         _edits(_set("student.ref", DELETE), _set("student.from_teacher", "t"), _set("student.layers", [0, 7])),
         command="distill"),
    Case("layer map out of range", "teacher layer 9 is out of range",
         _edits(_set("teachers.t.hidden", {"map": "pairs", "pairs": [[0, 9]]}), _set("loss.beta", 1.0)),
         command="distill"),
    Case("model that needs trust_remote_code", "needs the code in its repository to run",
         _set("teachers.t.ref", "@remote"), command="distill"),
    Case("gguf file that is not there", "has no missing.gguf", _set("teachers.t.gguf_file", "missing.gguf"),
         command="distill"),
    Case("package: model that is not installed", "no installed package named 'kd_no_such_model'",
         _set("teachers.t.ref", "package:kd_no_such_model/m"), command="distill"),
    Case("fine-tuned teacher missing for eval", "has a finetune table but has not been fine-tuned yet",
         _set("teachers.t.finetune", {"epochs": 1.0}), command="eval", args=("--model", "teacher:t")),
    Case("eval of a teacher the recipe does not have", "no teacher named 'ghost'", None, command="eval",
         args=("--model", "teacher:ghost")),
    Case("vocabularies that differ for token-level KD", "do not share a vocabulary",
         _edits(_set("task", "generate"), _set("data.columns", {"answers": "answer"}), _set("data.label_names", DELETE),
                _set("student.ref", "@t5"), _set("teachers.t.ref", "@llama"), _set("loss.alpha", 0.5)),
         files={"s.jsonl": "".join(json.dumps({"text": f"what is {i}?", "answer": str(i)}) + "\n" for i in range(40))},
         command="distill"),
]

CASES = RECIPE_CASES + DATA_CASES + MODEL_CASES


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    import kit

    root = tmp_path_factory.mktemp("bad-input-models")
    found = {
        "@bert3": kit.make_model_dir(root, "bert", "sequence-classification", num_labels=3, layers=2),
        "@bert2": kit.make_model_dir(root, "bert", "sequence-classification", num_labels=2, layers=2),
        "@t5": kit.make_model_dir(root, "t5", "seq2seq", layers=1),
        "@llama": kit.make_model_dir(root, "llama", "causal", layers=1),
    }
    (root / "noconfig").mkdir()
    (root / "noconfig" / "model.safetensors").write_bytes(b"")
    found["@noconfig"] = root / "noconfig"
    bad = root / "badconfig"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    found["@badconfig"] = bad
    found["@remote"] = remote_code_model(root / "remote", root / "REMOTE_CODE_RAN")
    truncated = root / "truncated"
    shutil.copytree(found["@bert3"], truncated)
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:1000])
    found["@truncated"] = truncated
    pickled = root / "pickled"
    shutil.copytree(found["@bert3"], pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"bert.embeddings.word_embeddings.weight": _Payload(root / "REMOTE_CODE_RAN")},
               pickled / "pytorch_model.bin")
    found["@pickled"] = pickled
    return {k: str(v) for k, v in found.items()} | {"marker": str(root / "REMOTE_CODE_RAN")}


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))

    def __init__(self, marker: Path) -> None:
        self.marker = marker


def remote_code_model(path: Path, marker: Path) -> Path:
    """A model directory whose config needs its own Python module (auto_map), which would leave ``marker``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "kd-evil", "architectures": ["EvilForSequenceClassification"],
        "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"},
        "num_labels": 3,
    }))
    code = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n" \
           "from transformers import PretrainedConfig\n" \
           "class EvilConfig(PretrainedConfig):\n    model_type = 'kd-evil'\n"
    (path / "configuration_evil.py").write_text(code)
    (path / "modeling_evil.py").write_text(code)
    return path


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KD_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _fill(value: Any, models: dict[str, str]) -> Any:
    if isinstance(value, str):
        return models.get(value, value)
    if isinstance(value, dict):
        return {_fill(k, models): _fill(v, models) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, models) for v in value]
    return value


def write_case(case: Case, models: dict[str, str], root: Path) -> None:
    import copy

    (root / "s.jsonl").write_text(_sentences(), encoding="utf-8")
    for name, content in case.files.items():
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if isinstance(case.recipe, (str, bytes)):  # a broken file, written as it is
        raw = case.recipe if isinstance(case.recipe, bytes) else case.recipe.encode("utf-8")
        (root / "recipe.toml").write_bytes(raw)
    else:
        recipe = copy.deepcopy(BASE)
        if case.recipe is not None:
            recipe = case.recipe(recipe)
        jobs.write_recipe(root / "recipe.toml", _fill(recipe, models))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: size and modification time (the run lock's file aside)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and p.name != ".lock"
    }


def check_clean_failure(result, expect: str) -> None:
    text = result.stderr
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}"
    # not a crash
    assert isinstance(result.exception, SystemExit), f"{type(result.exception).__name__}: {result.exception}"
    assert "Traceback" not in result.output, result.output
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, text
    assert lines[-1].startswith("hint:") and len(lines[-1]) > len("hint: "), text
    assert expect in text, f"expected {expect!r} in:\n{text}"


def _params(cases: list[Case]) -> list:
    """Model cases load models and run `kd prepare` first: about a second each, so marked slow."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c in MODEL_CASES else []) for c in cases]


@pytest.mark.parametrize("case", _params(CASES))
def test_bad_input_is_a_clean_error_that_writes_nothing(case, models, here):
    write_case(case, models, here)
    command = case.command
    if command in ("distill", "eval"):
        # Model cases: the data is prepared first (it is fine); the failing command must not change the run.
        kd("prepare", "recipe.toml")
    before = snapshot(here)
    args = list(case.args) if case.args and case.args[0].endswith(".toml") else ["recipe.toml", *case.args]
    result = kd(command, *args, code=None)
    # One line per case (pytest -s): the source of the table in docs/reliability.md.
    print(f"CASE|{case.id}|kd {command}|"
          + "|".join(line for line in result.stderr.splitlines() if line.startswith(("error:", "hint:"))))
    check_clean_failure(result, case.expect)
    assert snapshot(here) == before, "the failed command wrote or changed files"
    assert not Path(models["marker"]).exists(), "a model's own code ran"
    if case in RECIPE_CASES or case in DATA_CASES:
        assert not (here / "runs").exists()


def test_the_catalogue_has_at_least_forty_cases():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def test_a_failed_distill_in_an_empty_directory_leaves_no_run_directory(models, here):
    """The run lock and the resolved recipe are written before the models are looked at; a command
    that fails there takes both back."""
    write_case(Case("x", "", _set("teachers.t.ref", "./nope")), models, here)
    result = kd("distill", "recipe.toml", code=None)
    check_clean_failure(result, "is not a directory")
    assert not (here / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("args", [["distill"], ["eval", "--model", "teacher:t"], ["bench", "--model", "teacher:t"]])
def test_a_first_command_that_fails_after_preparing_the_data_leaves_no_run_directory(args, models, here):
    """The pickled teacher is found only when its weights load, after the data was prepared."""
    write_case(Case("x", "", _set("teachers.t.ref", "@pickled")), models, here)
    result = kd(args[0], "recipe.toml", *args[1:], code=None)
    check_clean_failure(result, "weights")
    assert not (here / "runs").exists()


def test_a_failed_distill_does_not_rewrite_the_recipe_an_existing_run_was_made_with(models, here):
    write_case(Case("x", ""), models, here)
    kd("prepare", "recipe.toml")
    resolved = here / "runs" / "bad" / "recipe.resolved.toml"
    before = resolved.read_text()
    result = kd("distill", "recipe.toml", "--set", 'teachers.t.ref="./nope"', code=None)
    check_clean_failure(result, "is not a directory")
    assert resolved.read_text() == before


def test_eval_before_distill_writes_nothing(models, here):
    write_case(Case("x", ""), models, here)
    result = kd("eval", "recipe.toml", code=None)
    check_clean_failure(result, "there is no trained student model")
    assert not (here / "runs").exists()
