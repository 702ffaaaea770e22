"""Loss functions for distillation: pure functions on tensors, no model or recipe access.

The training loop builds the recipe's loss from these parts::

    loss = alpha * cross_entropy + (1 - alpha) * kd_term + beta * hidden_mse + gamma * diversity_penalty

Conventions shared by every function here:

- Logits have shape ``[..., C]``: ``[N, C]`` for classes or options, ``[B, T, V]`` for tokens.
  A ``mask`` has the leading shape ``[...]`` and is True where a position counts.
- The math is done in float32 whatever the input dtype (fp16/bf16 logits under mixed
  precision lose too much in exp/log), and results are float32 scalars.
- Means are over valid positions only. A fully masked input gives 0, not NaN, and its
  graph still backpropagates (with zero gradients), so an all-padding micro-batch under
  gradient accumulation does not need a special case in the loop.
- Teacher outputs are targets: they are detached, the teacher is never trained by these losses.

Modelled on torchtune's ``torchtune/modules/loss/kd_losses.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcli.errors import KdError

DIVERGENCES = ("forward_kl", "reverse_kl", "skew_kl", "jsd")
TEACHER_WEIGHTINGS = ("static", "confidence", "entropy")

# Reverse KL needs log p where the teacher gives a class probability 0 (a trimmed
# vocabulary, a top-k cache, an fp32 underflow). Clamping p at 1e-12 caps the penalty
# at about 27.6 nats per unit of student mass there, so one zero cannot dominate the loss.
PROB_FLOOR = 1e-12

# Added to each teacher's entropy before inverting it, so a one-hot teacher gets a large
# but finite weight.
ENTROPY_EPS = 1e-6


class NonFiniteLoss(KdError, ValueError):
    """A loss term became NaN or infinite; the run is stopped rather than trained on garbage."""


def _valid_mask(mask: Tensor | None, leading_shape: torch.Size, device: torch.device) -> Tensor:
    """The boolean mask of valid positions, all True when none is given."""
    if mask is None:
        return torch.ones(leading_shape, dtype=torch.bool, device=device)
    if mask.shape != leading_shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(leading_shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [...] over ``mask`` [...]; 0 when nothing is valid."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with gold labels, averaged over labels that are not ``ignore_index``.

    logits [..., C], labels [...] (integer class ids) -> scalar. For token-level losses the
    caller shifts labels so that ``labels[..., t]`` is the target of ``logits[..., t, :]``.
    """
    num_classes = logits.shape[-1]
    flat_labels = labels.reshape(-1)
    total = F.cross_entropy(
        logits.float().reshape(-1, num_classes), flat_labels, ignore_index=ignore_index, reduction="sum"
    )
    # reduction="mean" would give NaN when every label is ignored; sum / count gives 0.
    return total / (flat_labels != ignore_index).sum().clamp(min=1)


def teacher_probs(
    teacher_logits: list[Tensor],
    temperature: float,
    weights: list[float] | None = None,
    mode: str = "static",
    labels: Tensor | None = None,
) -> Tensor:
    """Mix several teachers' softened distributions into one target distribution.

    teacher_logits: K tensors [..., C] of the same shape. Returns float32 probabilities
    [..., C] (summing to 1 over C), detached.

    Each teacher contributes ``softmax(logits / temperature)`` with a weight per example:

    - ``static``: ``weights`` (None = equal), normalised to sum to 1.
    - ``confidence``: proportional to the teacher's probability of the gold label at
      temperature 1 (``labels`` [...] required). Where the label is negative (-1 or -100,
      no gold answer) the static weights are used instead.
    - ``entropy``: proportional to ``1 / (entropy + 1e-6)`` of the teacher's softened
      distribution, so a sharper teacher counts more.

    In the per-example modes the static ``weights`` multiply the per-example weights, so the
    recipe's teacher weights still act as a prior (equal by default).
    """
    if not teacher_logits:
        raise ValueError("teacher_probs needs at least one teacher")
    if mode not in TEACHER_WEIGHTINGS:
        raise ValueError(f"unknown teacher weighting {mode!r}; expected one of {', '.join(TEACHER_WEIGHTINGS)}")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"teacher logits must all have the same shape, got {sorted(shapes)}")
    num_teachers = len(teacher_logits)
    if weights is None:
        weights = [1.0] * num_teachers
    if len(weights) != num_teachers:
        raise ValueError(f"{len(weights)} weights for {num_teachers} teachers")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"teacher weights must be >= 0 with a positive sum, got {weights}")

    with torch.no_grad():
        logits = torch.stack([t.detach().float() for t in teacher_logits])  # [K, ..., C]
        probs = F.softmax(logits / temperature, dim=-1)
        if num_teachers == 1:
            return probs[0]

        prior = torch.tensor(weights, dtype=torch.float32, device=logits.device)
        prior = (prior / prior.sum()).view(-1, *([1] * (logits.dim() - 2)))  # [K, 1...] broadcasts over [...]
        if mode == "static":
            example_weights = prior.expand(logits.shape[:-1])
        elif mode == "confidence":
            if labels is None:
                raise ValueError("teacher weighting 'confidence' needs the gold labels")
            if labels.shape != logits.shape[1:-1]:
                raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(logits.shape[1:-1])}")
            labels = labels.to(logits.device)
            has_gold = labels >= 0
            gold = labels.clamp(min=0)
            gold = gold.unsqueeze(0).expand(logits.shape[:-1]).unsqueeze(-1)  # [K, ..., 1]
            confidence = F.softmax(logits, dim=-1).gather(-1, gold).squeeze(-1)  # [K, ...] at T = 1
            scored = prior * confidence
            # Fall back to the prior where there is no gold label, or where every teacher gives
            # it probability 0 (nothing to prefer, and 0/0 otherwise).
            usable = has_gold & (scored.sum(0) > 0)
            example_weights = torch.where(usable, scored / scored.sum(0).clamp(min=1e-30), prior)
        else:  # entropy
            entropy = -torch.xlogy(probs, probs).sum(-1)  # [K, ...]; xlogy: 0 * log 0 = 0
            example_weights = prior / (entropy + ENTROPY_EPS)
        example_weights = example_weights / example_weights.sum(0, keepdim=True)
        return (example_weights.unsqueeze(-1) * probs).sum(0)


def divergence(
    student_logits: Tensor,
    teacher_probs: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """Mean over valid positions of D(p, q), in nats, without the T^2 factor (see ``kd_term``).

    student_logits [..., C], teacher_probs [..., C] (already softened, e.g. from
    ``teacher_probs``), mask [...] or None -> scalar. The student distribution is
    ``q = softmax(student_logits / temperature)``, the teacher's is ``p = teacher_probs``.

    - ``forward_kl``: KL(p || q), mean-seeking; equals ``F.kl_div(log q, p, reduction="batchmean")``
      on [N, C]. Terms with p = 0 count 0.
    - ``reverse_kl``: KL(q || p), mode-seeking; p is clamped at ``PROB_FLOOR`` inside the log.
    - ``skew_kl``: KL(p || skew * p + (1 - skew) * q), DistiLLM's skewed forward KL, which stays
      finite where the student gives a class almost nothing; tends to forward KL as skew -> 0.
    - ``jsd``: beta * KL(p || m) + (1 - beta) * KL(q || m) with m = beta * p + (1 - beta) * q;
      symmetric and at most log 2 at beta = 0.5.
    """
    _check_divergence(kind, skew, jsd_beta)
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher probabilities "
            f"{tuple(teacher_probs.shape)} must have the same shape"
        )

    valid = _valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    # Padding may hold anything (inf, NaN from an empty row). where() drops it from the value,
    # but a NaN input would still turn the zero gradient into NaN in backward, so masked rows
    # are replaced with harmless values before any math: uniform student, uniform teacher.
    keep = valid.unsqueeze(-1)
    logits = torch.where(keep, student_logits.float(), torch.zeros((), device=student_logits.device))
    uniform = torch.full((), 1.0 / teacher_probs.shape[-1], device=keep.device)
    p = torch.where(keep, teacher_probs.detach().float(), uniform)

    log_q = F.log_softmax(logits / temperature, dim=-1)
    return _masked_mean(_per_position(log_q, p, kind, skew, jsd_beta), valid)


def _check_divergence(kind: str, skew: float, jsd_beta: float) -> None:
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")
    if kind == "skew_kl" and not 0 < skew < 1:
        raise ValueError(f"skew must be in (0, 1), got {skew}")
    if kind == "jsd" and not 0 < jsd_beta < 1:
        raise ValueError(f"jsd_beta must be in (0, 1), got {jsd_beta}")


def _per_position(log_q: Tensor, p: Tensor, kind: str, skew: float, jsd_beta: float) -> Tensor:
    """D(p, q) per position from the student's log-probabilities and the teacher's probabilities [..., C]."""
    if kind == "forward_kl":
        return (torch.xlogy(p, p) - p * log_q).sum(-1)
    if kind == "reverse_kl":
        log_p = torch.log(p.clamp(min=PROB_FLOOR))
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "skew_kl":
        # log(skew * p + (1 - skew) * q) computed from logs, so a tiny q does not underflow.
        log_mix = torch.logaddexp(math.log(skew) + torch.log(p), math.log(1 - skew) + log_q)
        return (torch.xlogy(p, p) - p * log_mix).sum(-1)
    # jsd
    log_m = torch.logaddexp(math.log(jsd_beta) + torch.log(p), math.log(1 - jsd_beta) + log_q)
    kl_p_m = (torch.xlogy(p, p) - p * log_m).sum(-1)
    kl_q_m = (log_q.exp() * (log_q - log_m)).sum(-1)
    return jsd_beta * kl_p_m + (1 - jsd_beta) * kl_q_m


# Stands in for log 0 in the student's collapsed tail when the top-k ids cover the whole
# vocabulary: finite, so gradients stay finite, and exp() of it is exactly 0 in float32.
_LOG_ZERO = -1e9


def topk_tail(teacher_logprobs: Tensor, vocab_size: int) -> Tensor:
    """The teacher's probability mass outside its top k: ``1 - sum(exp(top-k log-probs))``, >= 0.

    teacher_logprobs [..., k] -> [...]. Exactly 0 when k covers the vocabulary (k >= vocab_size):
    fp16 rounding would otherwise leave a tiny positive "tail" against a student tail of exactly 0.
    """
    if teacher_logprobs.shape[-1] >= vocab_size:
        return torch.zeros(teacher_logprobs.shape[:-1], device=teacher_logprobs.device)
    return (1 - teacher_logprobs.float().exp().sum(-1)).clamp(min=0)


def sparse_divergence(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    mask: Tensor | None = None,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """``divergence`` against a top-k teacher: k log-probabilities plus one tail bucket.

    student_logits [..., V]; teacher_logprobs [..., k], the log-probabilities of the teacher's k
    most likely tokens, already softened at ``temperature`` (a teacher cache stores
    ``log_softmax(logits / T)``); teacher_ids [..., k] their token ids; mask [...] or None -> scalar.

    Both distributions are collapsed onto the same k + 1 outcomes: the teacher's k tokens and
    "any other token". The teacher's tail is ``1 - sum(top-k probabilities)`` (``topk_tail``);
    the student's is the mass ``softmax(student_logits / T)`` puts outside those k ids. Then the
    divergence is the dense one on these [..., k + 1] distributions, so with k = V it equals
    ``divergence`` on the full distributions (up to the teacher's rounding).
    """
    _check_divergence(kind, skew, jsd_beta)
    if teacher_logprobs.shape != teacher_ids.shape or teacher_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, teacher log-probs {tuple(teacher_logprobs.shape)} and ids "
            f"{tuple(teacher_ids.shape)} must agree on the leading shape, and log-probs and ids on k"
        )
    vocab = student_logits.shape[-1]
    valid = _valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    keep = valid.unsqueeze(-1)
    device = student_logits.device
    logits = torch.where(keep, student_logits.float(), torch.zeros((), device=device))
    ids = torch.where(keep, teacher_ids.to(device=device, dtype=torch.long),
                      torch.zeros((), dtype=torch.long, device=device))
    k = ids.shape[-1]
    # Masked rows: a uniform teacher over the k ids (no tail), harmless finite values.
    log_p_k = torch.where(keep, teacher_logprobs.detach().float().to(device),
                          torch.full((), -math.log(k), device=device))
    p_k = log_p_k.exp()
    if k >= vocab:  # the whole distribution: renormalised, so rounded (fp16) log-probs still sum to 1
        p_k = p_k / p_k.sum(-1, keepdim=True)
    tail_p = torch.where(valid, topk_tail(log_p_k, vocab), torch.zeros((), device=device))

    log_q = F.log_softmax(logits / temperature, dim=-1)
    log_q_k = log_q.gather(-1, ids)
    in_top = torch.zeros_like(log_q, dtype=torch.bool).scatter(-1, ids, True)
    # With k = V every entry is filled: about -1e9, whose exp is 0 (no tail), with zero gradients.
    log_q_tail = torch.logsumexp(log_q.masked_fill(in_top, _LOG_ZERO), dim=-1)
    p = torch.cat([p_k, tail_p.unsqueeze(-1)], dim=-1)
    collapsed_log_q = torch.cat([log_q_k, log_q_tail.unsqueeze(-1)], dim=-1)
    return _masked_mean(_per_position(collapsed_log_q, p, kind, skew, jsd_beta), valid)


def sparse_kd_term(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    temperature: float,
    kind: str,
    mask: Tensor | None = None,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """``temperature**2 * sparse_divergence(...)``, the top-k counterpart of ``kd_term``."""
    return temperature**2 * sparse_divergence(
        student_logits, teacher_logprobs, teacher_ids, kind=kind, temperature=temperature, mask=mask,
        skew=skew, jsd_beta=jsd_beta,
    )


def topk_to_dense(teacher_logprobs: Tensor, teacher_ids: Tensor, vocab_size: int) -> Tensor:
    """A full distribution [..., V] from a top-k one: the k probabilities at their ids and the tail
    spread evenly over the other V - k ids (the maximum-entropy guess). Used to mix several
    top-k teachers, and by benchmarks/topk_cache.py to measure what the top k loses."""
    probs = teacher_logprobs.float().exp()
    k = probs.shape[-1]
    tail = topk_tail(teacher_logprobs, vocab_size)
    rest = (tail / max(vocab_size - k, 1)).unsqueeze(-1)
    dense = rest.expand(*probs.shape[:-1], vocab_size).clone()
    return dense.scatter(-1, teacher_ids.long(), probs)


def kd_term(
    student_logits: Tensor,
    teacher_probs: Tensor,
    temperature: float,
    kind: str,
    mask: Tensor | None = None,
    skew: float = 0.1,
    jsd_beta: float = 0.5,
) -> Tensor:
    """The distillation term: ``temperature**2 * divergence(...)`` (shapes as in ``divergence``).

    Softening by T shrinks the soft-target gradients by about 1/T^2; the factor keeps their
    size comparable to the cross-entropy term when T changes (Hinton et al., 2015).
    """
    return temperature**2 * divergence(
        student_logits, teacher_probs, kind=kind, temperature=temperature, mask=mask, skew=skew, jsd_beta=jsd_beta
    )


def pool_hidden(hidden: Tensor, attention_mask: Tensor, mode: str = "mean") -> Tensor:
    """Pool one layer's token states into one vector per example.

    hidden [B, L, D], attention_mask [B, L] (1/True = real token) -> float32 [B, D].
    ``mean``: mean over real tokens (0 for an example without any). ``first``: the first real
    token, which is position 0 (the [CLS] token) with right padding and still the first real
    token with left padding.
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"expected hidden [B, L, D] and attention_mask [B, L], got {tuple(hidden.shape)} and "
            f"{tuple(attention_mask.shape)}"
        )
    states = hidden.float()
    real = attention_mask.to(device=hidden.device, dtype=torch.bool)
    if mode == "mean":
        summed = torch.where(real.unsqueeze(-1), states, torch.zeros((), device=states.device)).sum(1)
        return summed / real.sum(1, keepdim=True).clamp(min=1)
    if mode == "first":
        first = real.int().argmax(dim=1)  # index of the first True; 0 when a row has none
        return states[torch.arange(states.shape[0], device=states.device), first]
    raise ValueError(f"unknown pooling {mode!r}; expected 'mean' or 'first'")


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, projection: torch.nn.Module | None = None) -> Tensor:
    """Mean squared error between the (projected) student states and the teacher's.

    student_hidden [B, Ds], teacher_hidden [B, Dt] -> scalar, the mean over batch and features.
    ``projection`` maps Ds to Dt (a learned ``nn.Linear``, trained with the student) and is
    required when the widths differ.
    """
    student = student_hidden.float()
    if projection is not None:
        student = projection(student).float()
    elif student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"student width {student_hidden.shape[-1]} differs from teacher width {teacher_hidden.shape[-1]}: "
            "a projection is needed"
        )
    if student.shape != teacher_hidden.shape:
        raise ValueError(
            f"student states {tuple(student.shape)} (after projection) and teacher states "
            f"{tuple(teacher_hidden.shape)} must have the same shape"
        )
    return F.mse_loss(student, teacher_hidden.detach().float())


def layer_pairs(
    map: str, student_layers: int, teacher_layers: int, pairs: list[list[int]] | None = None
) -> list[tuple[int, int]]:
    """The (student_layer, teacher_layer) pairs matched by the hidden-state MSE.

    Layers are 0-based transformer blocks (block i's output is ``hidden_states[i + 1]`` in a
    transformers model, whose ``hidden_states[0]`` is the embeddings).

    - ``skip``: with k = teacher_layers // student_layers, student i matches teacher
      (i + 1) * k - 1, i.e. the last block of each group of k (DistilBERT: 6 of 12 -> 1, 3, ..., 11).
    - ``last``: the last min(s, t) student layers match the last min(s, t) teacher layers, in order.
    - ``pairs``: the given [student, teacher] pairs, checked against both depths.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student {student_layers} and teacher {teacher_layers}")
    if map != "pairs" and pairs:
        raise ValueError("pairs are only read when map = 'pairs'")
    if map == "skip":
        step = teacher_layers // student_layers
        if step == 0:
            raise ValueError(
                f"map 'skip' needs a teacher at least as deep as the student "
                f"(student has {student_layers} layers, teacher {teacher_layers}); use 'last' or 'pairs'"
            )
        return [(i, (i + 1) * step - 1) for i in range(student_layers)]
    if map == "last":
        n = min(student_layers, teacher_layers)
        return [(student_layers - n + j, teacher_layers - n + j) for j in range(n)]
    if map == "pairs":
        if not pairs:
            raise ValueError("map 'pairs' needs pairs, e.g. [[0, 1], [1, 3]]")
        checked = []
        for pair in pairs:
            if len(pair) != 2:
                raise ValueError(f"a layer pair is [student_layer, teacher_layer], got {pair}")
            student, teacher = pair
            for role, layer, depth in (("student", student, student_layers), ("teacher", teacher, teacher_layers)):
                if not 0 <= layer < depth:
                    raise ValueError(
                        f"{role} layer {layer} is out of range: the {role} has {depth} layers (0..{depth - 1})"
                    )
            checked.append((student, teacher))
        return checked
    raise ValueError(f"unknown layer map {map!r}; expected 'skip', 'last' or 'pairs'")


def diversity_penalty(student_logits: Tensor, prior: Tensor, mask: Tensor | None = None,
                      temperature: float = 1.0) -> Tensor:
    """KL(prior || mean prediction): how far the batch's average prediction drifts from the label prior.

    student_logits [N, C], prior [C] (label frequencies: counts or probabilities, normalised
    here), mask [N] or None -> scalar. Rows are softmaxed at ``temperature`` and averaged over
    valid rows. At temperature 1 a student can satisfy the penalty by hedging every answer at
    the prior while still answering the majority class everywhere; below 1 the average comes
    close to the histogram of the answers themselves, so only answering differently helps. A
    student that answers the majority class for everything scores high even when each answer
    is confident, which per-example losses do not catch. 0 when fully masked.
    """
    if student_logits.dim() != 2 or prior.shape != student_logits.shape[-1:]:
        raise ValueError(
            f"expected student_logits [N, C] and prior [C], got {tuple(student_logits.shape)} and {tuple(prior.shape)}"
        )
    valid = _valid_mask(mask, student_logits.shape[:-1], student_logits.device)
    any_valid = valid.any()
    # With no valid row, average over all rows instead (a finite value with a normal graph)
    # and zero the result below; this avoids both NaN and a host sync on a data-dependent branch.
    rows = valid | ~any_valid
    target = prior.detach().float().to(student_logits.device)
    target = target / target.sum()

    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_q = torch.where(rows.unsqueeze(-1), log_q, torch.tensor(float("-inf"), device=log_q.device))
    # log of the mean probability, from logs, so a collapsed class's tiny mass keeps its gradient.
    log_mean = torch.logsumexp(log_q, dim=0) - torch.log(rows.sum().float())
    value = (torch.xlogy(target, target) - target * log_mean).sum()
    return torch.where(any_valid, value, torch.zeros_like(value))


def weighted_sum(parts: dict[str, Tensor], weights: dict[str, float], scales: dict[str, float] | None = None) -> Tensor:
    """The total loss: ``sum(weights[k] * parts[k] * scales[k])`` over the parts computed.

    parts: name -> scalar tensor; weights: every part's weight in the recipe (``alpha``, ...);
    scales: per part, the micro-batch's share of the step (``train``), 1 when None.
    """
    if scales is None:
        return sum(weights[k] * v for k, v in parts.items())
    return sum(weights[k] * v * scales[k] for k, v in parts.items())


def check_finite(parts: dict[str, Tensor | float], step: int) -> None:
    """Raise ``NonFiniteLoss`` naming the step and every NaN or infinite part."""
    bad = [f"{name} = {float(value):g}" for name, value in parts.items() if not math.isfinite(float(value))]
    if bad:
        raise NonFiniteLoss(
            f"step {step}: non-finite loss term {', '.join(bad)}",
            "lower train.lr, set train.max_grad_norm, or use bf16 instead of fp16; "
            "then resume from the last checkpoint with --resume",
        )
