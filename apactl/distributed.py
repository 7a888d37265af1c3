"""Data parallelism on torch.distributed (gloo on CPU, NCCL on GPUs), set up by Accelerate.

``accelerate launch`` and ``torchrun`` both start N copies of ``apactl``; Accelerate's
``PartialState`` joins them into one process group. Every rank holds the whole model, works on its
share of each batch, and gradients are averaged with one flat all-reduce per optimizer step, so
N ranks with micro-batches of size m compute the same update as 1 rank accumulating N micro-batches
of size m. Metrics are averaged over ranks; only rank 0 writes files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch


def stack_scalars(values: list, device: torch.device) -> torch.Tensor:
    """Floats and 0-dim tensors (on any device) as one float64 vector on ``device``, filled in
    place (kernel launches, no copy from pageable host memory, no host sync)."""
    t = torch.zeros(len(values), dtype=torch.float64, device=device)
    for i, v in enumerate(values):
        t[i] = v.detach().reshape(()) if isinstance(v, torch.Tensor) else float(v)
    return t


def read_scalars(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """``values`` as python floats, read back from the device in one host sync (tensors are
    gathered where the first of them lives)."""
    device = next((v.device for v in values.values() if isinstance(v, torch.Tensor)), None)
    if device is None:  # numbers only: nothing to read back
        return {k: float(v) for k, v in values.items()}
    return dict(zip(values, stack_scalars(list(values.values()), device).tolist()))


def collective_device(backend: str, local_rank: int) -> torch.device:
    """The device whose tensors a process group's collectives take: ``cuda:<local_rank>`` when
    NCCL carries them (``"nccl"``, or ``"cpu:gloo,cuda:nccl"``), else the CPU (gloo, mpi). An
    NCCL-only group refuses CPU tensors ("No backend type associated with device type cpu")."""
    if "nccl" in str(backend):
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass
class Dist:
    """This rank's place in the job and the collectives it runs.

    Tensor collectives run on ``device``, the process group's device (``collective_device``):
    the CPU under gloo, ``cuda:<local_rank>`` under NCCL. Host objects (texts, paths, shapes)
    go through ``objects``, a gloo group made next to an NCCL one (None: the default group).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    objects: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def joined(self) -> bool:
        """A process group exists: N launched ranks, or one made for ``run.strategy: fsdp``."""
        td = torch.distributed
        return td.is_available() and td.is_initialized()

    def barrier(self) -> None:
        if self.enabled:  # a host-side rendezvous (files written, folders claimed)
            torch.distributed.barrier(group=self.objects)

    def all_reduce_grads(self, params: Iterable[torch.nn.Parameter],
                         bucket_bytes: int = 256 * 2**20) -> None:
        """Average the gradients of ``params`` over ranks, in flat buckets of about
        ``bucket_bytes`` (a few large messages, and a bounded temporary buffer rather than a
        copy of every gradient at once: 6.8 GB for a 1.7B model in fp32)."""
        if not self.enabled:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for g in (p.grad for p in params if p.grad is not None):
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= bucket_bytes:
                self._average(bucket)
                bucket, size = [], 0
        if bucket:
            self._average(bucket)

    def _average(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads]).to(self.device)
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean_dict(self, stats: dict[str, float | torch.Tensor]) -> dict[str, float]:
        """Average metrics over ranks (every rank must pass the same keys); values are floats or
        0-dim tensors (on any device), read back to the host at once: one sync."""
        if not self.enabled:
            return read_scalars(stats)
        keys = sorted(stats)
        t = stack_scalars([stats[k] for k in keys], self.device)
        torch.distributed.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def sum_scalar(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def max_int(self, value: int) -> int:
        """The largest ``value`` over ranks."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` (picklable host data, no tensors), in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj, group=self.objects)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.objects)
        return box[0]

    def gather_rows(self, mine: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``mine`` (any length along dim 0, the same trailing shape and dtype), in
        rank order, on ``device``: the lengths are exchanged first, then one all_gather of the
        rows padded to the longest."""
        mine = mine.to(self.device)
        if not self.enabled:
            return [mine]
        n = torch.tensor([mine.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(n) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, n)
        lengths = torch.cat(sizes).tolist()
        longest = max(lengths)
        padded = torch.zeros((longest, *mine.shape[1:]), dtype=mine.dtype, device=self.device)
        padded[:mine.shape[0]] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return [p[:m] for p, m in zip(parts, lengths)]

    def shard(self, items: list) -> list:
        """This rank's items of a global list: every world_size-th, starting at the rank."""
        return items[self.rank::self.world_size]

    def unshard(self, mine: torch.Tensor) -> torch.Tensor:
        """Inverse of ``shard`` for per-item results (dim 0): the global tensor in item order, on
        ``mine``'s device."""
        parts = self.gather_rows(mine)
        out = torch.empty((sum(len(p) for p in parts), *mine.shape[1:]), dtype=mine.dtype,
                          device=self.device)
        for r, part in enumerate(parts):
            out[r::self.world_size] = part
        return out.to(mine.device)

    def owns(self, j: int) -> bool:
        """Chunk/micro-batch ``j`` of a global sequence belongs to rank ``j % world_size``."""
        return j % self.world_size == self.rank

    def gather_chunks(self, mine: dict[int, object]) -> list:
        """{chunk index: result} of every rank -> all results in chunk order, on every rank.

        A result that is a dict travels as its tensors, packed into one byte buffer on
        ``device`` (one all_gather), and the rest (texts, scores lists, shapes) as host
        objects; any other result travels as a host object. Received tensors are on ``device``
        (host tensors come back to the host).
        """
        if not self.enabled:
            return [mine[j] for j in sorted(mine)]
        skeleton, tensors = pack_skeleton(mine)
        payload = pack_bytes(tensors, self.device)
        merged: dict[int, object] = {}
        for sk, buf in zip(self.gather_objects(skeleton), self.gather_rows(payload)):
            merged.update(unpack(sk, buf))
        return [merged[j] for j in sorted(merged)]


# Every packed tensor starts at a multiple of 8 bytes: a byte slice then views as any dtype.
_ALIGN = 8


def pack_skeleton(mine: dict[int, object]) -> tuple[dict, list[torch.Tensor]]:
    """(what a receiver needs to rebuild ``mine`` besides tensor bytes, the tensors in order).
    A tensor's entry is (shape, dtype, on the host); other values are kept as they are."""
    skeleton, tensors = {}, []
    for j in sorted(mine):
        value = mine[j]
        if not isinstance(value, dict):
            skeleton[j] = ("object", value)
            continue
        entry = {}
        for k, v in value.items():
            if isinstance(v, torch.Tensor):
                entry[k] = ("tensor", tuple(v.shape), v.dtype, v.device.type == "cpu")
                tensors.append(v)
            else:
                entry[k] = ("object", v)
        skeleton[j] = ("dict", entry)
    return skeleton, tensors


def pack_bytes(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The tensors' bytes, one after the other (each padded to ``_ALIGN``), as uint8 on
    ``device``."""
    parts = []
    for t in tensors:
        raw = t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        if raw.numel() % _ALIGN:
            parts.append(raw.new_zeros(_ALIGN - raw.numel() % _ALIGN))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=device)


def unpack(skeleton: dict, buf: torch.Tensor) -> dict[int, object]:
    """Inverse of ``pack_skeleton`` + ``pack_bytes``: a tensor that was on the host comes back
    to the host (a CPU tensor of a caller stays one), the others are on ``buf``'s device."""
    out: dict[int, object] = {}
    offset = 0
    for j, (kind, value) in skeleton.items():
        if kind == "object":
            out[j] = value
            continue
        entry = {}
        for k, (what, *spec) in value.items():
            if what == "object":
                entry[k] = spec[0]
                continue
            shape, dtype, on_host = spec
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            # A copy of its own: views of one buffer as several dtypes cannot be saved.
            t = buf[offset:offset + n].view(dtype).reshape(shape)
            entry[k] = t.cpu() if on_host and t.device.type != "cpu" else t.clone()
            offset += -(-n // _ALIGN) * _ALIGN
        out[j] = entry
    return out


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


def init_dist(device_pref: str, timeout_s: float = 600, group: bool = False
              ) -> tuple[Dist, torch.device | None]:
    """Join the process group when launched by accelerate/torchrun; else a 1-process Dist.

    Returns the device this rank should use when distributed (``cuda:<local_rank>``), or None to
    let the recipe's ``run.device`` decide. ``timeout_s`` bounds every collective. ``group``:
    a single process makes a process group of one (FSDP shards over a group, so that
    ``run.strategy: fsdp`` runs, and can be measured, on one device).
    """
    from accelerate import PartialState

    # cpu=True without CUDA: otherwise PartialState joins the launcher's group but reports a
    # single process (its CPU path is only taken when asked for).
    cpu = device_pref == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=timeout_s))
    td = torch.distributed
    if group and td.is_available() and not td.is_initialized():
        backend = "gloo" if cpu else "nccl"
        td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1,
                              timeout=timedelta(seconds=timeout_s))
    if not (td.is_available() and td.is_initialized()):
        return Dist(), None
    # The process group is the truth: collectives use its ranks and its device.
    local = state.local_process_index if td.get_world_size() > 1 else 0
    device_of_group = collective_device(td.get_backend(), local)
    # Host objects next to NCCL: a gloo group of the same ranks (made by every rank, in order).
    objects = (None if device_of_group.type == "cpu" else
               td.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
    dist = Dist(td.get_rank(), td.get_world_size(), local, device_of_group, objects)
    if not dist.enabled:  # a group of one: the recipe's run.device decides
        return dist, None
    device = state.device if state.device.type != "cpu" else torch.device("cpu")
    return dist, device
