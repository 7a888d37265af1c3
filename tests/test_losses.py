"""Hand-computed checks of the APA / PPO / AWR / value / pairwise losses in apactl.losses."""

import inspect
import math

import pytest
import torch
from helpers import t

from apactl.losses import (
    apa_loss,
    awr_loss,
    bradley_terry_loss,
    entropy_from_logits,
    grpo_loss,
    logprobs_from_logits,
    ppo_loss,
    rloo_loss,
    value_loss,
)


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


ONES3 = t([[1.0, 1.0, 1.0]])


# ----------------------------------------------------------------------------- APA


def test_apa_value_and_gradient_by_hand():
    logp = leaf([[-1.0, -2.0, -0.5]])
    anchor = t([[-1.2, -1.5, -0.5]])
    adv = t([[0.01, -0.02, 0.0]])
    # target = A / lam = [0.1, -0.2, 0.0]; log_ratio = logp - anchor = [0.2, -0.5, 0.0]
    # residual = [0.1, -0.3, 0.0]; loss = (0.01 + 0.09 + 0) / 3 = 0.0333...
    loss, stats = apa_loss(logp, anchor, adv, ONES3, lam=0.1)
    assert loss.item() == pytest.approx(0.1 / 3)
    assert stats["policy/apa_target_mean"] == pytest.approx(-0.1 / 3)
    assert stats["policy/log_ratio_mean"] == pytest.approx(-0.3 / 3)
    # 0-dim tensors without gradient: the loop reads them back once per optimizer step
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert "policy/loss" not in stats  # the loop logs the loss itself, as loss/policy
    loss.backward()
    # d/dlogp = 2 * residual / 3 = [0.0667, -0.2, 0]: descent lowers logp where it overshoots
    # the target and raises it where it undershoots.
    assert torch.allclose(logp.grad, t([[0.2 / 3, -0.2, 0.0]]))
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0


def test_apa_zero_loss_and_gradient_at_target():
    anchor = t([[-1.0, -2.0], [-0.3, -4.0]])
    adv = t([[0.05, -0.1], [0.2, 0.0]])
    logp = (anchor + adv / 0.1).detach().requires_grad_(True)
    loss, _ = apa_loss(logp, anchor, adv, torch.ones(2, 2, dtype=torch.float64), lam=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0


def test_apa_only_sees_its_anchor_not_old_logprobs():
    assert "old_logprobs" not in inspect.signature(apa_loss).parameters
    logp, anchor, adv = t([[-1.0, -2.0, -0.5]]), t([[-1.2, -1.5, -0.5]]), t([[0.3, -0.2, 0.1]])
    old_a, old_b = t([[-1.0, -1.0, -1.0]]), t([[-3.0, -0.1, -2.0]])
    # Rollout-policy log-probs may change between epochs; APA's value must not.
    apa_a, _ = apa_loss(logp, anchor, adv, ONES3)
    apa_b, _ = apa_loss(logp, anchor, adv, ONES3)
    assert apa_a.item() == apa_b.item()
    # Contrast: PPO does depend on them.
    ppo_a, ppo_b = ppo_loss(logp, old_a, adv, ONES3)[0], ppo_loss(logp, old_b, adv, ONES3)[0]
    assert ppo_a.item() != ppo_b.item()


def test_apa_detaches_anchor_and_advantages():
    logp, anchor, adv = leaf([[-1.0, -2.0]]), leaf([[-1.1, -1.9]]), leaf([[0.1, 0.2]])
    apa_loss(logp, anchor, adv, torch.ones(1, 2, dtype=torch.float64))[0].backward()
    assert anchor.grad is None and adv.grad is None and logp.grad is not None


# ----------------------------------------------------------------------------- PPO


def test_ppo_clipping_binding_side():
    old = t([[-1.0, -1.0, -1.0]])
    logp = (old + t([[math.log(1.5), math.log(0.5), math.log(1.1)]])).requires_grad_(True)
    adv = t([[1.0, -1.0, 2.0]])
    # tok0: rho=1.5, A=+1: unclipped 1.5, clipped 1.2 -> min 1.2 (clipped binds, grad 0)
    # tok1: rho=0.5, A=-1: unclipped -0.5, clipped -0.8 -> min -0.8 (clipped binds, grad 0)
    # tok2: rho=1.1, A=+2: both 2.2 -> in range, grad = -rho * A / 3 = -2.2 / 3
    # loss = -(1.2 - 0.8 + 2.2) / 3 = -2.6 / 3
    loss, stats = ppo_loss(logp, old, adv, ONES3, clip_eps=0.2)
    assert loss.item() == pytest.approx(-2.6 / 3)
    assert stats["policy/clip_frac"] == pytest.approx(2 / 3)
    assert stats["policy/ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    # approx_kl = 0.5 * mean(log_ratio^2)
    kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    assert stats["policy/approx_kl"] == pytest.approx(kl)
    loss.backward()
    assert logp.grad[0, 0] == 0.0 and logp.grad[0, 1] == 0.0
    assert logp.grad[0, 2].item() == pytest.approx(-2.2 / 3)


def test_ppo_clipping_non_binding_side():
    old = t([[-1.0, -1.0]])
    logp = (old + t([[math.log(1.5), math.log(0.5)]])).requires_grad_(True)
    adv = t([[-1.0, 1.0]])
    # tok0: rho=1.5, A=-1: unclipped -1.5 < clipped -1.2 -> unclipped active, grad nonzero
    # tok1: rho=0.5, A=+1: unclipped 0.5 < clipped 0.8 -> unclipped active, grad nonzero
    # loss = -(-1.5 + 0.5) / 2 = 0.5; grad = -rho * A / 2 = [0.75, -0.25]
    loss, stats = ppo_loss(logp, old, adv, torch.ones(1, 2, dtype=torch.float64), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.5)
    assert stats["policy/clip_frac"] == 0.0
    loss.backward()
    assert torch.allclose(logp.grad, t([[0.75, -0.25]]))


def test_ppo_gradient_sign_in_range():
    old = t([[-1.0, -1.0]])
    logp = old.clone().requires_grad_(True)
    # rho = 1: grad = -A / 2 -> descent raises logp of positive-advantage tokens.
    ppo_loss(logp, old, t([[2.0, -2.0]]), torch.ones(1, 2, dtype=torch.float64))[0].backward()
    assert torch.allclose(logp.grad, t([[-1.0, 1.0]]))


# ----------------------------------------------------------------------------- AWR


def test_awr_value_weights_and_clamp():
    logp = leaf([[-1.0, -2.0, -0.5]])
    adv = leaf([[0.0, 0.1, 1.0]])
    # A / lam = [0, 0.2, 2]; exp -> [1, 1.221403, 7.389] -> clamp at 1.5 -> [1, 1.221403, 1.5]
    # loss = -(1 * -1 + 1.221403 * -2 + 1.5 * -0.5) / 3 = 4.192806 / 3 = 1.397602
    loss, stats = awr_loss(logp, adv, ONES3, lam=0.5, max_weight=1.5)
    w1 = math.exp(0.2)
    assert loss.item() == pytest.approx((1 + 2 * w1 + 0.75) / 3)
    assert stats["policy/awr_weight_mean"] == pytest.approx((1 + w1 + 1.5) / 3)
    assert stats["policy/awr_weight_clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    # grad = -w / 3: always negative, so descent raises every sampled token's log-prob.
    assert torch.allclose(logp.grad, t([[-1 / 3, -w1 / 3, -0.5]]))
    assert adv.grad is None


def test_awr_huge_advantage_does_not_overflow():
    logp = leaf([[-1.0]])
    loss, _ = awr_loss(logp, t([[1e6]]), t([[1.0]]), lam=0.01, max_weight=20.0)
    assert loss.item() == pytest.approx(20.0)


# ----------------------------------------------------------------------------- value


def test_value_loss_unclipped():
    values = leaf([[1.0, 2.0, 0.5]])
    returns = t([[1.5, 1.0, 0.5]])
    # 0.5 * mean([0.25, 1.0, 0.0]) = 0.5 * 1.25 / 3 = 0.208333
    loss, stats = value_loss(values, t([[0.0, 0.0, 0.0]]), returns, ONES3, clip=None)
    assert loss.item() == pytest.approx(1.25 / 6)
    assert "value/clip_frac" not in stats
    loss.backward()
    # grad = (V - R) / 3 = [-0.5, 1.0, 0.0] / 3
    assert torch.allclose(values.grad, t([[-0.5, 1.0, 0.0]]) / 3)


def test_value_loss_clipped():
    values = leaf([[1.0, 2.0, 0.5]])
    old = t([[1.1, 1.0, 0.0]])
    returns = t([[1.5, 1.0, 0.5]])
    # V - old = [-0.1, 1.0, 0.5] -> clamp(+-0.2) = [-0.1, 0.2, 0.2] -> V_clip = [1.0, 1.2, 0.2]
    # err^2 = [0.25, 1.0, 0.0]; err_clip^2 = [0.25, 0.04, 0.09]; max = [0.25, 1.0, 0.09]
    # loss = 0.5 * 1.34 / 3 = 0.223333; only tok2 has the clipped error strictly larger.
    loss, stats = value_loss(values, old, returns, ONES3, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * 1.34 / 3)
    assert stats["value/clip_frac"] == pytest.approx(1 / 3)
    loss.backward()
    # tok0: V_clip == V, grad (V-R)/3 = -0.5/3; tok1: unclipped binds, 1.0/3;
    # tok2: clipped binds and V_clip is saturated -> grad 0.
    assert torch.allclose(values.grad, t([[-0.5 / 3, 1.0 / 3, 0.0]]))


# ----------------------------------------------------------------------------- padding


MASK = t([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def _inputs(pad_value):
    base = {
        "logp": [[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, 0.0, 0.0]],
        "anchor": [[-1.1, -1.8, -0.7, 0.0], [-0.2, -1.0, 0.0, 0.0]],
        "adv": [[0.05, -0.1, 0.3, 0.0], [-0.2, 0.15, 0.0, 0.0]],
        "ret": [[0.5, 0.1, -0.2, 0.0], [1.0, 0.3, 0.0, 0.0]],
    }
    out = {}
    for name, rows in base.items():
        x = t(rows)
        out[name] = torch.where(MASK.bool(), x, torch.full_like(x, pad_value))
    return out


LOSSES = {
    "apa": lambda d, p: apa_loss(p, d["anchor"], d["adv"], MASK),
    "ppo": lambda d, p: ppo_loss(p, d["anchor"], d["adv"] * 10, MASK),
    "awr": lambda d, p: awr_loss(p, d["adv"], MASK, lam=0.1, max_weight=1.5),
    "grpo": lambda d, p: grpo_loss(p, d["anchor"], d["ret"], d["adv"] * 10, MASK, beta=0.5),
    "grpo_seq": lambda d, p: grpo_loss(p, d["anchor"], d["ret"], d["adv"] * 10, MASK,
                                       beta=0.5, aggregation="sequence"),
    "rloo": lambda d, p: rloo_loss(p, d["anchor"], t([1.0, -2.0]), MASK),
    "value": lambda d, p: value_loss(p, d["anchor"], d["ret"], MASK),
    "value_clip": lambda d, p: value_loss(p, d["anchor"], d["ret"], MASK, clip=0.1),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("pad_value", [1e4, -1e4, float("inf"), float("-inf")])
def test_padding_is_excluded(name, pad_value):
    results = []
    for inputs in (_inputs(0.0), _inputs(pad_value)):
        logp = inputs["logp"].clone().requires_grad_(True)
        loss, stats = LOSSES[name](inputs, logp)
        loss.backward()
        results.append((loss.item(), logp.grad, {k: v.item() for k, v in stats.items()}))
    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = results
    assert loss_a == pytest.approx(loss_b)
    assert stats_a == pytest.approx(stats_b)
    assert torch.equal(grad_a, grad_b)
    assert torch.count_nonzero(grad_b[~MASK.bool()]) == 0
    assert torch.count_nonzero(grad_b[MASK.bool()]) > 0


def test_loss_is_token_level_mean():
    # Row 0 has 3 valid tokens, row 1 has 1: token mean = (1 + 1 + 1 + 4) / 4 = 1.75,
    # not the mean of per-row means ((1 + 4) / 2 = 2.5).
    values = t([[1.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    loss, _ = value_loss(values * math.sqrt(2), values * 0, values * 0, mask)
    # err^2 = 2 * v^2 = [2, 2, 2 | 8]; 0.5 * mean = 0.5 * 14 / 4 = 1.75
    assert loss.item() == pytest.approx(1.75)


# ----------------------------------------------------------------------------- logits helpers


def test_entropy_and_logprobs_from_logits():
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 1, 2], [3, 0, 1]])
    # Uniform over 4 tokens: entropy = log 4, every log-prob = -log 4.
    assert torch.allclose(entropy_from_logits(logits), torch.full((2, 3), math.log(4)))
    assert torch.allclose(logprobs_from_logits(logits, labels), torch.full((2, 3), -math.log(4)))


def test_logprobs_from_logits_temperature():
    logits = torch.tensor([[[0.0, math.log(2.0)]]])
    # T=1: probs [1/3, 2/3]; T=2: logits/2 = [0, 0.5 log 2] -> probs [1, sqrt2] / (1 + sqrt2)
    assert logprobs_from_logits(logits, torch.tensor([[1]])).item() == pytest.approx(
        math.log(2 / 3), rel=1e-6
    )
    got = logprobs_from_logits(logits, torch.tensor([[0]]), temperature=2.0).item()
    assert got == pytest.approx(-math.log(1 + math.sqrt(2)), rel=1e-6)


def test_bradley_terry_by_hand():
    # gaps [2, 0, -1] with margin 0.5 -> -log sigmoid([1.5, -0.5, -1.5])
    chosen, rejected = leaf([3.0, 1.0, 0.0]), t([1.0, 1.0, 1.0])
    loss, stats = bradley_terry_loss(chosen, rejected, margin=0.5)
    expected = sum(math.log1p(math.exp(-g)) for g in (1.5, -0.5, -1.5)) / 3
    assert loss.item() == pytest.approx(expected)
    assert stats["train/accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert stats["train/margin"] == pytest.approx(1 / 3)
    loss.backward()
    # d/dc -log sigmoid(c - r - m) = -(1 - sigmoid(gap - m)) / 3
    sig = [1 / (1 + math.exp(-g)) for g in (1.5, -0.5, -1.5)]
    assert chosen.grad.tolist() == pytest.approx([-(1 - s) / 3 for s in sig])


# ----------------------------------------------------------------------------- GRPO / RLOO
# Two answers, T = 2; the second answer has one token (its padding holds inf).
G_MASK = t([[1.0, 1.0], [1.0, 0.0]])
G_LOGP = [[math.log(0.5), math.log(0.25)], [math.log(0.4), float("inf")]]
G_OLD = t([[math.log(0.5), math.log(0.5)], [math.log(0.5), 0.0]])
G_REF = t([[math.log(0.5), math.log(0.5)], [math.log(0.5), 0.0]])


def test_grpo_token_and_sequence_aggregation_by_hand():
    adv = t([[2.0, 2.0], [-1.0, -1.0]])  # the answer's advantage on each of its tokens
    # ratios 1, 0.5 | 0.8; eps 0.2: -min(2, 2) = -2, -min(1, 1.6) = -1 | -min(-0.8, -0.8) = 0.8
    # k3 = exp(ref - logp) - (ref - logp) - 1: 0, 1 - log 2 | 0.25 - log 1.25
    k3 = [0.0, 1 - math.log(2), 0.25 - math.log(1.25)]
    loss, stats = grpo_loss(leaf(G_LOGP), G_OLD, G_REF, adv, G_MASK, 0.2, beta=0.1)
    assert loss.item() == pytest.approx((-2 - 1 + 0.8 + 0.1 * sum(k3)) / 3)
    assert stats["policy/kl_k3"] == pytest.approx(sum(k3) / 3)
    assert stats["policy/clip_frac"] == 0.0
    loss, _ = grpo_loss(leaf(G_LOGP), G_OLD, G_REF, adv, G_MASK, 0.2, beta=0.1,
                        aggregation="sequence")
    row0, row1 = (-2 - 1 + 0.1 * k3[1]) / 2, 0.8 + 0.1 * k3[2]
    assert loss.item() == pytest.approx((row0 + row1) / 2)


def test_grpo_gradient_by_hand():
    # Token mean over 3 tokens. d/dlogp of -rho*A = -rho*A where unclipped; 0 where the clip
    # binds; d/dlogp of beta*k3 = beta * (1 - exp(ref - logp)).
    logp = leaf(G_LOGP)
    adv = t([[2.0, -2.0], [-1.0, -1.0]])
    # token (0,1): rho 0.5, A -2: unclipped -1 > clipped -1.6 -> the clip binds, no ratio grad
    loss, stats = grpo_loss(logp, G_OLD, G_REF, adv, G_MASK, 0.2, beta=0.1)
    loss.backward()
    expected = [[(-2.0 + 0.1 * (1 - 1)) / 3, (0.0 + 0.1 * (1 - 2)) / 3],
                [(0.8 + 0.1 * (1 - 1.25)) / 3, 0.0]]
    torch.testing.assert_close(logp.grad, t(expected))
    assert stats["policy/clip_frac"] == pytest.approx(1 / 3)


def test_rloo_sequence_ratio_clipping_by_hand():
    # rho_0 = exp(log .5 + log .25 - 2 log .5) = 0.5, rho_1 = 0.8 (one token); A = [-2, -1]
    adv = t([-2.0, -1.0])
    loss, stats = rloo_loss(leaf(G_LOGP), G_OLD, adv, G_MASK, clip_eps=0.2)
    # -min(-1, -1.6) = 1.6, -min(-0.8, -0.8) = 0.8
    assert loss.item() == pytest.approx((1.6 + 0.8) / 2)
    assert stats["policy/clip_frac"] == pytest.approx(0.5)
    loss, _ = rloo_loss(leaf(G_LOGP), G_OLD, adv, G_MASK, clip_eps=None)
    assert loss.item() == pytest.approx((1.0 + 0.8) / 2)


def test_rloo_is_reinforce_on_policy():
    # old = logp (a fresh rollout): grad = -A_b / B on every valid token of answer b
    logp = leaf([[-1.0, -2.0], [-0.5, float("inf")]])
    loss, _ = rloo_loss(logp, logp.detach(), t([3.0, -1.0]), G_MASK)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[-1.5, -1.5], [0.5, 0.0]]))


def test_apa_with_a_leave_one_out_advantage_by_hand():
    # The critic-free APA: the paper's loss unchanged, A from the group. Rewards [1, 2, 3, 6]:
    # A = r_i - mean of the others = [-8/3, -4/3, 0, 4], on each answer's tokens.
    from apactl.rl.advantages import leave_one_out_advantages, per_token

    mask = t([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    adv = per_token(leave_one_out_advantages(t([1.0, 2.0, 3.0, 6.0]), 4), mask).double()
    anchor = t([[-1.0, 0.0], [-2.0, -1.0], [-0.5, 0.0], [-1.5, 0.0]])
    # At logp = anchor the residual is -A / lam: ((16/3)^2 + 2 (8/3)^2 + 0 + 8^2) / 5 tokens
    loss, _ = apa_loss(anchor.clone(), anchor, adv, mask, lam=0.5)
    assert loss.item() == pytest.approx((256 / 9 + 128 / 9 + 64) / 5)
    # ... and 0 at the paper's target logp = anchor + A / lam.
    loss, _ = apa_loss(anchor + adv / 0.5, anchor, adv, mask, lam=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
