"""Pieces shared by the TRL drivers (trl_ppo_driver.py, trl_rloo_driver.py).

They run in the TRL virtual environments (benchmarks/.venv-trl, .venv-trl-new), where apactl is not
installed, so the few apactl rules a fair comparison needs are restated here:

* ``freeze_bottom_layers``: freeze the input embeddings (and a tied LM head with them) and the
  bottom N decoder layers, as ``train.freeze_bottom_layers`` does in apactl.
* ``ApactlRuleScorer``: score a (prompt messages, response text) pair the way apactl's
  reward-model judge does: the chat template renders prompt + reply (end-of-turn marker
  included), the text is re-tokenised by the reward model's tokenizer without extra special
  tokens, and the scalar head is read at the last attended token (not at "the last non-pad
  token", which is wrong when pad == eos, as in SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import benchlib as bl


def common_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--policy", required=True, help="causal-LM folder (Hugging Face)")
    p.add_argument("--reward", required=True, help="sequence-classifier reward-model folder")
    p.add_argument("--prompts", required=True,
                   help="jsonl of {messages, input_ids}, in the order they are consumed")
    p.add_argument("--batch", type=int, default=16, help="episodes per iteration")
    p.add_argument("--minibatch", type=int, default=8, help="episodes per optimizer step")
    p.add_argument("--length", type=int, default=64, help="max new tokens")
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--iterations", type=int, default=4, help="iterations in all (warm-up included)")
    p.add_argument("--warmup", type=int, default=1, help="iterations left out of the timings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--freeze-bottom-layers", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--out-dir", default=str(bl.HERE / ".cache" / "trl-out"))
    return p


def setup_torch(threads: int, seed: int):
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()
    return torch


def load_prompts(path: str | Path, n: int) -> list[dict[str, Any]]:
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    if len(rows) < n:
        sys.exit(f"{path}: {len(rows)} prompts, {n} needed")
    return rows[:n]


def freeze_bottom_layers(model, n: int) -> None:
    if n <= 0:
        return
    backbone = getattr(model, model.base_model_prefix)
    layers = backbone.layers
    if n > len(layers):
        sys.exit(f"--freeze-bottom-layers {n}: the model has {len(layers)} layers")
    model.get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def render_for_reward(tokenizer, messages: list[dict[str, str]], response: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": response}], tokenize=False,
            add_generation_prompt=False)
    plain = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}
    prompt = "".join(plain[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"
    return prompt + " " + response + (tokenizer.eos_token or "")


class ApactlRuleScorer:
    """Raw reward-model scores by apactl's rule (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 16, max_len: int = 1024):
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size, self.max_len = batch_size, max_len

    def __call__(self, messages: list[list[dict[str, str]]], responses: list[str]) -> list[float]:
        import torch

        texts = [render_for_reward(self.tok, m, r) for m, r in zip(messages, responses)]
        backbone = getattr(self.model, self.model.base_model_prefix)
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[i:i + self.batch_size], add_special_tokens=False,
                           truncation=True, max_length=self.max_len)["input_ids"]
            width = max(len(e) for e in enc)
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            ids = torch.tensor([e + [pad] * (width - len(e)) for e in enc])
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc])
            with torch.inference_mode():
                hidden = backbone(input_ids=ids, attention_mask=mask,
                                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                  use_cache=False).last_hidden_state
                last = mask.sum(1) - 1
                scores = self.model.score(hidden[torch.arange(len(enc)), last]).squeeze(-1)
            out += scores.float().tolist()
        return out


class IterationClock:
    """Iteration boundaries every ``steps_per_iteration`` optimizer steps. After ``step()``
    reports an iteration's end, work done before ``restart()`` (the benchmark's own extra
    scoring) belongs to no iteration."""

    def __init__(self, steps_per_iteration: int, warmup: int, sampler: bl.RssSampler):
        self.spi, self.warmup, self.sampler = steps_per_iteration, warmup, sampler
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.steps = 0

    def begin(self) -> None:
        self.sampler.mark("warmup" if self.warmup else "measured")
        self.starts.append(time.perf_counter())

    def step(self) -> bool:
        """Call at every optimizer step's end; True when an iteration just ended."""
        self.steps += 1
        if self.steps % self.spi:
            return False
        self.ends.append(time.perf_counter())
        if len(self.ends) == self.warmup:
            self.sampler.mark("measured")
        self.starts.append(self.ends[-1])
        return True

    def restart(self) -> None:
        self.starts[-1] = time.perf_counter()

    def durations(self) -> list[float]:
        return [e - s for s, e in zip(self.starts, self.ends)]


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("trl", "transformers", "torch", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def emit(name: str, args, clock: IterationClock, sampler: bl.RssSampler,
         per_iteration: list[dict[str, Any]], notes: list[str],
         config: dict[str, Any]) -> None:
    """Print the result as one JSON line (the last line of stdout)."""
    sampler.stop()
    mem = sampler.report()
    secs = clock.durations()
    measured = secs[args.warmup:]
    rewards = [it.get("reward_apactl_rule") for it in per_iteration]
    gen = [it.get("generate_s") for it in per_iteration[args.warmup:]]
    lengths = [it.get("response_length_mean") for it in per_iteration[args.warmup:]]
    spi = bl.mean(measured)
    res = {
        "name": name, "versions": versions(), "config": config,
        "iteration_seconds": secs, "seconds_per_iteration": spi,
        "episodes_per_s": args.batch / spi if measured else float("nan"),
        "generate_seconds_per_iteration": bl.mean(gen) if any(g is not None for g in gen)
        else None,
        "response_length_mean": bl.mean(lengths),
        "peak_rss_mib": mem["ru_maxrss_mib"],
        "peak_rss_measured_mib": mem["sampled_peak_mib_by_window"].get("measured"),
        "reward_mean_by_iteration": rewards,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean_all": bl.mean(rewards),
        "episodes": args.batch * len(per_iteration),
        "per_iteration": per_iteration, "notes": notes, "memory": mem,
    }
    print(json.dumps(res, default=str))
