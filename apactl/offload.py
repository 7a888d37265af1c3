"""Frozen models off the accelerator (``train.offload_frozen``): the reference and the reward
model live in host memory and are brought to the device only while they compute.

Frozen weights never change, so nothing is copied back: leaving the device just points every
tensor at its host copy again and the device copy is freed. On a GPU the host copies are pinned
(page-locked), so the copy in is a DMA transfer at PCIe/NVLink-C2C speed: ~0.1-0.3 s for the
3.4 GB of a 1.7B model in bf16, paid once per rollout (and per held-out evaluation) for what
would otherwise hold device memory through generation and the update. On a CPU device it is
a no-op.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import torch


class Offload:
    """Modules whose tensors (parameters and buffers) live on the host between uses.

    ``add`` moves a module's tensors to the host at once (load a model on the device, then add
    it: the device then holds it only for a moment). ``on_device()`` brings every added tensor
    to ``device`` for the block and drops the device copies after it; nested blocks move once.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.slots: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its host copy)
        self.buffers: list[torch.Tensor] = []  # one host buffer per added model (uint8)
        self.depth = 0
        self.moves = 0  # device round trips made (tests and benchmarks count them)
        # On a CPU device there is nowhere to offload to. (Tests set it on a CPU: every move is
        # then a copy into fresh CPU memory, standing in for the device.)
        self.active = self.device.type != "cpu"

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self.slots)

    def add(self, module: torch.nn.Module | None) -> None:
        """Keep ``module`` on the host from now on (``None``: nothing, e.g. a LoRA reference).

        Its tensors become views of one host buffer (``host_buffer``): one pinned allocation
        per model, not one per tensor (the caching host allocator rounds every pinned block up
        to a power of two: ~1.9x the model's bytes over a model's many tensors)."""
        if module is None or not self.active:
            return
        seen = {id(t) for t, _ in self.slots}
        tensors = []
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in seen:  # tied weights: one tensor, one slot
                seen.add(id(t))
                tensors.append(t)
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        buf = host_buffer(total, pinned=self.device.type == "cuda")
        self.buffers.append(buf)
        for t, start in zip(tensors, offsets):
            n = t.numel() * t.element_size()
            host = buf[start:start + n].view(t.dtype).view(t.shape)
            host.copy_(t.data)
            t.data = host
            self.slots.append((t, host))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed device blocks back for other models

    @contextlib.contextmanager
    def on_device(self) -> Iterator[None]:
        """The added modules on ``device`` inside the block, on the host after it."""
        if self.depth == 0 and self.slots:
            for t, host in self.slots:
                t.data = host.to(self.device, non_blocking=True, copy=True)
            self.moves += 1
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for t, host in self.slots:
                    t.data = host


# Every tensor of a model's host buffer starts at a multiple of 64 bytes: a byte slice then
# views as any dtype, and copies run on aligned memory.
_ALIGN = 64


def host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """``nbytes`` of host memory (uint8), page-locked when ``pinned``: registered with CUDA as
    it is (cudaHostRegister: exactly ``nbytes``), else, if that fails, from torch's pinned
    allocator (rounded up to a power of two)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    if not pinned or nbytes == 0:
        return buf
    try:
        cudart = torch.cuda.cudart()
        registered = int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0
    except (AttributeError, RuntimeError, TypeError):  # a torch without the binding
        registered = False
    if not registered:
        return buf.pin_memory()
    # Unregistered when the buffer is collected, before its memory is freed.
    weakref.finalize(buf, cudart.cudaHostUnregister, buf.data_ptr())
    return buf
