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
        self.depth = 0
        self.moves = 0  # device round trips made (tests and benchmarks count them)
        # On a CPU device there is nowhere to offload to. (Tests set it on a CPU: every move is
        # then a copy into fresh CPU memory, standing in for the device.)
        self.active = self.device.type != "cpu"

    @property
    def nbytes(self) -> int:
        return sum(host.numel() * host.element_size() for _, host in self.slots)

    def add(self, module: torch.nn.Module | None) -> None:
        """Keep ``module`` on the host from now on (``None``: nothing, e.g. a LoRA reference)."""
        if module is None or not self.active:
            return
        seen = {id(t) for t, _ in self.slots}
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in seen:  # tied weights: one tensor, one slot
                continue
            seen.add(id(t))
            host = t.data.to("cpu", copy=True)
            if self.device.type == "cuda":
                host = host.pin_memory()
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
