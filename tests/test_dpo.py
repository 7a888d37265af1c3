"""``apactl dpo``: the DPO/IPO loss by hand, the reply log-probs, and end to end on the tiny
random Llama (learning, precomputed vs live reference, resume, LoRA, reference.path, the saved
folder in plain transformers, the CLI, eval and sweep)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import QUIET, ROOT, cli, t, tiny_recipe, write_jsonl

from apactl.losses import dpo_loss
from apactl.metrics import read_metrics

TINY_DPO = ROOT / "recipes" / "tiny" / "dpo.yaml"


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # setup_run sets the process-wide count; give it back
    yield
    torch.set_num_threads(n)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------ the loss
def test_dpo_loss_on_two_pairs_by_hand():
    pc = t([-10.0, -5.0]).requires_grad_(True)
    pr = t([-12.0, -4.0]).requires_grad_(True)
    rc, rr = t([-11.0, -5.0]), t([-11.0, -5.0])
    # Pair 1: log-ratios +1 (chosen) and -1 (rejected): h = 2; pair 2: 0 and +1: h = -1.
    loss, stats = dpo_loss(pc, pr, rc, rr, beta=0.1)
    l1, l2 = math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(0.1))  # -log sigmoid(beta h)
    assert loss.item() == pytest.approx((l1 + l2) / 2, abs=1e-12)
    assert loss.item() == pytest.approx(0.6712678, abs=1e-7)  # (0.598139 + 0.744397) / 2
    assert stats["rewards/chosen"] == pytest.approx((0.1 + 0.0) / 2)
    assert stats["rewards/rejected"] == pytest.approx((-0.1 + 0.1) / 2)
    assert stats["rewards/margins"] == pytest.approx((0.2 - 0.1) / 2)
    assert stats["rewards/accuracies"] == 0.5  # pair 1 right, pair 2 wrong
    assert stats["logps/chosen"] == -7.5 and stats["logps/rejected"] == -8.0
    loss.backward()
    # d loss / d pc_i = -beta (1 - sigmoid(beta h_i)) / B; d / d pr_i is its negative.
    g = [-0.1 * (1 - sig(0.2)) / 2, -0.1 * (1 - sig(-0.1)) / 2]
    torch.testing.assert_close(pc.grad, t(g))
    torch.testing.assert_close(pr.grad, -t(g))


def test_ipo_loss_by_hand_and_reference_detached():
    rc = t([-11.0, -5.0]).requires_grad_(True)
    loss, _ = dpo_loss(t([-10.0, -5.0]), t([-12.0, -4.0]), rc, t([-11.0, -5.0]), beta=0.1,
                       kind="ipo")
    # h = [2, -1], target 1 / (2 beta) = 5: ((2 - 5)^2 + (-1 - 5)^2) / 2
    assert loss.item() == pytest.approx(22.5)
    assert not loss.requires_grad  # the reference is a constant: no gradient reaches it
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(t([0.0]), t([0.0]), t([0.0]), t([0.0]), kind="hinge")


def test_equal_policy_and_reference_give_log2():
    x = t([-3.0, -7.0, -1.0])
    loss, stats = dpo_loss(x, x - 1, x, x - 1)
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["rewards/margins"] == 0.0 and stats["rewards/accuracies"] == 0.0


# ----------------------------------------------------------------- reply log-probs
def test_response_logps_sum_the_reply_tokens_only():
    """The LM head from the first reply column on (logits_to_keep) gives the sum a plain full
    forward gives over each row's reply tokens, prompts of different lengths included."""
    from apactl.config import ModelConfig
    from apactl.data import collate_dpo
    from apactl.models import TINY_RANDOM, load_policy
    from apactl.workflows.dpo import response_logps

    model, tok = load_policy(ModelConfig(name_or_path=TINY_RANDOM), "cpu", torch.float32,
                             trainable=False)
    items = [{"chosen_ids": [5, 6, 7, 8, 9], "rejected_ids": [5, 6, 7, 20], "prompt_len": 3},
             {"chosen_ids": [11, 12, 13, 14, 15, 16], "rejected_ids": [11, 12, 30],
              "prompt_len": 2}]
    batch = collate_dpo(items, tok.pad_token_id)
    with torch.no_grad():
        got = response_logps(model, batch)
        rows = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        plens = [3, 2, 3, 2]
        want = []
        for ids, p in zip(rows, plens, strict=True):
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            want.append(sum(logp[i - 1, ids[i]].item() for i in range(p, len(ids))))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------- end to end
def dpo_recipe(out, data, *overrides):
    return tiny_recipe("dpo", out, f"data.source={data}", "data.max_rows=null",
                       "data.eval_rows=16", *overrides)


def train_rows(out) -> list[dict]:
    return [r for r in read_metrics(out) if "train/loss" in r]


def test_dpo_learns_the_preference_and_saves_a_plain_model(tmp_path, learnable_prefs):
    from transformers import AutoModelForCausalLM

    from apactl.workflows.dpo import run_dpo

    out = tmp_path / "dpo"
    final = run_dpo(dpo_recipe(out, learnable_prefs, "train.batch_size=8", "train.grad_accum=1",
                               "train.max_steps=10", "train.lr=2e-3", "train.eval_every=5"))
    rows = train_rows(out)
    print("\nstep loss acc margin:", [(r["step"], round(r["train/loss"], 4),
                                        r["rewards/accuracies"], round(r["rewards/margins"], 3))
                                       for r in rows])
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference
    assert rows[-1]["train/loss"] < 0.2 and rows[-1]["rewards/accuracies"] == 1.0
    evals = [r for r in read_metrics(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 5, 10]
    assert evals[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert evals[-1]["eval_rewards/margins"] > 1.0 and final["eval_rewards/accuracies"] == 1.0
    assert final == {k: v for k, v in evals[-1].items() if k != "step"}
    # final/ is a plain Hugging Face causal LM: the same reply log-probs without apactl.
    plain = AutoModelForCausalLM.from_pretrained(out / "final")
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    from apactl.config import ModelConfig
    from apactl.models import load_policy

    ours, _ = load_policy(ModelConfig(name_or_path=str(out / "final")), "cpu", torch.float32,
                          trainable=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits)


STEPS = ("train.batch_size=4", "train.grad_accum=2", "train.max_steps=4", "train.lr=2e-3",
         "train.eval_every=2", "data.eval_rows=8")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_precomputed_reference_equals_the_live_one(tmp_path, learnable_prefs, lora):
    """train.precompute_reference on (once per pair, before training) and off (a reference
    forward per micro-batch: the reloaded initial policy, or with LoRA the policy with its
    adapter disabled) give the same run."""
    from apactl.workflows.dpo import run_dpo

    extra = ["policy.lora={r: 4, alpha: 8}", "train.lr=2e-2"] if lora else []
    runs = {}
    for pre in (True, False):
        out = tmp_path / f"pre-{pre}"
        runs[pre] = run_dpo(dpo_recipe(out, learnable_prefs, *STEPS, *extra,
                                       f"train.precompute_reference={pre}"))
        runs[pre, "rows"] = train_rows(out)
    for a, b in zip(runs[True, "rows"], runs[False, "rows"], strict=True):
        for key in ("train/loss", "rewards/margins", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert runs[True] == pytest.approx(runs[False], rel=1e-4, abs=1e-5)
    assert runs[True, "rows"][-1]["rewards/margins"] > 0.05  # it trained (LoRA included)
    if lora:  # the final folder is merged: no adapter left
        assert not (tmp_path / "pre-True/final/adapter_config.json").exists()


def test_resume_equals_the_uninterrupted_run(tmp_path, learnable_prefs):
    from apactl.hooks import Hooks
    from apactl.workflows.dpo import run_dpo

    args = ("train.batch_size=4", "train.grad_accum=2", "train.max_steps=6", "train.lr=2e-3",
            "train.save_every=3", "train.schedule=cosine", "train.warmup_steps=2",
            "data.eval_rows=8")
    whole = run_dpo(dpo_recipe(tmp_path / "a", learnable_prefs, *args))

    def crash(step, stats):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_dpo(dpo_recipe(tmp_path / "b", learnable_prefs, *args),
                hooks=Hooks(on_step_end=crash))
    again = run_dpo(dpo_recipe(tmp_path / "b", learnable_prefs, *args), resume=True)
    a, b = train_rows(tmp_path / "a"), train_rows(tmp_path / "b")
    assert [r["step"] for r in b] == [r["step"] for r in a]  # no duplicated step
    for ra, rb in zip(a[3:], b[3:], strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-6, abs=1e-7)
        assert rb["rewards/margins"] == pytest.approx(ra["rewards/margins"], rel=1e-5, abs=1e-6)
    assert again == pytest.approx(whole, rel=1e-5, abs=1e-6)


def test_reference_path_is_the_reference(tmp_path, learnable_prefs):
    """reference.path: the log-ratios are taken against that model, not the policy: a DPO run
    from a trained model against the random one starts with nonzero rewards."""
    from apactl.workflows.dpo import run_dpo

    first = tmp_path / "first"
    run_dpo(dpo_recipe(first, learnable_prefs, "train.batch_size=8", "train.grad_accum=1",
                       "train.max_steps=3", "train.lr=5e-3", "data.eval_rows=8"))
    out = tmp_path / "second"
    run_dpo(dpo_recipe(out, learnable_prefs, f"policy.name_or_path={first}",
                       "reference.path=tiny-random", "train.batch_size=8",
                       "train.grad_accum=1", "train.max_steps=1", "data.eval_rows=8"))
    row = train_rows(out)[0]
    assert row["rewards/margins"] > 0.1 and row["train/loss"] < math.log(2) - 0.01


# ----------------------------------------------------------------------------- CLI
def test_cli_dpo_bad_rows_and_schema(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a"}])
    res = cli("dpo", TINY_DPO, f"run.output_dir={tmp_path / 'o'}", f"data.source={bad}",
              "data.eval_rows=0", *QUIET)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "row 1" in lines[0] and "rejected" in lines[0], lines
    assert "Traceback" not in res.output and not (tmp_path / "o" / "final").exists()
    res = cli("dpo", TINY_DPO, "dpo.loss=hinge", "dpo.beta=0")
    assert res.exit_code == 2 and "dpo.loss" in res.output and "dpo.beta" in res.output
    res = cli("recipe", "schema", "dpo")
    assert res.exit_code == 0
    props = json.loads(res.output)["properties"]
    assert {"policy", "reference", "dpo", "train", "data"} <= set(props)


def test_cli_dpo_then_eval_and_sweep_take_the_run(tmp_path):
    """A tiny DPO run through the CLI, then `apactl eval` on it (its checkpoints too, with its
    initial policy as the baseline) and `apactl sweep --dry-run` over a dpo grid."""
    run = tmp_path / "dpo"
    res = cli("dpo", TINY_DPO, f"run.output_dir={run}", "train.max_steps=2", "train.save_every=1",
              "data.max_rows=16", "data.eval_rows=4", *QUIET)
    assert res.exit_code == 0, res.output
    assert (run / "final" / "config.json").exists()
    assert "dpo: reference log-probs of 12 + 4 pairs" in res.output  # minutes on a real set
    # Precomputing the reference is operational: a resume may switch it (not the step count).
    again = cli("dpo", TINY_DPO, f"run.output_dir={run}", "train.max_steps=3",
                "train.save_every=1", "data.max_rows=16", "data.eval_rows=4", *QUIET,
                "train.precompute_reference=false", "--resume")
    assert again.exit_code == 2 and "train.max_steps" in again.output, again.output
    assert "precompute_reference" not in again.output
    out = tmp_path / "eval"
    res = cli("eval", ROOT / "recipes/tiny/eval.yaml", f"run.output_dir={out}", "baseline=null",
              f"policies=[{{name: dpo, path: {run}, checkpoints: true}}]", "data.eval_rows=2",
              "eval.samples_per_prompt=1", "eval.plots=false", "--judge", "length", *QUIET)
    assert res.exit_code == 0, res.output
    names = [p["name"] for p in json.loads((out / "report.json").read_text())["policies"]]
    assert names == ["baseline", "dpo@1", "dpo"]  # step 2's checkpoint is final itself
    res = cli("sweep", TINY_DPO, "--grid", "dpo.beta=0.1,0.5", "--dry-run",
              f"run.output_dir={tmp_path / 'sweep'}")
    assert res.exit_code == 0, res.output
    assert "dpo.beta=0.1" in res.output and "dpo.beta=0.5" in res.output


@pytest.mark.slow  # bf16 on a CPU: ~80 s on the 2 busy cores even for 3 tiny steps
def test_mixed_precision_dpo_runs_on_cpu(tmp_path, learnable_prefs):
    """The CUDA default (fp32 masters, bf16 autocast, a bf16-stored reference) run on CPU: the
    log-ratios are taken in float32 or wider, it trains, and final/ holds fp32 weights."""
    from safetensors.torch import load_file

    from apactl.workflows.dpo import run_dpo

    out = tmp_path / "bf16"
    # bf16 matmuls are slow on a CPU: 3 steps of 2 pairs, no held-out pairs.
    run_dpo(dpo_recipe(out, learnable_prefs, "run.mixed_precision=bf16", "train.batch_size=2",
                       "train.grad_accum=1", "train.max_steps=3", "train.lr=5e-3",
                       "data.eval_rows=0", "train.precompute_reference=false",
                       "train.freeze_bottom_layers=1"))
    rows = train_rows(out)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=0.05)
    assert rows[-1]["rewards/margins"] > 0.05 and rows[-1]["train/loss"] < rows[0]["train/loss"]
    weights = load_file(out / "final/model.safetensors")
    top = [k for k in weights if ".layers.1." in k]
    assert top and all(weights[k].dtype == torch.float32 for k in top)
