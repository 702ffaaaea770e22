"""Scores as pure functions of predictions: tested without any model.

Classify and choice: ``classification_metrics`` (accuracy, macro precision/recall/F1, per class,
confusion), ``answer_histogram`` and ``shortcut_warning``. Generate (SQuAD style):
``squad_normalize``, ``exact_match``, ``token_f1`` and ``generation_metrics``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Sequence

# The validation metrics a training run maximises; only `loss` is minimised.
MAXIMISED = frozenset({"accuracy", "f1", "exact_match", "token_f1"})


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
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support,
                           "predicted": predicted}
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
