"""TRL 0.24's DPOTrainer on data apactl tokenised and ordered (started by compare_trl_dpo.py
inside benchmarks/.venv-trl, where apactl is not installed). Prints one JSON line.

    loss   DPOTrainer.dpo_loss on given log-probs (--logps JSON: pc, pr, rc, rr lists),
           per pair, for each --beta and loss type given.
    train  DPOTrainer on --data (jsonl of prompt_input_ids / chosen_input_ids /
           rejected_input_ids, one row per pair in the order apactl consumes them), read in
           that order (a sequential sampler instead of the random one), constant lr, AdamW
           (torch, not fused, as apactl's), no dropout: the per-step losses and metrics, the
           seconds of every optimizer step (and of the reference precompute when
           --precompute), and peak memory.

TRL re-tokenises text itself (its prompt + completion + an extra eos); here the dataset is already
tokenised, so ``_prepare_dataset`` is the identity: both trainers see the same token ids.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import benchlib as bl
from trl_common import freeze_bottom_layers, setup_torch, versions


def import_trl():
    """TRL 0.24 reads transformers 5's ``_is_package_available`` answers ((False, None)
    tuples) as true and then imports absent extras (mergekit, weave) when the DPO trainer's
    callbacks load; its flags are set to their first element first."""
    import trl.import_utils as flags

    for name, value in vars(flags).items():
        if name.startswith("_") and name.endswith("_available") and isinstance(value, tuple):
            setattr(flags, name, value[0])
    import trl

    return trl


def loss_mode(args) -> dict:
    import torch

    DPOTrainer = import_trl().DPOTrainer  # noqa: N806 - the class
    from trl.trainer.dpo_trainer import FDivergenceType

    data = json.loads(Path(args.logps).read_text())
    dtype = getattr(torch, args.dtype)
    pc, pr, rc, rr = (torch.tensor(data[k], dtype=dtype) for k in ("pc", "pr", "rc", "rr"))
    out = {}
    for beta in args.beta:
        for kind in args.loss_type:
            # dpo_loss reads these attributes of the trainer; a stand-in carries their defaults.
            fake = argparse.Namespace(
                beta=beta, label_smoothing=0.0, reference_free=False,
                f_divergence_type=FDivergenceType.REVERSE_KL, f_divergence_params={},
                accelerator=argparse.Namespace(device=torch.device("cpu")), use_weighting=False,
                args=argparse.Namespace())
            losses, cr, rj = DPOTrainer.dpo_loss(fake, pc, pr, rc, rr, kind)
            out[f"{kind}/beta={beta}"] = {"losses": losses.tolist(), "chosen_rewards": cr.tolist(),
                                          "rejected_rewards": rj.tolist()}
    return out


def train_mode(args) -> dict:
    torch = setup_torch(args.threads, args.seed)
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    trl = import_trl()
    DPOConfig, DPOTrainer = trl.DPOConfig, trl.DPOTrainer  # noqa: N806 - classes

    sampler = bl.RssSampler().start()
    rows = [json.loads(ln) for ln in Path(args.data).read_text().splitlines() if ln.strip()]
    dataset = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    freeze_bottom_layers(model, args.freeze_bottom_layers)
    # TRL 0.24 writes to this attribute, which transformers 5 models no longer have.
    model.warnings_issued = {}
    record: list[dict] = []

    class Ordered(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # tokenised by apactl already

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def get_batch_loss_metrics(self, model, batch, train_eval="train"):
            loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
            if train_eval == "train":
                record.append({"loss": loss.item(), **metrics})
            return loss, metrics

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()
            if state.global_step == args.warmup:
                sampler.mark("measured")

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = DPOConfig(
        output_dir=args.out_dir, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=args.beta[0], loss_type=args.loss_type[0],
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        data_seed=args.seed, dataloader_num_workers=0, bf16=False, fp16=False,
        max_length=None, max_prompt_length=None, max_completion_length=None,
        precompute_ref_log_probs=args.precompute, precompute_ref_batch_size=args.batch,
        disable_dropout=True, remove_unused_columns=False, disable_tqdm=True)
    trainer = Ordered(model=model, ref_model=None, args=cfg, train_dataset=dataset,
                      processing_class=tok, callbacks=[Clock()])
    sampler.mark("train")
    t0 = time.perf_counter()
    pre = 0.0
    if args.precompute:  # TRL computes them when the dataloader is first built: time it alone
        trainer.get_train_dataloader()
        pre = time.perf_counter() - t0
    trainer.train()
    wall = time.perf_counter() - t0
    sampler.stop()
    measured = times[args.warmup:]
    return {"name": "trl-dpo" + ("-precompute" if args.precompute else ""),
            "versions": versions(), "steps": record, "step_seconds": times,
            "reference_seconds": pre, "train_wall_seconds": wall,
            "pairs_per_s": args.batch * len(measured) / sum(measured) if measured else None,
            "pairs_per_s_with_reference": args.batch * args.steps / wall,
            "memory": sampler.report()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["loss", "train"])
    p.add_argument("--logps", help="loss: JSON of pc, pr, rc, rr")
    p.add_argument("--beta", type=float, nargs="+", default=[0.1])
    p.add_argument("--loss-type", nargs="+", default=["sigmoid"])
    p.add_argument("--dtype", default="float64", help="loss: the log-probs' dtype")
    p.add_argument("--model", help="train: causal-LM folder")
    p.add_argument("--data", help="train: tokenised pairs, jsonl, in step order")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=1, help="steps left out of pairs_per_s")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--freeze-bottom-layers", type=int, default=0)
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    p.add_argument("--out-dir", default=str(bl.HERE / ".cache" / "trl-dpo-out"))
    args = p.parse_args()
    res = loss_mode(args) if args.mode == "loss" else train_mode(args)
    sys.stdout.flush()
    print(json.dumps(res, default=str))


if __name__ == "__main__":
    main()
