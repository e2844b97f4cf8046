"""Tests for prefsel.losses: every value is checked against an independent float64 hand
computation with Python's math module (never by calling prefsel's own helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prefsel.losses import (
    DPO_LOSS_TYPES,
    bt_loss,
    dpo_loss,
    gamma_schedule,
    hps_multi_negative_loss,
    hps_negative_probs,
    hps_sample_negative,
    hps_sample_negatives_mc,
    hps_select_chosen,
    reward_accuracy,
)

# ---------------------------------------------------------------- hand-computation helpers (math only)


def log_sig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def hand_dpo(pc, pr, rc, rr, beta, loss_type, ls=0.0):
    a, b = pc - rc, pr - rr
    h = a - b
    z = beta * h
    if loss_type == "sigmoid":
        return -log_sig(z) * (1 - ls) - log_sig(-z) * ls
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "exo_pair":
        eps = ls if ls != 0 else 1e-3
        return sig(z) * (log_sig(z) - math.log(1 - eps)) + sig(-z) * (log_sig(-z) - math.log(eps))
    if loss_type == "nca_pair":
        cr, rj = beta * a, beta * b
        return -log_sig(cr) - 0.5 * log_sig(-cr) - 0.5 * log_sig(-rj)
    if loss_type == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    raise AssertionError(loss_type)


# (pc, pr, rc, rr): positive, negative, zero and large margins
PAIRS = [
    (-10.0, -12.5, -11.0, -12.0),  # a=1, b=-0.5, h=1.5
    (-20.0, -15.0, -18.0, -17.5),  # a=-2, b=2.5, h=-4.5
    (-7.25, -7.25, -7.25, -7.25),  # h=0
    (-100.0, -300.0, -120.0, -250.0),  # a=20, b=-50, h=70
]


def _cols(dtype=torch.float64):
    return [torch.tensor([p[i] for p in PAIRS], dtype=dtype) for i in range(4)]


# ---------------------------------------------------------------- DPO family


def test_loss_types_constant():
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard"}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "exo_pair", "nca_pair", "sppo_hard"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_matches_hand(loss_type, beta):
    out = dpo_loss(*_cols(), beta=beta, loss_type=loss_type)
    want = [hand_dpo(*p, beta, loss_type) for p in PAIRS]
    assert out.losses.dtype == torch.float64 and out.losses.shape == (len(PAIRS),)
    for got, w in zip(out.losses.tolist(), want):
        assert got == pytest.approx(w, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.1), ("sigmoid", 0.3), ("exo_pair", 0.2), ("exo_pair", 1e-3)])
def test_dpo_label_smoothing(loss_type, ls):
    out = dpo_loss(*_cols(), beta=0.25, loss_type=loss_type, label_smoothing=ls)
    want = [hand_dpo(*p, 0.25, loss_type, ls) for p in PAIRS]
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # label smoothing must actually change the sigmoid loss
    if loss_type == "sigmoid":
        plain = dpo_loss(*_cols(), beta=0.25).losses
        assert not torch.allclose(plain, out.losses)


def test_exo_default_eps_is_1e_3():
    a = dpo_loss(*_cols(), beta=0.1, loss_type="exo_pair").losses
    b = dpo_loss(*_cols(), beta=0.1, loss_type="exo_pair", label_smoothing=1e-3).losses
    c = dpo_loss(*_cols(), beta=0.1, loss_type="exo_pair", label_smoothing=1e-2).losses
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_dpo_hand_picked_literal_values():
    # pc=-10, pr=-12.5, rc=-11, rr=-12, beta=0.1 -> h=1.5, beta*h=0.15
    args = [torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.5, -11.0, -12.0)]
    assert dpo_loss(*args, beta=0.1).losses.item() == pytest.approx(math.log(1 + math.exp(-0.15)), rel=1e-14)
    assert dpo_loss(*args, beta=0.1, loss_type="ipo").losses.item() == pytest.approx((1.5 - 5.0) ** 2, rel=1e-14)
    assert dpo_loss(*args, beta=0.1, loss_type="hinge").losses.item() == pytest.approx(0.85, rel=1e-14)
    assert dpo_loss(*args, beta=0.1, loss_type="sppo_hard").losses.item() == pytest.approx(
        (1 - 5) ** 2 + (-0.5 + 5) ** 2, rel=1e-14
    )


def test_dpo_rewards_detached_and_values():
    pc, pr, rc, rr = _cols()
    pc.requires_grad_(True)
    out = dpo_loss(pc, pr, rc, rr, beta=0.2)
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    assert out.chosen_rewards.tolist() == pytest.approx([0.2 * (p[0] - p[2]) for p in PAIRS], rel=1e-12, abs=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx([0.2 * (p[1] - p[3]) for p in PAIRS], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_float32(loss_type):
    out32 = dpo_loss(*_cols(torch.float32), beta=0.1, loss_type=loss_type).losses
    assert out32.dtype == torch.float32
    want = [hand_dpo(*p, 0.1, loss_type) for p in PAIRS]
    assert out32.tolist() == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_dpo_bad_loss_type_and_beta():
    with pytest.raises(ValueError, match="valid: sigmoid, ipo, hinge, exo_pair, nca_pair, sppo_hard"):
        dpo_loss(*_cols(), loss_type="dpo")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(*_cols(), beta=0.0)


def test_dpo_sigmoid_gradient_central_differences():
    beta = 0.3
    x = [torch.tensor([p[i] for p in PAIRS[:3]], dtype=torch.float64, requires_grad=True) for i in range(4)]
    loss = dpo_loss(*x, beta=beta).losses.sum()
    grads = torch.autograd.grad(loss, x)
    eps = 1e-6
    for i in range(4):  # which input
        for k in range(3):  # which row
            def f(delta):
                p = [list(t) for t in PAIRS[:3]]
                p[k][i] += delta
                return sum(hand_dpo(*row, beta, "sigmoid") for row in p)

            fd = (f(eps) - f(-eps)) / (2 * eps)
            assert grads[i][k].item() == pytest.approx(fd, rel=1e-6, abs=1e-9)
    # and the closed form: dL/dpc = -beta * sigmoid(-beta*h)
    h0 = (PAIRS[0][0] - PAIRS[0][2]) - (PAIRS[0][1] - PAIRS[0][3])
    assert grads[0][0].item() == pytest.approx(-beta * sig(-beta * h0), rel=1e-12)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_gradcheck(loss_type):
    x = [torch.tensor([p[i] for p in PAIRS[:2]], dtype=torch.float64, requires_grad=True) for i in range(4)]
    assert torch.autograd.gradcheck(lambda *t: dpo_loss(*t, beta=0.2, loss_type=loss_type).losses, x)


# ---------------------------------------------------------------- Bradley-Terry


def test_bt_loss_plain_margin_center():
    rw = [1.5, -0.3, 2.0, 0.0]
    rl = [0.5, 0.7, -4.0, 0.0]
    m = [0.25, 0.0, 1.0, -0.5]
    tw, tl, tm = (torch.tensor(v, dtype=torch.float64) for v in (rw, rl, m))
    assert bt_loss(tw, tl).tolist() == pytest.approx([-log_sig(w - l) for w, l in zip(rw, rl)], rel=1e-13)
    assert bt_loss(tw, tl, margin=tm).tolist() == pytest.approx(
        [-log_sig(w - l - mm) for w, l, mm in zip(rw, rl, m)], rel=1e-13
    )
    assert bt_loss(tw, tl, margin=0.5).tolist() == pytest.approx([-log_sig(w - l - 0.5) for w, l in zip(rw, rl)], rel=1e-13)
    got = bt_loss(tw, tl, margin=tm, center_coef=0.01).tolist()
    want = [-log_sig(w - l - mm) + 0.01 * (w + l) ** 2 for w, l, mm in zip(rw, rl, m)]
    assert got == pytest.approx(want, rel=1e-13)
    # literal: r_w - r_l = 1 -> log(1 + e^-1)
    assert bt_loss(torch.tensor([1.5]), torch.tensor([0.5])).item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-6)
    # [B, 1] from a one-label sequence classifier
    assert bt_loss(tw[:, None], tl[:, None]).shape == (4,)


def test_bt_gradient():
    rw = torch.tensor([0.4, -1.0], dtype=torch.float64, requires_grad=True)
    rl = torch.tensor([0.1, 2.0], dtype=torch.float64, requires_grad=True)
    bt_loss(rw, rl, center_coef=0.1).sum().backward()
    # d/dr_w = -sigmoid(-(w-l)) + 2c(w+l)
    for k, (w, l) in enumerate([(0.4, 0.1), (-1.0, 2.0)]):
        assert rw.grad[k].item() == pytest.approx(-sig(-(w - l)) + 0.2 * (w + l), rel=1e-12)
        assert rl.grad[k].item() == pytest.approx(sig(-(w - l)) + 0.2 * (w + l), rel=1e-12)


def test_reward_accuracy_ties_wrong():
    c = torch.tensor([1.0, 2.0, 3.0, 0.0])
    r = torch.tensor([0.0, 2.0, 4.0, -1.0])
    assert reward_accuracy(c, r).item() == pytest.approx(0.5)


# ---------------------------------------------------------------- HPS sampler


def test_select_chosen_argmax_ties_lowest():
    assert hps_select_chosen([0.1, 0.9, 0.3]) == 1
    assert hps_select_chosen([0.5, 2.0, 2.0, 1.0, 2.0]) == 1
    assert hps_select_chosen([-3.0, -3.0]) == 0
    assert hps_select_chosen(np.array([1, 5, 5])) == 1
    with pytest.raises(ValueError):
        hps_select_chosen([])


def hand_probs(rewards, chosen, gamma):
    w = [0.0 if j == chosen else math.exp(gamma * r) for j, r in enumerate(rewards)]
    s = sum(w)
    return [x / s for x in w]


@pytest.mark.parametrize("gamma", [-5.0, 0.0, 1.0, 3.0])
def test_negative_probs_vs_hand(gamma):
    rewards = [0.1, 0.9, 0.5, 0.85, 0.2]
    p = hps_negative_probs(rewards, 1, gamma)
    assert p.dtype == np.float64
    assert p.tolist() == pytest.approx(hand_probs(rewards, 1, gamma), rel=1e-13, abs=1e-300)
    assert p[1] == 0.0 and p.sum() == pytest.approx(1.0, abs=1e-15)


def test_negative_probs_stable_large_gamma():
    rewards = [10.0, 9.0, 8.0, 3.0]
    p = hps_negative_probs(rewards, 0, 1000.0)  # exp(9000) would overflow without shifting
    assert np.all(np.isfinite(p))
    assert p[1] == pytest.approx(1.0) and p[2] == pytest.approx(math.exp(-1000.0), abs=1e-300)
    p = hps_negative_probs(rewards, 0, -1000.0)
    assert p[3] == pytest.approx(1.0)
    # gamma = 0 is uniform over the negatives
    assert hps_negative_probs(rewards, 2, 0.0).tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3])


def test_sampler_deterministic_and_errors():
    rewards = [0.1, 0.9, 0.5, 0.85, 0.2, 0.6]
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    a = [hps_sample_negative(rewards, 2.0, rng_a) for _ in range(200)]
    b = [hps_sample_negative(rewards, 2.0, rng_b) for _ in range(200)]
    assert a == b
    c_rng = np.random.default_rng(8)
    c = [hps_sample_negative(rewards, 2.0, c_rng) for _ in range(200)]
    assert c != a
    assert all(ch == 1 and rj != 1 for ch, rj in a)
    with pytest.raises(ValueError, match="at least 2"):
        hps_sample_negative([1.0], 1.0, np.random.default_rng(0))


@pytest.mark.parametrize("gamma", [0.0, 3.0, -2.0])
def test_sampler_empirical_frequencies(gamma):
    rewards = [0.1, 0.9, 0.5, 0.85, 0.2]
    draws = 20000
    rng = np.random.default_rng(1234)
    counts = [0] * len(rewards)
    for _ in range(draws):
        ch, rj = hps_sample_negative(rewards, gamma, rng)
        assert ch == 1
        counts[rj] += 1
    p = hand_probs(rewards, 1, gamma)
    assert counts[1] == 0
    chi2 = sum((counts[j] - draws * p[j]) ** 2 / (draws * p[j]) for j in range(len(rewards)) if p[j] > 0)
    # df = 3; P(chi2 > 27) ~ 6e-6. A wrong distribution (e.g. uniform for gamma=3) gives chi2 in the hundreds.
    assert chi2 < 27.0, (counts, p, chi2)


def test_mc_negatives():
    rewards = [0.3, 0.1, 0.9, 0.4, 0.2, 0.7, 0.5]
    s1 = hps_sample_negatives_mc(rewards, 2, 3, np.random.default_rng(3))
    s2 = hps_sample_negatives_mc(rewards, 2, 3, np.random.default_rng(3))
    assert s1 == s2 and len(s1) == 3 and len(set(s1)) == 3 and 2 not in s1 and s1 == sorted(s1)
    assert hps_sample_negatives_mc(rewards, 2, 10, np.random.default_rng(0)) == [0, 1, 3, 4, 5, 6]
    # uniform inclusion: each negative appears with prob m/(n-1) = 3/6
    rng = np.random.default_rng(99)
    hits = [0] * 7
    trials = 6000
    for _ in range(trials):
        for j in hps_sample_negatives_mc(rewards, 2, 3, rng):
            hits[j] += 1
    assert hits[2] == 0
    for j in (0, 1, 3, 4, 5, 6):
        assert abs(hits[j] / trials - 0.5) < 0.03  # sd ~ 0.0065


# ---------------------------------------------------------------- gamma schedule


def test_gamma_schedule():
    assert gamma_schedule(0, 11) == -5.0
    assert gamma_schedule(10, 11) == 5.0
    assert gamma_schedule(5, 11) == pytest.approx(0.0, abs=1e-15)
    assert gamma_schedule(2, 11) == pytest.approx(-3.0)
    assert gamma_schedule(-4, 11) == -5.0 and gamma_schedule(50, 11) == 5.0
    assert gamma_schedule(0, 1) == 5.0 and gamma_schedule(0, 0) == 5.0
    assert gamma_schedule(1, 3, gamma_start=0.0, gamma_end=2.0) == pytest.approx(1.0)


# ---------------------------------------------------------------- HPS multi-negative loss


def hand_hps(pol, ref, rm, chosen, beta, gamma, valid=None, scale=True):
    """Paper loss, literally: -log(e^{r_w} / (e^{r_w} + c * sum_j q_j e^{r_j}))."""
    n = len(pol)
    valid = valid or [True] * n
    r = [beta * (p - q) for p, q in zip(pol, ref)]
    negs = [j for j in range(n) if j != chosen and valid[j]]
    z = sum(math.exp(gamma * rm[j]) for j in negs)
    q = {j: math.exp(gamma * rm[j]) / z for j in negs}
    c = len(negs) if scale else 1
    s = c * sum(q[j] * math.exp(r[j]) for j in negs)
    return -math.log(math.exp(r[chosen]) / (math.exp(r[chosen]) + s)), r, s


POL = [-12.0, -10.0, -11.5, -14.0]
REF = [-11.0, -11.0, -12.5, -13.0]
RM = [0.2, 1.5, 1.1, -0.4]
CH = 1  # argmax of RM


def _row(*vals, dtype=torch.float64):
    return [torch.tensor([v], dtype=dtype) for v in vals]


@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("gamma", [5.0, 0.0, -2.0])
def test_hps_loss_one_row_n4(scale, gamma):
    pol, ref, rm = _row(POL, REF, RM)
    got = hps_multi_negative_loss(pol, ref, rm, [CH], beta=0.25, gamma=gamma, scale_by_n_minus_1=scale)
    want, _, _ = hand_hps(POL, REF, RM, CH, 0.25, gamma, scale=scale)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-13)


def test_hps_scale_changes_value():
    pol, ref, rm = _row(POL, REF, RM)
    a = hps_multi_negative_loss(pol, ref, rm, [CH], scale_by_n_minus_1=True)
    b = hps_multi_negative_loss(pol, ref, rm, [CH], scale_by_n_minus_1=False)
    assert a.item() > b.item() + 1e-3


def test_hps_gamma_zero_is_plain_multinegative_softmax():
    pol, ref, rm = _row(POL, REF, RM)
    got = hps_multi_negative_loss(pol, ref, rm, [CH], beta=0.25, gamma=0.0).item()
    r = [0.25 * (p - q) for p, q in zip(POL, REF)]
    want = -math.log(math.exp(r[CH]) / sum(math.exp(x) for x in r))
    assert got == pytest.approx(want, rel=1e-13)


@pytest.mark.parametrize("scale", [True, False])
def test_hps_loss_mask_excludes_response(scale):
    valid = [True, True, False, True]  # drop the hardest negative (RM 1.1), so the value must move
    pol = list(POL)
    pol[2] = float("nan")  # padded slot holding garbage must not matter
    t_pol, t_ref, t_rm = _row(pol, REF, RM)
    t_pol.requires_grad_(True)
    got = hps_multi_negative_loss(
        t_pol, t_ref, t_rm, [CH], beta=0.25, gamma=5.0, scale_by_n_minus_1=scale, mask=torch.tensor([valid])
    )
    want, _, _ = hand_hps(POL, REF, RM, CH, 0.25, 5.0, valid=valid, scale=scale)
    assert got.item() == pytest.approx(want, rel=1e-13)
    # differs from the unmasked loss, so the mask is really applied
    full, _, _ = hand_hps(POL, REF, RM, CH, 0.25, 5.0, scale=scale)
    assert abs(want - full) > 1e-3
    got.sum().backward()
    assert torch.isfinite(t_pol.grad).all() and t_pol.grad[0, 2].item() == 0.0


def test_hps_batch_rows_independent_and_masks():
    pol = torch.tensor([POL, [-5.0, -6.0, -7.0, -8.0]], dtype=torch.float64)
    ref = torch.tensor([REF, [-5.5, -5.0, -7.5, -9.0]], dtype=torch.float64)
    rm = torch.tensor([RM, [3.0, 1.0, 0.0, 2.5]], dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, False, True, True]])
    got = hps_multi_negative_loss(pol, ref, rm, torch.tensor([1, 0]), mask=mask, beta=0.5, gamma=2.0)
    w0, _, _ = hand_hps(POL, REF, RM, 1, 0.5, 2.0)
    w1, _, _ = hand_hps([-5.0, -6.0, -7.0, -8.0], [-5.5, -5.0, -7.5, -9.0], [3.0, 1.0, 0.0, 2.5], 0, 0.5, 2.0,
                        valid=[True, False, True, True])
    assert got.tolist() == pytest.approx([w0, w1], rel=1e-13)


def test_hps_mc_subset_is_renormalised_q():
    # Monte Carlo usage: keep chosen + sampled subset via the mask, keep (n-1) via num_negatives.
    rng = np.random.default_rng(5)
    subset = hps_sample_negatives_mc(RM, CH, 2, rng)
    valid = [j == CH or j in subset for j in range(4)]
    pol, ref, rm = _row(POL, REF, RM)
    got = hps_multi_negative_loss(
        pol, ref, rm, [CH], beta=0.25, gamma=5.0, mask=torch.tensor([valid]), num_negatives=torch.tensor([3])
    ).item()
    r = [0.25 * (p - q) for p, q in zip(POL, REF)]
    z = sum(math.exp(5.0 * RM[j]) for j in subset)
    est = 3 * sum(math.exp(5.0 * RM[j]) / z * math.exp(r[j]) for j in subset)
    assert got == pytest.approx(-math.log(math.exp(r[CH]) / (math.exp(r[CH]) + est)), rel=1e-13)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_hps_n2_reduces_to_dpo(loss_type, ls):
    # One negative: q = 1 and n-1 = 1, so the aggregated negative IS the rejected response.
    pc, pr, rc, rr = _cols()
    pol = torch.stack([pr, pc], dim=1)  # chosen in column 1 to exercise chosen_index
    ref = torch.stack([rr, rc], dim=1)
    rm = torch.tensor([[0.0, 1.0]] * len(PAIRS), dtype=torch.float64)
    for scale in (True, False):
        got = hps_multi_negative_loss(
            pol, ref, rm, [1] * len(PAIRS), beta=0.2, gamma=5.0, scale_by_n_minus_1=scale,
            loss_type=loss_type, label_smoothing=ls,
        )
        want = [hand_dpo(*p, 0.2, loss_type, ls) for p in PAIRS]
        assert got.tolist() == pytest.approx(want, rel=1e-10, abs=1e-10)
        torch.testing.assert_close(
            got, dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, label_smoothing=ls).losses,
            rtol=1e-10, atol=1e-10,
        )


@pytest.mark.parametrize("loss_type", ["ipo", "sppo_hard", "hinge", "nca_pair", "exo_pair"])
def test_hps_other_loss_types_vs_hand(loss_type):
    beta, gamma = 0.25, 5.0
    pol, ref, rm = _row(POL, REF, RM)
    got = hps_multi_negative_loss(pol, ref, rm, [CH], beta=beta, gamma=gamma, loss_type=loss_type).item()
    _, r, s = hand_hps(POL, REF, RM, CH, beta, gamma)
    r_w, r_neg = r[CH], math.log(s)
    # The documented mapping: a = r_w/beta, b = r_neg/beta, h = a - b, then the DPO formulas.
    a, b = r_w / beta, r_neg / beta
    want = hand_dpo(a, b, 0.0, 0.0, beta, loss_type)
    assert got == pytest.approx(want, rel=1e-12)


def test_hps_extreme_values_stable():
    # rewards_theta around +-800: e^{800} overflows float64; the loss must still be exact and finite.
    pol = [800.0, 790.0, -800.0, 799.0]
    ref = [0.0] * 4
    rm = [2.0, 1.0, 0.5, 1.9]
    got = hps_multi_negative_loss(*_row(pol, ref, rm), [0], beta=1.0, gamma=3.0).item()
    negs = [1, 2, 3]
    z = sum(math.exp(3.0 * rm[j]) for j in negs)
    # scaled by e^{-800}: loss = log(1 + 3 * sum q_j e^{r_j - r_w})
    want = math.log1p(3 * sum(math.exp(3.0 * rm[j]) / z * math.exp(pol[j] - 800.0) for j in negs))
    assert got == pytest.approx(want, rel=1e-12)
    big = hps_multi_negative_loss(*_row([-800.0, 800.0, 0.0, 0.0], ref, rm), [0], beta=1.0, gamma=3.0)
    assert torch.isfinite(big).all() and big.item() > 1000


def test_hps_float32_and_grad_only_policy():
    pol, ref, rm = _row(POL, REF, RM, dtype=torch.float32)
    pol.requires_grad_(True)
    rm.requires_grad_(True)
    got = hps_multi_negative_loss(pol, ref, rm, [CH])
    assert got.dtype == torch.float32
    want, _, _ = hand_hps(POL, REF, RM, CH, 0.25, 5.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.sum().backward()
    assert pol.grad is not None and torch.isfinite(pol.grad).all() and pol.grad.abs().sum() > 0
    assert rm.grad is None  # the RM scores are a fixed weighting


def test_hps_gradient_central_differences():
    beta, gamma = 0.25, 5.0
    pol = torch.tensor([POL], dtype=torch.float64, requires_grad=True)
    ref, rm = _row(REF, RM)
    (g,) = torch.autograd.grad(hps_multi_negative_loss(pol, ref, rm, [CH], beta=beta, gamma=gamma).sum(), pol)
    eps = 1e-6
    for j in range(4):
        up, dn = list(POL), list(POL)
        up[j] += eps
        dn[j] -= eps
        fd = (hand_hps(up, REF, RM, CH, beta, gamma)[0] - hand_hps(dn, REF, RM, CH, beta, gamma)[0]) / (2 * eps)
        assert g[0, j].item() == pytest.approx(fd, rel=1e-6, abs=1e-10)
    assert g[0, CH].item() < 0  # raising the chosen log-prob lowers the loss


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_hps_gradcheck(loss_type):
    pol = torch.tensor([POL, [-5.0, -6.0, -7.0, -8.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([REF, [-5.5, -5.0, -7.5, -9.0]], dtype=torch.float64)
    rm = torch.tensor([RM, [3.0, 1.0, 0.0, 2.5]], dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, True]])
    assert torch.autograd.gradcheck(
        lambda p: hps_multi_negative_loss(p, ref, rm, [1, 0], mask=mask, loss_type=loss_type), (pol,)
    )


def test_hps_input_errors():
    pol, ref, rm = _row(POL, REF, RM)
    with pytest.raises(ValueError, match="chosen response is masked"):
        hps_multi_negative_loss(pol, ref, rm, [1], mask=torch.tensor([[True, False, True, True]]))
    with pytest.raises(ValueError, match="valid negative"):
        hps_multi_negative_loss(pol, ref, rm, [1], mask=torch.tensor([[False, True, False, False]]))
    with pytest.raises(ValueError, match="valid:"):
        hps_multi_negative_loss(pol, ref, rm, [1], loss_type="kto")
    with pytest.raises(IndexError):
        hps_multi_negative_loss(pol, ref, rm, [4])
    with pytest.raises(ValueError, match="shape"):
        hps_multi_negative_loss(pol, ref[:, :3], rm, [1])


@pytest.mark.parametrize("gamma", [math.inf, -math.inf, math.nan])
def test_non_finite_gamma_is_refused_not_turned_into_a_positional_pick(gamma):
    # NaN hardness weights made the sampler's inverse CDF return the last non-best response
    rewards = [0.45, 0.5, 0.1, -2.0]
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        hps_sample_negative(rewards, gamma, np.random.default_rng(0))
    pol, ref, rm = _row(POL, REF, RM)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        hps_multi_negative_loss(pol, ref, rm, [CH], gamma=gamma)
    with pytest.raises(ValueError, match="overflows"):
        hps_negative_probs([1e300, 2e300, 0.0], 1, 1e10)


def test_dpo_log_ratios_never_subtracted_below_float32():
    # bf16 sums of ~500 are spaced 2-4 apart: subtracting them in bf16 loses the margin
    vals = [(-500.25, -520.5, -510.125, -530.0), (-480.0, -470.5, -479.0, -471.25)]
    cols16 = [torch.tensor([v[i] for v in vals], dtype=torch.bfloat16) for i in range(4)]
    got = dpo_loss(*cols16, beta=0.1).losses
    assert got.dtype == torch.float32
    # the hand value on the bf16-ROUNDED inputs: only the inputs' rounding, no arithmetic in bf16
    want = [hand_dpo(*(float(c[k]) for c in cols16), 0.1, "sigmoid") for k in range(2)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
