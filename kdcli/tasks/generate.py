"""Task kind `generate`: answer a prompt with free text (TriviaQA), with a seq2seq or causal LM.

Inputs: a prompt (``data.template``, default ``GENERATE_TEMPLATE``) and its reference answer (the
first of ``answers``, or a teacher's answer put in ``target`` for sequence-level KD) become
``labels`` [B, T]: the answer tokens plus EOS, -100 elsewhere. A causal model reads prompt + answer
in one sequence and only the answer tokens are targets; a seq2seq model reads the prompt and its
decoder the answer. The output is next-token logits [B, T, V] aligned with ``TaskOutput.labels``
and ``token_mask`` (True at answer tokens), over the shared vocabulary only.

Every loss term is a mean over answer tokens. ``ce``: the gold answer's tokens. ``kd``, token
level: T^2 * D(teacher || student) at each answer token, against the teacher's top-k distribution
(``losses.sparse_kd_term``); several teachers are mixed as full distributions (tail spread evenly,
``losses.topk_to_dense``). Sequence level: cross-entropy on the tokens of the teachers' greedy
answers, each token weighted by its teacher's static weight.

Transfer rows (``[data.transfer]``: prompts without an answer) have no ``ce``. Each teacher answers
them greedily (synthetic targets) and, at token level, gives its distribution at each token of its
own answer; the student learns each teacher's answers separately, weighted like sequence-level KD
(the teachers' answers differ, so their distributions cannot be mixed token by token).

Evaluation answers with batched greedy decoding and scores exact match and token F1 against every
alias (``kdcli.metrics``); two models agree when their normalised answers are equal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from kdcli.batching import gather, length_sorted_batches, measured_lengths
from kdcli.errors import KdError, ModelError
from kdcli.tasks.base import TaskKind, TeacherBatch, part_weights

if TYPE_CHECKING:
    import torch

    from kdcli.job import Job, TeacherSettings
    from kdcli.models import TaskModel, TaskOutput


class Generate(TaskKind):
    name = "generate"
    primary = "f1"
    compare_columns = ("f1", "precision", "recall", "questions_per_s")
    hidden_states = False
    token_distributions = True
    drift_unit = "answer token"

    def num_classes(self, manifest: dict[str, Any]) -> int:
        return 0  # answers are text: no classes, no label prior

    def scorable(self, row: dict) -> bool:
        return bool(row["answers"])

    # ----------------------------------------------------------------- a model's input and output

    def encode(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
               template: str | None = None, answer_max_length: int | None = None) -> dict[str, "torch.Tensor"]:
        """Prompt and answer tokens, with ``labels`` [B, T] over the answer tokens (see the module docstring)."""
        import torch

        from kdcli.models import pad_rows

        max_length = max_length or model.max_length
        limit = answer_max_length or model.answer_max_length
        if model.kind == "seq2seq":
            batch = model.tokenize([model.prompt(ex, template) for ex in examples], max_length=max_length,
                                   add_special_tokens=not any(ex.get("messages") for ex in examples))
            labels = pad_rows(_seq2seq_answers(model, examples, limit), -100)
            batch["labels"] = labels
            if hasattr(model.model, "prepare_decoder_input_ids_from_labels"):
                batch["decoder_input_ids"] = model.model.prepare_decoder_input_ids_from_labels(labels=labels)
            else:
                start = torch.full((len(examples), 1), model.model.config.decoder_start_token_id, dtype=torch.long)
                batch["decoder_input_ids"] = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
            return batch
        sequences, labels = [], []
        for prompt_ids, answer in _causal_rows(model, examples, max_length, template, limit):
            sequences.append(prompt_ids + answer)
            labels.append([-100] * len(prompt_ids) + answer)
        input_ids = pad_rows(sequences, model.tokenizer.pad_token_id)
        mask = pad_rows([[1] * len(x) for x in sequences], 0)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad_rows(labels, -100)}

    def lengths(self, model: "TaskModel", examples: list[dict], max_length: int | None = None,
                template: str | None = None, answer_max_length: int | None = None) -> list[int]:
        """Prompt plus answer tokens of each example (``encode``'s, unpadded; a seq2seq model reads the
        prompt in its encoder and the answer in its decoder)."""
        max_length = max_length or model.max_length
        limit = answer_max_length or model.answer_max_length
        if model.kind == "seq2seq":
            prompts = model.prompt_lengths(examples, max_length, template)
            return [n + len(answer) for n, answer in zip(prompts, _seq2seq_answers(model, examples, limit))]
        return [len(prompt) + len(answer) for prompt, answer in _causal_rows(model, examples, max_length, template,
                                                                             limit)]

    def teacher_lengths(self, model: "TaskModel", examples: list[dict], settings: "TeacherSettings") -> list[int]:
        """Token level: prompt plus answer tokens; sequence level: the prompt's, which the greedy answer follows."""
        if settings.kd_level == "sequence":
            return model.prompt_lengths(examples, settings.max_length, settings.template)
        return super().teacher_lengths(model, examples, settings)

    def forward(self, model: "TaskModel", batch: dict[str, "torch.Tensor"],
                output_hidden_states: bool = False) -> "TaskOutput":
        """Next-token logits at the answer positions' predecessors, trimmed to the shared vocabulary."""
        from kdcli.models import TaskOutput

        inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
        labels = batch["labels"].to(model.device)
        mask = inputs["attention_mask"]
        if model.kind == "causal":
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs["use_cache"] = False
        out = (model.runner or model.model)(**inputs, output_hidden_states=output_hidden_states)
        logits = out.logits[..., : model.vocab_size]
        if model.kind == "causal":
            # Position t predicts token t + 1.
            logits, labels = logits[:, :-1], labels[:, 1:]
            hidden = out.hidden_states
        else:
            hidden = out.encoder_hidden_states
        return TaskOutput(logits=logits, hidden_states=hidden if output_hidden_states else None, attention_mask=mask,
                          labels=labels, token_mask=labels != -100)

    def answer_tokens(self, job: "Job", examples: list[dict]) -> int:
        """The answer tokens (targets) a batch of examples has."""
        batch = self.encode(job.student, examples, job.max_length, job.template, job.answer_max_length)
        return int((batch["labels"] != -100).sum())

    # ----------------------------------------------------------------- training

    def units(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch]) -> dict[str, float]:
        """Gold answer tokens; for sequence-level KD, the tokens of the teachers' answers (teacher-weighted);
        on an on-policy step, the tokens the student sampled."""
        labelled = _labelled(examples)
        gold = self.answer_tokens(job, _gold(examples)) if labelled else 0
        kd = gold
        if any("sample_ids" in ex for ex in examples):
            kd = sum(len(ex["sample_ids"]) for ex in examples)
        elif answers and (job.loss.kd_level == "sequence" or not labelled):
            kd = sum(job.teacher_weights.get(n, 1.0) * self.answer_tokens(job, _teacher_targets(examples, answers[n]))
                     for n in job.teachers)
        return {"ce": gold, "kd": kd}

    def loss(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch], projections: Any):

        from kdcli import losses

        cfg = job.loss
        student = job.student

        def run(batch: list[dict]) -> "TaskOutput":
            return self.forward(student, self.encode(student, batch, job.max_length, job.template,
                                                     job.answer_max_length))

        sampled = any("sample_ids" in ex for ex in examples)
        labelled = _labelled(examples)  # a batch of transfer rows has no gold answer: no CE
        ce = cfg.alpha > 0 and labelled
        # An on-policy step without CE never reads the gold answers: one forward pass fewer.
        output = run(examples) if sampled and not ce else run(_gold(examples)) if labelled else None
        parts: dict[str, torch.Tensor] = {}
        if ce:
            parts["ce"] = losses.cross_entropy(output.logits, output.labels)
        if answers and cfg.alpha < 1:
            weights = [job.teacher_weights.get(name, 1.0) for name in job.teachers]
            if cfg.kd_level == "sequence" or (not labelled and not sampled):
                parts["kd"] = self._own_answers_kd(job, examples, answers, weights,
                                                   token_level=cfg.kd_level != "sequence")
            else:  # token level, and on-policy: on the student's samples when the step drew them
                on_samples = run(examples) if sampled and ce else output
                parts["kd"] = self._token_kd(job, answers, weights, on_samples)
        return losses.weighted_sum(parts, part_weights(cfg)), parts, output

    def with_student_samples(self, job: "Job", examples: list[dict]) -> list[dict]:
        """The student's sampled answer to each prompt (no gradient, KV cache, ``loss.sampling_temperature``,
        up to ``answer_max_length`` tokens), as ``sample_ids``: its tokens up to and with EOS."""
        student = job.student
        batch = student.encode_prompts(examples, job.max_length, job.template)
        new = student.sample_ids(batch, job.answer_max_length, job.loss.sampling_temperature)
        eos = student.tokenizer.eos_token_id
        samples = []
        for row in new.tolist():
            ids = row[: row.index(eos) + 1] if eos in row else row  # after EOS: padding
            samples.append(ids or [eos])
        return [dict(ex, sample_ids=ids) for ex, ids in zip(examples, samples)]

    def _own_answers_kd(self, job: "Job", examples: list[dict], answers: dict[str, TeacherBatch],
                        weights: list[float], token_level: bool) -> "torch.Tensor":
        """KD on each teacher's own greedy answers, teacher by teacher, weighted by its weight times its
        answer tokens: cross-entropy on their tokens (sequence level), or, on transfer rows at token
        level, the divergence from the teacher's distribution at each of them."""
        from kdcli import losses

        student = job.student
        weighted_sum, weighted_count, zero = 0.0, 0.0, None
        for name, weight in zip(job.teachers, weights):
            targets = _teacher_targets(examples, answers[name])
            theirs = self.forward(student, self.encode(student, targets, job.max_length, job.template,
                                                       job.answer_max_length))
            tokens = int(theirs.token_mask.sum())
            zero = theirs.logits.sum() * 0.0
            if tokens and weight:
                term = (self._token_kd(job, {name: answers[name]}, [1.0], theirs) if token_level
                        else losses.cross_entropy(theirs.logits, theirs.labels))
                weighted_sum = weighted_sum + weight * tokens * term
                weighted_count += weight * tokens
        return weighted_sum / weighted_count if weighted_count else zero

    def _token_kd(self, job: "Job", answers: dict[str, TeacherBatch], weights: list[float],
                  output: "TaskOutput") -> "torch.Tensor":
        from kdcli import losses

        cfg = job.loss
        mask = output.token_mask
        flat = output.logits[mask]  # [N, V]: the answer tokens, row after row
        mine = mask.sum(1).tolist()
        for name, answer in answers.items():
            if list(answer.lengths) != mine:
                raise KdError(
                    f"teacher {name} scores {answer.lengths} answer tokens per example, the student {mine}",
                    "teacher and student must tokenize answers alike for token-level KD; "
                    'use loss.kd_level = "sequence"',
                )
        device = flat.device
        if len(answers) == 1:
            answer = next(iter(answers.values()))
            return losses.sparse_kd_term(
                flat, answer.token_logprobs.to(device), answer.token_ids.to(device), cfg.temperature,
                cfg.divergence, skew=cfg.skew, jsd_beta=cfg.jsd_beta,
            )
        vocab = flat.shape[-1]
        dense = [losses.topk_to_dense(a.token_logprobs.to(device), a.token_ids.to(device), vocab)
                 for a in answers.values()]
        # Already softened: mixed at temperature 1 (log-probabilities are valid logits).
        probs = losses.teacher_probs(
            [d.clamp(min=losses.PROB_FLOOR).log() for d in dense], 1.0, weights=weights,
            mode=cfg.teacher_weighting, labels=output.labels[mask],
        )
        return losses.kd_term(flat, probs, cfg.temperature, cfg.divergence, skew=cfg.skew, jsd_beta=cfg.jsd_beta)

    def validate(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                 metric: str | None, answer_max_length: int) -> dict[str, float]:
        """The loss per answer token, and, when ``metric`` is exact_match or token_f1, greedy answers
        (up to ``answer_max_length`` new tokens) scored against every alias."""
        import torch

        from kdcli import losses
        from kdcli.metrics import generation_metrics

        was_training = model.model.training
        model.model.eval()
        loss_sum, count = 0.0, 0
        lengths = measured_lengths(rows, lambda part: self.lengths(model, part, max_length, template,
                                                                   answer_max_length))
        with torch.no_grad():
            for index in length_sorted_batches(lengths, batch_size):
                chunk = gather(rows, index)
                output = self.forward(model, self.encode(model, chunk, max_length, template, answer_max_length))
                n = int(output.token_mask.sum())
                loss_sum += float(losses.cross_entropy(output.logits, output.labels)) * n
                count += n
        scores = {"loss": loss_sum / count if count else float("nan")}
        if metric in ("exact_match", "token_f1"):
            scored = self.scored_rows(rows)
            predictions = model.generate(scored, answer_max_length, max_length, template, batch_size)
            measured = generation_metrics(predictions, [row["answers"] for row in scored])
            scores.update(exact_match=measured["exact_match"], token_f1=measured["f1"])
        model.model.train(was_training)
        return scores

    def inputs_cut(self, model: "TaskModel", rows: list[dict], max_length: int,
                   template: str | None) -> tuple[int, int]:
        """Prompts longer than ``max_length`` (a causal model keeps their end, a seq2seq model their start)."""
        lengths = measured_lengths(rows, lambda part: model.prompt_lengths(part, template=template, whole=True))
        return sum(n > max_length for n in lengths), max(lengths, default=0)

    def gold_loss(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int,
                  template: str | None, answer_max_length: int) -> float:
        """The cross-entropy per gold answer token (EOS included), teacher-forced: what distillation
        moves even where the answers are rarely right."""
        return self.validate(model, rows, batch_size, max_length, template, None, answer_max_length)["loss"]

    # ----------------------------------------------------------------- teachers

    def teacher_answer(self, model: "TaskModel", examples: list[dict], settings: "TeacherSettings") -> TeacherBatch:
        """Token level: the top-k log-probs at temperature T of every answer token, rounded to fp16 as
        the cache stores them (so a live teacher and its cache give the same loss); on transfer rows
        (no answer of their own) the answer is the teacher's greedy one, returned as ``texts``.
        Sequence level: the greedy answers."""
        import torch
        import torch.nn.functional as F

        def greedy() -> list[str]:
            return model.generate(examples, settings.answer_max_length, settings.max_length, settings.template,
                                  batch_size=len(examples) or 1)

        if settings.kd_level == "sequence":
            return TeacherBatch(texts=greedy())
        texts = None
        if not _labelled(examples) and not any("sample_ids" in ex for ex in examples):
            texts = greedy()  # transfer rows: the teacher's own answer is the target its distributions cover
            examples = _teacher_targets(examples, TeacherBatch(texts=texts))
        with torch.no_grad():
            output = self.forward(model, self.encode(model, examples, settings.max_length, settings.template,
                                                     settings.answer_max_length))
            mask = output.token_mask
            logprobs = F.log_softmax(output.logits[mask].float() / settings.temperature, dim=-1)
            k = min(settings.top_k or logprobs.shape[-1], logprobs.shape[-1])
            values, ids = logprobs.topk(k, dim=-1)
        return TeacherBatch(token_logprobs=values.half().float(), token_ids=ids, lengths=mask.sum(1).tolist(),
                            targets=output.labels[mask], texts=texts)

    # ----------------------------------------------------------------- kd eval and kd bench

    def predict(self, model: "TaskModel", rows: list[dict], batch_size: int, max_length: int, template: str | None,
                max_new_tokens: int, on_batch: Callable[[int], None] | None = None) -> list[str]:
        return model.generate(rows, max_new_tokens, max_length, template, batch_size, on_batch)

    def answer_logits(self, model: "TaskModel", examples: list[dict], max_length: int, template: str | None,
                      answer_max_length: int) -> "torch.Tensor":
        import torch

        with torch.inference_mode():
            output = self.forward(model, self.encode(model, examples, max_length, template, answer_max_length))
            return output.logits[output.token_mask].float()

    def score(self, rows: list[dict], answers: list[str], manifest: dict[str, Any]) -> dict[str, Any]:
        from kdcli.metrics import generation_metrics

        return {"metrics": generation_metrics(answers, [row["answers"] for row in rows]), "shortcut": None,
                "predictions": [{"id": row["id"], "prediction": p} for row, p in zip(rows, answers)]}

    def same_answer(self, mine: str, theirs: str) -> bool:
        from kdcli.metrics import squad_normalize

        return squad_normalize(mine) == squad_normalize(theirs)

    def disagreement(self, row: dict, gold: Any, teacher: str, model: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "input": row["text"], "options": [], "gold": row["answers"][0],
                "teacher_answer": teacher, "model_answer": model}

    def bench_inputs(self, model: "TaskModel", examples: list[dict], max_length: int,
                     template: str | None) -> dict[str, "torch.Tensor"]:
        """The prompts alone: the answer is what gets timed."""
        encoded = model.encode_prompts(examples, max_length, template)
        return {k: v.to(model.device) for k, v in encoded.items()}

    def bench_call(self, model: "TaskModel", max_new_tokens: int) -> tuple[Callable[[dict], Any], str]:
        return (lambda batch: model.generate_ids(batch, max_new_tokens),
                f"greedy generation of up to {max_new_tokens} new tokens on tokenised prompts already on the device "
                "(tokenisation and decoding excluded)")


def _labelled(examples: list[dict]) -> bool:
    """Whether a batch is of labelled rows (with gold answers), not transfer rows (a step never mixes them)."""
    return any(ex["answers"] for ex in examples)


def _gold(examples: list[dict]) -> list[dict]:
    """The examples with their data answers (an on-policy step adds the student's samples to them)."""
    if not any("sample_ids" in ex for ex in examples):
        return examples  # most steps: nothing to strip, no copies in the training loop
    return [{k: v for k, v in ex.items() if k != "sample_ids"} for ex in examples]


def _seq2seq_answers(model: "TaskModel", examples: list[dict], limit: int) -> list[list[int]]:
    """A seq2seq model's answer tokens (its decoder's targets) for each example."""
    from kdcli.models import answer_target

    return [list(ex["sample_ids"]) if "sample_ids" in ex else _answer_ids(model, None, None, answer_target(ex), limit)
            for ex in examples]


def _causal_rows(model: "TaskModel", examples: list[dict], max_length: int, template: str | None,
                 limit: int) -> list[tuple[list[int], list[int]]]:
    """A causal model's prompt tokens and answer tokens for each example (they read as one sequence)."""
    from kdcli.models import answer_target

    if model.kind != "causal":
        raise ModelError(f"task 'generate' needs a seq2seq or causal model, not '{model.kind}'")
    rows = []
    for example in examples:
        prompt, target = model.prompt(example, template), answer_target(example)
        special = not example.get("messages")  # a chat template writes the special tokens itself
        whole = model.tokenizer(prompt, add_special_tokens=special)["input_ids"]
        prompt_ids = whole if len(whole) <= max_length else model.cut_prompt(prompt, max_length, special)
        if "sample_ids" in example:  # on-policy: what the student generated, token for token
            answer = list(example["sample_ids"])
        elif example.get("messages"):
            answer = _chat_answer_ids(model, example["messages"], prompt, target, limit)
        else:
            answer = _answer_ids(model, whole, prompt, target, limit)
        rows.append((prompt_ids, answer))
    return rows


def _teacher_targets(examples: list[dict], answer: TeacherBatch) -> list[dict]:
    """Sequence-level KD: the examples with a teacher's greedy answer as the target."""
    return [dict(ex, target=text) for ex, text in zip(examples, answer.texts)]


def _chat_answer_ids(model: "TaskModel", turns: list[dict[str, str]], prompt: str, answer: str,
                     limit: int) -> list[int]:
    """The assistant turn's tokens as the model's chat template writes them after ``prompt``: the
    answer and its end-of-turn token (EOS), cut to ``limit`` (EOS kept)."""
    tokenizer = model.tokenizer
    full = model.chat_text(turns, answer)
    if not full.startswith(prompt):
        raise ModelError(f"model {model.model.name_or_path}: its chat template writes the conversation with the "
                         "answer differently from the one without it, so the answer's tokens cannot be found",
                         "use a chat template whose generation prompt is a prefix of the full conversation")
    ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids + [eos]  # what follows the turn's end is not the answer
    return ids if len(ids) <= limit else ids[: max(limit - 1, 0)] + [eos]


def _answer_ids(model: "TaskModel", prompt_ids: list[int] | None, prompt: str | None, answer: str,
                limit: int) -> list[int]:
    """The answer's tokens as they follow the prompt, cut to ``limit - 1``, then EOS.

    A causal model sees ``prompt + " " + answer``; the answer's tokens are what that adds to the
    prompt's own tokens (so merges across the boundary are as in the text). Tokenizers that
    add special tokens at the end of a text break that prefix; the answer is then tokenized
    on its own with a leading space.
    """
    tokenizer = model.tokenizer
    ids: list[int] | None = None
    if prompt_ids is not None and answer:
        full = tokenizer(prompt + " " + answer)["input_ids"]
        if full[: len(prompt_ids)] == prompt_ids:
            ids = full[len(prompt_ids):]
        else:
            ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    elif answer:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return (ids or [])[: max(limit - 1, 0)] + [tokenizer.eos_token_id]
