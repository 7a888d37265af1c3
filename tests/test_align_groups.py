"""Critic-free align (GRPO, RLOO, APA with a group advantage) end to end on the tiny random
Llama and the toy judge of tests/test_align_e2e.py (the fraction of 'a' characters): k answers
per prompt, group baselines, no critic anywhere, and the shared loop's guarantees."""

from __future__ import annotations

import pytest
from helpers import tiny_recipe

from apactl.metrics import read_metrics

CRITIC_FREE = ["grpo", "rloo", "apa-group"]


def rewards(out) -> list[float]:
    return [r["reward/score_mean"] for r in read_metrics(out)]


@pytest.mark.parametrize("name", CRITIC_FREE)
def test_critic_free_algorithm_learns_without_a_critic(tmp_path, name):
    """Reward up on the toy judge, with the recipe's KL setting; no critic loaded or saved."""
    from apactl.hooks import Hooks
    from apactl.workflows.align import run_align

    seen = {}
    run_align(tiny_recipe(name, tmp_path, "train.iterations=25"),
              hooks=Hooks(on_start=lambda pieces: seen.update(pieces)))
    r = rewards(tmp_path)
    start, end = sum(r[:5]) / 5, sum(r[-5:]) / 5
    assert start < 0.05, r
    assert end > 0.3 and end > 5 * start, r
    assert seen["critic"] is None
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["policy"]
    rows = read_metrics(tmp_path)
    assert not any(k.startswith(("loss/value", "critic/", "value/")) for k in rows[-1])
    assert "train/critic_lr" not in rows[-1] and "critic/grad_norm" not in rows[-1]


@pytest.mark.slow  # two 30-iteration runs
def test_rloo_kl_penalty_bounds_the_kl(tmp_path):
    """RLOO's KL in the reward (k1, beta 0.01 in the tiny recipe): once the reward saturates
    the KL is held far below the unpenalised run's (which drifts to the all-'a' policy)."""
    from apactl.workflows.align import run_align

    kl = {}
    for beta in ("0.0", "0.01"):
        run_align(tiny_recipe("rloo", tmp_path / beta, f"kl.beta={beta}"))
        kl[beta] = sum(r["kl/ref_k1"] for r in read_metrics(tmp_path / beta)[-5:]) / 5
    assert kl["0.01"] < 0.5 * kl["0.0"], kl


@pytest.mark.slow  # two runs
def test_grpo_kl_term_keeps_the_policy_closer(tmp_path):
    """GRPO's beta * k3 loss term: a larger beta, a smaller KL to the reference."""
    from apactl.workflows.align import run_align

    kl = {}
    for beta in ("0.0", "0.5"):
        run_align(tiny_recipe("grpo", tmp_path / beta, f"kl.beta={beta}", "train.iterations=12"))
        rows = read_metrics(tmp_path / beta)
        kl[beta] = sum(r["kl/ref_k1"] for r in rows[-3:]) / 3
        assert rows[-1]["kl/beta"] == float(beta)
    assert kl["0.5"] < 0.5 * kl["0.0"], kl


def test_groups_stay_whole_in_every_chunk_and_rank_split(tmp_path):
    """The k answers to a prompt are sampled in one decode call and land in consecutive rows of
    one chunk, so a rank never holds part of a group; every split (chunks of 1 or 2 prompts,
    1 or 2 ranks) samples the same answers: each group's answers come from its chunk's seeded
    stream, independent draws (the 4 answers differ)."""
    import torch

    from apactl.distributed import Dist
    from apactl.hooks import Hooks
    from apactl.metrics import Timer
    from apactl.rl.rollout import RolloutPlan, collect_rollout
    from apactl.sampling import SamplingSpec, Stream
    from apactl.workflows.align import run_align

    class OneRank(Dist):
        """Rank ``rank`` of ``world_size``, seen alone: its own chunks, no exchange."""

        def gather_chunks(self, mine):
            return [mine[j] for j in sorted(mine)]

    out = {}

    def on_start(pieces):
        actors = pieces["actors"]
        tok = actors.tokenizer
        prompts = [{"input_ids": tok(f"prompt {i}")["input_ids"], "messages": []}
                   for i in range(4)]
        for chunk in (None, 1, 2):
            for dist in (Dist(), OneRank(0, 2), OneRank(1, 2)):
                plan = RolloutPlan(SamplingSpec(max_new_tokens=6), chunk, None, 0,
                                   tok.pad_token_id)
                ro, texts, _ = collect_rollout(actors, prompts, plan, Timer(), Stream.ROLLOUT,
                                               (0,), dist, samples=4)
                out[chunk, dist.rank, dist.world_size] = ro

    run_align(tiny_recipe("grpo", tmp_path, "train.iterations=1"),
              hooks=Hooks(on_start=on_start))
    whole = out[None, 0, 1]
    assert whole.batch_size == 16
    # Rows 4g .. 4g+3 answer prompt g: the same prompt ids, different answers.
    for g in range(4):
        rows = whole.query_ids[4 * g:4 * g + 4]
        assert all(torch.equal(rows[0], r) for r in rows)
        answers = {tuple(a.tolist()) for a in whole.response_ids[4 * g:4 * g + 4]}
        assert len(answers) > 1
    for chunk in (1, 2):
        parts = [out[chunk, r, 2] for r in (0, 1)]
        assert [p.batch_size for p in parts] == [8, 8]  # whole groups on each rank
        one = out[chunk, 0, 1]
        for rank, part in enumerate(parts):
            # Rank r holds chunks r, r + 2, ...: the same rows as in the one-rank rollout.
            size = 4 * chunk
            idx = [i for j in range(rank, 4 // chunk, 2) for i in range(j * size, (j + 1) * size)]
            width = part.response_ids.shape[1]
            assert torch.equal(part.response_ids, one.response_ids[idx][:, :width])


@pytest.mark.parametrize("overrides, message", [
    (["generation.samples_per_prompt=3"],
     "generation.samples_per_prompt: train.rollout_batch_size (16) is not divisible"),
    (["generation.samples_per_prompt=1"], "generation.samples_per_prompt: algo.name=grpo"),
    (["critic.init=policy"],
     "critic.init: algo.name=grpo with advantage group trains no critic; remove critic.init"),
    (["algo.name=apa", "algo.advantage=leave_one_out", "critic.lr=1e-3", "critic.clip=0.2"],
     "critic.clip: algo.name=apa with advantage leave_one_out trains no critic; remove "
     "critic.clip, critic.lr from the recipe"),
    (["gae.lam=0.9"], "gae.lam: algo.name=grpo with advantage group uses no GAE; remove gae.lam"),
])
def test_group_recipe_errors_name_the_fields(tmp_path, overrides, message):
    from helpers import TINY, cli

    res = cli("recipe", "validate", TINY / "grpo.yaml", *overrides)
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output


def test_apa_with_gae_still_needs_no_groups():
    from helpers import TINY

    from apactl.recipe import load_recipe

    r = load_recipe(TINY / "align.yaml", [])
    assert r.generation.samples_per_prompt == 1 and r.has_critic


def test_grpo_resume_matches_uninterrupted_run(tmp_path):
    from apactl.hooks import Hooks
    from apactl.workflows.align import run_align

    args = ("train.iterations=4", "train.save_every=2", "kl.beta=0.04")
    run_align(tiny_recipe("grpo", tmp_path / "a", *args))

    def crash(step, metrics):
        if step == 3:  # after the checkpoint at iteration 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_align(tiny_recipe("grpo", tmp_path / "b", *args), hooks=Hooks(on_step_end=crash))
    assert not (tmp_path / "b/checkpoints/step-00000002/critic").exists()
    run_align(tiny_recipe("grpo", tmp_path / "b", *args), resume=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in ("reward/score_mean", "kl/ref_k1", "loss/policy", "policy/kl_k3",
                    "policy/entropy"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)


def test_rloo_with_lora_and_held_out_evaluation(tmp_path):
    """LoRA (the reference = the adapter-disabled base: KL 0 at the start) and held-out
    evaluation (one answer per held-out prompt) with a critic-free algorithm."""
    from apactl.workflows.align import run_align

    run_align(tiny_recipe("rloo", tmp_path, "policy.lora.r=8", "train.lr=5e-2",
                          "policy.lora.target_modules=all-linear", "train.iterations=4",
                          "train.eval_every=2", "data.eval_rows=8", "train.eval_prompts=8"))
    rows = read_metrics(tmp_path)
    assert rows[0]["kl/ref_k1"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl/ref_k1"] > 0.01
    assert [r["step"] for r in rows if "eval/score_mean" in r] == [2, 4]
    assert (tmp_path / "final/policy/model.safetensors").exists()


@pytest.mark.slow  # two align subprocesses and an eval (~25 s of CPU)
def test_sweep_over_algo_name_then_eval_the_sweep(tmp_path, monkeypatch):
    """`apactl sweep --grid algo.name=grpo,rloo` (each run a subprocess) and `apactl eval` of
    the sweep folder: every critic-free run is a policy against the shared initial policy."""
    import json
    import os
    import sys
    from pathlib import Path

    from helpers import QUIET, ROOT, TINY, cli

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "sweep"
    small = ["train.iterations=2", "train.rollout_batch_size=8", "train.minibatch_size=8",
             "train.epochs_per_rollout=1", "data.max_rows=8", "generation.max_new_tokens=4",
             *QUIET]
    res = cli("sweep", TINY / "grpo.yaml", "--grid", "algo.name=grpo,rloo",
              f"run.output_dir={root}", *small)
    assert res.exit_code == 0, res.output
    for algo in ("grpo", "rloo"):
        final = root / f"algo.name={algo}" / "final"
        assert sorted(p.name for p in final.iterdir()) == ["policy"], algo
    out = tmp_path / "eval"
    res = cli("eval", TINY / "eval.yaml", f"run.output_dir={out}", "data.eval_rows=4",
              f"policies=[{{name: sweep, path: {root}}}]", "baseline=null",
              "judges=[{name: char-fraction, args: {chars: a}}]", *QUIET)
    assert res.exit_code == 0, res.output
    names = [p["name"] for p in json.loads((out / "report.json").read_text())["policies"]]
    assert names[0] == "baseline" and len(names) == 3, names


def test_frozen_trunk_reuse_without_a_critic_matches_plain_forwards(tmp_path):
    """train.reuse_frozen_trunk with no critic to share the trunk with: the same metrics as the
    plain forwards."""
    from apactl.workflows.align import run_align

    common = ("train.iterations=3", "train.freeze_bottom_layers=1", "kl.beta=0.04")
    for flag in ("true", "false"):
        run_align(tiny_recipe("grpo", tmp_path / flag, *common,
                              f"train.reuse_frozen_trunk={flag}"))
    fast, plain = read_metrics(tmp_path / "true"), read_metrics(tmp_path / "false")
    for key in ("reward/score_mean", "kl/ref_k1", "loss/policy", "policy/entropy"):
        for a, b in zip(fast, plain, strict=True):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key


def test_a_critic_free_runs_own_recipe_yaml_validates_and_resumes(tmp_path):
    # The hint of a refused resume says "resume with the run's own recipe.yaml": for a
    # critic-free run that file must not carry the critic/gae sections its schema refuses.
    import yaml
    from helpers import QUIET, TINY, cli

    out = tmp_path / "run"
    args = ("train.iterations=2", "train.save_every=1", f"run.output_dir={out}", *QUIET)
    assert cli("align", TINY / "grpo.yaml", *args).exit_code == 0
    written = yaml.safe_load((out / "recipe.yaml").read_text())
    assert "critic" not in written and "gae" not in written and written["algo"]["name"] == "grpo"
    res = cli("recipe", "validate", out / "recipe.yaml")
    assert res.exit_code == 0, res.output
    res = cli("align", out / "recipe.yaml", "train.iterations=2", "--resume", *QUIET)
    assert res.exit_code == 0, res.output
