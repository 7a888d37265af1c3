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
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from apactl import eval_stats as st
from apactl.checkpoint import list_checkpoints, seed_everything
from apactl.config import EvalRecipe, ModelConfig, PolicySpec, looks_local
from apactl.distributed import Dist, chunk_seed
from apactl.errors import UserError
from apactl.metrics import console, read_metrics
from apactl.models import ModelError, resolve_model_ref
from apactl.runtime import Runtime, setup_run


@dataclass
class Entry:
    """One model to evaluate: a policy, one checkpoint of a policy run, or the baseline."""

    name: str  # report name; checkpoints are "name@step"
    path: str  # what load_policy gets: a model folder, an alias or a hub id
    field: str  # the recipe key it came from (error messages)
    group: str  # the PolicySpec name: a run's checkpoints share it and are joined in plots
    step: int | None = None
    run: Path | None = None  # the apactl run folder (recipe.yaml, metrics.jsonl)
    init: str | None = None  # the run's initial policy: policy.name_or_path of its recipe.yaml
    is_baseline: bool = False
    ref: str | None = None  # the reference as the recipe wrote it (before resolution)


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


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------------- policies
def _run_meta(run: Path | None) -> dict[str, Any]:
    if run is None:
        return {}
    return yaml.safe_load((run / "recipe.yaml").read_text()) or {}


def _resolve(ref: str, field: str) -> str:
    try:
        return resolve_model_ref(ref)
    except ModelError as exc:
        raise ModelError(f"{field}: {_first_line(exc)}") from None


def expand_policy(spec: PolicySpec, i: int) -> list[Entry]:
    """A PolicySpec -> its entries: the checkpoints (when asked, in step order), then the model
    itself. A run's last checkpoint is skipped when final/policy holds the same weights."""
    field = f"policies.{i}.path"
    path = Path(spec.path).expanduser()
    # Checked here rather than by `recipe validate`: see EvalRecipe's _path_fields comment.
    if looks_local(spec.path) and not path.exists():
        raise UserError(f"{field}: not found: {spec.path}")
    run = path if path.is_dir() and (path / "recipe.yaml").is_file() else None
    meta = _run_meta(run)
    ckpts = list_checkpoints(run) if spec.checkpoints and run is not None else []
    if spec.checkpoints and run is None:
        raise UserError(f"policies.{i}.checkpoints: {spec.path} is not an apactl run folder "
                        "(no recipe.yaml)")
    try:
        final: str | None = resolve_model_ref(spec.path)
    except ModelError as exc:
        if not ckpts:
            raise ModelError(f"{field}: {_first_line(exc)}") from None
        final = None  # an unfinished run: its checkpoints only
    final_step = (meta.get("train") or {}).get("iterations") if final else None
    common = dict(field=field, group=spec.name, run=run,
                  init=(meta.get("policy") or {}).get("name_or_path"))
    entries = []
    for ck in ckpts:
        step = int(ck.name.split("-")[1])
        if step != final_step:
            entries.append(Entry(f"{spec.name}@{step}", str(ck / "policy"), step=step, **common))
    if final is not None:
        entries.append(Entry(spec.name, final, step=final_step, **common))
    return entries


def resolve_baseline(recipe: EvalRecipe, entries: list[Entry]) -> Entry:
    """``recipe.baseline``, else the initial policy of the first policy run."""
    if recipe.baseline is not None:
        b = recipe.baseline
        return Entry(b.name, _resolve(b.path, "baseline.path"), "baseline.path", b.name,
                     is_baseline=True, ref=b.path)
    for e in entries:
        if e.init:
            taken = {x.group for x in entries}
            name = "baseline" if "baseline" not in taken else "baseline-init"
            field = f"baseline (policy.name_or_path of {e.run / 'recipe.yaml'})"
            return Entry(name, _resolve(e.init, field), field, name, is_baseline=True,
                         ref=e.init)
    raise UserError("baseline: not set, and no policy is an apactl run folder naming its initial "
                    "policy; set baseline: {name: ..., path: ...}")


def _same_model(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _starts_at_baseline(e: Entry, base: Entry) -> bool:
    if not e.init:
        return False
    try:
        return _same_model(resolve_model_ref(e.init), base.path)
    except ModelError:  # the run's initial model is gone: nothing to connect
        return False


def load_entry(e: Entry, rt: Runtime):
    """(model, tokenizer), frozen in eval mode; load failures name the recipe key."""
    from apactl.models import load_policy

    try:
        return load_policy(ModelConfig(name_or_path=e.path), rt.device, rt.dtype,
                           trainable=False)
    except (OSError, ValueError, ModelError) as exc:
        raise ModelError(f"{e.field}: cannot load {e.path}: {_first_line(exc)}") from None


# ---------------------------------------------------------------------------- data, judges
def eval_prompts(recipe: EvalRecipe, tok) -> tuple[list[dict], str]:
    """Tokenised eval prompts: the held-out rows when a held-out split is set, else all rows."""
    from apactl.data import fit_prompts, load_examples, tokenize_prompts

    d = recipe.data
    train, held, report = load_examples(d, "prompt")
    held_out = d.eval_split is not None or d.eval_fraction > 0 or d.eval_rows > 0
    chosen = held if held_out else train
    items, skipped = tokenize_prompts(tok, fit_prompts(tok, chosen, d), d.max_prompt_len,
                                      d.on_bad_row, report.source)
    skipped += report.n_skipped
    console.print(f"data: {report.source}: {len(items)} {'held-out ' if held_out else ''}"
                  f"prompts" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    if not items:
        raise UserError(f"data.source: no usable eval prompts in {report.source}")
    return items, report.source


def build_judges(recipe: EvalRecipe, rt: Runtime) -> dict[str, Any]:
    """{report column: Judge}, loaded once for all policies."""
    from apactl.judges import make_judge

    judges = {}
    for i, j in enumerate(recipe.judges):
        # Only pass `normalize` when set: a custom judge factory need not accept it.
        args = {**j.args, **({"normalize": True} if j.normalize else {})}
        try:
            judges[j.key] = make_judge(j.name, j.path, args, device=rt.device, dtype=rt.dtype,
                                       batch_size=recipe.eval.batch_size)
        except (OSError, ModelError) as exc:
            raise ModelError(f"judges.{i}.path: cannot load {j.path}: {_first_line(exc)}") from None
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
def _sample_chunk(model, ref, tok, rows: list[dict], recipe: EvalRecipe, eos: list[int],
                  device) -> dict[str, Any]:
    """Sample one chunk of rows; log-probs/entropy [n, T] under the policy, log-probs under ref."""
    from apactl.data import left_pad
    from apactl.generation import sample
    from apactl.rl.scoring import build_sequences, policy_forward

    gen, pad = recipe.generation, tok.pad_token_id
    q_ids, q_mask = left_pad([r["input_ids"] for r in rows], pad)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    resp, mask = sample(model, q_ids, q_mask, gen, eos, pad)
    seq = build_sequences(q_ids, q_mask, resp, mask, pad)
    logp, ent = policy_forward(model, seq, resp, gen.temperature, with_entropy=True)
    # The policy as its own reference: reuse its log-probs, so its KL is exactly 0.
    ref_logp = logp if ref is None else policy_forward(ref, seq, resp, gen.temperature)[0]
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

    Rows are cut into chunks of ``eval.batch_size``; chunk j is sampled with a seed derived from
    (run.seed, j), so every policy draws the same random numbers, on any number of ranks (chunk j
    runs on rank j % world_size; every rank gets all the chunks back).
    """
    from apactl.generation import eos_ids

    dist = dist or Dist()
    seed_everything(recipe.run.seed)
    rows = [p for p in prompts for _ in range(recipe.eval.samples_per_prompt)]
    eos, step = eos_ids(model, tok), recipe.eval.batch_size
    mine = {}
    for j, i in enumerate(range(0, len(rows), step)):
        if dist.owns(j):
            torch.manual_seed(chunk_seed(recipe.run.seed, 3, j))
            chunk = _sample_chunk(model, ref, tok, rows[i:i + step], recipe, eos, device)
            chunk["scores"] = score_samples(judges or {}, rows[i:i + step], chunk["texts"], 1)
            mine[j] = chunk
    chunks = dist.gather_chunks(mine)
    cat = {k: st.as_tensor_rows([c[k] for c in chunks]) for k in ("logp", "ref", "ent", "mask")}
    per_seq = st.kl_per_sequence(cat["logp"], cat["ref"], cat["mask"])
    return Measured(
        texts=[t for c in chunks for t in c["texts"]], k1=per_seq["k1"], k3=per_seq["k3"],
        lengths=cat["mask"].sum(1).numpy(), kl=st.kl_summary(cat["logp"], cat["ref"], cat["mask"]),
        entropy=st.entropy_mean(cat["ent"], cat["mask"]),
        eos_rate=float(torch.cat([c["ended"] for c in chunks]).float().mean()),
        scores={k: np.concatenate([c["scores"][k] for c in chunks]) for k in judges or {}})


# ---------------------------------------------------------------------------------- summary
def summarize(e: Entry, m: Measured, scores: dict[str, np.ndarray],
              base_scores: dict[str, np.ndarray], recipe: EvalRecipe, n_prompts: int,
              init_is_baseline: bool) -> dict[str, Any]:
    """report.json entry of one policy: judges (mean + CI, win rate vs baseline), KL, diversity."""
    ev, seed = recipe.eval, recipe.run.seed
    shape, alpha = (n_prompts, ev.samples_per_prompt), 1 - ev.confidence
    judges = {}
    for key, s in scores.items():
        mean, lo, hi = st.bootstrap_mean_ci(s.reshape(shape), ev.bootstrap, seed, alpha)
        wr = st.win_rate(s.reshape(shape), base_scores[key].reshape(shape), n_boot=ev.bootstrap,
                         seed=seed, alpha=alpha)
        judges[key] = {"mean": mean, "ci_lo": lo, "ci_hi": hi, "win_vs_baseline": wr}
    return {
        "name": e.name, "group": e.group, "step": e.step, "path": e.path,
        "run": str(e.run) if e.run else None, "is_baseline": e.is_baseline,
        "init_is_baseline": init_is_baseline, "n_samples": len(m.texts), "kl": m.kl,
        "entropy": m.entropy, "length_mean": float(m.lengths.mean()), "eos_rate": m.eos_rate,
        "distinct_1": st.distinct_n(m.texts, 1), "distinct_2": st.distinct_n(m.texts, 2),
        "judges": judges,
    }


def sample_rows(e: Entry, prompts: list[dict], m: Measured, scores: dict[str, np.ndarray],
                s: int) -> list[dict[str, Any]]:
    """samples.jsonl lines of one policy."""
    return [{"policy": e.name, "prompt_index": i // s, "row": prompts[i // s]["row"],
             "sample": i % s, "prompt": prompts[i // s]["messages"], "response": text,
             "scores": {k: float(v[i]) for k, v in scores.items()},
             "kl_k1": float(m.k1[i]), "kl_k3": float(m.k3[i]), "length": int(m.lengths[i])}
            for i, text in enumerate(m.texts)]


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: they become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ----------------------------------------------------------------------------------- tables
def _num(x: float | None, fmt: str = ".3g") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, fmt)


def _label(p: dict[str, Any]) -> str:
    return p["name"] + ("" if not p["is_baseline"] or "baseline" in p["name"] else " (baseline)")


def _judge_cells(p: dict[str, Any], key: str) -> tuple[str, str]:
    """("mean [lo, hi]", "win% [lo, hi] (ties%)") of one judge; no win rate for the baseline."""
    j = p["judges"][key]
    w = j["win_vs_baseline"]
    mean = f"{_num(j['mean'])} [{_num(j['ci_lo'])}, {_num(j['ci_hi'])}]"
    if p["is_baseline"]:
        return mean, "—"
    return mean, f"{w['win_rate']:.0%} [{w['ci_lo']:.0%}, {w['ci_hi']:.0%}] ({w['tie_rate']:.0%})"


def _kl_cell(p: dict[str, Any], k: str) -> str:
    return f"{_num(p['kl'][f'{k}_mean'])} ± {_num(p['kl'][f'{k}_se'], '.2g')}"


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) of report.md's table: one row per policy, the baseline first."""
    keys = report["settings"]["judges"]
    ci = f"{round(report['settings']['confidence'] * 100)}% CI"
    headers = ["policy"]
    for k in keys:
        headers += [f"{k} mean [{ci}]", f"{k} win vs baseline [{ci}] (ties)"]
    headers += ["KL k1 ± se", "KL k3 ± se", "entropy", "tokens", "distinct-1", "distinct-2"]
    rows = []
    for p in report["policies"]:
        row = [_label(p)] + [c for k in keys for c in _judge_cells(p, k)]
        row += [_kl_cell(p, "k1"), _kl_cell(p, "k3"), _num(p["entropy"]),
                _num(p["length_mean"], ".1f"), _num(p["distinct_1"], ".3f"),
                _num(p["distinct_2"], ".3f")]
        rows.append(row)
    return headers, rows


def render_markdown(report: dict[str, Any]) -> str:
    s, g = report["settings"], report["settings"]["generation"]
    headers, rows = table_rows(report)
    lines = [
        f"# apactl eval: {s['run_name']}", "",
        f"- prompts: {s['n_prompts']} from `{s['data']}`, {s['samples_per_prompt']} sample(s) "
        f"each; every policy uses sampling seed {s['seed']}",
        f"- baseline and KL reference: **{s['baseline']}** (`{s['baseline_ref']}`)",
        f"- sampling: temperature {g['temperature']}, top_k {g['top_k']}, top_p {g['top_p']}, "
        f"max_new_tokens {g['max_new_tokens']}",
        f"- intervals: percentile bootstrap over prompts ({s['bootstrap']} resamples); win rate "
        "= wins / pairs with the baseline's sample on the same prompt and sample index, ties "
        "counted apart; KL in nats per response ± standard error; entropy in nats per token; "
        "tokens = mean response length in tokens", "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
        *("| " + " | ".join(r) + " |" for r in rows), "",
    ]
    plots = [f for f in ("frontier.png", "training_curves.png") if f in report["files"]]
    if plots:
        lines += ["Plots: " + ", ".join(f"[{f}]({f})" for f in plots), ""]
    return "\n".join(lines)


def print_table(report: dict[str, Any]) -> None:
    """A compact console table: a judge's mean and win rate share one two-line cell."""
    from rich.table import Table

    keys = report["settings"]["judges"]
    ci = round(report["settings"]["confidence"] * 100)
    table = Table(title=f"apactl eval: {report['settings']['run_name']} (mean [{ci}% CI] / "
                  f"win rate vs baseline [{ci}% CI] (ties))")
    table.add_column("policy", no_wrap=True)
    for k in keys:
        table.add_column(k)
    for h in ("KL k1", "entropy", "tokens", "distinct-1/2"):
        table.add_column(h, justify="right")
    for p in report["policies"]:
        judges = ["\n".join(_judge_cells(p, k)) for k in keys]
        table.add_row(_label(p), *judges, _kl_cell(p, "k1"), _num(p["entropy"]),
                      _num(p["length_mean"], ".1f"),
                      f"{_num(p['distinct_1'], '.2f')}/{_num(p['distinct_2'], '.2f')}")
    console.print(table)


# -------------------------------------------------------------------------------------- run
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
    if e.is_baseline or _same_model(e.path, base.path):
        return base_model, base_tok
    model, tok = load_entry(e, rt)
    if tok.get_vocab() != base_tok.get_vocab():
        raise UserError(f"{e.field}: {e.name} has another tokenizer than the baseline "
                        f"{base.name}; KL to the baseline needs the same tokenizer")
    return model, tok


def _write_plots(report: dict[str, Any], entries: list[Entry], out: Path) -> list[str]:
    from apactl.plots import frontier_plot, training_curves_plot

    files = [frontier_plot(report["policies"], report["settings"]["judges"],
                           out / "frontier.png").name]
    runs = {e.group: read_metrics(e.run) for e in entries if e.run is not None}
    curves = training_curves_plot(runs, out / "training_curves.png")
    return files + ([curves.name] if curves else [])


def run_eval(recipe: EvalRecipe) -> dict[str, Any]:
    """Evaluate every policy against the baseline; write the reports; return report.json."""
    rt = setup_run(recipe)
    main = rt.is_main
    entries = [e for i, spec in enumerate(recipe.policies) for e in expand_policy(spec, i)]
    base = resolve_baseline(recipe, entries)
    judges = build_judges(recipe, rt)
    base_model, base_tok = load_entry(base, rt)
    prompts, source = eval_prompts(recipe, base_tok)
    out, s = rt.output_dir, recipe.eval.samples_per_prompt
    samples_path = out / "samples.jsonl"
    if main:
        samples_path.write_text("")
    policies: list[dict[str, Any]] = []
    base_scores: dict[str, np.ndarray] = {}
    for k, e in enumerate([base, *entries]):
        console.print(f"eval [{k + 1}/{len(entries) + 1}] {e.name}: {e.path}")
        model, tok = _policy_model(e, base, base_model, base_tok, rt)
        m = measure(model, None if model is base_model else base_model, tok, prompts, recipe,
                    rt.device, judges, rt.dist)
        if model is not base_model:
            del model
            gc.collect()  # one policy in memory at a time
        scores = m.scores
        if e.is_baseline:  # the first entry: every win rate pairs with these
            base_scores = scores
        policies.append(summarize(e, m, scores, base_scores, recipe, len(prompts),
                                  _starts_at_baseline(e, base)))
        if main:
            with samples_path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in sample_rows(e, prompts, m, scores, s))
    report = {"settings": _settings(recipe, base, len(prompts), source), "policies": policies,
              "files": ["report.json", "report.md", "samples.jsonl"]}
    if not main:  # every rank has the report; rank 0 writes it
        return _finite(report)
    if recipe.eval.plots:
        report["files"] += _write_plots(report, entries, out)
    report = _finite(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    print_table(report)
    console.print(f"[green]eval done[/]: {out / 'report.md'}")
    return report
