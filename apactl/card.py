"""The model card (``README.md``) of every model folder a run finishes, and its eval update.

Written with ``huggingface_hub``'s ``ModelCard``/``ModelCardData``: YAML metadata the Hub reads
(``library_name``, ``base_model``, ``tags``, ``datasets``, ``pipeline_tag``, later
``model-index``), then what the run did, from the resolved recipe and its metrics. Generic over
the command: everything is read from the recipe's ``kind``, its ``algo`` section when it has one
(``apactl.trackers.algorithm``) and the metrics it logged, so a new command or algorithm gets a
card without code here. The card is written into the model folder while that folder is still
the temporary one that ``atomic.write_folder`` renames: a ``final/`` is never without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CARD = "README.md"
RECIPE = "recipe.yaml"
EVAL_START, EVAL_END = "<!-- apactl-eval:start -->", "<!-- apactl-eval:end -->"
EVAL_CONFIG = "apactl-eval"  # model-index metric config of the entries apactl eval writes
# Metrics a card shows first when the run logged them; then every other train/* and eval/*.
KEY_METRICS = ("reward/score_mean", "kl/ref_k1", "policy/entropy", "response/length_mean",
               "train/loss", "train/accuracy")
HIDDEN = ("train/lr", "train/critic_lr", "train/grad_norm")
# Longer names of the algorithms apactl knows; any other is shown as its recipe name.
NAMES = {"sft": "supervised fine-tuning (loss on response tokens)",
         "rm": "Bradley-Terry reward modelling", "apa": "APA (Advantage-Induced Policy Alignment)",
         "ppo": "PPO (clipped policy gradient)", "awr": "AWR (advantage-weighted regression)",
         "dpo": "DPO (Direct Preference Optimization)",
         "grpo": "GRPO (group-relative policy optimisation)",
         "rloo": "RLOO (REINFORCE leave-one-out)"}
# Roles of a model folder: what it is, how transformers loads it, its Hub pipeline.
ROLES = {
    "policy": ("a language model (policy)", "AutoModelForCausalLM", "text-generation"),
    "reward": ("a reward model: one scalar score per sequence (the last token's)",
               "AutoModelForSequenceClassification", "text-classification"),
    "value": ("a value model (the critic trained beside the policy): it estimates the return "
              "of a partial response at every token; it is not a reward model",
              "AutoModelForSequenceClassification", "text-classification"),
}


@dataclass
class CardFacts:
    """What a card says about one model folder of a run."""

    recipe: dict[str, Any]  # the resolved recipe
    role: str  # a key of ROLES
    start: str | None  # the model reference training started from (name_or_path)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl rows
    rows: dict[str, int] = field(default_factory=dict)  # {"train": n, "held_out": m}
    wall_s: float | None = None
    resumed_from: int | None = None  # the checkpoint step this process resumed


# ----------------------------------------------------------------------------- metadata
def base_model(ref: str | None, depth: int = 0) -> str | None:
    """The hub id a model reference ultimately starts from: a hub id itself, an alias's
    source, or (for a local model or apactl run folder) its card's ``base_model`` or its
    recipe's start, followed up to 5 runs back; None when unknown (a random model)."""
    from apactl.models.refs import ALIASES, TINY_RANDOM, run_final_model
    from apactl.sources import looks_local

    if not ref or depth > 5 or ref.lower() == TINY_RANDOM:
        return None
    alias = ALIASES.get(ref.lower())
    if alias is not None:
        return alias.hub_id
    if not looks_local(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.is_dir():
        return None
    for folder in (path, run_final_model(path, "causal"), path / "final"):
        if folder is not None and (folder / CARD).is_file():
            found = _card_base(folder / CARD)
            if found:
                return found
    for run in (path, path.parent, path.parent.parent):  # run folder, final/, final/policy
        start = _recipe_start(run / RECIPE)
        if start:
            return base_model(start, depth + 1)
    return None


def _card_base(path: Path) -> str | None:
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(path).data.base_model
    except Exception:  # noqa: BLE001 - someone else's README: no metadata to follow
        return None
    return value if isinstance(value, str) else None


def _recipe_start(path: Path) -> str | None:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return start_of(data) if isinstance(data, dict) else None


def start_of(recipe: dict[str, Any]) -> str | None:
    """The model a recipe trains from: ``model.name_or_path`` (sft, rm, ...) or
    ``policy.name_or_path`` (align)."""
    for section in ("model", "policy"):
        ref = (recipe.get(section) or {}).get("name_or_path")
        if isinstance(ref, str):
            return ref
    return None


def hub_dataset(recipe: dict[str, Any]) -> str | None:
    from apactl.sources import looks_local

    source = (recipe.get("data") or {}).get("source")
    return source if isinstance(source, str) and not looks_local(source) else None


def card_data(facts: CardFacts):
    from huggingface_hub import ModelCardData

    from apactl.trackers import algorithm

    algo = algorithm(facts.recipe)
    tags = ["apactl", "rlhf", algo] + (["value-model"] if facts.role == "value" else []) \
        + (["reward-model"] if facts.role == "reward" else [])
    dataset = hub_dataset(facts.recipe)
    return ModelCardData(library_name="transformers", base_model=base_model(facts.start),
                         tags=list(dict.fromkeys(tags)), datasets=[dataset] if dataset else None,
                         pipeline_tag=ROLES[facts.role][2])


# --------------------------------------------------------------------------------- text
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "null" if v is None else str(v)


def _settings(section: Any) -> str:
    if not isinstance(section, dict):
        return ""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in section.items()
                     if not isinstance(v, (dict, list)) and k != "name")


def _latest(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], int | None]:
    latest: dict[str, Any] = {}
    for r in rows:
        latest.update(r)
    return latest, latest.get("step")


def _metric_table(latest: dict[str, Any], keys: list[str]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    return lines + [f"| `{k}` | {_fmt(latest[k])} |" for k in keys]


def card_text(facts: CardFacts) -> str:
    """The markdown body (below the metadata)."""
    import torch
    import transformers

    from apactl import __version__
    from apactl.trackers import algorithm

    r, role = facts.recipe, facts.role
    kind, algo = r.get("kind", "run"), algorithm(r)
    what, auto_class, _ = ROLES[role]
    run_name = (r.get("run") or {}).get("name", "run")
    command = f"apactl {kind} {RECIPE}"
    lines = [f"# {run_name}: {algo.upper()} {role}", "",
             f"This is {what}, trained by apactl (RLHF toolkit: APA, PPO, AWR, GRPO, RLOO, "
             f"DPO) with `{command}`. The resolved recipe that reproduces the run is "
             f"[{RECIPE}]({RECIPE}), beside this card.", "", "## How it was made", ""]
    facts_lines = [f"- **Command**: `{command}` ({kind})"]
    algo_section = r.get("algo")
    # The algorithm's settings: align's `algo`, else a section named after the command (a
    # `dpo:` section of a dpo recipe), else a `loss` section (rm's margin).
    settings = _settings(algo_section) or _settings(r.get(kind)) or _settings(r.get("loss"))
    facts_lines.append(f"- **Algorithm**: {NAMES.get(algo, algo)}"
                       + (f"; {settings}" if settings else ""))
    train = r.get("train") or {}
    keys = ("lr", "iterations", "rollout_batch_size", "minibatch_size", "epochs_per_rollout",
            "epochs", "max_steps", "batch_size", "freeze_bottom_layers")
    facts_lines.append("- **Training settings**: " + ", ".join(
        f"{k}={_fmt(train[k])}" for k in keys if train.get(k) is not None))
    if "kl" in r:
        facts_lines.append(f"- **KL to the reference**: {_settings(r['kl'])}")
    if facts.start:
        base = base_model(facts.start)
        facts_lines.append(f"- **Started from**: `{facts.start}`"
                           + (f" (base model: `{base}`)" if base and base != facts.start else ""))
    facts_lines.append(_data_line(r, facts.rows))
    reward = r.get("reward")
    if isinstance(reward, dict):
        facts_lines.append(f"- **Reward**: {_judge(reward)}"
                           + (f", normalised={reward.get('normalize')}"
                              if "normalize" in reward else ""))
    judges = r.get("eval_judges") or []
    if judges:
        facts_lines.append("- **Held-out judges (never trained on)**: "
                           + "; ".join(_judge(j) for j in judges))
    latest, last_step = _latest(facts.metrics)
    if "iterations" in train:
        episodes = train["iterations"] * train.get("rollout_batch_size", 0)
        facts_lines.append(f"- **Iterations**: {train['iterations']} ({episodes} episodes)")
    elif last_step is not None:
        facts_lines.append(f"- **Optimizer steps**: {last_step}")
    if facts.wall_s is not None:
        resumed = (f" (this process, resumed from step {facts.resumed_from})"
                   if facts.resumed_from is not None else "")
        facts_lines.append(f"- **Wall time**: {facts.wall_s:.0f} s{resumed}")
    facts_lines.append(f"- **Versions**: apactl {__version__}, torch {torch.__version__}, "
                       f"transformers {transformers.__version__}")
    lines += facts_lines
    shown = [k for k in KEY_METRICS if k in latest]
    shown += sorted(k for k in latest if k.startswith("train/") and k not in shown
                    and k not in HIDDEN)
    if shown and role != "value":
        lines += ["", f"## Final training metrics (step {last_step})", "",
                  *_metric_table(latest, shown)]
    held = sorted(k for k in latest if k.startswith("eval/"))
    if held and role != "value":
        lines += ["", "## Held-out evaluation during training", "", *_metric_table(latest, held)]
    lines += ["", "## How to load", "", "```python",
              f"from transformers import {auto_class}, AutoTokenizer",
              f'model = {auto_class}.from_pretrained("PATH_OR_REPO_ID")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_ID")', "```", ""]
    return "\n".join(lines)


def _judge(j: dict[str, Any]) -> str:
    name = j.get("label") or j.get("name")
    return f"`{name}`" + (f" (`{j['path']}`)" if j.get("path") else "")


def _data_line(r: dict[str, Any], rows: dict[str, int]) -> str:
    d = r.get("data") or {}
    where = ", ".join(f"{k}={d[k]}" for k in ("subset", "data_dir", "split")
                      if d.get(k) and hub_dataset(r))  # a local file has no splits
    line = f"- **Data**: `{d.get('source')}`" + (f" ({where})" if where else "")
    if rows:
        line += f": {rows.get('train', 0)} training rows used, {rows.get('held_out', 0)} held out"
    return line


def write_card(folder: Path, facts: CardFacts) -> None:
    """``README.md`` (the card) and ``recipe.yaml`` into the model folder ``folder``."""
    import yaml
    from huggingface_hub import ModelCard

    card = ModelCard(f"---\n{card_data(facts).to_yaml()}\n---\n\n{card_text(facts)}")
    card.save(Path(folder) / CARD)
    (Path(folder) / RECIPE).write_text(yaml.safe_dump(facts.recipe, sort_keys=False))


# -------------------------------------------------------------------------- eval update
def update_card(folder: Path, model_name: str, results: list[dict[str, Any]],
                section: str) -> bool:
    """Add ``apactl eval`` results to the card in ``folder``: ``model-index`` entries (one per
    judge: ``{"judge", "value", "dataset"}``) and the markdown ``section`` (replacing the one an
    earlier eval wrote). False when the folder has no card. Atomic (temp file + rename)."""
    from huggingface_hub import EvalResult, ModelCard

    from apactl.atomic import write_file

    path = Path(folder) / CARD
    if not path.is_file():
        return False
    card = ModelCard.load(path)
    data = card.data
    # Entries an earlier apactl eval wrote are replaced; anyone else's are kept.
    kept = [e for e in (data.eval_results or [])
            if e.metric_config != EVAL_CONFIG]
    data.eval_results = kept + [
        EvalResult(task_type="text-generation", dataset_type=r["dataset"],
                   dataset_name=r["dataset"], metric_type=r["judge"],
                   metric_name=f"{r['judge']} (mean score)", metric_value=r["value"],
                   metric_config=EVAL_CONFIG) for r in results]
    data.model_name = data.model_name or model_name
    text = card.text
    if EVAL_START in text and EVAL_END in text:
        head, rest = text.split(EVAL_START, 1)
        text = head + rest.split(EVAL_END, 1)[1].lstrip("\n")
    text = text.rstrip("\n") + f"\n\n{EVAL_START}\n{section.rstrip()}\n{EVAL_END}\n"
    write_file(path, f"---\n{data.to_yaml()}\n---\n{text}")
    return True
