"""A fuzz of bad recipes and overrides over every command: each must exit 2 with one line per
problem naming the field, no traceback, and nothing written (the output folder never appears).

(The data-file fuzz is tests/test_data_fuzz.py; runtime faults are in tests/test_reliability.py.)
"""

from __future__ import annotations

import pytest
from helpers import TINY, cli

KINDS = ("sft", "rm", "align", "eval", "label", "dpo")

# (override, text the error line must contain): wrong for every kind.
COMMON = [
    ("nope=1", "nope: unknown key"),
    ("run.nope=1", "run.nope: unknown key"),
    ("runn.seed=1", "runn: unknown key; did you mean run?"),
    ("run.seed=abc", "run.seed"),
    ("run.device=tpu", "run.device"),
    ("run.dtype=int8", "run.dtype"),
    ("run.mixed_precision=maybe", "run.mixed_precision"),
    ("run.num_threads=0", "run.num_threads"),
    ("run.num_threads=true", "run.num_threads: expected a number, not a boolean"),
    ("run.seed=-1", "run.seed: Input should be greater than or equal to 0"),
    ("run.dist_timeout_s=-5", "run.dist_timeout_s"),
    ("logging.progress=sometimes", "logging.progress"),
    ("logging.nope=1", "logging.nope: unknown key"),
    ("data.source=[a", "override 'data.source=[a'"),
    ("data.nope=1", "data.nope: unknown key"),
    ("data.format=xml", "data.format"),
    ("data.on_bad_row=ignore", "data.on_bad_row"),
    ("data.source=./missing.jsonl", "data.source: file not found"),
    ("data.source=builtin:nope", "data.source: unknown built-in dataset"),
    ("data.eval_fraction=1.5", "data.eval_fraction"),
    ("data.eval_rows=-3", "data.eval_rows"),
    ("data.max_len=-1", "data.max_len"),
    ("data.max_prompt_len=400", "max_prompt_len (400) must be < max_len"),
    ("data.truncate_prompt=cut", "data.truncate_prompt"),
    ("data.fields.nope=x", "data.fields.nope: unknown key"),
    ("run.dtype=float32", None),  # a valid override: the case list's control (exit 0 check off)
]
TRAIN = [  # sft and rm
    ("train.lr=-1", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=3", "must be divisible by grad_accum (3)"),
    ("train.schedule=exp", "train.schedule"), ("train.epochs=0", "train.epochs"),
    ("train.max_grad_norm=-1", "train.max_grad_norm"),
    ("train.warmup_ratio=2", "train.warmup_ratio"), ("trian.lr=1", "did you mean train?"),
    ("model.lora.r=0", "model.lora.r"), ("model.lora.dropout=2", "model.lora.dropout"),
    ("model.name_or_path=./nope", "model.name_or_path: file not found"),
    ("run.strategy=zero", "run.strategy"), ("kind=eval", "kind: this is a 'eval' recipe"),
    ("train.save_every=0", "train.save_every: expected a period > 0"),
    ("train.lr=inf", "train.lr: Input should be a finite number"),
    ("train.lr=true", "train.lr: expected a number, not a boolean"),
]
SPECIFIC = {
    "rm": [("loss.margin=abc", "loss.margin"), ("loss.nope=1", "loss.nope: unknown key"),
           ("loss.margin=nan", "loss.margin: Input should be a finite number")],
    "sft": [("data.packing=perhaps", "data.packing")],
    "align": [
        ("algo.name=trpo", "algo.name: unknown algorithm"), ("algo.lam=-1", "algo.lam"),
        ("algo.clip_eps=0.2", "algo.clip_eps: unknown key for this algorithm"),
        ("kl.target=0", "kl.target"), ("gae.gamma=2", "gae.gamma"), ("gae.lam=-0.5", "gae.lam"),
        ("generation.temperature=0", "generation.temperature"),
        ("generation.temperature=inf", "generation.temperature: Input should be a finite"),
        ("algo.lam=inf", "algo.lam: Input should be a finite number"),
        ("kl.beta=inf", "kl.beta: Input should be a finite number"),
        ("train.lr=nan", "train.lr: Input should be a finite number"),
        ("train.save_every=0", "train.save_every: expected a period > 0"),
        ("generation.top_k=5", "generation.top_k: align samples the full"),
        ("generation.top_p=0.9", "generation.top_p: align samples the full"),
        ("generation.backend=vllm", "generation.backend"),
        ("generation.weight_major_matmul=true", "weight_major_matmul: removed"),
        ("critic.init=reward", "critic.init: 'reward' needs a reward-model judge"),
        ("critic.clip=-1", "critic.clip"), ("reward.name=nope", "unknown judge 'nope'"),
        ("reward.judge=sentiment", "judge: renamed"),
        ("reward.args={nope: 1}", "judge 'char-fraction': unknown args nope"),
        ("train.minibatch_size=7", "must be divisible by minibatch_size (7)"),
        ("train.iterations=0", "train.iterations"),
        ("train.iterations=1e12", "train.iterations"),
        ("eval_judges=[{name: nope}]", "eval_judges.0"),
        ("policy.name_or_path=./nope", "policy.name_or_path: file not found"),
        ("kind=sft", "kind: this is a 'sft' recipe"),
    ],
    "eval": [
        ("policies=[]", "policies"), ("judges=[]", "judges"),
        ("eval.confidence=1.5", "eval.confidence"), ("eval.bootstrap=0", "eval.bootstrap"),
        ("judges=[{name: nope}]", "judges.0"), ("judges=[{name: length, role: boss}]",
                                                "judges.0.role"),
        ("judges=[{name: length}, {name: length}]", "judge names must be unique"),
        ("baseline.path=./nope", "baseline.path: file not found"),
        ("policies=[{name: a@b, path: x}]", "cannot contain '@'"),
        ("generation.top_p=0", "generation.top_p"),
        ("run.strategy=fsdp", "fsdp shards what trains (sft, rm, align, dpo), not eval"),
    ],
    "dpo": [
        ("train.lr=-1", "train.lr"), ("train.grad_accum=3", "must be divisible by grad_accum (3)"),
        ("train.precompute_reference=maybe", "train.precompute_reference"),
        ("dpo.beta=0", "dpo.beta"), ("dpo.loss=hinge", "dpo.loss"),
        ("dpo.nope=1", "dpo.nope: unknown key"), ("reference.nope=1", "reference.nope"),
        ("reference.path=./nope", "reference.path: file not found"),
        ("policy.lora.r=0", "policy.lora.r"),
        ("policy.name_or_path=./nope", "policy.name_or_path: file not found"),
        ("kind=rm", "kind: this is a 'rm' recipe"),
    ],
    "label": [
        ("label.samples=1", "label.samples"), ("label.pairs=some", "label.pairs"),
        ("judge.name=nope", "judge"), ("judge.args={chars: 5, nope: 2}", "unknown args nope"),
        ("label.min_margin=-1", "label.min_margin"),
        ("run.strategy=fsdp", "fsdp shards what trains (sft, rm, align, dpo), not label"),
        ("policy.name_or_path=./nope", "policy.name_or_path: file not found"),
    ],
}


def cases():
    for kind in KINDS:
        extra = TRAIN if kind in ("sft", "rm") else []
        for override, expected in COMMON + extra + SPECIFIC.get(kind, []):
            if expected is not None:
                yield pytest.param(kind, override, expected, id=f"{kind}:{override}")


CASES = list(cases())


def test_the_fuzz_is_large():
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize("kind, override, expected", CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, kind, override, expected):
    out = tmp_path / "out"
    res = cli(kind, TINY / f"{kind}.yaml", f"run.output_dir={out}", override)
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and all(ln.startswith("error: ") for ln in lines), lines
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ every float, inf and nan
def _float_fields(model, prefix: str = "", extra: tuple[str, ...] = ()):
    """(dotted key, overrides that make it valid to set) of every float field of a schema,
    nested sections and each member of a discriminated union (algo) included."""
    import types
    import typing

    from pydantic import BaseModel

    def walk(ann, key, extra):
        args = typing.get_args(ann)
        if ann is float:
            yield key, extra
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            tag = ann.model_fields.get("name")
            if tag is not None and typing.get_origin(tag.annotation) is typing.Literal:
                extra = (*extra, f"{key}.name={typing.get_args(tag.annotation)[0]}")
            yield from _float_fields(ann, f"{key}.", extra)
        elif typing.get_origin(ann) in (typing.Union, types.UnionType, typing.Annotated):
            for a in args:
                yield from walk(a, key, extra)
        # lists (judges, policies): their element schemas are walked where they are a section

    for name, f in model.model_fields.items():
        yield from walk(f.annotation, f"{prefix}{name}", extra)


def float_cases():
    from apactl.config import RECIPES

    for kind in KINDS:
        for key, extra in dict(_float_fields(RECIPES[kind])).items():
            for value in ("inf", "-inf", "nan"):
                yield pytest.param(kind, key, extra, value, id=f"{kind}:{key}={value}")


FLOAT_CASES = list(float_cases())


def test_every_float_field_is_walked():
    keys = {(c.values[0], c.values[1]) for c in FLOAT_CASES}
    assert {("align", "algo.lam"), ("align", "algo.clip_eps"), ("align", "kl.beta"),
            ("align", "reward.clip"), ("rm", "loss.margin"), ("eval", "eval.confidence"),
            ("label", "label.min_margin"), ("sft", "model.lora.alpha")} <= keys, sorted(keys)


@pytest.mark.parametrize("kind, key, extra, value", FLOAT_CASES)
def test_non_finite_numbers_are_refused_naming_the_field(kind, key, extra, value):
    from apactl.errors import RecipeError
    from apactl.recipe import load_recipe

    with pytest.raises(RecipeError) as err:
        load_recipe(TINY / f"{kind}.yaml", [*extra, f"{key}={value}"], check_files=False)
    assert err.value.problems == [f"{key}: Input should be a finite number, got '{value}'"], \
        err.value.problems
