"""The optimizer step's host traffic and numerics: one host sync per optimizer step (the update's
statistics stay on the device until then), fp16 steps with an inf/nan skipped by the loss
scaler before a divergence is declared, cuBLAS's determinism setting, one pinned host buffer
per offloaded model, the loss scaler that FSDP needs.

On the CPU a "host sync" is counted as a read of a tensor's value into Python (``.item()``,
``.tolist()``, ``float()``, ``int()``, ``bool()``): on a GPU each of those waits for the
device's queue to drain.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ROOT

from apactl.metrics import read_metrics
from apactl.recipe import load_recipe
from apactl.training import (
    MAX_SKIPPED_STEPS,
    DivergedError,
    Optimization,
    Schedule,
    make_trainee,
    non_finite,
)

READS = ("item", "tolist", "__float__", "__int__", "__bool__")
# Where the statistics of a step are made and read: each read here is a host sync per step.
STATS_FILES = {"training.py", "update.py", "losses.py", "algos.py", "distributed.py"}


class ReadCounter:
    """Counts reads of tensor values while ``on``, by the apactl file that asked for them.

    Left out: reads inside torch.optim (CPU AdamW reads its step counter, a host tensor; the
    fused CUDA AdamW does not) and inside transformers (its mask code checks the padding mask,
    once per forward: noted, not ours)."""

    def __init__(self, monkeypatch):
        self.on, self.by_file = False, {}
        for name in READS:
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **kw):
                if self.on:
                    self.record()
                return _real(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def record(self) -> None:
        import traceback

        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename.replace("\\", "/")
            if "/torch/optim/" in path or "/transformers/" in path:
                return
            if "/apactl/" in path:
                name = path.rsplit("/", 1)[1]
                self.by_file[name] = self.by_file.get(name, 0) + 1
                return

    @property
    def stats_reads(self) -> int:
        return sum(v for k, v in self.by_file.items() if k in STATS_FILES)


def test_update_reads_back_once_per_optimizer_step(tmp_path, monkeypatch):
    """A tiny APA run: during each update the only reads are one per optimizer step, and the
    logged statistics are the means of the per-micro-batch values (read here one by one, the
    way the loop did before)."""
    import apactl.rl.loop as loop
    import apactl.rl.update as upd
    from apactl.workflows.align import run_align

    counter = ReadCounter(monkeypatch)
    seen = {"steps": 0, "reads": [], "micro": [], "per_update": []}
    real_update, real_step = loop.update, Optimization.step
    real_value_loss = upd.value_loss

    def update(*a, **kw):
        counter.on, counter.by_file, seen["steps"] = True, {}, 0
        try:
            out = real_update(*a, **kw)
        finally:
            counter.on = False
        seen["reads"].append((counter.stats_reads, seen["steps"]))
        seen["other"] = dict(counter.by_file)
        # What the loop logged before: the mean over steps of the mean over micro-batches.
        per_step = [sum(m) / len(m) for m in _split(seen["micro"])]
        seen["per_update"].append(sum(per_step) / len(per_step))
        seen["micro"].clear()
        return out

    def step(self, *a, **kw):
        seen["steps"] += 1
        seen["micro"].append(None)  # a step boundary
        return real_step(self, *a, **kw)

    def value_loss(*a, **kw):
        loss, stats = real_value_loss(*a, **kw)
        on, counter.on = counter.on, False
        seen["micro"].append(loss.item())
        counter.on = on
        return loss, stats

    monkeypatch.setattr(loop, "update", update)
    monkeypatch.setattr(Optimization, "step", step)
    monkeypatch.setattr(upd, "value_loss", value_loss)
    run_align(load_recipe(ROOT / "recipes/tiny/align.yaml", [
        f"run.output_dir={tmp_path}", "logging.progress=false", "logging.tensorboard=false",
        "train.iterations=1", "train.rollout_batch_size=8", "train.minibatch_size=4",
        "train.grad_accum=2", "generation.max_new_tokens=4"]))
    assert seen["reads"] == [(4, 4)]  # 2 epochs x 2 minibatches, one read each
    # Left: build_sequences reads the longest prompt (a shape) once per micro-batch.
    assert {k: v for k, v in seen["other"].items() if k not in STATS_FILES} == {"forward.py": 8}
    logged = [r["loss/value"] for r in read_metrics(tmp_path)]
    assert logged == pytest.approx(seen["per_update"], rel=1e-6)


def _split(marks: list) -> list[list[float]]:
    """[v, v, None, v, v, None] -> [[v, v], [v, v]]: micro-batch values per optimizer step."""
    out, cur = [], []
    for m in marks:
        if m is None:
            out.append(cur)
            cur = []
        else:
            cur.append(m)
    return out


def _tiny(scaler=None) -> tuple[torch.nn.Linear, Optimization]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    return model, Optimization({"m": make_trainee("m", model, Schedule(0.1))}, scaler=scaler)


def test_one_read_per_step_in_the_training_core(monkeypatch):
    model, opt = _tiny()
    counter = ReadCounter(monkeypatch)
    counter.on = True
    x = torch.randn(4, 3)
    for _ in range(3):  # micro-batches
        loss = model(x).pow(2).mean()
        opt.backward(loss, 3)
    out = opt.step(stats={"a": loss.detach(), "b": 2.0})
    assert counter.by_file == {"distributed.py": 1}  # read_scalars, called by step
    assert set(out) == {"m/grad_norm", "a", "b"} and out["b"] == 2.0
    assert out["a"] == pytest.approx(loss.item())


def test_non_finite_is_skipped_under_loss_scaling_then_declared():
    assert non_finite(1.0, {"m/grad_norm": 2.0}, scaled=False, streak=3) == (None, 0)
    why, streak = non_finite(math.nan, {}, scaled=False, streak=0)
    assert why == "the loss became nan" and streak == 1
    why, _ = non_finite(1.0, {"policy/grad_norm": math.inf}, scaled=False, streak=0)
    assert why == "the policy gradient norm became inf"
    assert non_finite(math.inf, {}, scaled=True, streak=0) == (None, 1)
    why, streak = non_finite(math.inf, {}, scaled=True, streak=MAX_SKIPPED_STEPS - 1)
    assert streak == MAX_SKIPPED_STEPS and "in a row under fp16 loss scaling" in why


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_fp16_scaler_skips_an_overflowing_step():
    """Before: backward raised DivergedError on the first inf loss, before the scaler could
    skip the step. Now the step is skipped (weights unchanged, scale halved), training goes on,
    and only a long run of them ends the run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    model, opt = _tiny(scaler)
    before = model.weight.detach().clone()
    x = torch.randn(4, 3)
    opt.backward(model(x).sum() * math.inf, 1)
    opt.step()
    assert torch.equal(model.weight, before) and scaler.get_scale() == 2.0**15
    opt.backward(model(x).pow(2).mean(), 1)  # a finite step trains again
    opt.step()
    assert not torch.equal(model.weight, before) and opt.skipped == 0
    with pytest.raises(DivergedError, match="in a row under fp16 loss scaling"):
        for _ in range(MAX_SKIPPED_STEPS):
            opt.backward(model(x).sum() * math.nan, 1)
            opt.step()


def test_without_a_scaler_an_inf_loss_ends_the_run_unstepped():
    model, opt = _tiny()
    before = model.weight.detach().clone()
    opt.backward(model(torch.randn(4, 3)).sum() * math.inf, 1)
    with pytest.raises(DivergedError, match="the loss became -?inf"):
        opt.step()
    assert torch.equal(model.weight, before)


def test_fsdp_fp16_uses_a_sharded_scaler():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from apactl.precision import Precision

    p = Precision(torch.device("cpu"), "fp16", torch.float16)
    assert isinstance(p.grad_scaler(sharded=True), ShardedGradScaler)
    assert not isinstance(p.grad_scaler(), ShardedGradScaler)
    assert Precision(torch.device("cpu"), "bf16", torch.bfloat16).grad_scaler(True) is None


def test_deterministic_sets_cublas_workspace_before_cuda():
    from apactl.runtime import deterministic_env

    want = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    assert deterministic_env(True, "cuda", {}) == want
    assert deterministic_env(True, "auto", {}) == want  # auto may pick CUDA
    assert deterministic_env(True, "cpu", {}) == {}
    assert deterministic_env(False, "cuda", {}) == {}
    assert deterministic_env(True, "cuda", {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}) == {}


def test_setup_run_sets_it_in_the_process(tmp_path, monkeypatch):
    import os

    from helpers import tiny_recipe

    from apactl.runtime import setup_run

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **kw: None)
    with setup_run(tiny_recipe("sft", tmp_path / "run", "run.deterministic=true",
                               "run.device=auto")):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
