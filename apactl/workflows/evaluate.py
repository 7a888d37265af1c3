"""``apactl eval``: is the aligned policy better than the baseline, and at what KL cost?

Every policy (and, with ``checkpoints: true``, every checkpoint of a policy run) and the baseline
answer the SAME held-out prompts with the SAME sampling seed, so their samples differ only through
the weights. Each sample is scored by every judge and by the baseline's log-probs: the baseline
is also the KL reference. Win rates pair a policy's sample with the baseline's sample on the same
prompt and sample index. Outputs in ``run.output_dir``: report.json, report.md, samples.jsonl,
frontier.png and training_curves.png.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apactl import eval_stats as st
from apactl.atomic import write_file
from apactl.checkpoint import seed_everything
from apactl.config import EvalRecipe
from apactl.distributed import Dist
from apactl.errors import ModelError, UserError
from apactl.eval_report import finite, print_table, render_markdown
from apactl.metrics import console, read_metrics
from apactl.runtime import Runtime, setup_run
from apactl.sampling import SamplingSpec, Stream, seeded_chunks
from apactl.workflows.common import check_positions
from apactl.workflows.eval_entries import (
    Entry,
    expand_policy,
    first_line,
    group_configs,
    load_entry,
    resolve_baseline,
    reward_is_normalized,
    same_model,
    starts_at_baseline,
)


@dataclass
class Measured:
    """One entry's N = P * S samples, prompt-major (row = prompt * S + sample)."""

    texts: list[str]
    k1: np.ndarray  # [N] per-sequence KL estimates to the baseline
    k3: np.ndarray  # [N]
    lengths: np.ndarray  # [N] response tokens (EOS included)
    kl: dict[str, float]  # kl_summary: k1/k3 mean and SE
    entropy: float  # nats per token
    eos_rate: float
    scores: dict[str, np.ndarray]  # {judge: [N]}


# ---------------------------------------------------------------------------- data, judges
def eval_prompts(recipe: EvalRecipe, tok) -> tuple[list[dict], str]:
    """Tokenised eval prompts: the held-out rows when a held-out split is set, else all rows."""
    from apactl.data import fit_prompts, load_examples, tokenize_prompts

    d = recipe.data
    train, held, report = load_examples(d, "prompt")
    held_out = d.eval_split is not None or d.eval_fraction > 0 or d.eval_rows > 0
    chosen = held if held_out else train
    items, _ = tokenize_prompts(tok, fit_prompts(tok, chosen, d), d.max_prompt_len,
                                d.on_bad_row, report.source, report)
    console.print(f"data: {report.source} ({report.format_note()}): {len(items)} "
                  f"{'held-out ' if held_out else ''}"
                  "prompts" + (f"; {report.skipped_summary()}" if report.n_skipped else ""))
    if not items:
        raise UserError(f"data.source: no usable eval prompts in {report.source}")
    return items, report.source


def build_judges(recipe: EvalRecipe, rt: Runtime) -> dict[str, Any]:
    """{report column: Judge}, loaded once for all policies."""
    from apactl.judges import build_judge

    judges = {}
    for i, j in enumerate(recipe.judges):
        try:
            judges[j.key] = build_judge(j, device=rt.device, dtype=rt.precision.frozen_dtype,
                                        field=f"judges.{i}")
        except OSError as exc:
            raise ModelError(f"judges.{i}.path: cannot load {j.path}: {first_line(exc)}") from None
    return judges


def score_samples(judges: dict[str, Any], prompts: list[dict], texts: list[str],
                  s: int) -> dict[str, np.ndarray]:
    """{judge: scores [N]} for prompt-major samples (row = prompt * s + sample)."""
    msgs = [p["messages"] for p in prompts for _ in range(s)]
    out = {}
    for key, judge in judges.items():
        scores = np.asarray(judge.score(msgs, texts), dtype=np.float64)
        if scores.shape != (len(texts),) or not np.isfinite(scores).all():
            raise UserError(f"judge {key}: expected {len(texts)} finite scores, got "
                            f"{scores.shape[0] if scores.ndim else scores} values "
                            f"({int((~np.isfinite(scores)).sum())} non-finite)")
        out[key] = scores
    return out


# --------------------------------------------------------------------------------- sampling
def _sample_chunk(model, ref, tok, rows: list[dict], spec: SamplingSpec, backend: str,
                  eos: list[int], device) -> dict[str, Any]:
    """Sample one chunk of rows; log-probs/entropy [n, T] under the policy, log-probs under ref."""
    from apactl.data import left_pad
    from apactl.rl.forward import build_sequences, policy_forward
    from apactl.sampling import sample

    pad = tok.pad_token_id
    q_ids, q_mask = left_pad([r["input_ids"] for r in rows], pad)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    resp, mask = sample(model, q_ids, q_mask, spec, eos, pad, backend)
    seq = build_sequences(q_ids, q_mask, resp, mask, pad)
    logp, ent = policy_forward(model, seq, resp, spec, with_entropy=True)
    # The policy as its own reference: reuse its log-probs, so its KL is exactly 0.
    ref_logp = logp if ref is None else policy_forward(ref, seq, resp, spec)[0]
    ids = [r[: int(m.sum())].tolist() for r, m in zip(resp.cpu(), mask.cpu())]
    ended = (torch.isin(resp, torch.tensor(eos, device=resp.device)) & mask.bool()).any(1)
    return {"logp": logp.float().cpu(), "ref": ref_logp.float().cpu(), "ent": ent.float().cpu(),
            "mask": mask.float().cpu(), "ended": ended.cpu(),
            "texts": tok.batch_decode(ids, skip_special_tokens=True)}


@torch.no_grad()
def measure(model, ref, tok, prompts: list[dict], recipe: EvalRecipe, device,
            judges: dict[str, Any] | None = None, dist: Dist | None = None) -> Measured:
    """S samples per prompt from ``model`` with the run seed; KL to ``ref`` (None: itself);
    scores by ``judges``.

    Rows are cut into chunks of ``eval.batch_size``, seeded per chunk (``Stream.EVAL``), so every
    policy draws the same random numbers, on any number of ranks.
    """
    from apactl.sampling import eos_ids

    seed_everything(recipe.run.seed)
    rows = [p for p in prompts for _ in range(recipe.eval.samples_per_prompt)]
    eos, spec = eos_ids(model, tok), SamplingSpec.from_config(recipe.generation)

    def chunk(sl: slice) -> dict[str, Any]:
        out = _sample_chunk(model, ref, tok, rows[sl], spec, recipe.generation.backend, eos,
                            device)
        out["scores"] = score_samples(judges or {}, rows[sl], out["texts"], 1)
        return out

    chunks = seeded_chunks(len(rows), recipe.eval.batch_size, chunk, recipe.run.seed,
                           Stream.EVAL, (), dist)
    cat = {k: st.as_tensor_rows([c[k] for c in chunks]) for k in ("logp", "ref", "ent", "mask")}
    per_seq = st.kl_per_sequence(cat["logp"], cat["ref"], cat["mask"])
    return Measured(
        texts=[t for c in chunks for t in c["texts"]], k1=per_seq["k1"], k3=per_seq["k3"],
        lengths=cat["mask"].sum(1).numpy(), kl=st.kl_summary(cat["logp"], cat["ref"], cat["mask"]),
        entropy=st.entropy_mean(cat["ent"], cat["mask"]),
        eos_rate=float(torch.cat([c["ended"] for c in chunks]).float().mean()),
        scores={k: np.concatenate([c["scores"][k] for c in chunks]) for k in judges or {}})


def summarize(e: Entry, m: Measured, scores: dict[str, np.ndarray],
              base_scores: dict[str, np.ndarray], recipe: EvalRecipe, n_prompts: int,
              init_is_baseline: bool) -> dict[str, Any]:
    """report.json entry of one policy: judges (mean + CI, win rate vs baseline), KL, diversity."""
    ev, seed = recipe.eval, recipe.run.seed
    shape, alpha = (n_prompts, ev.samples_per_prompt), 1 - ev.confidence
    judges = {}
    for key, s in scores.items():
        mean, lo, hi = st.bootstrap_mean_ci(s.reshape(shape), ev.bootstrap, seed, alpha)
        base = base_scores[key].reshape(shape)
        wr = st.win_rate(s.reshape(shape), base, n_boot=ev.bootstrap, seed=seed, alpha=alpha)
        d, d_lo, d_hi = st.paired_diff_ci(s.reshape(shape), base, ev.bootstrap, seed, alpha)
        judges[key] = {"mean": mean, "ci_lo": lo, "ci_hi": hi, "win_vs_baseline": wr,
                       "diff_vs_baseline": {"mean": d, "ci_lo": d_lo, "ci_hi": d_hi,
                                            "includes_zero": d_lo <= 0 <= d_hi}}
    return {
        "name": e.name, "group": e.group, "step": e.step, "path": e.path,
        "config": e.config, "seed": e.seed,
        "run": str(e.run) if e.run else None, "is_baseline": e.is_baseline,
        "init_is_baseline": init_is_baseline, "n_samples": len(m.texts), "kl": m.kl,
        "entropy": m.entropy, "length_mean": float(m.lengths.mean()), "eos_rate": m.eos_rate,
        "distinct_1": st.distinct_n(m.texts, 1), "distinct_2": st.distinct_n(m.texts, 2),
        "judges": judges,
    }


def configurations(policies: list[dict[str, Any]], recipe: EvalRecipe) -> list[dict[str, Any]]:
    """Per configuration (runs that differ only in their seed), the mean over seeds of each
    final policy's figures with a Student-t interval across seeds (n - 1 degrees of freedom):
    the spread a new seed would show, which the per-prompt bootstrap of one run cannot."""
    finals: dict[str, list[dict[str, Any]]] = {}
    for p in policies:
        if p.get("config") and "@" not in p["name"]:
            finals.setdefault(p["config"], []).append(p)
    conf = recipe.eval.confidence

    def across(values: list[float]) -> dict[str, float]:
        mean, lo, hi = st.seed_interval(values, conf)
        return {"mean": mean, "ci_lo": lo, "ci_hi": hi}

    out = []
    for label, runs in finals.items():
        judges = {k: across([r["judges"][k]["mean"] for r in runs]) for k in runs[0]["judges"]}
        diffs = {k: across([r["judges"][k]["diff_vs_baseline"]["mean"] for r in runs])
                 for k in runs[0]["judges"]}
        out.append({"config": label, "runs": [r["name"] for r in runs],
                    "seeds": [r["seed"] for r in runs], "n_seeds": len(runs),
                    "judges": judges, "diff_vs_baseline": diffs,
                    "kl_k1": across([r["kl"]["k1_mean"] for r in runs]),
                    "kl_k3": across([r["kl"]["k3_mean"] for r in runs]),
                    "entropy": across([r["entropy"] for r in runs]),
                    "length_mean": across([r["length_mean"] for r in runs]),
                    "distinct_2": across([r["distinct_2"] for r in runs])})
    return out


def sample_rows(e: Entry, prompts: list[dict], m: Measured, scores: dict[str, np.ndarray],
                s: int) -> list[dict[str, Any]]:
    """samples.jsonl lines of one policy."""
    return [{"policy": e.name, "prompt_index": i // s, "row": prompts[i // s]["row"],
             "sample": i % s, "prompt": prompts[i // s]["messages"], "response": text,
             "scores": {k: float(v[i]) for k, v in scores.items()},
             "kl_k1": float(m.k1[i]), "kl_k3": float(m.k3[i]), "length": int(m.lengths[i])}
            for i, text in enumerate(m.texts)]


def _settings(recipe: EvalRecipe, base: Entry, n_prompts: int, source: str) -> dict[str, Any]:
    return {"run_name": recipe.run.name, "data": source, "n_prompts": n_prompts,
            "samples_per_prompt": recipe.eval.samples_per_prompt, "seed": recipe.run.seed,
            "bootstrap": recipe.eval.bootstrap, "confidence": recipe.eval.confidence,
            "baseline": base.name, "baseline_ref": base.ref, "baseline_path": base.path,
            "reference": base.name,
            "judges": [j.key for j in recipe.judges],
            "judge_specs": [j.model_dump(mode="json") for j in recipe.judges],
            "generation": recipe.generation.model_dump(mode="json")}


def _policy_model(e: Entry, base: Entry, base_model, base_tok, rt: Runtime):
    """The entry's (model, tokenizer); the baseline's own objects when it is the same folder."""
    if e.is_baseline or same_model(e.path, base.path):
        return base_model, base_tok
    model, tok = load_entry(e, rt.device, rt.precision.frozen_dtype)
    if tok.get_vocab() != base_tok.get_vocab():
        raise UserError(f"{e.field}: {e.name} has another tokenizer than the baseline "
                        f"{base.name}; KL to the baseline needs the same tokenizer")
    return model, tok


def _write_plots(report: dict[str, Any], entries: list[Entry], out: Path) -> list[str]:
    from apactl.plots import frontier_configs_plot, frontier_plot, training_curves_plot

    files = [frontier_plot(report["policies"], report["settings"]["judges"],
                           out / "frontier.png").name]
    if any(c["n_seeds"] > 1 for c in report.get("configurations", [])):
        files.append(frontier_configs_plot(report["policies"], report["settings"]["judges"],
                                           out / "frontier_configs.png").name)
    runs = {e.group: read_metrics(e.run) for e in entries if e.run is not None}
    normalized = {e.group for e in entries if e.run is not None and reward_is_normalized(e.run)}
    curves = training_curves_plot(runs, out / "training_curves.png", normalized)
    return files + ([curves.name] if curves else [])


def run_eval(recipe: EvalRecipe) -> dict[str, Any]:
    """Evaluate every policy against the baseline; write the reports; return report.json."""
    with setup_run(recipe, trains=False) as rt:
        entries = [e for i, spec in enumerate(recipe.policies) for e in expand_policy(spec, i)]
        group_configs(entries)
        base = resolve_baseline(recipe, entries)
        judges = build_judges(recipe, rt)
        base_model, base_tok = load_entry(base, rt.device, rt.precision.frozen_dtype)
        check_positions(base_model, recipe.data.max_prompt_len
                        + recipe.generation.max_new_tokens,
                        "data.max_prompt_len + generation.max_new_tokens")
        prompts, source = eval_prompts(recipe, base_tok)
        policies, samples = _measure_all(recipe, rt, entries, base, (base_model, base_tok),
                                         prompts, judges)
        report = {"settings": _settings(recipe, base, len(prompts), source),
                  "policies": policies, "configurations": configurations(policies, recipe),
                  "files": ["report.json", "report.md", "samples.jsonl"]}
        rt.begin()
        if rt.is_main:  # every rank has the report; rank 0 writes it
            report = _write(report, recipe, entries, rt.output_dir, samples)
            _share(report, recipe, rt.output_dir)
    return finite(report)


def _share(report: dict[str, Any], recipe: EvalRecipe, out: Path) -> None:
    """The report to the trackers of logging.report_to, and (eval.update_model_cards) into
    the model cards of the evaluated policies."""
    from apactl.eval_report import card_section, table_rows
    from apactl.metrics import report_results

    figures = {}
    for p in report["policies"]:
        name = p["name"].replace("@", "_step")  # apa@2 -> apa_step2: MLflow refuses '@' in keys
        figures.update({f"{name}/{k}_mean": j["mean"] for k, j in p["judges"].items()})
        figures[f"{name}/kl_k1"] = p["kl"]["k1_mean"]
    report_results(out, recipe.logging, recipe.model_dump(mode="json"), figures,
                   [out / f for f in report["files"]], table_rows(report))
    if not recipe.eval.update_model_cards:
        return
    from apactl.card import update_card

    for p in report["policies"]:
        if p["is_baseline"] or "@" in p["name"]:
            continue  # name@step: a checkpoint's folder is not a model users take away
        results = [{"judge": k, "value": j["mean"], "dataset": report["settings"]["data"]}
                   for k, j in p["judges"].items() if j["mean"] is not None]
        if update_card(Path(p["path"]), p["name"], results, card_section(report, p)):
            console.print(f"model card updated: {Path(p['path']) / 'README.md'}")
        else:
            console.print(f"[yellow]warning:[/] {p['name']}: no model card in {p['path']} "
                          "(not an apactl model folder); not updated")


def _measure_all(recipe: EvalRecipe, rt: Runtime, entries: list[Entry], base: Entry, base_mt,
                 prompts: list[dict], judges) -> tuple[list[dict], list[str]]:
    """report.json's policy entries and samples.jsonl's lines, the baseline first."""
    base_model, base_tok = base_mt
    policies: list[dict[str, Any]] = []
    samples: list[str] = []
    base_scores: dict[str, np.ndarray] = {}
    s = recipe.eval.samples_per_prompt
    for k, e in enumerate([base, *entries]):
        console.print(f"eval [{k + 1}/{len(entries) + 1}] {e.name}: {e.path}")
        model, tok = _policy_model(e, base, base_model, base_tok, rt)
        m = measure(model, None if model is base_model else base_model, tok, prompts, recipe,
                    rt.device, judges, rt.dist)
        if model is not base_model:
            del model
            gc.collect()  # one policy in memory at a time
        if e.is_baseline:  # the first entry: every win rate pairs with these
            base_scores = m.scores
        policies.append(summarize(e, m, m.scores, base_scores, recipe, len(prompts),
                                  starts_at_baseline(e, base)))
        samples += [json.dumps(r) + "\n" for r in sample_rows(e, prompts, m, m.scores, s)]
    return policies, samples


def _write(report: dict[str, Any], recipe: EvalRecipe, entries: list[Entry], out: Path,
           samples: list[str]) -> dict[str, Any]:
    if recipe.eval.plots:
        report["files"] += _write_plots(report, entries, out)
    report = finite(report)
    write_file(out / "samples.jsonl", "".join(samples))
    write_file(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_file(out / "report.md", render_markdown(report))
    print_table(report)
    console.print(f"[green]eval done[/]: {out / 'report.md'}")
    return report
