"""Statistics for ``apactl eval``: bootstrap intervals, paired win rates, KL estimates, diversity.

Pure functions of arrays: numpy for the bootstraps, torch only for the token-level KL and entropy
helpers (they take the [N, T] tensors the scoring code produces). No models, no I/O.

Shapes: P = prompts, S = samples per prompt, N = sequences, T = padded response length.
Per-prompt inputs may be [P] or [P, S]. Bootstraps resample whole prompts (rows): the S samples of
one prompt are correlated, and resampling them one by one would make the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from apactl.masked import masked_mean
from apactl.rl.advantages import kl_estimates


def _rows(values) -> np.ndarray:
    """float64 [P, S] from [P] or [P, S]; rejects empty and non-finite input."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty [P] or [P, S] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    return x


def _boot_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    """int [n_boot, n]: row indices of each bootstrap resample (with replacement)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentiles(boots: np.ndarray, alpha: float) -> tuple[float, float]:
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_mean_ci(values, n_boot: int = 1000, seed: int = 0,
                      alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` [P] or [P, S] and its percentile bootstrap interval
    at level 1 - alpha, resampling prompts (rows)."""
    x = _rows(values)
    row_sums = x.sum(axis=1)  # every row holds S values, so mean = sum of row sums / (P * S)
    boots = row_sums[_boot_index(len(x), n_boot, seed)].sum(axis=1) / x.size
    return (float(x.mean()), *_percentiles(boots, alpha))


def win_rate(scores_a, scores_b, tie_eps: float = 1e-9, n_boot: int = 1000, seed: int = 0,
             alpha: float = 0.05) -> dict[str, float]:
    """Paired comparison of A against B on the same (prompt, sample index) pairs.

    Inputs [P] or [P, S] of equal shape. |a - b| <= tie_eps is a tie, counted apart from wins and
    losses. Returns counts (n, wins, ties, losses), rates (win_rate = wins / n, tie_rate,
    loss_rate) and a bootstrap interval (ci_lo, ci_hi) of win_rate, resampling prompts.
    """
    a, b = _rows(scores_a), _rows(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    diff = a - b
    win, tie = diff > tie_eps, np.abs(diff) <= tie_eps
    n, wins, ties = diff.size, int(win.sum()), int(tie.sum())
    boots = win.sum(axis=1)[_boot_index(len(diff), n_boot, seed)].sum(axis=1) / n
    lo, hi = _percentiles(boots, alpha)
    return {"n": n, "wins": wins, "ties": ties, "losses": n - wins - ties,
            "win_rate": wins / n, "tie_rate": ties / n, "loss_rate": (n - wins - ties) / n,
            "ci_lo": lo, "ci_hi": hi}


def paired_diff_ci(scores_a, scores_b, n_boot: int = 1000, seed: int = 0,
                   alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi) of A - B on the same (prompt, sample index) pairs [P] or [P, S], the
    interval by bootstrapping prompts: far narrower than two marginal intervals when A and B
    answer the same prompts (their scores share the prompt's difficulty)."""
    a, b = _rows(scores_a), _rows(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    return bootstrap_mean_ci(a - b, n_boot, seed, alpha)


def mean_se(values) -> tuple[float, float]:
    """(mean, standard error) of a 1-D sample; the SE is nan for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64).ravel()
    se = float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


def kl_per_sequence(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> dict[str, np.ndarray]:
    """Per-sequence KL(policy || ref) estimates {k1, k3} as float64 [N] from token log-probs
    [N, T] of tokens sampled from the policy (padding positions may hold anything):

        k1 = sum_t (logp_t - ref_t)                                 unbiased, can be < 0
        k3 = sum_t (exp(ref_t - logp_t) - 1 - (ref_t - logp_t))     unbiased, always >= 0
    """
    est = kl_estimates(logp.double(), ref_logp.double(), mask)
    return {k: v.cpu().numpy() for k, v in est.items()}


def kl_summary(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """{k1_mean, k1_se, k3_mean, k3_se}: mean and SE over sequences of ``kl_per_sequence``."""
    out = {}
    for k, v in kl_per_sequence(logp, ref_logp, mask).items():
        out[f"{k}_mean"], out[f"{k}_se"] = mean_se(v)
    return out


def entropy_mean(entropy: Tensor, mask: Tensor) -> float:
    """Mean policy entropy in nats per generated token over all valid tokens of [N, T]
    (token-weighted, like the ``policy/entropy`` training metric)."""
    return float(masked_mean(entropy.double(), mask))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over all texts (whitespace tokens); 0.0 if there are none."""
    grams = []
    for text in texts:
        toks = text.split()
        grams += [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def as_tensor_rows(chunks: Sequence[Tensor], fill: float = 0.0) -> Tensor:
    """Concatenate [n_i, T_i] chunks into [sum n_i, max T_i], right-padding with ``fill``."""
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=fill)
                      for c in chunks])


def t_critical(confidence: float, df: float) -> float:
    """Two-sided Student-t critical value: P(|T_df| <= t) = confidence (t_{(1+c)/2, df}).

    No scipy: with T = sqrt(df) tan(theta), theta in [0, pi/2) has density proportional to
    cos(theta)^(df-1), smooth and bounded, so a fine trapezoid grid of its CDF inverted by
    interpolation is exact to ~1e-6 for any df >= 1 (12.706 for df 1, 2.262 for df 9).
    """
    if not 0 < confidence < 1 or df < 1:
        raise ValueError(f"need 0 < confidence < 1 and df >= 1, got {confidence}, {df}")
    theta = np.linspace(0.0, np.pi / 2, 20_001)
    dens = np.cos(theta) ** (df - 1)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    return float(np.sqrt(df) * np.tan(np.interp(confidence, cdf / cdf[-1], theta)))


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) over seeds [n]: mean +- t_{n-1} * s / sqrt(n) (Student t, s with ddof 1).

    Seeds are few and their spread is the run-to-run noise, so this (not a bootstrap over
    prompts) is the interval for "does A beat B across seeds". n == 1: (v, nan, nan).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError("seed_interval needs one or more finite values")
    mean = float(x.mean())
    if x.size == 1:
        return mean, float("nan"), float("nan")
    half = t_critical(confidence, x.size - 1) * float(x.std(ddof=1)) / float(np.sqrt(x.size))
    return mean, mean - half, mean + half
