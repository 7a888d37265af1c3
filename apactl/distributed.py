"""Data parallelism on torch.distributed (gloo on CPU, NCCL on GPUs), set up by Accelerate.

``accelerate launch`` and ``torchrun`` both start N copies of ``apactl``; Accelerate's
``PartialState`` joins them into one process group. Every rank holds the whole model, works on its
share of each batch, and gradients are averaged with one flat all-reduce per optimizer step, so
N ranks with micro-batches of size m compute the same update as 1 rank accumulating N micro-batches
of size m. Metrics are averaged over ranks; only rank 0 writes files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of ``params`` over ranks (one flat buffer: one message)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean_dict(self, stats: dict[str, float]) -> dict[str, float]:
        """Average float metrics over ranks (every rank must pass the same keys)."""
        if not self.enabled or not stats:
            return stats
        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return dict(zip(keys, (t / self.world_size).tolist()))

    def sum_scalar(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list) -> list:
        """This rank's items of a global list: every world_size-th, starting at the rank."""
        return items[self.rank::self.world_size]

    def unshard(self, mine: torch.Tensor) -> torch.Tensor:
        """Inverse of ``shard`` for per-item results (dim 0): the global tensor in item order."""
        parts = self.gather_objects(mine.cpu())
        out = torch.empty((sum(len(p) for p in parts), *mine.shape[1:]), dtype=mine.dtype)
        for r, part in enumerate(parts):
            out[r::self.world_size] = part
        return out

    def owns(self, j: int) -> bool:
        """Chunk/micro-batch ``j`` of a global sequence belongs to rank ``j % world_size``."""
        return j % self.world_size == self.rank

    def gather_chunks(self, mine: dict[int, object]) -> list:
        """{chunk index: result} of every rank -> all results in chunk order, on every rank."""
        merged: dict[int, object] = {}
        for part in self.gather_objects(mine):
            merged.update(part)
        return [merged[j] for j in sorted(merged)]


def claim_error_report() -> bool:
    """True for the first rank of the job to fail (it prints the error), False for the others.

    Uses the process group's key-value store, which answers even while other ranks are stuck in
    a collective; without one every rank reports.
    """
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        return store.add("apactl/failed", 1) == 1
    except Exception:  # no store (or it is gone with rank 0): better twice than never
        return True


def init_dist(device_pref: str, timeout_s: float = 600) -> tuple[Dist, torch.device | None]:
    """Join the process group when launched by accelerate/torchrun; else a 1-process Dist.

    Returns the device this rank should use when distributed (``cuda:<local_rank>``), or None to
    let the recipe's ``run.device`` decide. ``timeout_s`` bounds every collective.
    """
    from accelerate import PartialState

    # cpu=True without CUDA: otherwise PartialState joins the launcher's group but reports a
    # single process (its CPU path is only taken when asked for).
    cpu = device_pref == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    td = torch.distributed
    if not (td.is_available() and td.is_initialized()) or td.get_world_size() <= 1:
        return Dist(), None
    # The process group is the truth: collectives use its ranks.
    dist = Dist(td.get_rank(), td.get_world_size(), state.local_process_index)
    device = state.device if state.device.type != "cpu" else torch.device("cpu")
    return dist, device
