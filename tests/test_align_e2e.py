"""align end to end on a tiny random Llama with a programmatic reward (CPU, seconds).

The reward is the fraction of 'a' characters in the reply: a random model scores ~0.01, so a
clear rise means the algorithm learned, not just ran.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import ROOT

from apactl.metrics import read_metrics
from apactl.recipe import load_recipe


def recipe(out, *overrides):
    return load_recipe(ROOT / "recipes/tiny/align.yaml", [
        f"run.output_dir={out}", "logging.progress=false", "logging.tensorboard=false",
        *overrides])


def rewards(out) -> list[float]:
    return [r["reward/score_mean"] for r in read_metrics(out)]


# AWR on this toy task depends on the sampled stream: some seeds never draw enough 'a's to
# learn from (seed 0 since sampling is seeded per rollout chunk; seed 1 before that).
SEEDS = {"apa": 0, "ppo": 0, "awr": 1}
# PPO's default adaptive KL penalty (beta 0.05 per token) outweighs this toy reward (~0.01 per
# episode at the start) since sampling uses the full distribution (no hidden top-k=50): without
# the penalty it learns on every seed tried (0-3), with it on none in 30 iterations.
EXTRA = {"ppo": ["kl.adaptive=false", "kl.beta=0.0"]}


@pytest.mark.parametrize("algo", ["apa", "ppo", "awr"])
def test_reward_rises(tmp_path, algo):
    from apactl.workflows.align import run_align

    run_align(recipe(tmp_path, f"algo.name={algo}", "train.iterations=30",
                     f"run.seed={SEEDS[algo]}", *EXTRA.get(algo, [])))
    r = rewards(tmp_path)
    start, end = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert start < 0.05, r
    assert end > 0.3 and end > 5 * start, r
    assert (tmp_path / "final/policy/model.safetensors").exists()
    assert (tmp_path / "final/critic/model.safetensors").exists()


def test_apa_larger_lam_stays_closer_to_reference(tmp_path):
    from apactl.workflows.align import run_align

    kls = {}
    for lam in (0.1, 1.0):
        out = tmp_path / f"lam{lam}"
        run_align(recipe(out, f"algo.lam={lam}", "train.iterations=12"))
        kls[lam] = sum(r["kl/ref_k1"] for r in read_metrics(out)[-3:]) / 3
    assert kls[1.0] < 0.5 * kls[0.1], kls


def test_lora_policy_learns_with_adapter_disabled_reference(tmp_path):
    from apactl.workflows.align import run_align

    # Adapters on every linear layer at lr 5e-2: with attention-only adapters at lr 2e-2 the
    # reward rose only 1.4x in 25 iterations under peft 0.21 (2.5x under the peft of 0.1.0);
    # this setting rose 4.0x / 1.9x / 2.6x on seeds 0 / 1 / 2 in 30 iterations.
    run_align(recipe(tmp_path, "policy.lora.r=8", "policy.lora.alpha=16", "train.lr=5e-2",
                     "policy.lora.target_modules=all-linear", "train.iterations=30"))
    rows = read_metrics(tmp_path)
    assert rows[0]["kl/ref_k1"] == pytest.approx(0.0, abs=1e-5)  # pi_0 == pi_init exactly
    # The adapter moved the policy away from the (adapter-disabled) reference ...
    assert sum(r["kl/ref_k1"] for r in rows[-5:]) / 5 > 0.05, [r["kl/ref_k1"] for r in rows]
    # ... towards the reward.
    r = rewards(tmp_path)
    assert sum(r[-10:]) / 10 > 1.5 * sum(r[:10]) / 10, r


def test_resume_matches_uninterrupted_run(tmp_path):
    from apactl.hooks import Hooks
    from apactl.workflows.align import run_align

    args = ("train.iterations=6", "train.save_every=2", "algo.name=ppo")
    run_align(recipe(tmp_path / "a", *args))

    def crash(step, metrics):
        if step == 3:  # after the checkpoint at iteration 2, before the one at 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_align(recipe(tmp_path / "b", *args), hooks=Hooks(on_step_end=crash))
    run_align(recipe(tmp_path / "b", *args), resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("reward/score_mean", "kl/ref_k1", "loss/policy", "loss/value", "kl/beta",
                    "policy/entropy"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def test_sigkill_then_resume(tmp_path):
    """A real SIGKILL mid-run leaves whole checkpoints; --resume finishes the run."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "apactl", "align", str(ROOT / "recipes/tiny/align.yaml"),
           f"run.output_dir={out}", "train.iterations=40", "train.save_every=1",
           "logging.progress=false", "logging.tensorboard=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints/step-00000003").exists():
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert 3 <= killed_at < 40
    res = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stderr
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == list(range(1, 41))
    assert (out / "final/policy/config.json").exists()


def test_frozen_trunk_reuse_matches_plain_forwards(tmp_path, monkeypatch):
    """train.reuse_frozen_trunk (shared bottom, cached trunk, LM head on response positions)
    trains what the plain forwards train: the same metrics per iteration, the same weights."""
    from safetensors.torch import load_file

    from apactl.accel import trunk
    from apactl.workflows.align import run_align

    calls = {"top": 0}
    real_top = trunk.Split.top

    def counting_top(self, *a, **kw):
        calls["top"] += 1
        return real_top(self, *a, **kw)

    monkeypatch.setattr(trunk.Split, "top", counting_top)
    common = ("train.iterations=4", "train.freeze_bottom_layers=1", "algo.name=ppo")
    for flag in ("true", "false"):
        run_align(recipe(tmp_path / flag, *common, f"train.reuse_frozen_trunk={flag}"))
        assert (calls["top"] > 0) == (flag == "true")
        calls["top"] = 0
    fast, plain = read_metrics(tmp_path / "true"), read_metrics(tmp_path / "false")
    for key in ("reward/score_mean", "kl/ref_k1", "loss/policy", "loss/value",
                "policy/entropy", "critic/explained_var"):
        for a, b in zip(fast, plain, strict=True):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
    wa = load_file(tmp_path / "true/final/policy/model.safetensors")
    wb = load_file(tmp_path / "false/final/policy/model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_critic_warm_started_from_a_saved_critic(tmp_path):
    """critic.init: a path. The new run's critic starts with the saved critic's values (checked
    by hand against the saved folder loaded with plain transformers)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from apactl.hooks import Hooks
    from apactl.models import token_values
    from apactl.workflows.align import run_align

    run_align(recipe(tmp_path / "first", "train.iterations=2", "critic.init=policy"))
    saved = tmp_path / "first" / "final" / "critic"
    plain = AutoModelForSequenceClassification.from_pretrained(saved).eval()
    ids = torch.tensor([[5, 9, 14, 22, 31, 40]])
    mask = torch.ones_like(ids)
    seen = {}

    def on_start(pieces):
        with torch.no_grad():
            seen["values"] = token_values(pieces["critic"], ids, mask)

    for init in (str(tmp_path / "first"), str(saved)):  # the run folder or its final/critic
        run_align(recipe(tmp_path / f"second-{len(seen)}", "train.iterations=1",
                         f"critic.init={init}"), hooks=Hooks(on_start=on_start))
        with torch.no_grad():
            expected = token_values(plain, ids, mask)
        torch.testing.assert_close(seen["values"], expected)
    assert not torch.allclose(expected, torch.zeros_like(expected))


def test_eval_judges_score_held_out_prompts_only(tmp_path):
    """eval_judges: a judge the run never trains on, scored on held-out prompts every
    eval_every iterations beside the proxy's eval/score_mean."""
    from apactl.workflows.align import run_align

    run_align(recipe(tmp_path, "train.iterations=4", "train.eval_every=2", "data.eval_rows=8",
                     "eval_judges=[{name: length, label: words, role: held-out}]"))
    rows = read_metrics(tmp_path)
    evals = [r for r in rows if "eval/words_mean" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval/words_mean"] >= 1 and "eval/score_mean" in r for r in evals)
    assert all("eval/words_mean" not in r for r in rows if r["step"] % 2)
