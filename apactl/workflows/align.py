"""``apactl align --algo apa|ppo|awr|grpo|rloo``: build the pieces from the recipe, then run the
RL loop (``apactl.rl.loop``)."""

from __future__ import annotations

import copy
from typing import Any

from apactl.config import AlignRecipe
from apactl.errors import ModelError, UserError
from apactl.hooks import Hooks
from apactl.metrics import console
from apactl.precision import fp32_heads
from apactl.rl.advantages import AdvantageSpec
from apactl.rl.kl_control import AdaptiveKLController, FixedKLController
from apactl.rl.loop import LoopPlan, RLRun, run_rl
from apactl.rl.rollout import Actors, RolloutPlan
from apactl.rl.update import UpdatePlan
from apactl.runtime import Runtime, setup_run
from apactl.sampling import SamplingSpec
from apactl.training import Optimization, Schedule, make_trainee
from apactl.workflows.common import check_positions, data_summary


def build_actors(recipe: AlignRecipe, rt: Runtime) -> Actors:
    """Policy (trained), reference and judge (frozen), critic (trained; none for a critic-free
    advantage estimator), and their forwards."""
    from apactl.accel import plan_forwards
    from apactl.judges import build_judge
    from apactl.models import load_policy, load_reference
    from apactl.sampling import eos_ids

    tr, p = recipe.train, rt.precision
    policy, tok = load_policy(recipe.policy, rt.device, p.master_dtype,
                              freeze_bottom_layers=tr.freeze_bottom_layers)
    sharded = recipe.run.strategy == "fsdp" and rt.dist.joined
    fp32_heads(policy)
    if not sharded:  # an FSDP unit needs one dtype: sharded models keep fp32 throughout
        p.store_frozen(policy)
    offload = _offload(recipe, rt)
    if offload is not None and not offload.active:
        console.print("train.offload_frozen: the device is the CPU; nothing to offload")
    # Each frozen model goes to the host as soon as it is loaded: the GPU holds one at a time.
    # Loaded in the masters' dtype (on the host: no device peak), then stored as the policy's
    # frozen part is, so that it computes exactly what the initial policy computes.
    ref = load_reference(policy, recipe.policy, "cpu", p.master_dtype)
    if ref is not None:
        ref = p.store_inference(ref).to(rt.device)
    if offload is not None:
        offload.add(ref)
    judge = build_judge(recipe.reward, device=rt.device, dtype=p.frozen_dtype, field="reward")
    if offload is not None:
        offload.add(getattr(judge, "model", None))
    critic_k = _critic_freeze(recipe)
    critic = _load_critic(recipe, judge, rt, tok, sharded) if recipe.has_critic else None
    eos = eos_ids(policy, tok)
    reuse = _trunk_reuse(recipe, sharded)
    if sharded:
        return _sharded_actors(rt, policy, ref, critic, judge, tok, eos, offload)
    forwards = plan_forwards(policy, ref, critic, tr.freeze_bottom_layers, critic_k, reuse,
                             getattr(judge, "model", None),
                             warn=lambda msg: console.print(f"[yellow]warning:[/] {msg}"))
    return Actors(policy, ref, critic, judge, tok, eos, rt.device, forwards,
                  sampler=_sampler(policy, rt), offload=offload)


def _load_critic(recipe: AlignRecipe, judge, rt: Runtime, tok, sharded: bool):
    from apactl.models import load_sequence_classifier

    p = rt.precision
    try:  # a critic from the reward model or a saved critic keeps its trained head
        critic, critic_tok = load_sequence_classifier(
            _critic_source(recipe, judge), rt.device, p.master_dtype, trainable=True,
            freeze_bottom_layers=_critic_freeze(recipe),
            trained_head=recipe.critic.init != "policy")
    except ModelError as exc:
        raise ModelError(f"critic.init: {exc}") from None
    fp32_heads(critic)
    if not sharded:
        p.store_frozen(critic)
    if critic_tok.get_vocab() != tok.get_vocab():
        raise UserError("critic.init: the reward model's tokenizer differs from the policy's, "
                        "so it cannot value policy tokens; set critic.init=policy")
    return critic


def _offload(recipe: AlignRecipe, rt: Runtime):
    """``train.offload_frozen``: an ``Offload`` for frozen models, or None."""
    if not recipe.train.offload_frozen:
        return None
    from apactl.offload import Offload

    return Offload(rt.device)


def _trunk_reuse(recipe: AlignRecipe, sharded: bool) -> bool:
    """``train.reuse_frozen_trunk`` as asked, unless sharding or offloading rules it out (said
    once, with every reason)."""
    tr = recipe.train
    why = [reason for on, reason in (
        (sharded, "run.strategy=fsdp: sharded layers are not shared with the reference"),
        (tr.offload_frozen, "train.offload_frozen: the shared trunk would keep the reference's "
                            "layers on the device")) if on]
    if why and tr.reuse_frozen_trunk and tr.freeze_bottom_layers > 0:
        console.print(f"train.reuse_frozen_trunk is off ({'; '.join(why)})")
    return tr.reuse_frozen_trunk and not why


def _sharded_actors(rt: Runtime, policy, ref, critic, judge, tok, eos, offload) -> Actors:
    """run.strategy=fsdp: policy and critic sharded per layer (FSDP2); the decode copy of the
    policy, the frozen reference and reward model replicated. Sharded modules cannot be
    shared with unsharded ones, so the frozen-trunk reuse is off (plain forwards)."""
    from apactl.fsdp import shard_model
    from apactl.rl.forward import PlainForwards

    # The decode copy, made before sharding: 16-bit under mixed precision on CUDA, else a
    # plain copy. It is replicated, so each rank samples its own chunks with no collective.
    sampler = _sampler(policy, rt)
    if sampler is policy:
        sampler = copy.deepcopy(policy).requires_grad_(False).eval()
    shard_model(policy, rt.precision)
    if critic is not None:
        shard_model(critic, rt.precision)
    return Actors(policy, ref, critic, judge, tok, eos, rt.device,
                  PlainForwards(policy, ref, critic), sampler=sampler, sharded=True,
                  offload=offload)


def _critic_freeze(recipe: AlignRecipe) -> int:
    k = recipe.critic.freeze_bottom_layers
    return recipe.train.freeze_bottom_layers if k is None else k


def _critic_source(recipe: AlignRecipe, judge) -> str:
    from apactl.models import resolve_model_ref

    if recipe.critic.init == "reward":
        return judge.path
    if recipe.critic.init == "policy":
        return resolve_model_ref(recipe.policy.name_or_path, recipe.policy.cache_dir)
    from pathlib import Path

    run_critic = Path(recipe.critic.init) / "final" / "critic"
    # A saved critic (an align run folder, or its final/critic folder): warm start.
    return str(run_critic) if (run_critic / "config.json").is_file() else recipe.critic.init


def _sampler(policy, rt: Runtime):
    """Under mixed precision, decode with a 16-bit copy of the policy: a decode step reads
    every weight once, and autocast would re-cast the fp32 weights on every step (4x the bytes
    on a GPU; on the CPU, where mixed precision is a test mode, the copy runs the CUDA path).
    Only its matmul weights are 16-bit (``Precision.decode_copy``): under autocast it then
    draws from exactly the distribution the policy's old log-probs describe.
    ``Actors.sync_sampler`` refreshes it after each update, in place (a captured CUDA graph
    keeps reading the same storage)."""
    p = rt.precision
    if not p.mixed:
        return policy
    return p.decode_copy(policy)


def _eval_judges(recipe: AlignRecipe, rt: Runtime) -> tuple[dict[str, Any], Any]:
    """The evaluation-only judges, and an ``Offload`` of their models (offload_frozen)."""
    from apactl.judges import build_judge

    offload = _offload(recipe, rt)
    judges = {}
    for i, j in enumerate(recipe.eval_judges):
        judges[j.key] = build_judge(j, device=rt.device, dtype=rt.precision.frozen_dtype,
                                    field=f"eval_judges.{i}")
        if offload is not None:
            offload.add(getattr(judges[j.key], "model", None))
    return judges, offload


def make_optimization(actors: Actors, recipe: AlignRecipe, rt: Runtime) -> Optimization:
    tr = recipe.train
    steps = tr.derived()["total_optimizer_steps"]

    def schedule(lr: float) -> Schedule:
        return Schedule(lr, tr.weight_decay, tr.schedule, tr.warmup_steps, steps,
                        tr.max_grad_norm)

    trainees = {"policy": make_trainee("policy", actors.policy, schedule(tr.lr), actors.sharded)}
    if actors.critic is not None:
        trainees["critic"] = make_trainee("critic", actors.critic,
                                          schedule(recipe.critic.lr or tr.lr), actors.sharded)
    return Optimization(trainees, rt.dist, rt.precision.grad_scaler(actors.sharded))


def make_kl(recipe: AlignRecipe):
    kl = recipe.kl
    if kl.adaptive:
        return AdaptiveKLController(kl.beta, kl.target, kl.horizon)
    return FixedKLController(kl.beta)


def tokenized_prompts(recipe: AlignRecipe, tok) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out prompts), tokenised with the policy's chat template."""
    from apactl.data import fit_prompts, load_examples, tokenize_prompts

    d = recipe.data
    train_ex, eval_ex, report = load_examples(d, "prompt")
    args = (d.max_prompt_len, d.on_bad_row, report.source, report)
    train, _ = tokenize_prompts(tok, fit_prompts(tok, train_ex, d), *args)
    held, _ = tokenize_prompts(tok, fit_prompts(tok, eval_ex, d), *args)
    console.print(data_summary(report, len(train), len(held), "prompts"))
    if len(train) == 0:
        raise UserError(f"data.source: no usable prompts in {report.source}")
    return train, held


def plans(recipe: AlignRecipe, rt: Runtime, pad_id: int
          ) -> tuple[RolloutPlan, UpdatePlan, LoopPlan]:
    """The recipe's sections as the three plans the loop runs with."""
    tr, gen, ws = recipe.train, recipe.generation, rt.dist.world_size
    spec = SamplingSpec.from_config(gen)
    # CPU: rows per scoring forward as the update's micro-batch (memory-light); a GPU: a token
    # budget per forward (RolloutPlan.forward_tokens) unless train.forward_batch_size is set.
    rows = tr.forward_batch_size or (None if rt.device.type == "cuda" else tr.forward_batch(ws))
    rollout = RolloutPlan(spec, gen.batch_size, rows, recipe.run.seed, pad_id, gen.backend,
                          rt.precision.autocast)
    upd = UpdatePlan(recipe.algo, spec, tr.minibatch_size, tr.grad_accum, tr.epochs_per_rollout,
                     recipe.critic.clip, recipe.run.seed, pad_id, rt.precision.autocast)
    algo = recipe.algo
    advantage = AdvantageSpec(algo.advantage, recipe.gae.gamma, recipe.gae.lam,
                              recipe.gae.whiten, recipe.reward.clip, gen.samples_per_prompt,
                              getattr(algo, "scale", "none"), not algo.kl_in_loss)
    loop = LoopPlan(tr.iterations, tr.rollout_batch_size, tr.eval_every, tr.save_every,
                    tr.keep_checkpoints, recipe.critic.warmup_iterations, advantage,
                    gen.max_new_tokens, tr.eval_prompts)
    return rollout, upd, loop


def run_align(recipe: AlignRecipe, resume: bool = False, overwrite: bool = False,
              hooks: Hooks | None = None) -> dict[str, Any]:
    with setup_run(recipe, resume, overwrite) as rt:
        actors = build_actors(recipe, rt)
        check_positions(actors.policy, recipe.data.max_prompt_len
                        + recipe.generation.max_new_tokens,
                        "data.max_prompt_len + generation.max_new_tokens")
        prompts, held_out = tokenized_prompts(recipe, actors.tokenizer)
        rollout, upd, loop = plans(recipe, rt, actors.tokenizer.pad_token_id)
        run = RLRun(actors, make_optimization(actors, recipe, rt), make_kl(recipe), prompts,
                    held_out, rollout, upd, loop, rt.output_dir, recipe.model_dump(mode="json"),
                    name=f"align/{recipe.algo.name}", logging=recipe.logging,
                    progress=recipe.logging.progress, resume_from=rt.resume_from,
                    hooks=hooks or Hooks(), begin=rt.begin)
        run.eval_judges, run.eval_offload = _eval_judges(recipe, rt)
        last = run_rl(run)
    console.print(f"[green]align/{recipe.algo.name} done[/]: {rt.output_dir / 'final' / 'policy'}")
    return last

