"""The statistics behind ``apactl eval``: checked against simulations and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from apactl import eval_stats as st


def test_bootstrap_interval_covers_true_mean_about_95_percent():
    rng = np.random.default_rng(0)
    # 400 repetitions, not 200: the Monte Carlo SD of the coverage drops from 1.7 to 1.2 points
    # (a percentile bootstrap at n=100 covers ~93-94%, so 200 can land near the 90% floor).
    true_mean, reps = 1.5, 400
    covered = 0
    for rep in range(reps):
        draws = rng.normal(true_mean, 2.0, size=100)
        mean, lo, hi = st.bootstrap_mean_ci(draws, n_boot=1000, seed=rep)
        assert lo <= mean <= hi
        covered += lo <= true_mean <= hi
    assert 0.90 <= covered / reps <= 0.99, covered / reps


def test_bootstrap_resamples_prompts_not_samples():
    # Two samples per prompt that are identical: the interval must match the one of the prompt
    # means (resampling rows), not the narrower one of 2P independent values.
    x = np.random.default_rng(1).normal(size=50)
    one = st.bootstrap_mean_ci(x, seed=3)
    paired = st.bootstrap_mean_ci(np.stack([x, x], axis=1), seed=3)
    assert paired == pytest.approx(one)


def test_bootstrap_rejects_nan_and_empty():
    with pytest.raises(ValueError):
        st.bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        st.bootstrap_mean_ci([])


def test_win_rate_counts_ties_separately():
    a = [1.0, 2.0, 3.0, 0.5, 0.0]
    b = [0.0, 2.0, 4.0, 0.5 + 1e-12, -1.0]
    r = st.win_rate(a, b)
    assert (r["n"], r["wins"], r["ties"], r["losses"]) == (5, 2, 2, 1)
    assert r["win_rate"] == pytest.approx(0.4) and r["tie_rate"] == pytest.approx(0.4)
    assert r["loss_rate"] == pytest.approx(0.2)
    assert 0.0 <= r["ci_lo"] <= r["win_rate"] <= r["ci_hi"] <= 1.0


def test_win_rate_paired_by_prompt_and_extremes():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])  # [P=3, S=2]
    r = st.win_rate(a, np.zeros_like(a))
    assert (r["wins"], r["ties"], r["losses"]) == (3, 3, 0)
    same = st.win_rate(a, a)
    assert same["tie_rate"] == 1.0 and same["ci_lo"] == same["ci_hi"] == 0.0
    better = st.win_rate(a + 1, a)
    assert better["win_rate"] == better["ci_lo"] == better["ci_hi"] == 1.0
    with pytest.raises(ValueError):
        st.win_rate([1.0, 2.0], [1.0])


@pytest.mark.parametrize("padded", [False, True])
def test_kl_estimators_match_analytic_categorical_kl(padded):
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2], dtype=torch.float64)
    kl = float((p * (p / q).log()).sum())  # analytic KL(p || q) per token
    g = torch.Generator().manual_seed(0)
    n, t = 4000, 8
    tokens = torch.multinomial(p, n * t, replacement=True, generator=g).view(n, t)
    logp, ref = p.log()[tokens], q.log()[tokens]
    mask = torch.ones(n, t)
    if padded:  # ragged lengths; padding holds garbage that must not leak in
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        mask = (torch.arange(t) < lengths[:, None]).float()
        logp = torch.where(mask.bool(), logp, torch.tensor(float("inf"), dtype=logp.dtype))
    expected = kl * float(mask.sum(1).mean())  # per-sequence sums of per-token KL
    s = st.kl_summary(logp, ref, mask)
    for k in ("k1", "k3"):
        assert s[f"{k}_mean"] == pytest.approx(expected, abs=4 * s[f"{k}_se"]), (k, s)
        assert 0 < s[f"{k}_se"] < 0.05 * expected
    assert s["k3_se"] < s["k1_se"]  # k3's lower variance is why it is reported too


def test_kl_of_a_policy_with_itself_is_zero():
    logp = torch.randn(3, 5)
    s = st.kl_summary(logp, logp, torch.ones(3, 5))
    assert s == {"k1_mean": 0.0, "k1_se": 0.0, "k3_mean": 0.0, "k3_se": 0.0}
    assert math.isnan(st.mean_se([1.0])[1])


def test_distinct_n_by_hand():
    texts = ["the cat sat", "the cat ran", ""]
    assert st.distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran / 6 words
    assert st.distinct_n(texts, 2) == pytest.approx(3 / 4)  # the-cat twice, cat-sat, cat-ran
    assert st.distinct_n(["one"], 2) == 0.0


def test_entropy_mean_is_token_weighted_and_ignores_padding():
    ent = torch.tensor([[1.0, 1.0, 1.0], [4.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert st.entropy_mean(ent, mask) == pytest.approx(7 / 4)


def test_as_tensor_rows_pads_ragged_chunks():
    out = st.as_tensor_rows([torch.ones(2, 3), torch.ones(1, 5)])
    assert out.shape == (3, 5) and out[:2, 3:].abs().sum() == 0
