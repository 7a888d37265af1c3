#!/usr/bin/env python3
"""TRL 0.24 PPOTrainer on the borrowed GPU: the TRL side of the apactl-vs-TRL PPO benchmark.

Standalone (no apactl import): it needs torch, transformers, accelerate (there) and the wheels of
benchmarks/gpu/fetch_trl.sh (trl 0.24.0, datasets, dill, multiprocess, xxhash, pandas) installed
with ``pip install --no-index --no-deps --target DIR``; ``--site DIR`` appends DIR to the END of
sys.path, so whatever the machine already has wins over the carried wheels. Should ``datasets`` or
``pandas`` still fail to import, a stand-in module is put in its place (TRL's PPO path only needs
their names to import; the driver feeds a plain list as the dataset) and a note says so.

One iteration = one PPO batch: ``--episodes`` prompts generated at once (``--forward-batch``,
default all), scored, one epoch of ``episodes/minibatch`` optimizer steps (policy and value with
TRL's single AdamW). ``--warmup`` iterations run first and are left out of every figure; then
``--iterations`` measured ones. Wall time of an iteration: from one optimizer-batch end
(``on_step_end``) to the next (the first from ``on_train_begin``), with ``torch.cuda.synchronize()``
at both ends; generation: TRL's ``batch_generation`` timed (synchronised) from the outside. Peak GPU
memory: ``torch.cuda.max_memory_allocated`` over the whole run and per iteration.

Stdout carries exactly ONE JSON line, whatever happens (everything else TRL/transformers print goes
to stderr): on an exception, on SIGTERM/SIGINT, and when ``--deadline-s`` seconds after start are
near (no iteration is started that would, by the slowest one so far, end after the deadline minus
``--margin-s``; a watchdog prints what there is and exits 3 if the deadline is reached anyway).
Exit status: 0 ran (possibly stopped early by the deadline: ``stopped_early``), 1 error (JSON has
``error``), 3 watchdog, 143/130 killed by SIGTERM/SIGINT.

    python3 benchmarks/gpu/trl_ppo_gpu.py --site /tmp/site-trl --policy /tmp/models/policy-135m \\
        --reward /tmp/models/reward-135m --prompts apactl/assets/data/prompts.jsonl \\
        --episodes 64 --new-tokens 128 --minibatch 8 --warmup 1 --iterations 3 \\
        --dtype bfloat16 --deadline-s 150
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from typing import Any

T_START = time.perf_counter()

# The one JSON line goes to the real stdout; fd 1 and sys.stdout point at stderr from here on, so
# that TRL's prints (PrinterCallback, "===training policy===") and C-level output stay off it.
_REAL_STDOUT = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

RESULT: dict[str, Any] = {"name": "trl-ppo-gpu", "ok": False, "error": None, "stopped_early": None,
                          "phase": "start", "notes": []}
_EMIT_LOCK = threading.Lock()
_EMITTED = False


def log(msg: str) -> None:
    print(f"[trl_ppo_gpu {time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def emit_and_exit(code: int) -> None:
    """Print RESULT as one JSON line on the real stdout (once) and leave at once (os._exit: no
    hanging on CUDA/thread teardown)."""
    global _EMITTED
    with _EMIT_LOCK:
        if not _EMITTED:
            _EMITTED = True
            RESULT["exit_code"] = code
            RESULT["wall_s_total"] = time.perf_counter() - T_START
            line = None
            for _ in range(3):  # the main thread may be changing RESULT (watchdog, signal)
                try:
                    line = json.dumps(RESULT, default=str, allow_nan=True)
                    break
                except Exception as e:  # noqa: BLE001 - must print something
                    err = e
                    time.sleep(0.05)
            if line is None:
                line = json.dumps({"name": "trl-ppo-gpu", "ok": False,
                                   "error": f"result not serialisable: {err!r}"})
            _REAL_STDOUT.write(line + "\n")
            _REAL_STDOUT.flush()
    sys.stderr.flush()
    os._exit(code)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="causal-LM folder (LlamaForCausalLM)")
    p.add_argument("--reward", required=True,
                   help="one-label sequence-classifier folder; the value model starts from it too")
    p.add_argument("--prompts", required=True,
                   help='jsonl, one {"prompt": str} | {"messages": [...]} | {"input_ids": [...]} '
                        "per line, consumed in file order (cycled if short)")
    p.add_argument("--episodes", type=int, default=64, help="prompts (episodes) per iteration")
    p.add_argument("--new-tokens", type=int, default=128, help="response_length (max new tokens)")
    p.add_argument("--minibatch", type=int, default=8, help="episodes per optimizer step")
    p.add_argument("--epochs", type=int, default=1, help="num_ppo_epochs")
    p.add_argument("--iterations", type=int, default=3, help="measured iterations (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="iterations left out of the figures")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weights of all four models (and PPOConfig bf16=True for bfloat16)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="print the JSON line by this many seconds after start (0: no deadline)")
    p.add_argument("--margin-s", type=float, default=10.0,
                   help="safety margin before the deadline for the soft stop")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--vf-coef", type=float, default=0.5)
    p.add_argument("--cliprange", type=float, default=0.2)
    p.add_argument("--cliprange-value", type=float, default=1e6,
                   help="value clipping (default: none in effect, as apactl's critic.clip=None)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--lam", type=float, default=0.95)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--forward-batch", type=int, default=0,
                   help="local_rollout_forward_batch_size (generation and scoring chunk); "
                        "0: --episodes (one generate call per iteration, as apactl)")
    p.add_argument("--freeze-bottom-layers", type=int, default=0,
                   help="freeze embeddings + N bottom layers of policy and value (0: full FT)")
    p.add_argument("--system", default=None,
                   help="system message for {prompt} rows (default: the chat template's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--site", action="append", default=[],
                   help="folder with the carried wheels installed (--target); appended to sys.path")
    p.add_argument("--site-first", action="append", default=[],
                   help="like --site but put FIRST on sys.path (to override an installed package)")
    p.add_argument("--force-stub", default="",
                   help="comma list of datasets,pandas to replace by stand-ins (rehearsal only)")
    p.add_argument("--out-dir", default="/tmp/trl-ppo-gpu-out",
                   help="TRL output_dir (nothing is saved)")
    return p.parse_args()


# ------------------------------------------------------------------------------ imports
def _stub(name: str) -> types.ModuleType:
    """A stand-in module: any attribute is an inert placeholder class (``from X import Y``)."""
    import importlib.machinery

    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__path__ = []  # a package, so `import name.sub` fails cleanly instead of oddly
    mod.__version__ = "0+stub"
    cache: dict[str, type] = {}

    def __getattr__(attr: str):  # noqa: N807 - PEP 562
        if attr.startswith("__"):
            raise AttributeError(attr)
        return cache.setdefault(attr, type(attr, (), {"__module__": name}))

    mod.__getattr__ = __getattr__
    return mod


def import_or_stub(name: str, force: bool) -> str:
    """Import ``name``; on failure (or ``force``) put a stand-in in sys.modules. Returns where it
    came from (a path, or why it is a stand-in)."""
    import importlib

    if not force:
        try:
            mod = importlib.import_module(name)
            return str(getattr(mod, "__file__", "?"))
        except Exception as e:  # noqa: BLE001 - any import failure -> stand-in
            reason = f"{type(e).__name__}: {e}"
    else:
        reason = "forced (--force-stub)"
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    sys.modules[name] = _stub(name)
    RESULT["notes"].append(f"{name} could not be imported ({reason}); a stand-in module is used "
                           "(TRL's PPO path only imports its names)")
    return f"stub ({reason})"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("trl", "transformers", "torch", "accelerate", "datasets", "pandas", "numpy",
                "pyarrow", "huggingface_hub", "peft", "safetensors", "tokenizers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


# ------------------------------------------------------------------------------ prompts
def load_prompt_ids(path: str, tok, n: int, system: str | None) -> tuple[list[list[int]], str]:
    """Token ids of the first ``n`` prompts, rendered as apactl does: the chat template with the
    generation prompt, encoded without extra special tokens. Cycled when the file is short."""
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    out = []
    for r in rows[:n]:
        if "input_ids" in r:
            out.append([int(t) for t in r["input_ids"]])
            continue
        msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        if system is not None and msgs[0].get("role") != "system":
            msgs = [{"role": "system", "content": system}, *msgs]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        out.append(tok(text, add_special_tokens=False)["input_ids"])
    kind = next((k for k in ("input_ids", "messages") if k in rows[0]), "prompt")
    if len(out) < n:
        RESULT["notes"].append(f"{path}: {len(out)} prompts for {n} episodes: cycled")
        out = [out[i % len(out)] for i in range(n)]
    return out, kind


# ------------------------------------------------------------------------------ stats
def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(args: argparse.Namespace, per_it: list[dict[str, Any]]) -> None:
    measured = [it for it in per_it if not it["warmup"]]
    secs = [it["wall_s"] for it in measured]
    gen = [it.get("generate_s") for it in measured]
    spi = _mean(secs)
    tokens = sum(it.get("response_tokens") or 0 for it in measured)
    gsum = sum(g for g in gen if g is not None)
    RESULT.update({
        "iteration_seconds": [it["wall_s"] for it in per_it],
        "measured_iterations": len(measured),
        "seconds_per_iteration": spi,
        "seconds_per_iteration_min": min(secs) if secs else None,
        "seconds_per_iteration_max": max(secs) if secs else None,
        "episodes_per_s": args.episodes / spi if spi else None,
        "generate_seconds_per_iteration": _mean(gen),
        "generate_fraction": (gsum / sum(secs)) if secs and gsum else None,
        "generated_tokens_per_s": tokens / gsum if gsum else None,
        "response_length_mean": _mean([it.get("response_length_mean") for it in measured]),
        "eos_rate": _mean([it.get("eos_rate") for it in measured]),
        "peak_gpu_mem_measured_gib": max((it["peak_mem_gib"] for it in measured
                                          if it.get("peak_mem_gib") is not None), default=None),
        "reward_trl_by_iteration": [it.get("reward_trl") for it in per_it],
        "per_iteration": per_it,
    })


# ------------------------------------------------------------------------------ run
class _Stop(Exception):
    """Raised from the step callback to end training before the deadline."""


def main() -> int:
    args = parse_args()
    RESULT["settings"] = vars(args).copy()
    RESULT["command"] = sys.argv
    deadline = args.deadline_s if args.deadline_s > 0 else math.inf

    def on_signal(signum, frame):  # noqa: ARG001
        RESULT["error"] = RESULT["error"] or f"killed by signal {signum} during {RESULT['phase']}"
        emit_and_exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if math.isfinite(deadline):
        def watchdog():
            RESULT["error"] = RESULT["error"] or (
                f"deadline {deadline:.0f}s reached during {RESULT['phase']} (watchdog)")
            emit_and_exit(3)

        t = threading.Timer(max(0.0, deadline - 1.0 - (time.perf_counter() - T_START)), watchdog)
        t.daemon = True
        t.start()
    if args.episodes % args.minibatch:
        raise ValueError("--episodes must be a multiple of --minibatch")

    # --- imports
    RESULT["phase"] = "import"
    for d in args.site_first:
        sys.path.insert(0, os.path.abspath(d))
    for d in args.site:
        sys.path.append(os.path.abspath(d))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")  # the GPU machine reaches no hub: never wait on one
    t0 = time.perf_counter()
    import torch

    forced = {s.strip() for s in args.force_stub.split(",") if s.strip()}
    where = {"pandas": import_or_stub("pandas", "pandas" in forced)}
    where["datasets"] = import_or_stub("datasets", "datasets" in forced)
    import transformers
    import trl
    import trl.trainer.ppo_trainer as ppo_mod
    from torch.utils.data import DataLoader
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        TrainerCallback,
    )
    from transformers.utils import logging as hf_logging
    from trl import PPOConfig, PPOTrainer

    where.update({"trl": trl.__file__, "transformers": transformers.__file__,
                  "torch": torch.__file__})
    RESULT["versions"] = versions()
    RESULT["import_paths"] = where
    RESULT["timings"] = {"import_s": time.perf_counter() - t0}
    hf_logging.disable_progress_bar()
    log(f"imported trl {RESULT['versions']['trl']} transformers {transformers.__version__} "
        f"torch {torch.__version__} in {RESULT['timings']['import_s']:.1f}s")

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    RESULT["device"] = {"type": device.type,
                        "name": torch.cuda.get_device_name(device) if cuda else "cpu",
                        "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
                        "float32_matmul_precision": torch.get_float32_matmul_precision()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def mem_gib(fn) -> float | None:
        return fn(device) / 2**30 if cuda else None

    torch.manual_seed(args.seed)

    # --- tokenizer, prompts, models
    RESULT["phase"] = "load"
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.policy, padding_side="left")
    eos = tok.eos_token_id
    n_total = args.warmup + args.iterations
    prompt_ids, kind = load_prompt_ids(args.prompts, tok, args.episodes * n_total, args.system)
    if tok.pad_token_id is None or tok.pad_token_id == eos or any(
            tok.pad_token_id in ids for ids in prompt_ids):
        # TRL masks `ids == pad_token_id`: a pad equal to eos would mask the <|im_end|> tokens of
        # the chat-formatted prompts. As TRL's examples (and benchmarks/trl_ppo_driver.py): add a
        # [PAD] token; TRL sets its id to 0 before every embedding look-up, so no resize.
        tok.add_special_tokens({"pad_token": "[PAD]"})
        RESULT["notes"].append(f"pad token == eos or inside prompts: TRL runs with an added [PAD] "
                               f"(id {tok.pad_token_id}); apactl masks by position instead")
    lens = [len(x) for x in prompt_ids]
    RESULT["prompts"] = {"file": args.prompts, "row_format": kind, "n": len(prompt_ids),
                         "tokens_min": min(lens), "tokens_max": max(lens),
                         "tokens_mean": sum(lens) / len(lens)}

    def load(cls, path, **kw):
        m = cls.from_pretrained(path, dtype=dtype, **kw)
        return m.to(device)

    policy = load(AutoModelForCausalLM, args.policy)
    ref = load(AutoModelForCausalLM, args.policy)
    value = load(AutoModelForSequenceClassification, args.reward, num_labels=1)
    reward = load(AutoModelForSequenceClassification, args.reward, num_labels=1)
    reward.requires_grad_(False)
    ref.requires_grad_(False)
    for m in (policy, value):
        n = args.freeze_bottom_layers
        if n > 0:
            m.get_input_embeddings().requires_grad_(False)
            for layer in getattr(m, m.base_model_prefix).layers[:n]:
                layer.requires_grad_(False)
    sync()
    RESULT["timings"]["load_s"] = time.perf_counter() - t0
    RESULT["models"] = {
        "policy_params": sum(q.numel() for q in policy.parameters()),
        "value_params": sum(q.numel() for q in value.parameters()),
        "trainable_params": sum(q.numel() for m in (policy, value) for q in m.parameters()
                                if q.requires_grad),
        "layers": policy.config.num_hidden_layers,
        "dtype": str(next(policy.parameters()).dtype),
        "attn_implementation": getattr(policy.config, "_attn_implementation", None),
    }
    RESULT["gpu_mem_after_load_gib"] = mem_gib(torch.cuda.memory_allocated) if cuda else None
    log(f"loaded 4 models ({RESULT['models']['policy_params'] / 1e6:.0f}M params each policy) "
        f"in {RESULT['timings']['load_s']:.1f}s on {device}")

    # --- TRL
    RESULT["phase"] = "trainer-init"
    t0 = time.perf_counter()
    rows = [{"input_ids": ids} for ids in prompt_ids]
    ds, eval_ds = rows, rows[:args.episodes]  # all DataLoader + DataCollatorWithPadding need
    if not where["datasets"].startswith("stub"):
        try:  # as TRL's examples and benchmarks/trl_ppo_driver.py: a datasets.Dataset
            from datasets import Dataset

            ds = Dataset.from_dict({"input_ids": prompt_ids})
            eval_ds = ds.select(range(min(len(ds), args.episodes)))
        except Exception as e:  # noqa: BLE001 - e.g. a pyarrow too old for this datasets
            RESULT["notes"].append(f"datasets.Dataset.from_dict failed ({e!r}): plain list used")
    RESULT["dataset_type"] = type(ds).__name__
    fb = args.forward_batch or args.episodes
    cfg_kw = dict(
        output_dir=args.out_dir, exp_name="trl-ppo-gpu", seed=args.seed,
        per_device_train_batch_size=args.episodes, gradient_accumulation_steps=1,
        num_mini_batches=args.episodes // args.minibatch, num_ppo_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant",
        total_episodes=args.episodes * n_total, response_length=args.new_tokens,
        stop_token="eos", temperature=args.temperature, kl_coef=args.kl_coef,
        vf_coef=args.vf_coef, cliprange=args.cliprange, cliprange_value=args.cliprange_value,
        gamma=args.gamma, lam=args.lam, whiten_rewards=False, missing_eos_penalty=None,
        local_rollout_forward_batch_size=fb, num_sample_generations=0,
        report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=not cuda, bf16=dtype == torch.bfloat16, fp16=False,
        gradient_checkpointing=False, torch_compile=False, disable_tqdm=True,
        dataloader_num_workers=0,
    )
    cfg = PPOConfig(**cfg_kw)

    per_it: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    clock = {"start": None}
    real_generation = ppo_mod.batch_generation

    def batch_generation(model, queries, local_bs, pad_token_id, generation_config):
        sync()
        g0 = time.perf_counter()
        qr, logits = real_generation(model, queries, local_bs, pad_token_id, generation_config)
        sync()
        pending["generate_s"] = time.perf_counter() - g0
        pending["responses"] = qr[:, queries.shape[1]:]
        pending["prompt_width"] = int(queries.shape[1])
        return qr, logits

    ppo_mod.batch_generation = batch_generation

    def begin_iteration() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        RESULT["phase"] = f"iteration {len(per_it) + 1}/{n_total}"
        clock["start"] = time.perf_counter()

    class Callback(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            sync()
            begin_iteration()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs:
                pending["logs"] = {k: logs.get(k) for k in (
                    "objective/scores", "objective/kl", "objective/entropy", "loss/policy_avg",
                    "loss/value_avg", "policy/approxkl_avg", "val/num_eos_tokens", "eps")}

        def on_step_end(self, a, state, control, **kw):
            sync()
            now = time.perf_counter()
            i = len(per_it)
            it: dict[str, Any] = {"iteration": i, "warmup": i < args.warmup,
                                  "wall_s": now - clock["start"],
                                  "generate_s": pending.pop("generate_s", None),
                                  "peak_mem_gib": mem_gib(torch.cuda.max_memory_allocated),
                                  "peak_mem_reserved_gib": mem_gib(torch.cuda.max_memory_reserved)}
            resp = pending.pop("responses", None)
            if resp is not None:
                is_eos = resp == eos
                ended = is_eos.any(1)
                n = torch.where(ended, is_eos.float().argmax(1) + 1,
                                torch.full_like(ended, resp.shape[1], dtype=torch.long))
                it.update(response_tokens=int(n.sum()),
                          response_length_mean=n.float().mean().item(),
                          response_width=int(resp.shape[1]),
                          eos_rate=ended.float().mean().item(),
                          prompt_width=pending.pop("prompt_width", None))
            logs = pending.pop("logs", {}) or {}
            it["reward_trl"] = logs.pop("objective/scores", None)
            it["trl_logs"] = logs
            per_it.append(it)
            summarise(args, per_it)  # so that a watchdog/signal exit has the figures so far
            log(f"iteration {i + 1}/{n_total}{' (warm-up)' if it['warmup'] else ''}: "
                f"{it['wall_s']:.2f}s, generate {it['generate_s'] or 0:.2f}s"
                + (f", peak GPU memory {it['peak_mem_gib']:.2f} GiB" if cuda else ""))
            if len(per_it) < n_total and math.isfinite(deadline):
                # the slowest measured iteration (the warm-up one if none yet: it carries one-time
                # costs, so this errs on the safe side)
                slowest = max(x["wall_s"] for x in ([x for x in per_it if not x["warmup"]]
                                                    or per_it))
                if (now - T_START) + slowest + args.margin_s > deadline:
                    RESULT["stopped_early"] = (
                        f"after {len(per_it)}/{n_total} iterations: the next (~{slowest:.1f}s) "
                        f"would end after the deadline ({deadline:.0f}s) minus "
                        f"{args.margin_s:.0f}s")
                    raise _Stop()
            begin_iteration()

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref,
                         reward_model=reward, value_model=value, train_dataset=ds,
                         eval_dataset=eval_ds, callbacks=[Callback()])
    # The prompts in file order (apactl's order when the file is compare_trl.py-style), not
    # TRL's shuffled loader.
    ordered = DataLoader(ds, batch_size=args.episodes, shuffle=False, drop_last=True,
                         collate_fn=DataCollatorWithPadding(tok))
    trainer.dataloader = trainer.accelerator.prepare(ordered)
    sync()
    RESULT["timings"]["trainer_init_s"] = time.perf_counter() - t0
    RESULT["accelerator"] = {"mixed_precision": str(trainer.accelerator.mixed_precision),
                             "device": str(trainer.accelerator.device)}
    RESULT["trl_config"] = {k: v for k, v in cfg_kw.items() if k not in ("output_dir",)}
    RESULT["trl_config"].update(
        kl_estimator=cfg.kl_estimator, whiten_advantages="always (TRL)",
        optimizer=type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        max_grad_norm_used=False,
        stop_token_id=trainer.stop_token_id, pad_token_id=tok.pad_token_id)
    if cuda and dtype == torch.bfloat16 and RESULT["accelerator"]["mixed_precision"] == "no":
        RESULT["notes"].append("bf16=True does not reach PPOTrainer's own Accelerator (no "
                               "autocast); the models run in bf16 because they are loaded in bf16")

    RESULT["phase"] = "train"
    t0 = time.perf_counter()
    try:
        trainer.train()
    except _Stop:
        log(RESULT["stopped_early"])
    finally:
        RESULT["timings"]["train_s"] = time.perf_counter() - t0
        summarise(args, per_it)
    if cuda:
        RESULT["peak_gpu_mem_gib"] = max([it["peak_mem_gib"] or 0 for it in per_it]
                                         + [RESULT["gpu_mem_after_load_gib"] or 0])
        RESULT["peak_gpu_mem_reserved_gib"] = max(
            [it["peak_mem_reserved_gib"] or 0 for it in per_it], default=None)
    RESULT["notes"] += [
        "TRL PPO trains policy and value with ONE AdamW (loss = pg + vf_coef * vf); apactl has "
        "one optimizer per model",
        "TRL 0.24 PPO never clips gradients; apactl clips at train.max_grad_norm (1.0)",
        "TRL keeps kl_coef fixed (k1 per-token penalty); apactl PPO adapts beta from 0.05 "
        "(target 6, horizon 10000): over a few iterations the difference is negligible",
        "TRL generates with HF generate (output_scores: the logits of every step are kept) and "
        "scores in chunks of local_rollout_forward_batch_size; apactl uses its own KV-cache loop",
    ]
    RESULT["ok"] = RESULT["measured_iterations"] > 0
    if not RESULT["ok"]:
        RESULT["error"] = RESULT["error"] or "no measured iteration"
    RESULT["phase"] = "done"
    return 0 if RESULT["ok"] else 1


if __name__ == "__main__":
    try:
        code = main()
    except BaseException as e:  # noqa: BLE001 - the JSON line must come out
        RESULT["error"] = f"{type(e).__name__}: {e}"[:2000]
        RESULT["traceback"] = traceback.format_exc()[-6000:]
        traceback.print_exc()
        code = 1
    emit_and_exit(code)
