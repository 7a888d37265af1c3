"""Masked tensor statistics over padded token sequences.

Conventions: B = batch of sequences, T = padded length. `mask` is a [B, T] tensor with 1 on
valid tokens and 0 on padding. Values at padding positions are arbitrary (even inf/nan) and
never enter any result: they are replaced with `torch.where` rather than multiplied by 0,
because inf * 0 = nan.
"""

from __future__ import annotations

import torch
from torch import Tensor


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x with padding positions replaced by 0 (safe even if padding holds inf/nan)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) over `dim` (all elements when dim is None). x, mask broadcastable."""
    x = zero_padding(x, mask) * mask
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum(x * mask) / sum(mask) over `dim` (all elements when dim is None).

    An all-padding slice gives 0/0 = nan, which is deliberately not hidden.
    """
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of the valid entries of x: masked_mean((x - mu)^2) [* n / (n - 1)].

    With unbiased=True and a single valid entry the (zero) biased variance is returned
    instead of dividing by n - 1 = 0.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mu) / sqrt(var + eps) with mu, var over valid entries only; padding set to 0.

    With shift_mean=False the mean is added back, i.e. only the scale is normalised.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)
