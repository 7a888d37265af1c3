"""train.offload_frozen: frozen models on the host between uses (apactl.offload)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QUIET, TINY, cli

from apactl.offload import Offload


def frozen_model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight  # a tied head: one tensor, moved once
    m.register_buffer("scale", torch.tensor([2.0]))
    return m.requires_grad_(False)


def stand_in() -> Offload:
    """An Offload whose "device" is fresh CPU memory: CPU-only machines can check where every
    tensor points inside and after a block (the GPU test below checks the real transfer)."""
    off = Offload("cpu")
    off.active = True
    return off


def test_tensors_visit_the_device_only_inside_the_block():
    m = frozen_model()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    loaded_ptr = m[0].weight.data_ptr()
    off = stand_in()
    off.add(m)
    assert len(off.slots) == 2 and off.nbytes == 10 * 4 * 4 + 4  # tied weight once, buffer
    host_ptrs = [t.data_ptr() for t in (m[0].weight, m.scale)]
    assert loaded_ptr not in host_ptrs  # the loaded copy was let go
    x = torch.tensor([1, 2])
    want = m(x)
    with off.on_device():
        inside = [t.data_ptr() for t in (m[0].weight, m[1].weight, m.scale)]
        assert not set(inside) & set(host_ptrs) and inside[0] == inside[1]
        with off.on_device():  # nested: no second move
            assert torch.equal(m(x), want)
        assert m.scale.data_ptr() == inside[2]
    assert off.moves == 1
    assert [t.data_ptr() for t in (m[0].weight, m.scale)] == host_ptrs
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())
    assert m[1].weight is m[0].weight  # still tied


def test_an_exception_inside_the_block_still_leaves_the_device():
    m = frozen_model()
    off = stand_in()
    off.add(m)
    host = m[0].weight.data_ptr()
    with pytest.raises(RuntimeError), off.on_device():
        raise RuntimeError("boom")
    assert m[0].weight.data_ptr() == host and off.depth == 0


def test_on_a_cpu_device_nothing_moves():
    m = frozen_model()
    ptr = m[0].weight.data_ptr()
    off = Offload("cpu")
    off.add(m)
    with off.on_device():
        assert m[0].weight.data_ptr() == ptr
    assert off.slots == [] and off.moves == 0


def _align(out, *extra):
    return cli("align", TINY / "align.yaml", f"run.output_dir={out}", "train.iterations=2",
               "train.rollout_batch_size=4", "train.minibatch_size=4", "data.max_rows=8",
               "generation.max_new_tokens=4", *QUIET, *extra)


def _metrics(out) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


def test_align_with_offload_computes_what_the_plain_forwards_compute(tmp_path):
    plain = _align(tmp_path / "plain", "train.reuse_frozen_trunk=false",
                   "train.freeze_bottom_layers=1")
    assert plain.exit_code == 0, plain.output
    res = _align(tmp_path / "off", "train.offload_frozen=true", "train.freeze_bottom_layers=1")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "reuse_frozen_trunk is off" in text and "nothing to offload" in text
    assert _metrics(tmp_path / "off") == _metrics(tmp_path / "plain")
    # Where the weights live is operational: a resume may switch it (iterations 2 -> 3 here).
    again = cli("align", TINY / "align.yaml", f"run.output_dir={tmp_path / 'off'}",
                "train.iterations=3", "train.rollout_batch_size=4", "train.minibatch_size=4",
                "data.max_rows=8", "generation.max_new_tokens=4", *QUIET,
                "train.freeze_bottom_layers=1", "--resume")
    assert again.exit_code == 2 and "train.iterations" in again.output, again.output
    assert "offload_frozen" not in again.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_model_holds_no_gpu_memory_between_uses():
    m = torch.nn.Linear(1024, 1024, bias=False).cuda().requires_grad_(False)
    x = torch.randn(2, 1024, device="cuda")
    want = m(x)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    off = Offload("cuda")
    off.add(m)
    assert torch.cuda.memory_allocated() <= held - 1024 * 1024 * 4
    assert m.weight.device.type == "cpu" and m.weight.is_pinned()
    with off.on_device():
        assert m.weight.is_cuda
        assert torch.equal(m(x), want)
    assert torch.cuda.memory_allocated() <= held - 1024 * 1024 * 4


def test_one_host_buffer_per_model():
    """Every tensor of an added model is a view of one host buffer (one pinned allocation on a
    GPU, not one rounded-up block per tensor), and the values round-trip unchanged."""
    m = frozen_model()
    other = torch.nn.Linear(3, 5).requires_grad_(False)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    off = stand_in()
    off.add(m)
    off.add(other)
    assert len(off.buffers) == 2
    storages = {t.untyped_storage().data_ptr() for t, _ in off.slots[:2]}
    assert storages == {off.buffers[0].untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t, _ in off.slots[2:]} == \
        {off.buffers[1].untyped_storage().data_ptr()}
    assert all(t.data_ptr() % 64 == 0 for t, _ in off.slots)
    with off.on_device():
        assert torch.equal(m(torch.tensor([1, 2])), m[1](m[0](torch.tensor([1, 2]))))
    assert all(torch.equal(before[n], t) for n, t in m.state_dict().items())
    assert m[1].weight is m[0].weight
