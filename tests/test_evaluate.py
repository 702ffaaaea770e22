"""The metric functions of `kd eval`: against scikit-learn, hand-computed cases and the SQuAD rules."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from kdcli.evaluate import evaluate_role
from kdcli.metrics import (
    answer_histogram,
    classification_metrics,
    exact_match,
    generation_metrics,
    shortcut_warning,
    squad_normalize,
    token_f1,
)
from kdcli.recipe import validate
from kdcli.roles import BASELINE, Role, describe

NAMES = ["positive", "negative", "neutral", "unused"]


def test_classification_metrics_by_hand():
    m = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], NAMES[:3])
    assert m["n"] == 5 and m["accuracy"] == pytest.approx(0.6)
    assert m["per_class"]["positive"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "predicted": 2}
    )
    assert m["per_class"]["negative"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2, "predicted": 3}
    )
    assert m["per_class"]["neutral"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 0}
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn(seed):
    rng = random.Random(seed)
    # Four names, three used: the unused class must not dilute the macro averages (sklearn's rule).
    gold = [rng.randrange(3) for _ in range(60)]
    pred = [g if rng.random() < 0.6 else rng.randrange(2) for g in gold]  # class 2 is under-predicted
    m = classification_metrics(gold, pred, NAMES)
    precision, recall, f1, _ = precision_recall_fscore_support(gold, pred, average="macro", zero_division=0)
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((precision, recall, f1))
    per_p, per_r, per_f, support = precision_recall_fscore_support(gold, pred, labels=[0, 1, 2, 3], zero_division=0)
    for c, name in enumerate(NAMES):
        assert m["per_class"][name] == pytest.approx(
            {"precision": per_p[c], "recall": per_r[c], "f1": per_f[c], "support": support[c],
             "predicted": pred.count(c)}
        )
    assert m["confusion"] == confusion_matrix(gold, pred, labels=[0, 1, 2, 3]).tolist()


def test_answer_histogram():
    assert answer_histogram([1, 1, 0, 3], 4) == [1, 2, 0, 1]


def test_role_text_round_trips():
    for text in ("student", "dataset", "baseline", "teacher:fin", "student:fin", "runs/x/student", "package:m/model"):
        assert str(Role.parse(text)) == text
    assert Role.parse("student:fin").trained and Role.parse("student:fin").teacher == "fin"
    assert not Role.parse("teacher:fin").trained and Role.parse("teacher:fin").teacher == "fin"
    assert Role.parse("runs/x/student").kind == "model"


def test_shortcut_fires_on_a_collapsed_predictor_only():
    gold = [0, 1] * 50
    collapsed = shortcut_warning(gold, [1] * 100, ["1", "2"])
    assert collapsed is not None and "'2' for 100%" in collapsed and "50%" in collapsed
    balanced = [g if i % 5 else 1 - g for i, g in enumerate(gold)]  # 80% right, errors both ways
    assert shortcut_warning(gold, balanced, ["1", "2"]) is None


@pytest.mark.parametrize(
    "answers, gold_share, pred_share, fires",
    [
        (3, 0.62, 0.75, False),  # a dominant class predicted somewhat more often: +0.13, 1.2x
        (3, 0.62, 0.85, True),   # +0.23 over its gold share
        (5, 0.20, 0.35, True),   # one of five options: 1.75x and +0.15
        (5, 0.20, 0.26, False),  # 1.3x
        (10, 0.06, 0.12, False),  # 2x, but only +0.06: noise when every answer is rare
    ],
)
def test_shortcut_rule(answers, gold_share, pred_share, fires):
    """Answer 0 gets the given share; the rest is spread evenly, so answer 0 is the most predicted."""
    n = 100

    def labels(share: float) -> list[int]:
        top = round(share * n)
        return [0] * top + [1 + i % (answers - 1) for i in range(n - top)]

    names = [str(k) for k in range(1, answers + 1)]
    assert (shortcut_warning(labels(gold_share), labels(pred_share), names) is not None) is fires


@pytest.mark.parametrize(
    "text, normalised",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  A  cat's\ttoy. ", "cats toy"),
        ("an apple, the pear and a plum", "apple pear and plum"),
        ("Banana theatre Anthem", "banana theatre anthem"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_squad_normalize(text, normalised):
    assert squad_normalize(text) == normalised


def test_exact_match_takes_any_alias():
    assert exact_match("The Beatles.", ["Rolling Stones", "beatles"]) == 1.0
    assert exact_match("Beatles band", ["beatles"]) == 0.0
    assert exact_match("", ["x"]) == 0.0


def test_token_f1_best_alias_and_edge_cases():
    assert token_f1("the cat sat", ["cat sat on the mat"]) == pytest.approx(
        {"f1": 2 / 3, "precision": 1.0, "recall": 0.5}
    )
    assert token_f1("the cat sat", ["dog", "cat sat"]) == {"f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert token_f1("cat cat", ["cat"]) == pytest.approx({"f1": 2 / 3, "precision": 0.5, "recall": 1.0})  # counts clip
    assert token_f1("dog", ["cat"]) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}
    assert token_f1("the", ["a"])["f1"] == 1.0  # both normalise to nothing: SQuAD scores that a match
    assert token_f1("", ["paris"])["f1"] == 0.0
    with pytest.raises(ValueError):
        token_f1("x", [])


def test_generation_metrics_average_over_questions():
    m = generation_metrics(["Paris", "the cat sat", "no idea"], [["paris"], ["cat sat on mat"], ["London", "Londres"]])
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert m["precision"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert m["recall"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_role_description():
    recipe = {"student": {"from_teacher": "big", "layers": [0, 2]},
              "teachers": {"big": {"ref": "/models/bert-base", "finetune": {"epochs": 1}},
                           "fin": {"ref": "ProsusAI/finbert"}}}
    assert describe(recipe, Role.parse("teacher:big")) == "bert-base (fine-tuned)"
    assert describe(recipe, Role.parse("teacher:fin")) == "ProsusAI/finbert"
    assert describe(recipe, Role.parse("baseline")) == "big layers [0, 2]"
    assert describe(recipe, Role.parse("student")) == "big layers [0, 2], distilled"
    assert (describe({"student": {"ref": "distilbert-base-uncased"}}, Role.parse("dataset"))
            == "distilbert-base-uncased, labels only")


def test_choice_eval_counts_answers_and_compares_with_the_teacher(tiny, tmp_path, monkeypatch):
    """A multiple-choice encoder as baseline and teacher, no training: the eval's choice-only parts."""
    import json

    monkeypatch.chdir(tmp_path)
    model = tiny("bert", "multiple-choice", num_labels=1)
    other = tiny("bert", "multiple-choice", num_labels=1, seed=1)
    with open("qa.jsonl", "w") as handle:
        for i in range(30):
            handle.write(json.dumps({"text": f"Question {i}: is the outlook for the year raised?",
                                     "a": "yes", "b": f"no, {i} times", "label": i % 2}) + "\n")
    recipe = validate({
        "name": "mc", "task": "choice",
        "data": {"format": "jsonl", "path": "qa.jsonl", "columns": {"options": ["a", "b"]}},
        "student": {"ref": str(model)}, "teachers": {"t": {"ref": str(other)}}, "loss": {"alpha": 1.0},
        "eval": {"examples": 1, "split": "validation"},
    })
    result = evaluate_role(recipe, BASELINE)
    assert result["split"] == "validation" and result["metrics"]["label_names"] == ["1", "2"]
    assert sum(result["answer_histogram"].values()) == result["n"] == sum(result["gold_histogram"].values())
    assert all(count > 0 for count in result["gold_histogram"].values())  # the stratified split keeps both answers
    assert set(result["agreement"]) == {"t"}
    for case in result["disagreements"]:
        assert (case["teacher_answer"] in ("1. yes", f"2. {case['options'][1]}")
                and case["teacher_answer"] != case["model_answer"])
    assert (json.loads((tmp_path / "runs/mc/eval/baseline.json").read_text())["answer_histogram"]
            == result["answer_histogram"])


@pytest.mark.slow
def test_eval_on_a_file_scores_its_rows_as_the_same_rows_of_a_split_and_needs_no_train_split(here, tiny):
    import json
    from pathlib import Path

    import jobs
    from clirun import kd

    model = tiny("bert", "sequence-classification")
    recipe = jobs.write_classify_run(here, model, name="f", rows=80, loss={"alpha": 0.5}, train={"max_steps": 1})
    by_split = json.loads(kd("eval", str(recipe), "--model", "teacher:t", "--json").stdout)
    from kdcli import recipe as recipe_mod
    from kdcli.data.stage import stage_data
    from kdcli.rundir import RunDir

    loaded = recipe_mod.load(recipe, [])
    test = stage_data(loaded, RunDir.for_recipe(loaded), loaded.resolved_stages()[0]).rows["test"]
    names = jobs.LABELS
    Path("test.csv").write_text("sentence,gold\n" + "".join(f'"{row["text"]}",{names[row["label"]]}\n'
                                                            for row in test))
    by_file = json.loads(kd("eval", str(recipe), "--model", "teacher:t", "--data", "test.csv", "--format", "csv",
                            "--set", 'data.columns={text="sentence", label="gold"}', "--json").stdout)
    assert by_file["n"] == by_split["n"] == len(test) and by_file["split"] == "file"
    assert by_file["metrics"] == by_split["metrics"]
    assert by_file["data"] == {"path": str(Path("test.csv").resolve()), "format": "csv"}
    saved = Path(by_file["path"])
    assert saved.parent.parent == here / "runs" / "f" / "eval" / "files" and saved.name == "teacher-t.json"
    assert json.loads(saved.read_text())["metrics"] == by_split["metrics"]
    assert "file" not in kd("compare", str(recipe), "--format", "csv").stdout  # compare reads split results only

    # A new user's recipe: no train data at all, a model path, a file to score.
    jobs.write_recipe("only-eval.toml", {"name": "e", "task": "classify", "student": {"ref": str(model)},
                                         "data": {"format": "csv", "path": "nowhere.csv", "label_names": names,
                                                  "columns": {"text": "sentence", "label": "gold"}}})
    alone = json.loads(kd("eval", "only-eval.toml", "--model", str(model), "--data", "test.csv", "--json").stdout)
    assert alone["metrics"]["accuracy"] == by_split["metrics"]["accuracy"] and not Path("runs/e/data").exists()


def test_eval_format_without_a_data_file_or_an_unknown_one_is_a_clear_error(here):
    import jobs
    from clirun import kd

    jobs.write_recipe("r.toml", {"name": "r", "task": "classify", "student": {"ref": "m"},
                                 "data": {"format": "jsonl", "path": "x.jsonl", "label_names": ["a", "b"]}})
    assert "--format is the format of a --data file" in kd("eval", "r.toml", "--format", "csv", code=1).stderr
    open("f.txt", "w").close()
    result = kd("eval", "r.toml", "--data", "f.txt", "--format", "xml", code=1)
    assert "--format 'xml' is not a file format" in result.stderr and "csv" in result.stderr
