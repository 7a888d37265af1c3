"""On a CUDA device (skipped elsewhere): the distributed, FSDP, offload and optimizer-step points
of the GPU review that only a GPU can show (/work/shared/gpu/AUDIT.md #1, #6, #8, #11, #13,
#15, deterministic). One GPU is enough: NCCL and FSDP run over a process group of one, and
``Dist`` is forced to run its collectives as with several ranks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from apactl.distributed import Dist

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda", 0)


class AlwaysCollective(Dist):
    """A Dist that runs its collectives at world size 1 (as several ranks would)."""

    @property
    def enabled(self) -> bool:
        return True


@pytest.fixture
def nccl_group():
    td = torch.distributed
    torch.cuda.set_device(0)
    td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1,
                          device_id=CUDA)
    yield td.new_group(backend="gloo")
    td.destroy_process_group()


def test_an_nccl_group_refuses_cpu_tensors(nccl_group):
    """AUDIT #1's premise: what the old mean_dict/sum_scalar did."""
    with pytest.raises(RuntimeError):
        torch.distributed.all_reduce(torch.zeros(1, dtype=torch.float64))
        torch.cuda.synchronize()


def test_every_dist_collective_on_nccl(nccl_group):
    d = AlwaysCollective(0, 1, 0, CUDA, nccl_group)
    assert d.mean_dict({"a": 1.5, "b": torch.tensor(2.0, device=CUDA)}) == {"a": 1.5, "b": 2.0}
    assert d.sum_scalar(3.0) == 3.0
    p = torch.nn.Parameter(torch.zeros(3, device=CUDA))
    p.grad = torch.ones(3, device=CUDA)
    d.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.ones(3, device=CUDA))
    x = torch.arange(5.0)
    assert torch.equal(d.unshard(x), x) and d.unshard(x).device.type == "cpu"
    assert d.gather_rows(x)[0].device == CUDA
    chunks = {0: {"ids": torch.arange(6, device=CUDA).reshape(2, 3),
                  "mask": torch.ones(2, 3, dtype=torch.bool, device=CUDA),
                  "h": torch.randn(2, 3, 4, dtype=torch.bfloat16, device=CUDA),
                  "scores": torch.tensor([0.5, 1.0]), "texts": ["a", "b"]}}
    got = d.gather_chunks(chunks)[0]
    for k, v in chunks[0].items():
        if isinstance(v, torch.Tensor):
            assert got[k].device == v.device and torch.equal(got[k].cpu(), v.cpu()), k
    assert got["texts"] == ["a", "b"]
    assert d.broadcast_object("x") == "x" and d.gather_objects({"k": 1}) == [{"k": 1}]
    d.barrier()


def test_init_dist_makes_a_group_of_one_for_fsdp():
    from apactl.distributed import init_dist

    td = torch.distributed
    try:
        dist, device = init_dist("cuda", 60, group=True)
        assert dist.joined and not dist.enabled and device is None
        assert td.get_backend() == "nccl" and dist.device == CUDA
        assert dist.objects is not None  # host objects through gloo next to NCCL
    finally:
        td.destroy_process_group()


def test_fsdp_mixed_precision_refresh_and_sharded_scaler(nccl_group):
    """FSDP's CUDA mixed-precision branch (never run before), the per-parameter sampler
    refresh into a bf16 replica, and fp16 + FSDP with the sharded scaler."""
    import copy

    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from apactl.fsdp import copy_to_replica, shard_model
    from apactl.precision import Precision
    from apactl.testing import make_tiny_llama, make_tiny_tokenizer
    from apactl.training import Optimization, Schedule, make_trainee

    tok = make_tiny_tokenizer()
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        p = Precision(CUDA, mode, dtype)
        policy = make_tiny_llama(tok, hidden=64, layers=2).to(CUDA)
        replica = copy.deepcopy(policy).to(dtype).requires_grad_(False)
        shard_model(policy, p)
        scaler = p.grad_scaler(sharded=True)
        assert (mode == "fp16") == isinstance(scaler, ShardedGradScaler)
        opt = Optimization({"m": make_trainee("m", policy, Schedule(1e-2), sharded=True)},
                           scaler=scaler)
        ids = torch.randint(5, len(tok), (4, 16), device=CUDA)
        with p.autocast():
            loss = policy(input_ids=ids, labels=ids).loss
        opt.backward(loss, 1)
        out = opt.step()
        assert math.isfinite(out["m/grad_norm"])
        copy_to_replica(policy, replica)
        for name, w in policy.named_parameters():
            assert torch.equal(dict(replica.named_parameters())[name], w.full_tensor().to(dtype))


def test_one_host_sync_per_optimizer_step():
    """AUDIT #8: the step reads the loss, the norms and the statistics in one sync."""
    from apactl.training import Optimization, Schedule, make_trainee

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 1)).to(CUDA)
    opt = Optimization({"a": make_trainee("a", model, Schedule(1e-3))})
    x = torch.randn(32, 64, device=CUDA)
    opt.backward(model(x).pow(2).mean(), 1)
    opt.step()  # the first step initialises AdamW's state
    stats = {}
    for _ in range(2):
        loss = model(x).pow(2).mean()
        stats["s"] = stats.get("s", 0.0) + loss.detach() / 2
        opt.backward(loss, 2)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt.step(stats=stats)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


def test_fp16_inf_step_is_skipped_not_fatal():
    """AUDIT #15, first bullet: an overflow under fp16 is the scaler's to skip."""
    from apactl.training import Optimization, Schedule, make_trainee

    model = torch.nn.Linear(8, 1).to(CUDA)
    scaler = torch.amp.GradScaler("cuda")
    opt = Optimization({"m": make_trainee("m", model, Schedule(1e-3))}, scaler=scaler)
    before, scale = model.weight.detach().clone(), scaler.get_scale()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(torch.full((4, 8), 6e4, device=CUDA)).pow(2).mean()  # overflows fp16
    opt.backward(loss, 1)
    opt.step()
    assert torch.equal(model.weight, before) and scaler.get_scale() < scale


def test_offload_one_pinned_buffer_per_model():
    """AUDIT #13: one page-locked buffer per model, of the model's size (no power-of-two
    rounding per tensor); the copy in is correct."""
    from apactl.offload import Offload, host_buffer
    from apactl.testing import make_tiny_llama, make_tiny_tokenizer

    buf = host_buffer(3 * 2**20 + 7, pinned=True)
    assert buf.is_pinned() and buf.numel() == 3 * 2**20 + 7
    model = make_tiny_llama(make_tiny_tokenizer(), hidden=128, layers=2).to(CUDA)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    off = Offload(CUDA)
    off.add(model)
    assert len(off.buffers) == 1 and off.buffers[0].is_pinned()
    assert off.buffers[0].numel() < off.nbytes + 64 * len(off.slots)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with off.on_device():
        assert all(p.device == CUDA for p in model.parameters())
        assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_deterministic_run_sets_cublas_workspace(tmp_path, monkeypatch):
    import os

    from apactl.config import RunConfig
    from apactl.runtime import deterministic_env

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    os.environ.update(deterministic_env(RunConfig(deterministic=True).deterministic, "auto",
                                        os.environ))
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.randn(64, 64, device=CUDA)
        assert torch.equal(a @ a, a @ a)  # raises without CUBLAS_WORKSPACE_CONFIG
    finally:
        torch.use_deterministic_algorithms(False)
