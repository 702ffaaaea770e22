"""Task kind `choice`: pick one of an example's options (WinoGrande, Social IQA, AQuA-RAT).

Everything but the inputs is `classify`'s: the model's output is logits over the options. An
encoder with a multiple-choice head scores each (text, option) pair; a seq2seq or causal model
reads a prompt that lists the numbered options, and its logits for the tokens "1".."N" after the
prompt are the option logits. `kd eval` adds the answer histogram, which shows a student that
always answers "2".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdcli.errors import DataError
from kdcli.tasks.classify import Classify

if TYPE_CHECKING:
    from kdcli.models import TaskModel


class Choice(Classify):
    name = "choice"
    primary = "accuracy"
    compare_columns = ("accuracy", "s_per_question")
    drift_unit = "question"

    def num_classes(self, manifest: dict[str, Any]) -> int:
        return int(manifest["num_options"])

    def answer_names(self, manifest: dict[str, Any]) -> list[str]:
        """The option numbers "1".."N", as prompts show them."""
        return [str(k) for k in range(1, self.num_classes(manifest) + 1)]

    def _inputs(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None) -> dict:
        import torch

        _check_options(model, examples)
        if model.kind == "multiple-choice":
            return model.encode_pairs(examples, max_length)
        batch = model.tokenize(_prompts(model, examples, template), max_length=max_length)
        if model.kind == "seq2seq":
            start = model.model.config.decoder_start_token_id
            batch["decoder_input_ids"] = torch.full((len(examples), 1), start, dtype=torch.long)
        return batch

    def _lengths(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None) -> list[int]:
        """A multiple-choice encoder's longest (text, option) pair, or the prompt listing the options."""
        _check_options(model, examples)
        if model.kind == "multiple-choice":
            return model.pair_lengths(examples, max_length)
        return model.token_counts(_prompts(model, examples, template), max_length=max_length)

    def score(self, rows: list[dict], answers: list[int], manifest: dict[str, Any]) -> dict[str, Any]:
        from kdcli.metrics import answer_histogram

        names = self.answer_names(manifest)
        count = len(names)
        gold = [row["label"] for row in rows]
        return {**super().score(rows, answers, manifest),
                "answer_histogram": dict(zip(names, answer_histogram(answers, count))),
                "gold_histogram": dict(zip(names, answer_histogram(gold, count)))}

    def _show(self, row: dict, answer: int, names: list[str]) -> str:
        if 0 <= answer < len(row["options"]):
            return f"{names[answer]}. {row['options'][answer]}"
        return names[answer]


def _check_options(model: "TaskModel", examples: list[dict]) -> None:
    for ex in examples:
        if len(ex["options"]) != model.num_classes:
            raise DataError(f"example {ex['id']}: {len(ex['options'])} options, "
                            f"but the model scores {model.num_classes}")


def _prompts(model: "TaskModel", examples: list[dict], template: str | None) -> list[str]:
    """A seq2seq or causal model's prompts: the text and its numbered options, then the suffix the answer follows."""
    from kdcli.models import render_prompt

    return [render_prompt(ex, template) + model.prompt_suffix for ex in examples]
