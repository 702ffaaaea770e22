"""kdcli.losses: golden values, identities between divergences, masking, dtypes, teacher mixing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcli import losses
from kdcli.errors import KdError

KINDS = list(losses.DIVERGENCES)
LN = math.log


def logits_for(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is ``probs`` (one row)."""
    return torch.tensor([probs]).log()


# --- golden values -----------------------------------------------------------------------------
# p = [1/2, 1/2] (teacher), q = [1/4, 3/4] (student); values worked out by hand below.
P = torch.tensor([[0.5, 0.5]])
Q_LOGITS = logits_for([0.25, 0.75])
GOLDEN = {
    # 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln(4/3)
    "forward_kl": 0.5 * LN(4 / 3),
    # 1/4 ln(1/4 / 1/2) + 3/4 ln(3/4 / 1/2) = 3/4 ln 3 - ln 2
    "reverse_kl": 0.75 * LN(3) - LN(2),
    # skew 0.5: m = [3/8, 5/8]; 1/2 ln(4/3) + 1/2 ln(4/5) = 1/2 ln(16/15)
    "skew_kl": 0.5 * LN(16 / 15),
    # beta 0.5: m = [3/8, 5/8]; 1/2 KL(p||m) + 1/2 (1/4 ln(2/3) + 3/4 ln(6/5))
    "jsd": 0.5 * (0.5 * LN(16 / 15)) + 0.5 * (0.25 * LN(2 / 3) + 0.75 * LN(6 / 5)),
}


@pytest.mark.parametrize("kind", KINDS)
def test_golden_values(kind):
    value = losses.divergence(Q_LOGITS, P, kind=kind, skew=0.5, jsd_beta=0.5)
    assert value.item() == pytest.approx(GOLDEN[kind], rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_softens_student_and_kd_term_scales_by_t_squared(kind):
    # Doubling the logits and using T = 2 gives the same student distribution q.
    student = 2 * Q_LOGITS
    assert losses.divergence(student, P, kind, temperature=2.0, skew=0.5).item() == pytest.approx(
        GOLDEN[kind], rel=1e-5
    )
    assert losses.kd_term(student, P, 2.0, kind, skew=0.5).item() == pytest.approx(4 * GOLDEN[kind], rel=1e-5)


def test_zero_teacher_probabilities():
    p = torch.tensor([[1.0, 0.0]])
    # Forward KL: the p = 0 term counts 0, leaving 1 * ln(1 / 1/4).
    assert losses.divergence(Q_LOGITS, p, "forward_kl").item() == pytest.approx(LN(4), rel=1e-5)
    # Reverse KL: log 0 is clamped at PROB_FLOOR, so the value is large but finite.
    expected = 0.25 * LN(0.25) + 0.75 * (LN(0.75) - LN(losses.PROB_FLOOR))
    assert losses.divergence(Q_LOGITS, p, "reverse_kl").item() == pytest.approx(expected, rel=1e-5)
    for kind in KINDS:
        student = Q_LOGITS.clone().requires_grad_()
        value = losses.divergence(student, p, kind)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(student.grad).all()


# --- identities --------------------------------------------------------------------------------
def random_pair(shape=(5, 7), seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale, torch.randn(shape, generator=gen) * scale


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind):
    logits, _ = random_pair()
    value = losses.divergence(logits, F.softmax(logits, dim=-1), kind)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_forward_kl_matches_torch_kl_div():
    student, teacher = random_pair()
    p = F.softmax(teacher, dim=-1)
    expected = F.kl_div(F.log_softmax(student, dim=-1), p, reduction="batchmean")
    torch.testing.assert_close(losses.divergence(student, p, "forward_kl"), expected)


def test_reverse_kl_is_forward_kl_with_arguments_swapped():
    a, b = random_pair()
    reverse = losses.divergence(a, F.softmax(b, dim=-1), "reverse_kl")
    forward = losses.divergence(b, F.softmax(a, dim=-1), "forward_kl")
    torch.testing.assert_close(reverse, forward)


def test_skew_kl_tends_to_forward_kl_as_skew_goes_to_zero():
    # The gap shrinks like skew * (sum p^2/q - 1), so keep q away from 0 for a tight bound.
    student, teacher = random_pair(scale=1.0)
    p = F.softmax(teacher, dim=-1)
    forward = losses.divergence(student, p, "forward_kl").item()
    gaps = [abs(losses.divergence(student, p, "skew_kl", skew=s).item() - forward) for s in (0.3, 0.1, 1e-3, 1e-6)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-4


def test_jsd_is_symmetric_and_bounded_by_log_2_at_half():
    a, b = random_pair(scale=20.0)  # nearly one-hot, nearly disjoint: close to the bound
    ab = losses.divergence(a, F.softmax(b, dim=-1), "jsd", jsd_beta=0.5)
    ba = losses.divergence(b, F.softmax(a, dim=-1), "jsd", jsd_beta=0.5)
    torch.testing.assert_close(ab, ba)
    assert 0 < ab.item() <= LN(2) + 1e-6


def test_unknown_kind_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="unknown divergence"):
        losses.divergence(Q_LOGITS, P, "kl")
    with pytest.raises(ValueError, match="skew"):
        losses.divergence(Q_LOGITS, P, "skew_kl", skew=0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.divergence(Q_LOGITS, torch.tensor([[0.2, 0.3, 0.5]]))


# --- property tests ----------------------------------------------------------------------------
pairs = st.tuples(st.integers(1, 4), st.integers(2, 6), st.integers(0, 2**31 - 1), st.floats(0.1, 10.0))


@settings(max_examples=40, deadline=None)
@given(pairs, st.sampled_from(KINDS), st.floats(0.5, 4.0))
def test_divergences_are_non_negative_and_finite(shape_seed_scale, kind, temperature):
    rows, classes, seed, scale = shape_seed_scale
    student, teacher = random_pair((rows, classes), seed, scale)
    value = losses.divergence(student, F.softmax(teacher, dim=-1), kind, temperature=temperature)
    assert torch.isfinite(value) and value.item() >= -1e-6


@settings(max_examples=40, deadline=None)
@given(pairs)
def test_jsd_symmetry_and_bound_hold_everywhere(shape_seed_scale):
    rows, classes, seed, scale = shape_seed_scale
    a, b = random_pair((rows, classes), seed, scale)
    ab = losses.divergence(a, F.softmax(b, dim=-1), "jsd").item()
    ba = losses.divergence(b, F.softmax(a, dim=-1), "jsd").item()
    assert ab == pytest.approx(ba, abs=1e-5)
    assert -1e-6 <= ab <= LN(2) + 1e-6


# --- masking, shapes, gradients, dtypes --------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_masked_positions_do_not_change_the_value(kind):
    student, teacher = random_pair((6, 5))
    p = F.softmax(teacher, dim=-1)
    mask = torch.tensor([True, False, True, True, False, True])
    expected = losses.divergence(student[mask], p[mask], kind)

    garbage = student.clone()
    garbage[~mask] = float("nan")
    garbage_p = p.clone()
    garbage_p[~mask] = float("inf")
    garbage.requires_grad_()
    value = losses.divergence(garbage, garbage_p, kind, mask=mask)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert torch.isfinite(garbage.grad).all()
    assert (garbage.grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_is_zero_and_backpropagates(kind):
    student, teacher = random_pair((3, 4))
    student.requires_grad_()
    value = losses.kd_term(student, F.softmax(teacher, dim=-1), 2.0, kind, mask=torch.zeros(3, dtype=torch.bool))
    assert value.item() == 0.0
    value.backward()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_token_inputs_with_padding_equal_the_valid_rows(kind):
    student, teacher = random_pair((2, 4, 11))  # [B, T, V]
    p = F.softmax(teacher / 2.0, dim=-1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    token = losses.divergence(student, p, kind, temperature=2.0, mask=mask)
    rows = losses.divergence(student[mask], p[mask], kind, temperature=2.0)  # [5, V]
    torch.testing.assert_close(token, rows)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_finite_for_extreme_logits(kind):
    student, teacher = random_pair((4, 6), scale=200.0)
    student.requires_grad_()
    losses.kd_term(student, F.softmax(teacher, dim=-1), 1.0, kind).backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_inputs_are_computed_in_fp32(dtype, kind):
    student, teacher = random_pair((4, 6))
    p = F.softmax(teacher, dim=-1)
    low = losses.divergence(student.to(dtype), p.to(dtype), kind, temperature=2.0)
    same_inputs_fp32 = losses.divergence(student.to(dtype).float(), p.to(dtype).float(), kind, temperature=2.0)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, same_inputs_fp32)


def test_half_precision_logits_too_large_for_fp16_exp():
    # exp(20) overflows fp16 (max 65504); fp32 math inside keeps this finite.
    student = torch.tensor([[20.0, 0.0, -20.0]], dtype=torch.float16)
    assert torch.isfinite(losses.divergence(student, torch.full((1, 3), 1 / 3), "forward_kl"))
    assert torch.isfinite(losses.cross_entropy(student * 3, torch.tensor([2])))


# --- cross-entropy -----------------------------------------------------------------------------
def test_cross_entropy_ignores_labels_and_handles_all_ignored():
    logits, _ = random_pair((2, 3, 5))
    labels = torch.tensor([[1, -100, 4], [0, 2, -100]])
    valid = labels != -100
    expected = F.cross_entropy(logits[valid], labels[valid])
    torch.testing.assert_close(losses.cross_entropy(logits, labels), expected)

    logits.requires_grad_()
    none = losses.cross_entropy(logits, torch.full((2, 3), -100))
    assert none.item() == 0.0
    none.backward()
    assert (logits.grad == 0).all()


# --- teacher mixing ----------------------------------------------------------------------------
def test_single_teacher_is_its_softmax():
    logits, _ = random_pair((3, 4))
    for mode in losses.TEACHER_WEIGHTINGS:
        mixed = losses.teacher_probs([logits], 2.0, mode=mode, labels=torch.tensor([0, 1, 2]))
        torch.testing.assert_close(mixed, F.softmax(logits / 2.0, dim=-1))


def test_static_weights_are_normalised():
    a, b = random_pair((3, 4))
    mixed = losses.teacher_probs([a, b], 1.0, weights=[3.0, 1.0])
    torch.testing.assert_close(mixed, 0.75 * F.softmax(a, -1) + 0.25 * F.softmax(b, -1))
    torch.testing.assert_close(mixed.sum(-1), torch.ones(3))
    equal = losses.teacher_probs([a, b], 1.0)
    torch.testing.assert_close(equal, 0.5 * F.softmax(a, -1) + 0.5 * F.softmax(b, -1))


def test_teacher_logits_are_constants():
    a, b = random_pair((2, 3))
    a.requires_grad_()
    assert not losses.teacher_probs([a, b], 1.0).requires_grad


def test_confidence_picks_the_teacher_that_believes_the_gold_label():
    right = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # sure of class 0 / uniform
    wrong = torch.tensor([[0.0, 8.0, 0.0], [0.0, 0.0, 8.0]])  # sure of class 1 / class 2
    labels = torch.tensor([0, 2])
    mixed = losses.teacher_probs([right, wrong], 1.0, mode="confidence", labels=labels)
    assert mixed[0].argmax() == 0 and mixed[0, 0] > 0.99
    assert mixed[1].argmax() == 2
    # Weights are proportional to the gold probability: row 1 is 1/3 vs ~0.9993.
    c_right, c_wrong = F.softmax(right[1], -1)[2], F.softmax(wrong[1], -1)[2]
    expected = (c_right * F.softmax(right[1], -1) + c_wrong * F.softmax(wrong[1], -1)) / (c_right + c_wrong)
    torch.testing.assert_close(mixed[1], expected)


@pytest.mark.parametrize("missing", [-1, -100])
def test_confidence_falls_back_to_static_weights_without_a_gold_label(missing):
    a, b = random_pair((2, 4))
    mixed = losses.teacher_probs([a, b], 2.0, mode="confidence", labels=torch.tensor([missing, missing]))
    torch.testing.assert_close(mixed, losses.teacher_probs([a, b], 2.0))
    with pytest.raises(ValueError, match="labels"):
        losses.teacher_probs([a, b], 2.0, mode="confidence")


def test_entropy_prefers_the_sharper_teacher():
    sharp = torch.tensor([[6.0, 0.0, 0.0, 0.0]])
    flat = torch.tensor([[0.0, 0.3, 0.0, 0.0]])
    mixed = losses.teacher_probs([sharp, flat], 1.0, mode="entropy")
    h = [-(p * p.log()).sum() for p in (F.softmax(sharp, -1), F.softmax(flat, -1))]
    w_sharp = (1 / h[0]) / (1 / h[0] + 1 / h[1])
    assert w_sharp > 0.5
    expected = w_sharp * F.softmax(sharp, -1) + (1 - w_sharp) * F.softmax(flat, -1)
    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-6)


def test_teacher_mixing_token_shapes():
    a, b = random_pair((2, 3, 5))
    labels = torch.tensor([[0, 1, -100], [4, -100, -100]])
    for mode in losses.TEACHER_WEIGHTINGS:
        mixed = losses.teacher_probs([a, b], 2.0, mode=mode, labels=labels)
        assert mixed.shape == (2, 3, 5) and mixed.dtype == torch.float32
        torch.testing.assert_close(mixed.sum(-1), torch.ones(2, 3))


# --- hidden states -----------------------------------------------------------------------------
def test_pool_hidden_mean_and_first():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float16).reshape(2, 3, 2)
    right_padded = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = losses.pool_hidden(hidden, right_padded, "mean")
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, torch.tensor([[1.0, 2.0], [8.0, 9.0]]))
    torch.testing.assert_close(losses.pool_hidden(hidden, right_padded, "first"), hidden[:, 0].float())
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(losses.pool_hidden(hidden, left_padded, "first"), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    with pytest.raises(ValueError, match="pooling"):
        losses.pool_hidden(hidden, right_padded, "max")


def test_hidden_mse_same_width():
    student = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert losses.hidden_mse(student, teacher).item() == pytest.approx((4 + 4) / 4)
    assert losses.hidden_mse(teacher, teacher).item() == 0.0


def test_hidden_mse_with_projection():
    student = torch.randn(3, 4, requires_grad=True)
    teacher = torch.randn(3, 6)
    with pytest.raises(ValueError, match="projection"):
        losses.hidden_mse(student, teacher)
    projection = torch.nn.Linear(4, 6)
    value = losses.hidden_mse(student.to(torch.bfloat16), teacher, projection)
    expected = F.mse_loss(projection(student.to(torch.bfloat16).float()), teacher)
    torch.testing.assert_close(value, expected)
    value.backward()
    assert projection.weight.grad is not None and student.grad is not None
    with pytest.raises(ValueError, match="same shape"):
        losses.hidden_mse(student, teacher, torch.nn.Linear(4, 5))


def test_layer_pairs_skip():
    assert losses.layer_pairs("skip", 6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert losses.layer_pairs("skip", 3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert losses.layer_pairs("skip", 4, 6) == [(0, 0), (1, 1), (2, 2), (3, 3)]  # k = 1
    with pytest.raises(ValueError, match="at least as deep"):
        losses.layer_pairs("skip", 6, 4)


def test_layer_pairs_last():
    assert losses.layer_pairs("last", 2, 4) == [(0, 2), (1, 3)]
    assert losses.layer_pairs("last", 4, 2) == [(2, 0), (3, 1)]


def test_layer_pairs_explicit_and_errors():
    assert losses.layer_pairs("pairs", 2, 4, [[0, 1], [1, 3]]) == [(0, 1), (1, 3)]
    with pytest.raises(ValueError, match=r"teacher layer 4 is out of range: the teacher has 4 layers \(0\.\.3\)"):
        losses.layer_pairs("pairs", 2, 4, [[0, 4]])
    with pytest.raises(ValueError, match=r"student layer 2 is out of range: the student has 2 layers \(0\.\.1\)"):
        losses.layer_pairs("pairs", 2, 4, [[2, 0]])
    with pytest.raises(ValueError, match=r"student layer -1"):
        losses.layer_pairs("pairs", 2, 4, [[-1, 0]])
    with pytest.raises(ValueError, match="needs pairs"):
        losses.layer_pairs("pairs", 2, 4)
    with pytest.raises(ValueError, match="only read"):
        losses.layer_pairs("skip", 2, 4, [[0, 1]])
    with pytest.raises(ValueError, match="unknown layer map"):
        losses.layer_pairs("every", 2, 4)


# --- diversity ---------------------------------------------------------------------------------
def test_diversity_is_zero_when_the_mean_prediction_is_the_prior():
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0]])  # confident, but balanced across the batch
    assert losses.diversity_penalty(logits, torch.tensor([0.5, 0.5])).item() == pytest.approx(0.0, abs=1e-6)
    # Counts work as a prior too.
    assert losses.diversity_penalty(logits, torch.tensor([10, 10])).item() == pytest.approx(0.0, abs=1e-6)


def test_diversity_penalises_a_collapsed_student():
    prior = torch.tensor([0.5, 0.3, 0.2])
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 4, requires_grad=True)
    balanced = torch.tensor([[9.0, 0.0, 0.0], [9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    collapsed_value = losses.diversity_penalty(collapsed, prior)
    assert collapsed_value > 5 * losses.diversity_penalty(balanced, prior)
    # The penalty pushes the minority classes up even when their probability is tiny.
    collapsed_value.backward()
    assert (collapsed.grad[:, 1:] < 0).all()


def test_diversity_masking():
    prior = torch.tensor([0.5, 0.5])
    logits = torch.tensor([[3.0, 0.0], [0.0, 3.0], [50.0, 0.0]], requires_grad=True)
    mask = torch.tensor([True, True, False])
    assert losses.diversity_penalty(logits, prior, mask).item() == pytest.approx(0.0, abs=1e-6)
    none = losses.diversity_penalty(logits, prior, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert (logits.grad == 0).all()


# --- checking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, skew, jsd_beta, message", [
    ("skew_kl", 0.0, 0.5, "skew must be in"), ("jsd", 0.1, 1.0, "jsd_beta must be in"),
    ("kl", 0.1, 0.5, "unknown divergence"),
])
def test_dense_and_top_k_divergences_refuse_the_same_bad_settings(kind, skew, jsd_beta, message):
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match=message):
        losses.divergence(logits, torch.softmax(logits, -1), kind, skew=skew, jsd_beta=jsd_beta)
    top = torch.log_softmax(logits, -1).topk(2)
    with pytest.raises(ValueError, match=message):
        losses.sparse_divergence(logits, top.values, top.indices, kind, skew=skew, jsd_beta=jsd_beta)


def test_check_finite_names_the_step_and_term():
    losses.check_finite({"ce": torch.tensor(1.0), "kd": 0.5}, step=3)
    with pytest.raises(losses.NonFiniteLoss, match=r"step 7: non-finite loss term kd = nan, hidden = inf") as err:
        losses.check_finite({"ce": 1.0, "kd": torch.tensor(float("nan")), "hidden": float("inf")}, step=7)
    assert isinstance(err.value, ValueError) and isinstance(err.value, KdError)
    assert err.value.hint


def test_the_diversity_penalty_stops_a_skewed_fit_collapsing_onto_the_majority_answer():
    """A linear classifier on a 90/5/5 toy set with a weak cue: trained on CE alone it answers the
    majority class for every example; with the (sharpened) penalty it answers all three.

    A linear model because it trains in milliseconds; tiny transformers need far more steps
    before their outputs depend on the input at all.
    """
    torch.manual_seed(0)
    n = 400
    labels = torch.multinomial(torch.tensor([0.9, 0.05, 0.05]), n, replacement=True)
    features = torch.randn(n, 8)
    features[torch.arange(n), labels] += 0.5
    prior = torch.bincount(labels, minlength=3).float()

    def fit(gamma: float) -> list[int]:
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(100):
            batch = torch.randint(0, n, (32,))
            logits = model(features[batch])
            loss = losses.cross_entropy(logits, labels[batch]) + gamma * losses.diversity_penalty(
                logits, prior, temperature=0.3
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.bincount(model(features).argmax(-1), minlength=3).tolist()

    collapsed, diverse = fit(0.0), fit(1.0)
    assert sum(c > 0 for c in collapsed) == 1
    assert all(c > 0 for c in diverse)
