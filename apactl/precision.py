"""Devices and numeric precision: where models live and in which dtype they compute and learn.

Mixed precision (the CUDA default) keeps every trained weight and its AdamW state in fp32 and
runs forward/backward under ``torch.autocast`` in bf16 (or fp16 with a loss scaler); the matmul
weights that never train (reference, decode copy, reward model, the frozen bottom of a trained
model) are stored in the compute dtype (``store_matmuls``).

One distribution (why the 16-bit storage is of matmul weights only): autocast computes an
``nn.Linear`` from its weight rounded to bf16, so a bf16-stored copy of those weights gives the
very same products, while embeddings, norms and the residual stream they feed stay fp32 under
autocast. Storing *only* the matmul weights in 16 bits therefore makes the policy (fp32 masters),
the reference and the decode copy compute bit-identical numbers from identical weights: the KL
to the reference is exactly 0 at iteration 0 and the rollouts are drawn from the distribution
the old log-probs describe. (Casting whole models to bf16 rounded the embeddings, the norms, the
residual stream and the rotary ``inv_freq`` buffers too: k1 = -0.009 at iteration 0 on an H200.)
The output heads (LM head, value and reward ``score``) run in fp32 (``Fp32Head``): bf16 logits of
16-32 are 0.125 apart, up to ~0.06 nats per token. Costs: embeddings, norms and heads stay fp32
in the frozen copies (+2 bytes x vocab x hidden per copy: ~200 MB each at 1.7B, ~1 GB at 8B);
the decode step reads the fp32 head (+6% of the bytes at 1.7B); the head matmuls run in fp32.

Pure 16-bit (``run.mixed_precision: no`` with a 16-bit ``run.dtype``) stores
trained weights in 16 bits too: AdamW's update ``lr * m / sqrt(v)`` is ~lr per step, and at
lr 1e-6 that is below bf16's resolution (2^-8 relative) for any weight above ~3e-4, so almost
every update rounds away (measured on an H200: 1.8% of SmolLM2-135M's weights changed after 4
APA iterations at lr 1e-6, 6.0% in fp32).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from apactl.errors import ModelError
from apactl.models.heads import unwrap

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
        """Under mixed precision, keep a trained model's frozen matmul weights in the compute
        dtype (``store_matmuls``): they need no fp32 master, and the same rule for every model
        lets the frozen bottom be shared with the reference (``accel.trunk.share_bottom``
        compares weights exactly). Heads are left alone: align makes them fp32 (``fp32_heads``);
        SFT keeps a 16-bit LM head (an fp32 one over every position costs more than it buys)."""
        if self.mixed:
            store_matmuls(model, self.dtype, frozen_only=True)
        return model

    def store_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that never trains (reference, decode copy, reward model): the same storage
        as a trained model's frozen part, so under autocast it computes what the policy does."""
        fp32_heads(model)
        if self.mixed:
            store_matmuls(model, self.dtype)
        return model

    def decode_copy(self, policy: torch.nn.Module) -> torch.nn.Module:
        """A frozen inference copy of ``policy`` for decoding (16-bit matmul weights under mixed
        precision; buffers such as rotary ``inv_freq`` untouched). ``Actors.sync_sampler``
        refreshes it in place."""
        copy_ = copy.deepcopy(policy)
        copy_.requires_grad_(False)
        return self.store_inference(copy_).eval()

    def describe(self) -> str:
        if not self.mixed:
            return f"{str(self.dtype).removeprefix('torch.')} weights and compute"
        return (f"mixed {self.mode}: fp32 master weights, {str(self.dtype).removeprefix('torch.')}"
                " autocast, frozen matmul weights in " + str(self.dtype).removeprefix("torch.")
                + ", fp32 heads")

    @property
    def pure_half(self) -> bool:
        """16-bit trained weights: small learning rates will not move them."""
        return not self.mixed and self.dtype != torch.float32


class Fp32Head(torch.nn.Linear):
    """An output head (LM head, value or reward ``score``) computed in fp32 whatever the
    autocast state: inputs, weight and result fp32 (a no-op copy for fp32 weights, so gradients
    reach the masters). ``fp32_heads`` turns a model's heads into this class in place; the
    state dict, saving and loading are those of ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)


def head_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linear output heads of ``model``: its output embeddings (LM head) and ``score``
    (sequence classifiers), including a peft ``modules_to_save`` copy."""
    inner = unwrap(model)
    get_out = getattr(inner, "get_output_embeddings", None)
    heads = [get_out() if get_out is not None else None, getattr(inner, "score", None)]
    return [m for h in heads if h is not None for m in h.modules()
            if isinstance(m, torch.nn.Linear)]


def fp32_heads(model: torch.nn.Module) -> torch.nn.Module:
    """Make every output head of ``model`` an ``Fp32Head`` (in place; idempotent)."""
    for m in head_modules(model):
        if type(m) is torch.nn.Linear:
            m.__class__ = Fp32Head
    return model


def store_matmuls(model: torch.nn.Module, dtype: torch.dtype, frozen_only: bool = False
                  ) -> torch.nn.Module:
    """Store the weights and biases of ``model``'s ``nn.Linear`` layers in ``dtype``, except
    the output heads (an LM head tied to the embeddings stays with them); embeddings, norms
    and buffers keep their dtype. ``frozen_only``: parameters that need no grad only."""
    keep = {id(p) for m in head_modules(model) for p in m.parameters()}
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        for p in m.parameters(recurse=False):
            if id(p) in keep or not p.is_floating_point() or (frozen_only and p.requires_grad):
                continue
            p.data = p.data.to(dtype)
    return model


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
