"""apactl's GRPO / RLOO computations against TRL 0.24's, on the same batch (not CI).

On one batch of log-probs (policy, rollout policy, reference), rewards and masks, 3 prompts x 4
answers, this runs TRL 0.24's own code and apactl's, and writes the largest differences to
benchmarks/results/parity_trl_online.json:

* advantages: TRL's ``GRPOTrainer._generate_and_score_completions`` / ``RLOOTrainer.
  _generate_and_score_completions`` (the advantage arithmetic is inline there) called on a
  stand-in ``self`` whose generation, log-prob and reward methods return the fixed batch, against
  apactl's ``rl.advantages.add_advantages`` on a Rollout holding the same batch;
* losses: TRL's ``GRPOTrainer._compute_loss`` (loss_type dapo / bnpo = apactl's token
  aggregation, grpo = sequence; beta 0 and 0.04) and ``RLOOTrainer._compute_loss`` (whose
  per-token log-probs come from the stand-in), against apactl's ``rl.algos.policy_loss``; the
  gradients with respect to the log-probs too.

TRL is imported from a folder holding the unpacked ``trl-0.24.*`` wheel (``--trl PATH``; e.g.
``pip download trl==0.24.0 --no-deps`` and unzip) or from the environment. TRL 0.24 reads
``transformers.utils.import_utils._is_package_available`` as a bool, which transformers 5 made a
tuple; the import is shimmed for that one module (nothing else of TRL runs beyond the methods
named above, which compute with torch only).

    PYTHONPATH=. python benchmarks/parity_trl_online.py --trl /tmp/trl-0.24
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
G, K, T = 3, 4, 5  # prompts, answers per prompt, response length
CONTROLS: dict[str, float] = {}  # deliberately mismatched settings: differences far above 1e-6


def import_trl(path: str | None):
    if path:
        sys.path.insert(0, path)
    import transformers.utils.import_utils as iu

    orig = iu._is_package_available

    def as_bool(name, return_version=False):
        r = orig(name, return_version=True)
        ok, ver = r if isinstance(r, tuple) else (r, None)
        return (ok, ver) if return_version else ok

    iu._is_package_available = as_bool
    try:
        import trl.import_utils  # noqa: F401  (evaluates the availability flags once)
    finally:
        iu._is_package_available = orig
    import trl
    from trl.trainer.grpo_trainer import GRPOTrainer
    from trl.trainer.rloo_trainer import RLOOTrainer

    return trl.__version__, GRPOTrainer, RLOOTrainer


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """One rollout: lengths 1..T (right padding), rewards with a tied group (zero std)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (G * K,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    old = -torch.rand(G * K, T, generator=g, dtype=torch.float64) * 3
    ref = old + torch.randn(G * K, T, generator=g, dtype=torch.float64) * 0.3
    logp = old + torch.randn(G * K, T, generator=g, dtype=torch.float64) * 0.2
    rewards = torch.randn(G * K, generator=g, dtype=torch.float64)
    rewards[K:2 * K] = 0.5  # a group whose answers all scored alike
    return {"mask": mask, "old": old, "ref": ref, "logp": logp, "rewards": rewards}


class Accelerator:
    device = torch.device("cpu")
    process_index, num_processes = 0, 1

    def gather(self, x):
        return x

    def unwrap_model(self, model):
        return model


def trainer_self(cls, b, beta, **extra):
    # GRPOTrainer._generate also returns num_items_in_batch and the sampler's log-probs.
    """A stand-in ``self`` for TRL's methods: generation returns the batch's token ids, the
    log-prob method returns policy / reference log-probs in call order, rewards are fixed."""
    n = G * K
    lengths = b["mask"].sum(1).tolist()
    calls = []

    def logps(model, ids, attn, keep, *a, **kw):
        calls.append(model)
        which = {"policy": b["old"], "ref": b["ref"], "train": b["logp"]}[model.role]
        return which.clone(), torch.zeros_like(which)

    tok = SimpleNamespace(batch_decode=lambda ids, **kw: ["x"] * len(ids))
    s = SimpleNamespace(
        accelerator=Accelerator(), model=SimpleNamespace(training=True, role="policy"),
        ref_model=SimpleNamespace(role="ref"), beta=beta, num_generations=K,
        pad_token_id=0, eos_token_id=1, mask_truncated_completions=False,
        args=SimpleNamespace(per_device_train_batch_size=n, per_device_eval_batch_size=n,
                             gradient_accumulation_steps=1, steps_per_generation=1, delta=None),
        processing_class=tok, reward_weights=torch.tensor([1.0], dtype=torch.float64),
        reward_func_names=["judge"], reward_clip_range=None,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list),
               "advantages": [], "images": []},
        _generate=lambda prompts, images: (
            ([[5, 6]] * n, [[7] * ln for ln in lengths], b["mask"].sum(), None, {})
            if cls.__name__ == "GRPOTrainer" else
            ([[5, 6]] * n, [[7] * ln for ln in lengths], {})),
        _get_per_token_logps_and_entropies=logps,
        _calculate_rewards=lambda *a, **kw: b["rewards"].unsqueeze(1),
        num_iterations=1, use_vllm=False, vllm_importance_sampling_correction=False,
        top_entropy_quantile=1.0, importance_sampling_level="token",
        epsilon_low=0.2, epsilon_high=0.2, current_gradient_accumulation_steps=1, state=None,
        _step=0, _buffered_inputs=None, log_completions=False, max_completion_length=T,
        **extra)
    s.calls = calls
    return s


def apactl_rollout(b, k1_beta: float, estimator: str, kl_in_reward: bool, scale="group"):
    from apactl.rl.advantages import AdvantageSpec, add_advantages
    from apactl.rl.types import Rollout

    n = G * K
    ro = Rollout(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2),
                 torch.full((n, T), 7), b["mask"].to(torch.float64),
                 old_logprobs=b["old"], ref_logprobs=b["ref"], scores=b["rewards"])
    add_advantages(ro, k1_beta, AdvantageSpec(estimator, group_size=K, scale=scale,
                                              kl_in_reward=kl_in_reward))
    return ro


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def grpo_parity(GRPOTrainer, b) -> dict:
    from apactl.config import GRPOConfig
    from apactl.rl.algos import policy_loss

    out = {}
    inputs = [{"prompt": "p"}] * (G * K)
    for scale in ("group", "batch", "none"):
        trl_self = trainer_self(GRPOTrainer, b, 0.0, scale_rewards=scale)
        got = GRPOTrainer._generate_and_score_completions(trl_self, inputs)
        ro = apactl_rollout(b, 0.0, "group", kl_in_reward=False, scale=scale)
        out[f"advantages/scale={scale}"] = max_diff(ro.advantages[:, 0], got["advantages"])
    for beta in (0.0, 0.04):
        for trl_type, ours in (("dapo", "token"), ("bnpo", "token"), ("grpo", "sequence")):
            trl_self = trainer_self(GRPOTrainer, b, beta, loss_type=trl_type,
                                    scale_rewards="group")
            got = GRPOTrainer._generate_and_score_completions(trl_self, inputs)
            trl_self.model.role = "train"
            logp_trl = b["logp"].clone().requires_grad_(True)
            trl_self._get_per_token_logps_and_entropies = (
                lambda *a, _x=logp_trl, **kw: (_x, torch.zeros_like(_x)))
            got["num_items_in_batch"] = b["mask"].sum()
            got["old_per_token_logps"] = b["old"]
            got["ref_per_token_logps"] = b["ref"]
            trl_loss = GRPOTrainer._compute_loss(trl_self, None, got)
            trl_loss.backward()
            ro = apactl_rollout(b, beta, "group", kl_in_reward=False)
            logp = b["logp"].clone().requires_grad_(True)
            loss, _ = policy_loss(GRPOConfig(loss_aggregation=ours), logp, ro, beta)
            loss.backward()
            mask = b["mask"].bool()
            key = f"loss/beta={beta}/trl={trl_type}/apactl={ours}"
            out[key] = abs(loss.item() - trl_loss.item())
            out[key.replace("loss/", "grad/")] = max_diff(logp.grad[mask], logp_trl.grad[mask])
            # The comparison can fail: the other aggregation differs from TRL's by this much.
            other = "sequence" if ours == "token" else "token"
            wrong, _ = policy_loss(GRPOConfig(loss_aggregation=other), logp, ro, beta)
            CONTROLS[f"grpo/{key}/apactl={other}"] = abs(wrong.item() - trl_loss.item())
            assert logp.grad[mask].abs().max() > 1e-3 and got["advantages"].abs().max() > 0.1
    return out


def rloo_parity(RLOOTrainer, b) -> dict:
    from apactl.config import RLOOConfig
    from apactl.rl.algos import policy_loss

    out = {}
    inputs = [{"prompt": "p"}] * (G * K)
    for beta in (0.0, 0.05):
        trl_self = trainer_self(RLOOTrainer, b, beta, normalize_advantages=False)
        got = RLOOTrainer._generate_and_score_completions(trl_self, inputs)
        ro = apactl_rollout(b, beta, "leave_one_out", kl_in_reward=True)
        out[f"advantages/beta={beta}"] = max_diff(ro.advantages[:, 0], got["advantages"])
        trl_self.model.role = "train"
        logp_trl = b["logp"].clone().requires_grad_(True)
        trl_self._get_per_token_logps_and_entropies = (
            lambda *a, _x=logp_trl, **kw: (_x, torch.zeros_like(_x)))
        trl_loss = RLOOTrainer._compute_loss(trl_self, None, got)
        trl_loss.backward()
        logp = b["logp"].clone().requires_grad_(True)
        loss, _ = policy_loss(RLOOConfig(), logp, ro, beta)
        loss.backward()
        mask = b["mask"].bool()
        out[f"loss/beta={beta}"] = abs(loss.item() - trl_loss.item())
        out[f"grad/beta={beta}"] = max_diff(logp.grad[mask], logp_trl.grad[mask])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trl", help="folder holding an unpacked trl-0.24 wheel")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "parity_trl_online.json"))
    args = p.parse_args()
    version, GRPOTrainer, RLOOTrainer = import_trl(args.trl)
    worst: dict[str, float] = {}
    for seed in range(args.seeds):
        b = batch(seed)
        for k, v in {**{f"grpo/{k}": v for k, v in grpo_parity(GRPOTrainer, b).items()},
                     **{f"rloo/{k}": v for k, v in rloo_parity(RLOOTrainer, b).items()}}.items():
            worst[k] = max(worst.get(k, 0.0), v)
    ok = all(v <= 1e-6 for v in worst.values()) and not any(math.isnan(v) for v in worst.values())
    result = {"trl": version, "torch": torch.__version__, "batches": args.seeds,
              "shape": {"prompts": G, "answers_per_prompt": K, "max_len": T},
              "tolerance": 1e-6, "all_within_tolerance": ok, "max_abs_diff": worst,
              "controls_mismatched_aggregation": CONTROLS,
              "not_matched": {
                  "rloo/normalize_advantages": "TRL's option (off by default) whitens the RLOO "
                                              "advantages over the batch; apactl has no such "
                                              "option for rloo",
                  "grpo/dr_grpo": "TRL's loss_type dr_grpo divides by B x max_completion_length; "
                                  "apactl's Dr. GRPO is scale: none with token aggregation",
                  "grpo/epsilon_high, delta, importance_sampling_level=sequence, "
                  "top_entropy_quantile": "TRL-only options (DAPO/GSPO extensions); apactl "
                                          "clips symmetrically per token"}}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k, v in sorted(worst.items()):
        print(f"{k:55s} {v:.2e}")
    print(f"TRL {version}: all within 1e-6: {ok} -> {args.out}")


if __name__ == "__main__":
    main()
