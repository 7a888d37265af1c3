"""SFT and RM end to end on a tiny random Llama (CPU, seconds): learning, reload, resume."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from apactl.metrics import read_metrics
from apactl.recipe import load_recipe


def sft_recipe(tmp_path, data, *overrides):
    return load_recipe(ROOT / "recipes/tiny/sft.yaml", [
        f"run.output_dir={tmp_path / 'sft'}", f"data.source={data}", "data.eval_rows=0",
        "data.max_rows=null", "logging.progress=false", "logging.tensorboard=false",
        *overrides])


def test_sft_memorises_and_reloads(tmp_path, memorise_set):
    from apactl.workflows.sft import run_sft, sft_eval

    recipe = sft_recipe(tmp_path, memorise_set, "train.epochs=60", "train.batch_size=4",
                        "train.grad_accum=1", "train.lr=1e-2")
    run_sft(recipe)
    rows = [r for r in read_metrics(tmp_path / "sft") if "train/loss" in r]
    assert rows[0]["train/loss"] > 3.0  # a random model starts near log(vocab) = 4.6
    assert rows[-1]["train/loss"] < 0.1, rows[-1]
    # The saved folder is a plain Hugging Face model: same logits without apactl.
    final = tmp_path / "sft" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok("<|im_start|>user\nSay hi.<|im_end|>\n", return_tensors="pt").input_ids
    from apactl.models import load_policy

    ours, _ = load_policy(recipe.model.model_copy(update={"name_or_path": str(final)}),
                          torch.device("cpu"), torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ours(ids).logits)
    assert (final / "model.safetensors").exists() and (tmp_path / "sft/recipe.yaml").exists()
    assert callable(sft_eval)


def test_sft_resume_gives_same_next_loss(tmp_path, memorise_set):
    from apactl.hooks import Hooks
    from apactl.workflows.sft import run_sft

    args = ("train.epochs=4", "train.batch_size=2", "train.grad_accum=2", "train.save_every=3",
            "train.schedule=cosine", "train.warmup_steps=2")
    run_sft(sft_recipe(tmp_path, memorise_set, *args))
    losses = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "sft")
              if "train/loss" in r}
    # The same run, killed during step 5 (after the step-3 checkpoint), then resumed.
    def crash(step, stats):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_recipe(tmp_path / "b", memorise_set, *args), hooks=Hooks(on_step_end=crash))
    run_sft(sft_recipe(tmp_path / "b", memorise_set, *args), resume=True)
    again = {r["step"]: r["train/loss"] for r in read_metrics(tmp_path / "b" / "sft")
             if "train/loss" in r}
    assert sorted(again) == sorted(losses)  # metrics.jsonl has no duplicated steps
    for step in range(4, 9):
        assert again[step] == pytest.approx(losses[step], rel=1e-6, abs=1e-7), step


def rm_recipe(tmp_path, data, *overrides):
    return load_recipe(ROOT / "recipes/tiny/rm.yaml", [
        f"run.output_dir={tmp_path / 'rm'}", f"data.source={data}", "data.eval_rows=16",
        "data.max_rows=null", "logging.progress=false", "logging.tensorboard=false",
        *overrides])


def test_rm_learns_rule_and_reloads(tmp_path, learnable_prefs):
    from apactl.workflows.rm import run_rm

    recipe = rm_recipe(tmp_path, learnable_prefs, "train.epochs=3", "train.batch_size=8",
                       "train.grad_accum=1", "train.lr=3e-3")
    final = run_rm(recipe)
    assert final["eval/accuracy"] > 0.9, final
    out = tmp_path / "rm" / "final"
    stats = json.loads((out / "reward_stats.json").read_text())
    assert stats["std"] > 0
    # Plain transformers gives the same score as apactl on an unpadded input.
    from apactl.models import load_sequence_classifier, sequence_scores

    plain = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n",
              return_tensors="pt").input_ids
    ours, _ = load_sequence_classifier(str(out), torch.device("cpu"), torch.float32,
                                       trainable=False)
    with torch.no_grad():
        ref = plain(ids).logits[:, 0]
        got = sequence_scores(ours, ids, torch.ones_like(ids))
    torch.testing.assert_close(ref, got)
