"""On a CUDA device (skipped elsewhere): mixed precision learns at RLHF learning rates, pure
bf16 does not; a short align run uses the CUDA-graph decode and logs GPU memory per phase."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_recipe

from apactl.config import RunConfig
from apactl.metrics import read_metrics
from apactl.precision import resolve_precision
from apactl.testing import make_tiny_llama, make_tiny_tokenizer
from apactl.training import Optimization, Schedule, make_trainee

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def changed_after_one_step(mode: str, dtype: str, lr: float = 1e-6) -> float:
    p = resolve_precision(RunConfig(dtype=dtype, mixed_precision=mode), "cuda")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, hidden=256, layers=4, seed=0).to("cuda", p.master_dtype)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    opt = Optimization({"m": make_trainee("m", model, Schedule(lr))}, scaler=p.grad_scaler())
    ids = torch.randint(5, len(tok), (8, 64), device="cuda")
    with p.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    opt.backward(loss, 1)
    opt.step()
    changed = sum(int((t.detach() != before[n]).sum()) for n, t in model.named_parameters())
    return changed / sum(t.numel() for t in before.values())


def test_mixed_bf16_moves_weights_at_small_lr_pure_bf16_does_not():
    assert resolve_precision(RunConfig(), "cuda").mode == "bf16"  # the CUDA default
    assert changed_after_one_step("auto", "auto") > 0.99
    assert changed_after_one_step("no", "bfloat16") < 0.2


def test_align_three_iterations_on_cuda(tmp_path):
    import apactl.sampling.static as static
    from apactl.workflows.align import run_align

    static.reset_fallback()
    run_align(tiny_recipe("align", tmp_path, "train.iterations=3", "run.device=cuda",
                          "algo.name=ppo"))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["gpu/mem_peak_gb"] > 0 for r in rows)
    assert static.GRAPH_FALLBACK_REASON is None  # the decode ran as a CUDA graph
    assert (tmp_path / "final/policy/model.safetensors").exists()
