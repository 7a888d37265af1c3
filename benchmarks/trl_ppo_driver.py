"""TRL PPO (TRL 0.24.x ``PPOTrainer``) on the benchmark's policy, reward model and prompts.

Runs in benchmarks/.venv-trl (see setup_trl.sh); benchmarks/compare_trl.py starts it. Prints one
JSON line on stdout: seconds per iteration, episodes/s, peak RSS, mean reward per iteration.

Matching apactl (``train.rollout_batch_size`` R, ``minibatch_size`` M, ``epochs_per_rollout`` E):
``per_device_train_batch_size=R``, ``gradient_accumulation_steps=1``, ``num_mini_batches=R/M``
gives R/M optimizer steps of M episodes per epoch. (TRL's accelerate accumulation counts micro
batches across minibatches, so a split into micro batches with gradient_accumulation_steps > 1
would give one optimizer step per epoch.) The prompts are consumed in the jsonl's order (the
order apactl samples them) instead of TRL's shuffled dataloader. The value model starts from the
reward model (apactl's ``critic.init=reward``); both trainable models freeze the same bottom
layers. Besides TRL's own reward (``objective/scores``, read at TRL's token), every rollout is
also scored by apactl's rule, outside the timed iterations, so the rewards compare.
"""

from __future__ import annotations

import os
import sys
import time

import benchlib as bl
import trl_common as tc


def main() -> int:
    p = tc.common_args(__doc__.split("\n\n")[0])
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange-value", type=float, default=1e6,
                   help="value clipping range (default: none in effect, as apactl critic.clip)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--forward-batch", type=int, help="local_rollout_forward_batch_size "
                   "(generation and scoring chunk); default --batch")
    args = p.parse_args()
    if args.batch % args.minibatch:
        sys.exit("--batch must be a multiple of --minibatch")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    sampler = bl.RssSampler().start()
    sampler.mark("load")
    torch = tc.setup_torch(args.threads, args.seed)

    import trl.trainer.ppo_trainer as ppo_mod
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from trl import PPOConfig, PPOTrainer

    rows = tc.load_prompts(args.prompts, args.batch * args.iterations)
    notes: list[str] = []
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    eos = tok.eos_token_id
    pad_clash = tok.pad_token_id is None or tok.pad_token_id == eos or any(
        tok.pad_token_id in r["input_ids"] for r in rows)
    if pad_clash:
        # TRL derives attention masks from `ids != pad_token_id`: a pad equal to eos would mask
        # the end-of-turn tokens inside the chat-formatted prompts. TRL's own examples add a
        # [PAD] token; its id is masked to 0 before every embedding look-up, so no resize.
        tok.add_special_tokens({"pad_token": "[PAD]"})
        notes.append(f"pad token == eos or inside prompts: TRL runs with an added [PAD] "
                     f"(id {tok.pad_token_id}); apactl masks by position instead")
    f32 = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(args.policy, **f32)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, **f32)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **f32)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **f32)
    rm_tok = AutoTokenizer.from_pretrained(args.reward)
    tc.freeze_bottom_layers(policy, args.freeze_bottom_layers)
    tc.freeze_bottom_layers(value, args.freeze_bottom_layers)
    reward.requires_grad_(False)
    scorer = tc.ApactlRuleScorer(reward, rm_tok)

    ds = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]})
    fb = args.forward_batch or args.batch
    cfg = PPOConfig(
        output_dir=args.out_dir, exp_name="trl-ppo-bench", seed=args.seed,
        per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
        num_mini_batches=args.batch // args.minibatch, num_ppo_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant",
        total_episodes=args.batch * args.iterations, response_length=args.length,
        stop_token="eos", temperature=args.temperature, kl_coef=args.kl_coef,
        vf_coef=args.vf_coef, cliprange=args.cliprange, cliprange_value=args.cliprange_value,
        gamma=args.gamma, lam=args.lam, whiten_rewards=False, missing_eos_penalty=None,
        local_rollout_forward_batch_size=fb, num_sample_generations=0,
        max_grad_norm=args.max_grad_norm, report_to="none", save_strategy="no",
        logging_steps=1, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        disable_tqdm=True, dataloader_num_workers=0,
    )

    clock = tc.IterationClock(1, args.warmup, sampler)
    per_it: list[dict] = []
    pending: dict = {}

    real_generation = ppo_mod.batch_generation

    def batch_generation(model, queries, local_bs, pad_token_id, generation_config):
        t0 = time.perf_counter()
        qr, logits = real_generation(model, queries, local_bs, pad_token_id, generation_config)
        pending["generate_s"] = time.perf_counter() - t0
        pending["responses"] = qr[:, queries.shape[1]:].detach().clone()
        return qr, logits

    ppo_mod.batch_generation = batch_generation

    class Callback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.begin()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                pending["reward_trl"] = logs["objective/scores"]

        def on_step_end(self, a, state, control, **kw):
            clock.step()  # one PPO update = one iteration
            i = len(per_it)
            resp = pending.pop("responses")
            is_eos = resp == eos
            ended = is_eos.any(1)
            lens = torch.where(ended, is_eos.float().argmax(1) + 1,
                               torch.full_like(ended, resp.shape[1], dtype=torch.long))
            texts = tok.batch_decode([r[:n].tolist() for r, n in zip(resp, lens)],
                                     skip_special_tokens=True)
            msgs = [r["messages"] for r in rows[i * args.batch:(i + 1) * args.batch]]
            scores = scorer(msgs, texts)
            per_it.append({"generate_s": pending.pop("generate_s"),
                           "reward_trl": pending.pop("reward_trl", None),
                           "reward_apactl_rule": sum(scores) / len(scores),
                           "response_length_mean": lens.float().mean().item(),
                           "response_width": int(resp.shape[1]),
                           "eos_rate": ended.float().mean().item()})
            clock.restart()  # the extra scoring above is not TRL's time

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=ds,
                         eval_dataset=ds.select(range(min(len(ds), args.batch))),
                         callbacks=[Callback()])
    # The prompts in the jsonl's order (apactl's sampling order), not TRL's shuffled loader.
    ordered = DataLoader(ds, batch_size=args.batch, shuffle=False, drop_last=True,
                         collate_fn=DataCollatorWithPadding(tok))
    trainer.dataloader = trainer.accelerator.prepare(ordered)
    trainer.train()

    notes += [
        "TRL PPO trains policy and value with ONE AdamW (loss = pg + vf_coef * vf); apactl has a "
        "separate optimizer per model",
        "TRL 0.24 PPO never clips gradients (max_grad_norm unused in its loop); apactl clips at "
        "train.max_grad_norm",
        "TRL reads its reward (reward_trl) at the last token before the first pad of "
        "query+response ids; reward_apactl_rule re-scores the same responses by apactl's rule",
    ]
    config = {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1,
              "num_mini_batches": args.batch // args.minibatch, "num_ppo_epochs": args.epochs,
              "response_length": args.length, "kl_coef": args.kl_coef, "vf_coef": args.vf_coef,
              "cliprange": args.cliprange, "cliprange_value": args.cliprange_value,
              "local_rollout_forward_batch_size": fb, "lr": args.lr, "threads": args.threads,
              "freeze_bottom_layers": args.freeze_bottom_layers,
              "trainable_params": sum(q.numel() for q in trainer.model.parameters()
                                      if q.requires_grad)}
    tc.emit("trl-ppo", args, clock, sampler, per_it, notes, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
