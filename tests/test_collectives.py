"""Collectives on any backend: every tensor handed to a collective is on the process group's
device, host objects go through the object (gloo) group and carry no tensors.

An NCCL-only group (what Accelerate makes on GPUs) refuses CPU tensors; the CPU tests run gloo,
which takes anything. ``GroupChecker`` stands in for a group whose device is not the CPU: it
replaces torch.distributed's collectives, refuses a tensor on any other device as NCCL does,
and records the call. Its device is ``meta`` (the only non-CPU device a CPU machine has):
nothing can be read back from it, so a tensor collective that passes the check ends the call
(``Reached``). The values are checked on two real gloo processes (``test_two_gloo_ranks``).
"""

from __future__ import annotations

import io
import pickle

import pytest
import torch

from apactl.distributed import Dist, collective_device, pack_bytes, pack_skeleton, unpack

META = torch.device("meta")
OBJECTS = object()  # stands in for the gloo group made next to an NCCL one


class Reached(Exception):
    """A tensor collective got tensors on the group's device (nothing to read back on meta)."""


def _tensors_in(obj) -> bool:
    found = []

    class Spy(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, torch.Tensor):
                found.append(o)
            return None

    Spy(io.BytesIO()).dump(obj)
    return bool(found)


class GroupChecker:
    def __init__(self, monkeypatch, device: torch.device, world_size: int = 2):
        self.device, self.world_size, self.calls = device, world_size, []
        td = torch.distributed
        for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                     "reduce_scatter_tensor"):
            monkeypatch.setattr(td, name, self.tensor_op(name))
        monkeypatch.setattr(td, "all_gather_object", self.all_gather_object)
        monkeypatch.setattr(td, "broadcast_object_list", self.broadcast_object_list)
        monkeypatch.setattr(td, "barrier", self.barrier)

    def tensor_op(self, name):
        def op(*args, **kwargs):
            flat = [a for x in (*args, *kwargs.values())
                    for a in (x if isinstance(x, (list, tuple)) else [x])]
            for t in (a for a in flat if isinstance(a, torch.Tensor)):
                if t.device != self.device:  # NCCL's own words
                    raise RuntimeError(f"No backend type associated with device type "
                                       f"{t.device.type}")
            self.calls.append(name)
            raise Reached(name)
        return op

    def check_objects(self, name, obj, group):
        assert group is OBJECTS, f"{name} on the default group, not the object group"
        assert not _tensors_in(obj), f"{name} pickles tensors"
        self.calls.append(name)

    def all_gather_object(self, out, obj, group=None):
        self.check_objects("all_gather_object", obj, group)
        out[:] = [obj] * self.world_size

    def broadcast_object_list(self, box, src=0, group=None, device=None):
        self.check_objects("broadcast_object_list", box, group)

    def barrier(self, group=None, **_):
        assert group is OBJECTS, "barrier on the default group"
        self.calls.append("barrier")


def _chunks() -> dict[int, dict]:
    return {0: {"ids": torch.arange(6).reshape(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool),
                "texts": ["a", "b"]}}


def _grads() -> list[torch.nn.Parameter]:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    return [p]


TENSOR_CALLS = {
    "mean_dict": lambda d: d.mean_dict({"loss": 1.0, "acc": torch.tensor(0.5)}),
    "sum_scalar": lambda d: d.sum_scalar(3.0),
    "all_reduce_grads": lambda d: d.all_reduce_grads(_grads()),
    "unshard": lambda d: d.unshard(torch.arange(4.0)),
    "gather_rows": lambda d: d.gather_rows(torch.arange(4.0)),
    "gather_chunks": lambda d: d.gather_chunks(_chunks()),
}


@pytest.mark.parametrize("call", sorted(TENSOR_CALLS))
def test_tensor_collectives_run_on_the_groups_device(monkeypatch, call):
    """On today's code before the fix, mean_dict/sum_scalar handed CPU float64 tensors to the
    group (NCCL raises) and gather_chunks/unshard pickled tensors through all_gather_object."""
    checker = GroupChecker(monkeypatch, META)
    dist = Dist(rank=0, world_size=2, local_rank=0, device=META, objects=OBJECTS)
    with pytest.raises(Reached):
        TENSOR_CALLS[call](dist)
    assert checker.calls[-1].startswith("all_")


def test_host_objects_use_the_object_group(monkeypatch):
    checker = GroupChecker(monkeypatch, META)
    dist = Dist(rank=0, world_size=2, local_rank=0, device=META, objects=OBJECTS)
    assert dist.broadcast_object("run/checkpoints/step-2") == "run/checkpoints/step-2"
    assert dist.gather_objects(["x"]) == [["x"], ["x"]]
    dist.barrier()
    # A chunk of host objects only (apactl label) never reaches a tensor collective's data.
    with pytest.raises(Reached):
        dist.gather_chunks({0: [("item", ["text"], [1.0])]})
    assert checker.calls == ["broadcast_object_list", "all_gather_object", "barrier",
                             "all_gather_object", "all_gather"]


def test_collective_device_follows_the_backend():
    assert collective_device("nccl", 3) == torch.device("cuda", 3)
    assert collective_device("cpu:gloo,cuda:nccl", 1) == torch.device("cuda", 1)
    assert collective_device("gloo", 3) == torch.device("cpu")
    assert collective_device("mpi", 0) == torch.device("cpu")


def test_one_process_moves_nothing():
    """world size 1: no collective, chunks returned as they are (no host round trip)."""
    mine = _chunks()
    got = Dist().gather_chunks(mine)
    assert got[0]["ids"] is mine[0]["ids"]
    assert Dist().mean_dict({"a": 1.0, "b": torch.tensor(2.0)}) == {"a": 1.0, "b": 2.0}


def test_pack_round_trip_keeps_dtypes_shapes_and_objects():
    mine = {3: {"h": torch.randn(2, 3, dtype=torch.bfloat16), "b": torch.tensor([True, False]),
                "n": torch.tensor(7), "e": torch.zeros(0, 5), "x": torch.randn(1, 1, 3),
                "texts": ["hi"]},
            5: ["not", "a", "dict"]}
    skeleton, tensors = pack_skeleton(mine)
    assert not _tensors_in(skeleton)
    buf = pack_bytes(tensors, torch.device("cpu"))
    assert buf.dtype == torch.uint8 and buf.numel() % 8 == 0
    back = unpack(skeleton, buf)
    assert back[5] == ["not", "a", "dict"] and back[3]["texts"] == ["hi"]
    for k, v in mine[3].items():
        if isinstance(v, torch.Tensor):
            assert back[3][k].dtype == v.dtype and torch.equal(back[3][k], v), k


def _two_ranks(rank: int, store: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                         world_size=2)
    d = Dist(rank, 2, rank)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank))
    d.all_reduce_grads([p])
    # Buckets of ~8 bytes: three messages for three gradients (mixed dtypes, one without grad).
    small = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in
             ((4, torch.float32), (2, torch.float64), (5, torch.float32), (1, torch.float32))]
    for i, q in enumerate(small[:3]):
        q.grad = torch.full_like(q, float(rank * (i + 1)))
    d.all_reduce_grads(small, bucket_bytes=8)
    # Items 0..4 sharded: rank 0 holds 0, 2, 4 and rank 1 holds 1, 3 (uneven).
    mine = torch.tensor(d.shard(list(range(5))), dtype=torch.float32) * 10
    chunks = {j: {"x": torch.full((j + 1, 2), float(j)), "m": torch.tensor([j % 2 == 0] * j),
                  "t": [f"text {j}"]} for j in range(5) if d.owns(j)}
    res = {"mean": d.mean_dict({"a": float(rank), "b": torch.tensor(2.0 * rank)}),
           "sum": d.sum_scalar(rank + 1), "unshard": d.unshard(mine), "grad": p.grad,
           "buckets": [q.grad for q in small],
           "chunks": d.gather_chunks(chunks),
           "labels": d.gather_chunks({j: [j] for j in range(5) if d.owns(j)}),
           "bcast": d.broadcast_object("from 0" if rank == 0 else None)}
    torch.save(res, f"{out}/{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks(tmp_path):
    """The values: two gloo processes, uneven shards and chunks, every Dist collective."""
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"), str(tmp_path)),
                                nprocs=2)
    for rank in (0, 1):
        res = torch.load(tmp_path / f"{rank}.pt")
        assert res["mean"] == {"a": 0.5, "b": 1.0}
        assert res["sum"] == 3.0
        assert torch.equal(res["unshard"], torch.arange(5.0) * 10)
        assert torch.equal(res["grad"], torch.full((3,), 0.5))
        assert [None if g is None else g.tolist() for g in res["buckets"]] == \
            [[0.5] * 4, [1.0] * 2, [1.5] * 5, None]
        assert res["bcast"] == "from 0"
        assert res["labels"] == [[j] for j in range(5)]
        for j, c in enumerate(res["chunks"]):
            assert torch.equal(c["x"], torch.full((j + 1, 2), float(j)))
            assert torch.equal(c["m"], torch.tensor([j % 2 == 0] * j)) and c["t"] == [f"text {j}"]
