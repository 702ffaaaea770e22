"""`kd eval`: score one model on a split and save ``runs/NAME/eval/ROLE.json``.

The metrics are pure functions of predictions (``classification_metrics``,
``answer_histogram``, ``shortcut_warning``, ``squad_normalize``, ``exact_match``,
``token_f1``, ``generation_metrics``), so they are tested without any model.
``evaluate_role`` is the part with models: it loads the role, predicts the split of the
recipe's LAST stage (the student's final task), compares with every teacher of that
stage, and writes the result.

The saved JSON (what ``kd compare`` reads) has: ``role``, ``model`` (a description),
``ref`` (the weights loaded; a baseline cut from a teacher shows that teacher's), ``task``, ``stage``, ``split``, ``data_fingerprint``, ``n``,
``parameters``, ``seconds``, ``examples_per_second``, ``metrics`` (accuracy, f1,
precision, recall, per_class, confusion, label_names), ``answer_histogram`` (choice),
``shortcut`` (a warning or null), ``agreement`` ({teacher: rate}), ``agreement_skipped``
({teacher: why}), ``disagreements`` and ``env``.

For task ``generate`` the model answers with batched greedy decoding (``eval.max_new_tokens``,
left padding for causal models, the first line of the answer kept); ``metrics`` then holds
``exact_match``, ``f1``, ``precision`` and ``recall`` (SQuAD-normalised, best alias per
question), agreement is the share of questions where model and teacher give the same
normalised answer, and ``predictions`` lists every answer.
"""

from __future__ import annotations

import re
import string
import time
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from kdcli.errors import KdError, ModelError

if TYPE_CHECKING:
    from rich.console import Console

    from kdcli.models import TaskModel
    from kdcli.recipe import Recipe


# --------------------------------------------------------------------------- classify / choice metrics


def classification_metrics(gold: Sequence[int], pred: Sequence[int], label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, a per-class report and the confusion matrix.

    ``confusion[g][p]`` counts examples of gold class ``g`` predicted as ``p``. A class with
    no predictions has precision 0 (and no gold examples, recall 0). The macro averages
    leave out classes absent from both gold and predictions, as scikit-learn does, so the
    numbers match sklearn and the training loop's validation F1.
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    n_classes = len(label_names)
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_class: dict[str, dict[str, float]] = {}
    present = []
    for c, name in enumerate(label_names):
        true_positive = confusion[c][c]
        support = sum(confusion[c])
        predicted = sum(row[c] for row in confusion)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}
        if support or predicted:
            present.append(per_class[name])

    def macro(key: str) -> float:
        return sum(c[key] for c in present) / len(present) if present else 0.0

    n = len(gold)
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0,
        "f1": macro("f1"),
        "precision": macro("precision"),
        "recall": macro("recall"),
        "per_class": per_class,
        "confusion": confusion,
        "label_names": list(label_names),
    }


def answer_histogram(answers: Sequence[int], num_options: int) -> list[int]:
    """How many times each answer (0-based option index) was given."""
    counts = [0] * num_options
    for answer in answers:
        counts[answer] += 1
    return counts


# A model is "shortcutting" when it gives one answer far more often than the gold labels do
# (the study's student that always answered "2"). The rule looks at the most-predicted answer
# only: its share of predictions must exceed its share of gold labels by more than 0.2, or be
# more than 1.5 times that share while exceeding it by more than 0.1 (the floor keeps sampling
# noise on rare answers, e.g. 0.07 vs 0.04, from firing).
SHORTCUT_EXCESS = 0.2
SHORTCUT_RATIO = 1.5
SHORTCUT_RATIO_FLOOR = 0.1


def shortcut_warning(gold: Sequence[int], pred: Sequence[int], label_names: Sequence[str]) -> str | None:
    """A sentence describing the shortcut when the most-predicted answer is over-used, else None."""
    if not pred:
        return None
    n_classes = len(label_names)
    pred_share = [count / len(pred) for count in answer_histogram(pred, n_classes)]
    gold_share = [count / len(gold) for count in answer_histogram(gold, n_classes)]
    top = max(range(n_classes), key=lambda c: pred_share[c])
    excess = pred_share[top] - gold_share[top]
    over_ratio = pred_share[top] > SHORTCUT_RATIO * gold_share[top] and excess > SHORTCUT_RATIO_FLOOR
    if excess <= SHORTCUT_EXCESS and not over_ratio:
        return None
    return (
        f"answers '{label_names[top]}' for {pred_share[top]:.0%} of examples, but only {gold_share[top]:.0%} "
        "of the gold labels are that answer: the model may be shortcutting to it"
    )


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of examples where two models give the same answer."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} vs {len(b)} predictions")
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 0.0


# --------------------------------------------------------------------------- generate metrics (SQuAD style)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def squad_normalize(text: str) -> str:
    """Lowercase, strip punctuation and the articles a/an/the, collapse whitespace (the SQuAD script)."""
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer (alias), else 0.0."""
    normalised = squad_normalize(prediction)
    return float(any(normalised == squad_normalize(answer) for answer in answers))


def _token_scores(prediction: str, answer: str) -> tuple[float, float, float]:
    pred_tokens = squad_normalize(prediction).split()
    gold_tokens = squad_normalize(answer).split()
    if not pred_tokens or not gold_tokens:
        # Both empty is a perfect match; one empty shares nothing with the other.
        score = float(pred_tokens == gold_tokens)
        return score, score, score
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall), precision, recall


def token_f1(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """Token-overlap F1 against the best-matching alias, with that alias's precision and recall."""
    if not answers:
        raise ValueError("token_f1 needs at least one reference answer")
    f1, precision, recall = max(_token_scores(prediction, answer) for answer in answers)
    return {"f1": f1, "precision": precision, "recall": recall}


def generation_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1/precision/recall over questions (each against all its aliases)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    n = len(predictions)
    totals = {"exact_match": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    for prediction, aliases in zip(predictions, answers):
        totals["exact_match"] += exact_match(prediction, aliases)
        for key, value in token_f1(prediction, aliases).items():
            totals[key] += value
    return {"n": n, **{key: value / n if n else 0.0 for key, value in totals.items()}}


# --------------------------------------------------------------------------- models


def model_description(recipe: dict[str, Any], role: str) -> str:
    """What a role is, in a table cell: a Hub id, a path, or how the student was built.

    Takes the recipe as a plain dict (``recipe.resolved.toml`` parsed), so ``kd compare``
    can describe roles of runs whose recipe this kd version would not validate.
    """
    student = recipe.get("student", {})
    if role.startswith("teacher:"):
        teacher = recipe.get("teachers", {}).get(role.split(":", 1)[1], {})
        ref = _short_ref(teacher.get("ref", "?"))
        return f"{ref} (fine-tuned)" if teacher.get("finetune") else ref
    if role in ("student", "dataset", "baseline") or role.startswith("student:"):
        if student.get("ref"):
            base = _short_ref(student["ref"])
        else:
            base = f"{student.get('from_teacher')} layers {student.get('layers')}"
        if role.startswith("student:"):
            return f"{base}, distilled from {role.split(':', 1)[1]} alone"
        return base + {"baseline": "", "student": ", distilled", "dataset": ", labels only"}[role]
    return role  # a model reference given on the command line


def _short_ref(ref: str) -> str:
    """A local directory by its name (the full path is in ``ref``); Hub ids and package refs unchanged."""
    if ref.startswith(("/", ".", "~")) or "\\" in ref:
        return ref.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return ref


def parameter_count(model: "TaskModel") -> int:
    return sum(p.numel() for p in model.model.parameters())


def place(model: "TaskModel"):
    """Move the model to the GPU when there is one (quantised models are already placed)."""
    import torch

    from kdcli.models import is_weight_quantized

    if not is_weight_quantized(model.model):
        model.model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.model.eval()
    return model.device


def predict(model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None) -> list[int]:
    """The model's answer (argmax over classes or options) for each row."""
    import torch

    answers: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = model.encode(rows[start : start + batch_size], max_length, template)
            answers += model.forward(batch).logits.argmax(-1).tolist()
    return answers


def answer_names(task: str, manifest: dict[str, Any], num_classes: int) -> list[str]:
    """Names of the classes (classify) or of the option numbers "1".."N" (choice)."""
    if task == "classify":
        return list(manifest["label_names"])
    return [str(k) for k in range(1, num_classes + 1)]


def _show(row: dict, answer: int, task: str, names: list[str]) -> str:
    if task == "choice" and 0 <= answer < len(row["options"]):
        return f"{names[answer]}. {row['options'][answer]}"
    return names[answer]


def _result_header(recipe: "Recipe", role: str, model: "TaskModel", stage: str, split: str, fingerprint: str,
                   n: int, seconds: float) -> dict[str, Any]:
    """What every eval/ROLE.json says about what was scored, on what, and how long it took."""
    return {
        "role": role,
        "model": model_description(recipe.model_dump(mode="json"), role),
        "ref": str(model.model.name_or_path),
        "task": recipe.task,
        "stage": stage,
        "split": split,
        "data_fingerprint": fingerprint,
        "n": n,
        "parameters": parameter_count(model),
        "seconds": seconds,
        "examples_per_second": n / seconds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _other_teachers(recipe: "Recipe", role: str, stage, num_classes: int, result: dict[str, Any]):
    """Each of the stage's teachers except the one being scored, loaded and placed, one at a time;
    a teacher that cannot be loaded is noted in ``result["agreement_skipped"]`` instead."""
    from kdcli.engine import load_role

    for name in stage.teachers or []:
        if role == f"teacher:{name}":
            continue
        try:
            teacher = load_role(recipe, f"teacher:{name}", num_classes)
        except ModelError as exc:
            result["agreement_skipped"][name] = exc.message
            continue
        place(teacher)
        yield name, teacher


def _split_to_score(recipe: "Recipe", split: str | None, console: "Console"):
    """The run directory, last stage, its prepared data and the split `kd eval` scores (checked to exist)."""
    from kdcli.engine import stage_data
    from kdcli.rundir import RunDir

    run = RunDir.for_recipe(recipe)
    stage = recipe.resolved_stages()[-1]
    data = stage_data(recipe, run, stage, console)
    split = split or recipe.eval.split
    if split not in data.rows:
        raise KdError(f"stage '{stage.name}' has no '{split}' split (it has: {', '.join(data.rows)})",
                      "pick one with --split, or add it to data.split")
    return run, stage, data, split


def evaluate_role(recipe: "Recipe", role: str, split: str | None = None, console: "Console | None" = None) -> dict[str, Any]:
    """Score ``role`` on ``split`` (default ``eval.split``) of the last stage, save and return the result."""
    from rich.console import Console

    from kdcli.engine import check_role, load_role
    from kdcli.rundir import write_json
    from kdcli.runtime import describe

    check_role(recipe, role)  # a missing model is reported before any data is prepared
    console = console or Console(stderr=True)
    if recipe.task == "generate":
        return _evaluate_generate_role(recipe, role, split, console)
    run, stage, data, split = _split_to_score(recipe, split, console)
    rows = [row for row in data.rows[split] if row["label"] >= 0]
    if not rows:
        raise KdError(f"the {split} split of stage '{stage.name}' has no labelled examples", "score another split with --split")
    gold = [row["label"] for row in rows]
    names = answer_names(recipe.task, data.manifest, data.num_classes)
    batch_size, max_length, template = recipe.eval.batch_size, stage.data.max_length, stage.data.template

    model = load_role(recipe, role, data.num_classes)
    device = place(model)
    started = time.perf_counter()
    pred = predict(model, rows, batch_size, max_length, template)
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        **_result_header(recipe, role, model, stage.name, split, data.fingerprint, len(rows), seconds),
        "metrics": classification_metrics(gold, pred, names),
        "shortcut": shortcut_warning(gold, pred, names),
        "agreement": {},
        "agreement_skipped": {},
        "disagreements": [],
        "env": {**describe(), "device": str(device), "dtype": str(model.model.dtype).removeprefix("torch.")},
    }
    if recipe.task == "choice":
        result["answer_histogram"] = dict(zip(names, answer_histogram(pred, data.num_classes)))
        result["gold_histogram"] = dict(zip(names, answer_histogram(gold, data.num_classes)))
    del model  # teachers load next; one model in memory at a time

    for name, teacher in _other_teachers(recipe, role, stage, data.num_classes, result):
        teacher_pred = predict(teacher, rows, batch_size, max_length, template)
        del teacher
        result["agreement"][name] = agreement(pred, teacher_pred)
        differing = [i for i, (mine, theirs) in enumerate(zip(pred, teacher_pred)) if mine != theirs]
        for i in differing[: recipe.eval.examples]:
            row = rows[i]
            result["disagreements"].append({
                "teacher": name, "id": row["id"], "input": row["text"], "options": list(row["options"]),
                "gold": _show(row, gold[i], recipe.task, names),
                "teacher_answer": _show(row, teacher_pred[i], recipe.task, names),
                "model_answer": _show(row, pred[i], recipe.task, names),
            })
    write_json(run.eval(role), result)
    result["path"] = str(run.eval(role))
    return result


def _evaluate_generate_role(recipe: "Recipe", role: str, split: str | None, console: "Console") -> dict[str, Any]:
    """`kd eval` for generate: batched greedy answers (eval.max_new_tokens), exact match and token
    F1/precision/recall against every alias, agreement with each teacher (same normalised answer)."""
    from kdcli.engine import load_role
    from kdcli.rundir import write_json
    from kdcli.runtime import describe

    run, stage, data, split = _split_to_score(recipe, split, console)
    rows = [row for row in data.rows[split] if row["answers"]]
    if not rows:
        raise KdError(f"the {split} split of stage '{stage.name}' has no reference answers", "score another split with --split")
    cfg = recipe.eval
    max_length, template = stage.data.max_length, stage.data.template

    def answer(model: "TaskModel") -> list[str]:
        return model.generate(rows, cfg.max_new_tokens, max_length, template, cfg.batch_size)

    model = load_role(recipe, role, data.num_classes)
    device = place(model)
    started = time.perf_counter()
    pred = answer(model)
    seconds = time.perf_counter() - started
    metrics = generation_metrics(pred, [row["answers"] for row in rows])
    result: dict[str, Any] = {
        **_result_header(recipe, role, model, stage.name, split, data.fingerprint, len(rows), seconds),
        "max_new_tokens": cfg.max_new_tokens,
        "metrics": metrics,
        "shortcut": None,
        "agreement": {},
        "agreement_skipped": {},
        "disagreements": [],
        "predictions": [{"id": row["id"], "prediction": p} for row, p in zip(rows, pred)],
        "env": {**describe(), "device": str(device), "dtype": str(model.model.dtype).removeprefix("torch.")},
    }
    del model
    for name, teacher in _other_teachers(recipe, role, stage, data.num_classes, result):
        theirs = answer(teacher)
        del teacher
        same = [squad_normalize(a) == squad_normalize(b) for a, b in zip(pred, theirs)]
        result["agreement"][name] = sum(same) / len(same)
        for i in [i for i, agree in enumerate(same) if not agree][: cfg.examples]:
            result["disagreements"].append({
                "teacher": name, "id": rows[i]["id"], "input": rows[i]["text"], "options": [],
                "gold": rows[i]["answers"][0], "teacher_answer": theirs[i], "model_answer": pred[i],
            })
    write_json(run.eval(role), result)
    result["path"] = str(run.eval(role))
    return result
