"""Devices and numeric precision: where models live and in which dtype they compute and learn.

Mixed precision (the CUDA default) keeps every trained weight and its AdamW state in fp32 and
runs forward/backward under ``torch.autocast`` in bf16 (or fp16 with a loss scaler); weights
that never train (reference, reward model, the frozen bottom of a trained model) are stored in
the compute dtype. Pure 16-bit (``run.mixed_precision: no`` with a 16-bit ``run.dtype``) stores
trained weights in 16 bits too: AdamW's update ``lr * m / sqrt(v)`` is ~lr per step, and at
lr 1e-6 that is below bf16's resolution (2^-8 relative) for any weight above ~3e-4, so almost
every update rounds away (measured on an H200: 1.8% of SmolLM2-135M's weights changed after 4
APA iterations at lr 1e-6, 6.0% in fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from apactl.errors import ModelError

if TYPE_CHECKING:
    from apactl.config import RunConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How a run computes and stores weights. ``mode``: "no" (every weight in ``dtype``),
    "bf16" or "fp16" (fp32 masters, autocast to ``dtype``)."""

    device: torch.device
    mode: Literal["no", "bf16", "fp16"]
    dtype: torch.dtype  # the compute dtype; with mode "no" also the storage of every weight

    @property
    def mixed(self) -> bool:
        return self.mode != "no"

    @property
    def master_dtype(self) -> torch.dtype:
        """Storage of trained weights (and so of their optimizer state)."""
        return torch.float32 if self.mixed else self.dtype

    @property
    def frozen_dtype(self) -> torch.dtype:
        """Storage of weights that never train."""
        return self.dtype

    def autocast(self):
        """Context for every forward (and the backward it records) of a trained model."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self, sharded: bool = False):
        """A loss scaler for fp16 (its 5-bit exponent underflows small gradients), else None.

        ``sharded`` (FSDP): each rank holds a shard of the gradients, so each would find its own
        infs and skip (or not) on its own; the sharded scaler all-reduces ``found_inf`` so that
        every rank skips the same steps and keeps the same scale."""
        if self.mode != "fp16":
            return None
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type)

    def store_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """Under mixed precision, keep a trained model's frozen parameters in the compute dtype:
        they need no fp32 master, and equal dtypes let the frozen bottom be shared with the
        reference (``accel.trunk.share_bottom`` compares weights exactly)."""
        if self.mixed:
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.dtype)
        return model

    def describe(self) -> str:
        if not self.mixed:
            return f"{str(self.dtype).removeprefix('torch.')} weights and compute"
        return (f"mixed {self.mode}: fp32 master weights, {str(self.dtype).removeprefix('torch.')}"
                " autocast, frozen weights in " + str(self.dtype).removeprefix("torch."))

    @property
    def pure_half(self) -> bool:
        """16-bit trained weights: small learning rates will not move them."""
        return not self.mixed and self.dtype != torch.float32


def resolve_device(run: RunConfig) -> torch.device:
    """``auto``: cuda when available, else cpu. Asking for cuda without one is an error."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("run.device is cuda but no CUDA device is available")
    if run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(run.device)


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(run: RunConfig, device: torch.device | str) -> Precision:
    """The recipe's ``run.dtype`` and ``run.mixed_precision`` on ``device`` (see RunConfig)."""
    device = torch.device(device)
    if run.dtype == "auto":
        dtype = torch.bfloat16 if _bf16_ok(device) else torch.float32
    else:
        dtype = DTYPES[run.dtype]
    mode = run.mixed_precision
    if mode == "auto":
        half = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
        mode = half if half and device.type == "cuda" else "no"
    if mode != "no":
        dtype = MIXED[mode]
    return Precision(device, mode, dtype)
