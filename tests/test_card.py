"""Model cards: every final/ model folder has a README.md that huggingface_hub parses, with the
right metadata, beside recipe.yaml; transformers still loads the folder; the card is written
with the folder (never a final/ without it); apactl eval updates it when asked."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import TINY, cli, tiny_recipe

from apactl import card as card_mod
from apactl.card import CardFacts, base_model, card_data


def load(folder):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_align_cards_policy_and_value_model_then_eval_adds_its_results(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from apactl.workflows.align import run_align

    out = tmp_path / "run"
    recipe = tiny_recipe("align", out, "train.iterations=2", "train.rollout_batch_size=8",
                         "train.minibatch_size=4", "data.max_rows=16", "data.eval_rows=4",
                         "train.eval_every=2", "generation.max_new_tokens=8")
    run_align(recipe)
    policy, critic = out / "final" / "policy", out / "final" / "critic"
    pc, cc = load(policy), load(critic)
    assert pc.data.library_name == "transformers" and pc.data.pipeline_tag == "text-generation"
    assert pc.data.tags == ["apactl", "rlhf", "apa"]
    assert pc.data.base_model is None  # tiny-random: no hub model behind it
    assert cc.data.tags == ["apactl", "rlhf", "apa", "value-model"]
    assert cc.data.pipeline_tag == "text-classification" and "value model" in cc.text
    text = pc.text
    for part in ("`apactl align recipe.yaml`", "APA (Advantage-Induced Policy Alignment); "
                 "lam=0.1", "12 training rows used, 4 held out", "**Iterations**: 2 (16 "
                 "episodes)", "`reward/score_mean`", "`kl/ref_k1`", "`policy/entropy`",
                 "`eval/score_mean`", "**Reward**: `char-fraction`", "**Wall time**",
                 "transformers 5", "AutoModelForCausalLM.from_pretrained", "[recipe.yaml]"):
        assert part in text, part
    assert yaml.safe_load((policy / "recipe.yaml").read_text()) == recipe.model_dump(mode="json")
    AutoModelForCausalLM.from_pretrained(policy)  # the card does not get in the way
    AutoModelForSequenceClassification.from_pretrained(critic)

    # apactl eval with eval.update_model_cards: model-index entries and a section, replaced
    # (not repeated) by a second evaluation.
    eval_out = tmp_path / "eval"
    for _ in range(2):
        res = cli("eval", TINY / "eval.yaml", f"run.output_dir={eval_out}", "--judge",
                  "char-fraction", "--judge", "length", "eval.update_model_cards=true",
                  "eval.bootstrap=50", "data.max_rows=16", "data.eval_rows=4",
                  "generation.max_new_tokens=8", "logging.progress=false", "run.num_threads=1",
                  f"policies=[{{name: apa, path: {out}}}]", "baseline=null")
        assert res.exit_code == 0, res.output
    flat = "".join(res.output.split())  # rich wraps long paths
    assert f"modelcardupdated:{policy / 'README.md'}" in flat
    pc = load(policy)
    report = json.loads((eval_out / "report.json").read_text())
    apa = next(p for p in report["policies"] if p["name"] == "apa")
    results = {(r.metric_type, r.metric_value) for r in pc.data.eval_results}
    assert results == {(k, apa["judges"][k]["mean"]) for k in ("char-fraction", "length")}
    assert pc.text.count("## Evaluation (apactl eval: tiny-eval)") == 1
    assert "| `length` |" in pc.text and "## How to load" in pc.text
    AutoModelForCausalLM.from_pretrained(policy)


def test_rm_card_is_a_reward_model_card(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from apactl.workflows.rm import run_rm

    out = tmp_path / "rm"
    run_rm(tiny_recipe("rm", out, "data.max_rows=16", "data.eval_rows=4"))
    c = load(out / "final")
    assert c.data.tags == ["apactl", "rlhf", "rm", "reward-model"]
    assert c.data.pipeline_tag == "text-classification"
    assert "Bradley-Terry" in c.text and "`eval/accuracy`" in c.text
    assert "12 training rows used, 4 held out" in c.text
    AutoModelForSequenceClassification.from_pretrained(out / "final")


def test_a_failing_card_leaves_no_final_folder(tmp_path, monkeypatch):
    """The card is written inside the temporary folder that becomes final/: no final/ ever
    lacks it."""
    from apactl.workflows.sft import run_sft

    def broken(folder, facts):
        raise OSError("disk trouble")

    monkeypatch.setattr(card_mod, "write_card", broken)
    out = tmp_path / "sft"
    with pytest.raises(OSError, match="disk trouble"):
        run_sft(tiny_recipe("sft", out, "data.max_rows=12", "data.eval_rows=4"))
    assert not (out / "final").exists()
    assert not list(out.glob(".final.tmp-*"))


def test_base_model_follows_hub_ids_aliases_and_run_folders(tmp_path):
    assert base_model("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert base_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model("tiny-random") is None and base_model(None) is None
    sft = tmp_path / "sft"  # an sft run from a hub model, then an align run from the sft run
    (sft / "final").mkdir(parents=True)
    (sft / "final" / "config.json").write_text("{}")
    (sft / "recipe.yaml").write_text("kind: sft\nmodel: {name_or_path: org/base}\n")
    align = tmp_path / "align"
    align.mkdir()
    (align / "recipe.yaml").write_text(f"kind: align\npolicy: {{name_or_path: {sft}}}\n")
    assert base_model(str(sft)) == "org/base"
    assert base_model(str(sft / "final")) == "org/base"
    assert base_model(str(align)) == "org/base"


def test_card_metadata_names_hub_datasets_and_the_start():
    recipe = {"kind": "dpo", "model": {"name_or_path": "org/base"},
              "data": {"source": "Anthropic/hh-rlhf", "split": "test"},
              "train": {"lr": 1e-6, "max_steps": 10}}
    facts = CardFacts(recipe, "policy", "org/base", [{"step": 10, "train/loss": 0.5}])
    data = card_data(facts)
    assert data.base_model == "org/base" and data.datasets == ["Anthropic/hh-rlhf"]
    assert data.tags == ["apactl", "rlhf", "dpo"] and data.pipeline_tag == "text-generation"
    text = card_mod.card_text(facts)
    assert "`apactl dpo recipe.yaml`" in text and "DPO (Direct Preference" in text
    assert "`Anthropic/hh-rlhf` (split=test)" in text and "**Optimizer steps**: 10" in text
    local = card_data(CardFacts({**recipe, "data": {"source": "builtin:sft"}}, "policy", None))
    assert local.datasets is None and local.base_model is None
