"""Precision: mixed precision keeps fp32 masters that small learning rates move; pure bf16 does
not. On CPU (bf16 autocast runs there, slowly but exactly); the CUDA versions are in test_gpu.py."""

from __future__ import annotations

import pytest
import torch

from apactl.config import RunConfig
from apactl.errors import RecipeError
from apactl.precision import resolve_precision
from apactl.testing import make_tiny_llama, make_tiny_tokenizer
from apactl.training import Optimization, Schedule, make_trainee


def one_step_changed(mode: str, dtype: str, lr: float = 1e-6) -> tuple[float, torch.dtype]:
    """Fraction of trainable weights (with a gradient) that one AdamW step at ``lr`` changes."""
    p = resolve_precision(RunConfig(dtype=dtype, mixed_precision=mode), "cpu")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(tok, layers=2, seed=0).to(p.master_dtype)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    opt = Optimization({"m": make_trainee("m", model, Schedule(lr))}, scaler=p.grad_scaler())
    ids = torch.randint(5, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
    with p.autocast():
        loss = model(input_ids=ids, labels=ids).loss
    opt.backward(loss, 1)
    with_grad = {n for n, t in model.named_parameters() if t.grad is not None
                 and bool((t.grad != 0).any())}
    opt.step()
    total = changed = 0
    for n, t in model.named_parameters():
        if n in with_grad:
            total += t.numel()
            changed += int((t.detach() != before[n]).sum())
    return changed / total, next(model.parameters()).dtype


def test_mixed_bf16_moves_every_weight_at_lr_1e_6():
    changed, dtype = one_step_changed("bf16", "auto")
    assert dtype == torch.float32  # fp32 masters
    assert changed > 0.99, changed


def test_pure_bf16_rounds_small_updates_away():
    changed, dtype = one_step_changed("no", "bfloat16")
    assert dtype == torch.bfloat16
    # 1e-6 is below bf16's resolution for almost every weight of magnitude > ~3e-4.
    assert changed < 0.2, changed


def test_fp32_moves_every_weight():
    changed, _ = one_step_changed("no", "float32")
    assert changed > 0.99, changed


def test_autocast_and_storage_per_mode():
    mixed = resolve_precision(RunConfig(mixed_precision="bf16"), "cpu")
    with mixed.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16  # forward computed in the compute dtype
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    mixed.store_frozen(model)
    assert model[0].weight.dtype == torch.bfloat16 and model[1].weight.dtype == torch.float32
    fp16 = resolve_precision(RunConfig(mixed_precision="fp16"), "cpu")
    assert fp16.grad_scaler() is not None and mixed.grad_scaler() is None


def test_mixed_precision_must_agree_with_dtype():
    from apactl.recipe import parse_recipe

    data = {"kind": "sft", "data": {"source": "builtin:sft"},
            "run": {"dtype": "float32", "mixed_precision": "bf16"}}
    with pytest.raises(RecipeError, match="^run: mixed_precision bf16 computes in bfloat16"):
        parse_recipe(data)


def test_yaml_no_means_no(tmp_path):
    from apactl.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("kind: sft\ndata: {source: 'builtin:sft'}\nrun: {mixed_precision: no}\n")
    assert load_recipe(path).run.mixed_precision == "no"  # YAML 1.1 reads `no` as false
    assert load_recipe(path, ["run.mixed_precision=no"]).run.mixed_precision == "no"


def test_mixed_precision_align_runs_end_to_end_on_cpu(tmp_path):
    """The CUDA default path (fp32 masters, bf16 autocast, frozen layers in bf16 shared with the
    reference) run on CPU: it trains, and the saved policy holds fp32 weights."""
    from helpers import tiny_recipe
    from safetensors.torch import load_file

    from apactl.metrics import read_metrics
    from apactl.workflows.align import run_align

    run_align(tiny_recipe("align", tmp_path, "run.mixed_precision=bf16", "train.iterations=3",
                          "train.freeze_bottom_layers=1"))
    rows = read_metrics(tmp_path)
    assert len(rows) == 3 and rows[-1]["kl/ref_k1"] > 0.01  # the policy moved
    weights = load_file(tmp_path / "final/policy/model.safetensors")
    top = [k for k in weights if ".layers.1." in k]
    assert top and all(weights[k].dtype == torch.float32 for k in top)
