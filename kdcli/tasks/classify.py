"""Task kind `classify`: a text goes to one of the recipe's classes (Financial PhraseBank).

The model's output is logits over the classes [B, C]. The loss mixes cross-entropy on the gold
class, the divergence from the teachers' softened class distribution, the hidden-state MSE and
the diversity penalty; every term is a mean over the micro-batch's examples. `choice`
(``kdcli.tasks.choice``) shares all of this and differs only in its inputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from kdcli.batching import gather, in_data_order, length_sorted_batches, measured_lengths
from kdcli.tasks.base import TaskKind, TeacherBatch, part_weights, pooled_layers

if TYPE_CHECKING:
    import torch

    from kdcli.job import Job, TeacherSettings
    from kdcli.models import TaskModel, TaskOutput


class Classify(TaskKind):
    name = "classify"
    primary = "accuracy"
    compare_columns = ("accuracy", "f1", "ms_per_example")
    hidden_states = True
    token_distributions = False
    drift_unit = "row"

    def num_classes(self, manifest: dict[str, Any]) -> int:
        return len(manifest["label_names"])

    def answer_names(self, manifest: dict[str, Any]) -> list[str]:
        """What each answer index is called in reports."""
        return list(manifest["label_names"])

    def scorable(self, row: dict) -> bool:
        return row["label"] >= 0

    # ----------------------------------------------------------------- a model's input and output

    def encode(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
               template: str | None = None, answer_max_length: int | None = None) -> dict[str, "torch.Tensor"]:
        """Tokenised texts and ``labels`` [B] (-100 = no label)."""
        batch = self._inputs(model, examples, max_length or model.max_length, template)
        batch["labels"] = _labels(examples)
        return batch

    def _inputs(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None) -> dict:
        return model.tokenize([ex["text"] for ex in examples], max_length=max_length)

    def lengths(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
                template: str | None = None, answer_max_length: int | None = None) -> list[int]:
        """The tokens of each text (``encode``'s inputs, unpadded)."""
        return self._lengths(model, examples, max_length or model.max_length, template)

    def _lengths(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None) -> list[int]:
        return model.token_counts([ex["text"] for ex in examples], max_length=max_length)

    def forward(self, model: "TaskModel", batch: dict[str, "torch.Tensor"],
                output_hidden_states: bool = False) -> "TaskOutput":
        """Logits over classes or options [B, C], whatever the head (see ``TaskModel.class_logits``)."""
        return model.class_logits(batch, output_hidden_states)

    # ----------------------------------------------------------------- training

    def units(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch]) -> dict[str, float]:
        """CE and the diversity penalty read gold labels, so they are over the labelled examples (a transfer
        row has none); KD and the hidden-state MSE are over every example."""
        labelled = sum(ex["label"] >= 0 for ex in examples)
        return {"ce": labelled, "kd": len(examples), "hidden": len(examples), "diversity": labelled}

    def loss(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch], projections: Any):
        import torch

        from kdcli import losses

        cfg = job.loss
        student = job.student
        batch = self.encode(student, examples, job.max_length, job.template)
        batch = {k: v.to(student.device) for k, v in batch.items()}
        want_hidden = cfg.beta > 0 and bool(job.hidden_pairs)
        output = self.forward(student, batch, output_hidden_states=want_hidden)
        labels = batch["labels"]
        parts: dict[str, torch.Tensor] = {}
        if cfg.alpha > 0:
            parts["ce"] = losses.cross_entropy(output.logits, labels)
        if answers:
            if cfg.alpha < 1:
                probs = losses.teacher_probs(
                    [answers[name].logits.to(output.logits.device) for name in job.teachers],
                    cfg.temperature,
                    weights=[job.teacher_weights.get(name, 1.0) for name in job.teachers],
                    mode=cfg.teacher_weighting,
                    labels=labels,
                )
                parts["kd"] = losses.kd_term(
                    output.logits, probs, cfg.temperature, cfg.divergence, skew=cfg.skew, jsd_beta=cfg.jsd_beta
                )
            if want_hidden:
                terms = []
                for name, pairs in job.hidden_pairs.items():
                    mine = pooled_layers(output, [s for s, _ in pairs], job.pooling[name], len(examples))
                    project = projections[name] if name in projections else None
                    for s, t in pairs:
                        target = answers[name].hidden[t].to(mine[s].device)
                        terms.append(losses.hidden_mse(mine[s], target, project))
                parts["hidden"] = sum(terms) / len(terms)
        if cfg.gamma > 0 and job.label_prior is not None:
            prior = torch.tensor(job.label_prior, device=output.logits.device)
            parts["diversity"] = losses.diversity_penalty(output.logits, prior, labels != -100,
                                                          cfg.diversity_temperature)
        return losses.weighted_sum(parts, part_weights(cfg)), parts, output

    def validate(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                 metric: str | None, answer_max_length: int) -> dict[str, float]:
        """Loss (CE on gold), accuracy and macro-F1 over ``rows``."""
        import torch
        from sklearn.metrics import f1_score

        from kdcli import losses

        was_training = model.model.training
        model.model.eval()
        predictions, gold, loss_sum, count = [], [], 0.0, 0
        with torch.no_grad():
            lengths = measured_lengths(rows, lambda part: self.lengths(model, part, max_length, template))
            for index in length_sorted_batches(lengths, batch_size):
                chunk = gather(rows, index)
                batch = {k: v.to(model.device) for k, v in self.encode(model, chunk, max_length, template).items()}
                logits = self.forward(model, batch).logits
                labels = batch["labels"]
                valid = labels != -100
                if valid.any():
                    loss_sum += float(losses.cross_entropy(logits, labels)) * int(valid.sum())
                    count += int(valid.sum())
                predictions += logits.argmax(-1)[valid].tolist()
                gold += labels[valid].tolist()
        model.model.train(was_training)
        if not count:
            return {"loss": float("nan"), "accuracy": float("nan"), "f1": float("nan")}
        accuracy = sum(p == g for p, g in zip(predictions, gold)) / count
        return {"loss": loss_sum / count, "accuracy": accuracy,
                "f1": float(f1_score(gold, predictions, average="macro"))}

    # ----------------------------------------------------------------- teachers

    def teacher_answer(self, model: "TaskModel", examples: list[dict], settings: "TeacherSettings") -> TeacherBatch:
        import torch

        layers = list(settings.hidden_layers)
        with torch.no_grad():
            batch = self.encode(model, examples, settings.max_length, settings.template)
            output = self.forward(model, batch, output_hidden_states=bool(layers))
            hidden = pooled_layers(output, layers, settings.pooling, len(examples)) if layers else {}
        return TeacherBatch(output.logits.float(), {k: v.float() for k, v in hidden.items()})

    # ----------------------------------------------------------------- kd eval and kd bench

    def predict(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                max_new_tokens: int, on_batch: Callable[[int], None] | None = None) -> list[int]:
        """The model's answer (argmax over classes or options) for each row, from length-sorted batches."""
        import torch

        lengths = measured_lengths(rows, lambda part: self.lengths(model, part, max_length, template))
        batches = length_sorted_batches(lengths, batch_size)
        answers: list[list[int]] = []
        with torch.inference_mode():
            for index in batches:
                batch = self.encode(model, gather(rows, index), max_length, template)
                answers.append(self.forward(model, batch).logits.argmax(-1).tolist())
                if on_batch is not None:
                    on_batch(len(index))
        return in_data_order(batches, answers)

    def answer_logits(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None,
                      answer_max_length: int) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            return self.forward(model, self.encode(model, examples, max_length, template)).logits.float()

    def score(self, rows: list[dict], answers: list[int], manifest: dict[str, Any]) -> dict[str, Any]:
        from kdcli.metrics import classification_metrics, shortcut_warning

        gold = [row["label"] for row in rows]
        names = self.answer_names(manifest)
        return {"metrics": classification_metrics(gold, answers, names),
                "shortcut": shortcut_warning(gold, answers, names)}

    def same_answer(self, mine: int, theirs: int) -> bool:
        return mine == theirs

    def disagreement(self, row: dict, gold: int, teacher: int, model: int, manifest: dict[str, Any]) -> dict[str, Any]:
        names = self.answer_names(manifest)
        return {"id": row["id"], "input": row["text"], "options": list(row["options"]),
                "gold": self._show(row, gold, names), "teacher_answer": self._show(row, teacher, names),
                "model_answer": self._show(row, model, names)}

    def _show(self, row: dict, answer: int, names: list[str]) -> str:
        return names[answer]

    def bench_inputs(self, model: "TaskModel", examples: list[dict], max_length: int,
                     template: str | None) -> dict[str, "torch.Tensor"]:
        encoded = self.encode(model, examples, max_length, template)
        return {k: v.to(model.device) for k, v in encoded.items() if k != "labels"}

    def bench_call(self, model: "TaskModel", max_new_tokens: int) -> tuple[Callable[[dict], Any], str]:
        return (lambda batch: self.forward(model, batch),
                "model forward on tokenised batches already on the device (tokenisation excluded)")


def _labels(examples: list[dict]) -> "torch.Tensor":
    import torch

    return torch.tensor([ex["label"] if ex["label"] >= 0 else -100 for ex in examples], dtype=torch.long)
