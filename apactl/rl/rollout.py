"""Rollouts: generate -> log-probs under policy and reference, values -> judge scores.

A global batch of prompts is cut into chunks; chunk j is sampled with a seed derived from
(run.seed, stream, key..., j) and scored by rank j % world_size, then the ranks exchange their
chunks (``sampling.seeded_chunks``). So the rollout does not depend on the world size (for a
fixed chunk size), resume is exact, and everything after it (advantages, whitening, KL control,
metrics) sees the global batch on every rank with no further communication.

With k answers per prompt (``samples``) a chunk is a run of prompts, each repeated k times in
one decode call (independent samples: one seeded stream, k rows), so the k answers of a prompt
are always in one chunk, on one rank, in consecutive rows: rows g*k .. g*k+k-1 of the Rollout
answer prompt g, which is what the group estimators of ``rl.advantages`` read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from apactl.data import left_pad
from apactl.distributed import Dist
from apactl.masked import masked_mean
from apactl.metrics import Timer
from apactl.models import unwrap
from apactl.rl.forward import Forwards, build_sequences, fit_width
from apactl.rl.types import Rollout
from apactl.sampling import (
    SamplingSpec,
    Stream,
    release_decode_memory,
    sample,
    seeded_chunks,
    used_cuda_graph,
)


@dataclass
class Actors:
    """Every model the loop touches. ``ref is None`` means: the policy with LoRA disabled;
    ``critic is None``: a critic-free algorithm (no values computed, none trained or saved).

    ``sampler`` decodes; it is the policy itself, or an inference copy of it (16-bit weights
    under mixed precision) that ``sync_sampler`` refreshes after each update.
    """

    policy: torch.nn.Module
    ref: torch.nn.Module | None
    critic: torch.nn.Module | None
    judge: Any  # apactl.judges.Judge
    tokenizer: Any
    eos: list[int]
    device: torch.device
    forwards: Forwards
    sampler: torch.nn.Module | None = None
    # run.strategy=fsdp: policy and critic are sharded, the sampler is a local copy; each rank
    # samples and scores its own chunks (its scoring forwards in lockstep with the others').
    sharded: bool = False
    # train.offload_frozen: the reference and the reward model live on the host between uses
    # (an ``apactl.offload.Offload``); None: they stay on the device.
    offload: Any = None

    def frozen_on_device(self, timer: Timer | None = None) -> contextlib.ExitStack:
        """A context with the frozen models on the device (the transfer timed as "offload")."""
        stack = contextlib.ExitStack()
        if self.offload is not None:
            with timer("offload") if timer is not None else contextlib.nullcontext():
                stack.enter_context(self.offload.on_device())
        return stack

    def sync_sampler(self) -> None:
        """Copy the policy's current weights into the inference copy (no-op without one), in
        place: a captured CUDA graph keeps reading the same storage."""
        if self.sampler is None or self.sampler is self.policy:
            return
        with torch.no_grad():
            if self.sharded:
                from apactl.fsdp import copy_to_replica

                copy_to_replica(self.policy, self.sampler)
                return
            for dst, src in zip(self.sampler.parameters(), self.policy.parameters()):
                dst.copy_(src)


@dataclass
class RolloutPlan:
    """How one rollout runs: the distribution, chunking and seeding, the precision context."""

    spec: SamplingSpec
    chunk_size: int | None  # prompts per generate() call; None: one chunk per rank
    forward_batch: int | None  # rows per scoring forward; None: by ``forward_tokens``
    seed: int
    pad_id: int
    backend: str = "auto"
    autocast: Callable[[], Any] = lambda: torch.autocast("cpu", enabled=False)
    # Per scoring forward when forward_batch is None (``scoring_rows``): tokens (rows x padded
    # length; on a GPU one large forward uses the device far better than many small ones) and
    # bytes of fp32 logits (the vocabulary counts: 128k is 2.6x 49k).
    forward_tokens: int = 16384
    forward_bytes: int = 4 << 30


def scoring_rows(width: int, vocab: int, tokens: int, nbytes: int) -> int:
    """Rows per scoring forward of ``width``-token rows: at most ``tokens`` tokens, and at most
    ``nbytes`` for the forward's fp32 [rows, width, vocab] logits plus their [rows, T <= width,
    vocab] response gather (the log-softmax itself is chunked: ``losses.logprobs_from_logits``)."""
    return max(1, min(tokens // width, nbytes // (2 * width * vocab * 4)))


def repeat_prompts(prompts: list[dict], k: int) -> list[dict]:
    """Each prompt k times in a row: the rows of a rollout with k answers per prompt."""
    return [p for p in prompts for _ in range(k)]


def judge_scores(actors: Actors, prompts: list[dict], response_ids: Tensor,
                 mask: Tensor) -> tuple[list[str], Tensor]:
    """Decode responses and score the text: the judge tokenises it with its own tokenizer."""
    ids = [row[: int(m.sum())].tolist() for row, m in zip(response_ids.cpu(), mask.cpu())]
    texts = actors.tokenizer.batch_decode(ids, skip_special_tokens=True)
    scores = actors.judge.score([p["messages"] for p in prompts], texts)
    return texts, torch.as_tensor(scores, dtype=torch.float32)


@torch.no_grad()
def collect_rollout(actors: Actors, prompts: list[dict], plan: RolloutPlan, timer: Timer,
                    stream: Stream, key: tuple[int, ...], dist: Dist | None = None,
                    samples: int = 1) -> tuple[Rollout, list[str], dict[str, float]]:
    """Generate and score one global batch of prompts, ``samples`` answers each (rows
    prompt-major); every rank returns the whole Rollout (``episode`` = row index) and the
    forwards remember what they kept for the update."""
    dist = dist or Dist()
    size = plan.chunk_size or max(-(-len(prompts) // dist.world_size), 1)
    # Sharded (fsdp): the decode copy is replicated, so each rank samples its own chunks with
    # no collective; its scoring forwards are collectives, run in lockstep (``_chunk``).
    lockstep = dist if actors.sharded and dist.enabled else None
    idle = (lambda: _fillers(actors, plan, timer, lockstep.max_int(0))) if lockstep else None
    chunks = seeded_chunks(len(prompts), size,
                           lambda rows: _chunk(actors, repeat_prompts(prompts[rows], samples),
                                               plan, timer, lockstep),
                           plan.seed, stream, key, dist, idle)
    # The decode's CUDA graphs and static KV caches are not needed until the next rollout:
    # freed here, so the update (and scoring of other rollouts) has that memory.
    release_decode_memory()
    ro, ent, ended, kept = _merge(chunks, plan.pad_id, actors.device)
    actors.forwards.remember(kept)
    mask = ro.response_mask
    stats = {"policy/entropy": masked_mean(ent, mask).item(),
             "response/length_mean": mask.sum(1).mean().item(),
             "response/eos_rate": ended.float().mean().item(),
             # 1: every chunk was decoded by a replayed CUDA graph; 0: some chunk fell back
             "gen/cuda_graph": float(all(bool(c["cuda_graph"].all()) for c in chunks))}
    return ro, [t for c in chunks for t in c["texts"]], stats


def _chunk(actors: Actors, prompts: list[dict], plan: RolloutPlan, timer: Timer,
           lockstep: Dist | None = None) -> dict[str, Any]:
    """Sample and score one chunk; its tensors stay on the device (they travel between ranks
    as tensors on the process group's device, ``Dist.gather_chunks``).

    ``lockstep`` (sharded models): every forward of a sharded model is a collective, so the
    ranks agree on the most scoring forwards any of them runs for its chunk of this round, and
    the others make up the difference with ``_fillers``."""
    dev = actors.device
    q_ids, q_mask = left_pad([p["input_ids"] for p in prompts], plan.pad_id)
    q_ids, q_mask = q_ids.to(dev), q_mask.to(dev)
    sampler = actors.sampler or actors.policy
    sampler.eval()
    # Under autocast too: with mixed precision a policy mixes fp32 (trained) and 16-bit
    # (frozen) weights; the 16-bit sampler copy of a CUDA run is unaffected.
    with timer("generate"), plan.autocast():
        resp, mask = sample(sampler, q_ids, q_mask, plan.spec, actors.eos, plan.pad_id,
                            plan.backend)
    graph = torch.full((resp.shape[0],), used_cuda_graph(), dtype=torch.bool,
                       device=resp.device)
    seq = build_sequences(q_ids, q_mask, resp, mask, plan.pad_id)
    vocab = unwrap(actors.policy).get_output_embeddings().weight.shape[0]
    fb = plan.forward_batch or scoring_rows(seq.input_ids.shape[1], vocab, plan.forward_tokens,
                                            plan.forward_bytes)
    starts = range(0, resp.shape[0], fb)
    extra = lockstep.max_int(len(starts)) - len(starts) if lockstep is not None else 0
    with actors.frozen_on_device(timer):
        if actors.forwards.pending_check:
            with timer("verify"), plan.autocast():
                actors.forwards.check(seq.rows(slice(0, fb)), resp[:fb], plan.spec)
        with timer("score"), plan.autocast():
            parts = [actors.forwards.rollout(seq.rows(s), resp[s], plan.spec)
                     for s in (slice(i, i + fb) for i in starts)]
            width = seq.input_ids.shape[1]
            scored = {k: torch.cat([fit_width(p[k], width) if k.startswith("keep/") else p[k]
                                    for p in parts]) for k in parts[0]}
        _fillers(actors, plan, timer, extra)
        with timer("reward"):
            texts, raw = judge_scores(actors, prompts, resp, mask)
    ended = (torch.isin(resp, torch.tensor(actors.eos, device=dev)) & mask.bool()).any(1)
    out = {"query_ids": q_ids, "query_mask": q_mask, "response_ids": resp, "response_mask": mask,
           "scores": raw, "ended": ended, **scored}
    return {**out, "texts": texts, "cuda_graph": graph}


def _fillers(actors: Actors, plan: RolloutPlan, timer: Timer, n: int) -> None:
    """``n`` scoring forwards on a one-token row whose results are dropped: a rank with less
    to score runs the sharded models' collectives as often as the others."""
    if n <= 0:
        return
    one = torch.full((1, 1), plan.pad_id, dtype=torch.long, device=actors.device)
    ones = torch.ones_like(one)
    seq = build_sequences(one, ones, one, ones, plan.pad_id)
    with actors.frozen_on_device(timer), timer("score"), plan.autocast():
        for _ in range(n):
            actors.forwards.rollout(seq, one, plan.spec)


def _merge(chunks: list[dict], pad_id: int, device
           ) -> tuple[Rollout, Tensor, Tensor, dict[str, Tensor]]:
    """Chunks -> one Rollout (prompts re-left-padded, responses re-right-padded to the widest),
    the entropies, the ended flags and the forwards' kept tensors (padded along dim 1)."""
    p = max(c["query_ids"].shape[1] for c in chunks)
    t = max(c["response_ids"].shape[1] for c in chunks)

    def cat(key: str, width: int, value: float = 0, left: bool = False) -> Tensor:
        def pad(x: Tensor) -> Tensor:
            extra = width - x.shape[1]
            return torch.nn.functional.pad(x, (extra, 0) if left else (0, extra), value=value)
        return torch.cat([pad(c[key]) for c in chunks]).to(device)

    def rows(key: str) -> Tensor:
        return torch.cat([c[key] for c in chunks]).to(device)

    kept = {}
    for k in (k for k in chunks[0] if k.startswith("keep/")):
        width = max(c[k].shape[1] for c in chunks)
        kept[k] = torch.cat([fit_width(c[k], width) for c in chunks]).to(device)
    scores = rows("scores")
    ro = Rollout(cat("query_ids", p, pad_id, left=True), cat("query_mask", p, left=True),
                 cat("response_ids", t, pad_id), cat("response_mask", t),
                 old_logprobs=cat("old_logprobs", t), ref_logprobs=cat("ref_logprobs", t),
                 values=cat("values", t) if "values" in chunks[0] else None, scores=scores,
                 episode=torch.arange(scores.shape[0], device=device))
    return ro, cat("entropy", t), rows("ended"), kept
