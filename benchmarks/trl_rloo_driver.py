"""TRL RLOO (current TRL's ``RLOOTrainer``) on the benchmark's policy, reward model and prompts.

Runs in benchmarks/.venv-trl-new (see setup_trl.sh); benchmarks/compare_trl.py starts it. Prints
one JSON line on stdout: seconds per iteration, episodes/s, peak RSS, mean reward per iteration.

RLOO samples k completions per prompt and uses the mean reward of the other k-1 as the baseline
(no critic). One iteration = one generation batch of ``--batch`` completions (``--batch / k``
distinct prompts, taken in the jsonl's order), used for ``--epochs`` passes
(``num_iterations``) of ``--batch / --minibatch`` optimizer steps of ``--minibatch`` completions
(``per_device_train_batch_size``; ``steps_per_generation``). The reward function scores
completions by apactl's rule (trl_common.ApactlRuleScorer) with the reward-model folder, so the
rewards compare with apactl's ``reward/score_mean``.
"""

from __future__ import annotations

import sys
import time

import benchlib as bl
import trl_common as tc


def main() -> int:
    p = tc.common_args(__doc__.split("\n\n")[0])
    p.add_argument("--generations", type=int, default=2, help="completions per prompt (k)")
    p.add_argument("--beta", type=float, default=0.05, help="KL coefficient (TRL default)")
    p.add_argument("--epsilon", type=float, default=0.2, help="ratio clipping")
    args = p.parse_args()
    if args.batch % args.minibatch or args.batch % args.generations:
        sys.exit("--batch must be a multiple of --minibatch and of --generations")
    sampler = bl.RssSampler().start()
    sampler.mark("load")
    torch = tc.setup_torch(args.threads, args.seed)

    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl import RLOOConfig, RLOOTrainer

    n_prompts = args.batch // args.generations * args.iterations
    rows = tc.load_prompts(args.prompts, n_prompts)
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    tc.freeze_bottom_layers(policy, args.freeze_bottom_layers)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1,
                                                                dtype=torch.float32)
    reward.requires_grad_(False)
    scorer = tc.ApactlRuleScorer(reward, AutoTokenizer.from_pretrained(args.reward))

    per_it: list[dict] = []
    pending: dict = {}

    def reward_model(prompts, completions, completion_ids=None, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        scores = scorer(prompts, texts)
        lens = [len(ids) for ids in completion_ids] if completion_ids is not None else []
        pending.update(reward_apactl_rule=sum(scores) / len(scores),
                       response_length_mean=sum(lens) / len(lens) if lens else None,
                       eos_rate=(sum(bool(ids) and ids[-1] == tok.eos_token_id
                                     for ids in completion_ids) / len(lens)) if lens else None)
        return scores

    spg = args.batch // args.minibatch
    steps_per_iteration = spg * args.epochs
    cfg = RLOOConfig(
        output_dir=args.out_dir, seed=args.seed, per_device_train_batch_size=args.minibatch,
        gradient_accumulation_steps=1, steps_per_generation=spg,
        num_generations=args.generations, num_iterations=args.epochs,
        max_completion_length=args.length, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", beta=args.beta,
        epsilon=args.epsilon, max_grad_norm=args.max_grad_norm,
        max_steps=steps_per_iteration * args.iterations, shuffle_dataset=False,
        report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, bf16=False,
        fp16=False, gradient_checkpointing=False, disable_tqdm=True, disable_dropout=True,
        dataloader_num_workers=0, log_completions=False,
    )
    clock = tc.IterationClock(steps_per_iteration, args.warmup, sampler)

    class Callback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock.begin()

        def on_step_end(self, a, state, control, **kw):
            if clock.step():
                per_it.append({"generate_s": pending.pop("generate_s", None),
                               **{k: pending.pop(k, None) for k in
                                  ("reward_apactl_rule", "response_length_mean", "eos_rate")}})

    ds = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    trainer = RLOOTrainer(model=policy, reward_funcs=[reward_model], args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Callback()])
    real_generate = trainer._generate

    def timed_generate(prompts):
        t0 = time.perf_counter()
        out = real_generate(prompts)
        pending["generate_s"] = time.perf_counter() - t0
        return out

    trainer._generate = timed_generate
    trainer.train()

    notes = [
        f"RLOO: {args.generations} completions for each of {args.batch // args.generations} "
        f"prompts per iteration (apactl: {args.batch} prompts x 1); no critic",
        f"RLOO: KL penalty beta={args.beta} on the sequence reward; ratio clipping "
        f"epsilon={args.epsilon}",
        "RLOO rewards: apactl's scoring rule, so reward_mean compares with apactl's",
    ]
    config = {"per_device_train_batch_size": args.minibatch, "steps_per_generation": spg,
              "num_generations": args.generations, "num_iterations": args.epochs,
              "max_completion_length": args.length, "beta": args.beta, "lr": args.lr,
              "threads": args.threads, "freeze_bottom_layers": args.freeze_bottom_layers,
              "trainable_params": sum(q.numel() for q in policy.parameters() if q.requires_grad)}
    tc.emit("trl-rloo", args, clock, sampler, per_it, notes, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
