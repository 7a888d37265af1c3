"""Hand-computed checks of apactl.masked, apactl.rl.advantages, apactl.rl.kl_control and
Rollout."""

import math

import pytest
import torch
from helpers import t

from apactl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from apactl.rl.advantages import (
    AdvantageSpec,
    add_advantages,
    gae,
    group_advantages,
    kl_estimates,
    kl_penalized_rewards,
    leave_one_out_advantages,
    per_token,
)
from apactl.rl.kl_control import AdaptiveKLController, FixedKLController
from apactl.rl.types import Rollout


def close(a, b):
    return torch.allclose(a, t(b), atol=1e-10)


# ----------------------------------------------------------------------------- masked stats


def test_masked_sum_mean_var():
    x = t([[1.0, 3.0, 100.0], [5.0, -7.0, float("nan")]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid entries 1, 3, 5: sum 9, mean 3, unbiased var (4 + 0 + 4) / 2 = 4, biased 8 / 3
    assert masked_sum(x, mask).item() == 9.0
    assert masked_mean(x, mask).item() == 3.0
    assert close(masked_sum(x, mask, dim=1), [4.0, 5.0])
    assert close(masked_mean(x, mask, dim=1), [2.0, 5.0])
    assert masked_var(x, mask).item() == pytest.approx(4.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(8 / 3)


def test_masked_whiten_by_hand():
    x = t([[1.0, 3.0, 100.0], [5.0, -7.0, 1e6]])
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid 1, 3, 5: mean 3, std 2 -> [-1, 0, 1]; padding -> 0
    assert close(masked_whiten(x, mask, eps=0.0), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # shift_mean=False adds the mean back: [2, 3, 4]
    got = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert close(got, [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]])


def test_masked_whiten_matches_whitening_valid_entries_only():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = t([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 3 + [0] * 3])
    x_padded = torch.where(mask.bool(), x, torch.full_like(x, 1e3))
    valid = x[mask.bool()]
    expected = (valid - valid.mean()) / torch.sqrt(valid.var(unbiased=True) + 1e-8)
    got = masked_whiten(x_padded, mask)
    assert torch.allclose(got[mask.bool()], expected)
    assert torch.count_nonzero(got[~mask.bool()]) == 0


# ----------------------------------------------------------------------------- rewards


def test_kl_penalized_rewards_score_at_last_valid_token():
    old = t([[-1.0, -2.0, -1.0, 9.0], [-0.5, -1.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
    ref = t([[-1.5, -1.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    scores = t([2.0, -1.0, 5.0])
    # row0: old-ref = [0.5, -1, 0] -> -0.1 * . = [-0.05, 0.1, 0]; +2 at col 2
    # row1: old-ref = [0.5, 0] -> [-0.05, 0]; -1 at col 1
    # row2: no valid token -> no penalty and no score
    got = kl_penalized_rewards(scores, old, ref, mask, beta=0.1)
    assert close(got, [[-0.05, 0.1, 2.0, 0.0], [-0.05, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------- GAE


def test_gae_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.6, 0.7]]), t([[1.0, 1.0, 1.0]])
    # delta2 = 1 + 0 - 0.7 = 0.3; delta1 = 0 + 0.7 - 0.6 = 0.1; delta0 = 0 + 0.6 - 0.5 = 0.1
    # A = [0.1 + 0.1 + 0.3, 0.1 + 0.3, 0.3] = [0.5, 0.4, 0.3]; returns = A + V = [1, 1, 1]
    adv, ret = gae(rewards, values, mask, gamma=1.0, gae_lambda=1.0)
    assert close(adv, [[0.5, 0.4, 0.3]])
    assert close(ret, [[1.0, 1.0, 1.0]])


def test_gae_discounted_with_padding():
    rewards = t([[0.1, 0.0, -0.2, 1.0], [0.0, 1.0, 99.0, 99.0]])
    values = t([[0.2, 0.4, 0.3, 0.5], [0.5, 0.25, 7.0, float("inf")]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 0]])
    # gamma = 0.9, lam = 0.5 -> gamma * lam = 0.45
    # row0: delta3 = 1.0 - 0.5 = 0.5
    #       delta2 = -0.2 + 0.9 * 0.5 - 0.3 = -0.05
    #       delta1 = 0.0 + 0.9 * 0.3 - 0.4 = -0.13
    #       delta0 = 0.1 + 0.9 * 0.4 - 0.2 = 0.26
    #       A3 = 0.5; A2 = -0.05 + 0.45 * 0.5 = 0.175; A1 = -0.13 + 0.45 * 0.175 = -0.05125
    #       A0 = 0.26 + 0.45 * -0.05125 = 0.2369375
    # row1: V after col 1 is 0 (padding values 7, inf must not leak)
    #       delta1 = 1.0 + 0 - 0.25 = 0.75; delta0 = 0 + 0.9 * 0.25 - 0.5 = -0.275
    #       A1 = 0.75; A0 = -0.275 + 0.45 * 0.75 = 0.0625
    adv, ret = gae(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    assert close(adv, [[0.2369375, -0.05125, 0.175, 0.5], [0.0625, 0.75, 0.0, 0.0]])
    # returns = A + V: [0.4369375, 0.34875, 0.475, 1.0], [0.5625, 1.0, 0, 0]
    assert close(ret, [[0.4369375, 0.34875, 0.475, 1.0], [0.5625, 1.0, 0.0, 0.0]])


def test_gae_padded_row_equals_unpadded_row():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    values = torch.randn(1, 5, generator=gen, dtype=torch.float64)
    adv_short, ret_short = gae(rewards[:, :3], values[:, :3], torch.ones(1, 3), 0.95, 0.9)
    mask = t([[1, 1, 1, 0, 0]])
    adv_long, ret_long = gae(rewards, values, mask, 0.95, 0.9)
    assert torch.allclose(adv_long[:, :3], adv_short)
    assert torch.allclose(ret_long[:, :3], ret_short)
    assert torch.count_nonzero(adv_long[:, 3:]) == 0 and torch.count_nonzero(ret_long[:, 3:]) == 0


# ----------------------------------------------------------------------------- KL


def test_kl_estimates_by_hand():
    old = t([[-0.5, -2.0], [-1.0, 50.0]])
    ref = t([[-1.0, -1.0], [-1.2, 0.0]])
    mask = t([[1, 1], [1, 0]])
    # log ratios: row0 [0.5, -1.0], row1 [0.2]; k1 = [-0.5, 0.2]
    # k3(r) = exp(-r) - 1 + r: k3(0.5) = 0.6065307 - 0.5 = 0.1065307
    #                          k3(-1) = 2.7182818 - 2 = 0.7182818;  k3(0.2) = 0.8187308 - 0.8
    est = kl_estimates(old, ref, mask)
    assert close(est["k1"], [-0.5, 0.2])
    k3_row0 = (math.exp(-0.5) - 0.5) + (math.exp(1.0) - 2.0)
    assert close(est["k3"], [k3_row0, math.exp(-0.2) - 0.8])
    assert est["k3"][0].item() == pytest.approx(0.8248125, abs=1e-7)


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    # KL = 6.6: e = 6.6/6 - 1 = 0.1 (inside the clip) -> beta = 0.1 * (1 + 0.1 * 256 / 1e4)
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.1 * 1.00256)
    ctl.load_state_dict({"value": 0.1})
    # KL = 9: e = 0.5 -> clipped to 0.2 -> beta = 0.1 * (1 + 0.2 * 256 / 1e4) = 0.100512
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.100512)
    # KL = 3: e = -0.5 -> clipped to -0.2 -> beta = 0.100512 * (1 - 0.00512) = 0.0999973791
    ctl.update(3.0, 256)
    assert ctl.value == pytest.approx(0.0999973791)
    restored = AdaptiveKLController(init_beta=1.0, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}


# ----------------------------------------------------------------------------- Rollout


def _rollout(b=5):
    return Rollout(
        query_ids=torch.arange(b * 2).view(b, 2),
        query_mask=torch.ones(b, 2, dtype=torch.long),
        response_ids=torch.arange(b * 3).view(b, 3),
        response_mask=torch.ones(b, 3),
        scores=torch.arange(b, dtype=torch.float32),
    )


def test_rollout_index_skips_none_fields():
    sub = _rollout().index(torch.tensor([3, 1]))
    assert sub.batch_size == 2
    assert sub.scores.tolist() == [3.0, 1.0]
    assert sub.query_ids.tolist() == [[6, 7], [2, 3]]
    assert sub.values is None and sub.advantages is None


def test_rollout_minibatches_cover_each_row_once():
    chunks = list(_rollout().minibatches(2, torch.Generator().manual_seed(0)))
    assert [c.batch_size for c in chunks] == [2, 2, 1]
    seen = sorted(int(s) for c in chunks for s in c.scores)
    assert seen == [0, 1, 2, 3, 4]
    # Rows stay aligned across fields after shuffling.
    for c in chunks:
        assert torch.equal(c.query_ids[:, 0], 2 * c.scores.long())
    again = list(_rollout().minibatches(2, torch.Generator().manual_seed(0)))
    assert [c.scores.tolist() for c in again] == [c.scores.tolist() for c in chunks]
    assert _rollout().to("cpu").values is None


# ----------------------------------------------------------------------------- group estimators
# Two prompts x 4 answers: rewards [1, 2, 3, 6] (mean 3, unbiased std sqrt(14/3)) and [0]*4.
GROUPS = t([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0])


def near(a, b):  # float32 results (the rollout's dtype) against hand values
    return torch.allclose(a.double(), t(b), atol=1e-5)


def test_group_advantages_scaled_by_the_group_std():
    std = math.sqrt(14 / 3)
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0, 0, 0, 0]
    assert near(group_advantages(GROUPS, 4, "group"), expected)


def test_group_advantages_scaled_by_the_batch_std_or_not_at_all():
    # batch: the 8 rewards' mean 1.5, squared deviations sum to 32: std sqrt(32/7)
    std = math.sqrt(32 / 7)
    assert near(group_advantages(GROUPS, 4, "batch"),
          [d / (std + 1e-4) for d in (-2, -1, 0, 3, 0, 0, 0, 0)])
    assert near(group_advantages(GROUPS, 4, "none"), [-2, -1, 0, 3, 0, 0, 0, 0])  # Dr. GRPO


def test_leave_one_out_advantages_by_hand():
    # baselines (12 - r_i) / 3 = 11/3, 10/3, 3, 2
    assert near(leave_one_out_advantages(GROUPS, 4), [-8 / 3, -4 / 3, 0, 4, 0, 0, 0, 0])
    assert near(leave_one_out_advantages(t([1.0, 3.0]), 2), [-2, 2])


def test_per_answer_advantage_on_every_valid_token():
    mask = t([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert near(per_token(t([2.0, -1.0]), mask), [[2, 2, 0], [-1, 0, 0]])


def _group_rollout(scores):
    b = len(scores)
    ro = _rollout(b)
    ro.response_mask = t([[1.0, 1.0, 0.0]] * b, dtype=torch.float32)
    ro.scores = torch.tensor(scores)
    ro.old_logprobs = torch.full((b, 3), -1.0)
    ro.ref_logprobs = torch.full((b, 3), -1.5)  # k1 = 0.5 per token, 1.0 per answer
    return ro


def test_add_advantages_rloo_subtracts_the_kl_in_the_reward():
    ro = _group_rollout([1.0, 2.0, 3.0, 6.0])
    m = add_advantages(ro, 0.1, AdvantageSpec("leave_one_out", group_size=4))
    # every answer pays the same 0.1 * 1.0: the leave-one-out differences are unchanged
    assert near(ro.advantages[:, 0], [-8 / 3, -4 / 3, 0, 4])
    assert near(ro.rewards.sum(1), [0.9, 1.9, 2.9, 5.9])
    assert ro.returns is None and "critic/explained_var" not in m
    assert m["kl/ref_k1"] == pytest.approx(1.0)


def test_add_advantages_grpo_keeps_the_kl_out_of_the_reward():
    ro = _group_rollout([1.0, 1.0, 3.0, 3.0])
    m = add_advantages(ro, 0.1, AdvantageSpec("group", group_size=2, kl_in_reward=False))
    assert near(ro.rewards.sum(1), [1.0, 1.0, 3.0, 3.0])
    assert near(ro.advantages, [[0.0] * 3] * 4)  # both groups tie: nothing to learn
    assert m["adv/zero_std_group_frac"] == 1.0
