"""Typed recipes: YAML -> OmegaConf (with ``key=value`` overrides) -> pydantic.

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error, not a silently
ignored key. Cross-field checks live on the model that owns the fields. Nothing here imports torch:
``apactl recipe validate`` must be instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "run"
    output_dir: str = "apactl-runs/run"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # fp32 is the CPU default: bf16 matmul has no native support on most CPUs (about 100x slower).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    num_threads: PositiveInt | None = None
    deterministic: bool = False
    # Seconds a rank waits in a collective (all-reduce, barrier) before the job fails. It only
    # bounds a hang when the launcher does not tear the job down itself (torchrun and accelerate
    # launch do, as soon as one rank exits non-zero); long enough for rank 0 to save a
    # checkpoint while the others wait.
    dist_timeout_s: PositiveInt = 600
    # ddp: every rank holds the whole model. fsdp (sft only): weights, gradients and optimizer
    # state sharded over the ranks (torch FSDP2), for models that do not fit on one device.
    strategy: Literal["ddp", "fsdp"] = "ddp"


# ------------------------------------------------------------------------------------- model
class LoraConfig(Section):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: Fraction = 0.0
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


class ModelConfig(Section):
    name_or_path: str = "smollm2-135m-instruct"
    tokenizer: str | None = None  # defaults to name_or_path
    revision: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    cache_dir: str | None = None  # where dequantised GGUF copies are cached


# -------------------------------------------------------------------------------------- data
class FieldMap(Section):
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"


class DataConfig(Section):
    # A local file (.jsonl/.json/.parquet/.csv, optionally .gz) or a hub dataset id.
    source: str
    subset: str | None = None
    data_dir: str | None = None
    split: str = "train"
    # auto: detect from the columns of the first row.
    format: Literal["auto", "sft", "chat", "preference", "hh", "prompt"] = "auto"
    fields: FieldMap = Field(default_factory=FieldMap)
    skip_rows: NonNegInt = 0  # drop the first N source rows (e.g. the rows an RM trained on)
    max_rows: PositiveInt | None = None
    # Held-out split: a named split, a fraction, or a count of rows taken from the end.
    eval_split: str | None = None
    eval_fraction: Fraction = 0.0
    eval_rows: NonNegInt = 0
    max_prompt_len: PositiveInt = 256
    max_len: PositiveInt = 512
    on_bad_row: Literal["error", "skip"] = "error"
    # Prompts over max_prompt_len: "error" (a bad row) or "drop_turns" (drop the oldest dialogue
    # turns until it fits; the final user turn is kept).
    truncate_prompt: Literal["error", "drop_turns"] = "error"
    packing: bool = False
    # A system message put before every prompt that has none. None: the chat template's own
    # default (SmolLM2's adds a 16-token "You are a helpful AI assistant named SmolLM..." to
    # every prompt); "" : an empty system turn, the shortest prompts.
    system: str | None = None

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        held_out = [self.eval_split is not None, self.eval_fraction > 0, self.eval_rows > 0]
        if sum(held_out) > 1:
            raise ValueError("set only one of eval_split, eval_fraction, eval_rows")
        if self.max_prompt_len >= self.max_len:
            raise ValueError(
                f"max_prompt_len ({self.max_prompt_len}) must be < max_len ({self.max_len}) "
                "to leave room for a response"
            )
        if self.eval_fraction >= 1:
            raise ValueError("eval_fraction must be < 1")
        return self


# ------------------------------------------------------------------------------------- train
class TrainConfig(Section):
    lr: PositiveFloat = 2e-5
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_steps: NonNegInt = 0
    warmup_ratio: Fraction = 0.0
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None  # optimizer steps; overrides epochs
    batch_size: PositiveInt = 8  # sequences per optimizer step
    grad_accum: PositiveInt = 1  # micro-batch = batch_size / grad_accum
    max_grad_norm: PositiveFloat | None = 1.0
    eval_every: NonNegInt = 0  # optimizer steps; 0 = only at the end
    save_every: NonNegInt = 0  # optimizer steps; 0 = only at the end
    log_every: PositiveInt = 1
    keep_checkpoints: PositiveInt = 2
    freeze_bottom_layers: NonNegInt = 0
    eval_batch_size: PositiveInt | None = None
    # Batch examples of similar length (within windows of 50 batches): less padding, same data.
    group_by_length: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be divisible by "
                f"grad_accum ({self.grad_accum})"
            )
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set only one of warmup_steps and warmup_ratio")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def check_world_size(self, world_size: int) -> None:
        """batch_size is global: it must split into grad_accum x world_size micro-batches."""
        _check_split("train.batch_size", self.batch_size, self.grad_accum, world_size)

    def derived(self, world_size: int = 1) -> dict[str, int]:
        self.check_world_size(world_size)
        return {
            "world_size": world_size,
            "global_batch_size": self.batch_size,
            "micro_batch_size_per_rank": self.batch_size // (self.grad_accum * world_size),
            "grad_accum_per_rank": self.grad_accum,
            "sequences_per_rank_per_step": self.batch_size // world_size,
        }


def _check_split(field: str, total: int, accum: int, world_size: int) -> None:
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if total % (accum * world_size):
        raise ValueError(
            f"{field}: {total} is not divisible by grad_accum ({accum}) x world size "
            f"({world_size}); the batch is global and is split into equal micro-batches"
        )


class LoggingConfig(Section):
    tensorboard: bool = True
    progress: bool = True


class RecipeBase(Section):
    kind: str
    run: RunConfig = Field(default_factory=RunConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------- sft / rm
class SFTRecipe(RecipeBase):
    kind: Literal["sft"] = "sft"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class RMLossConfig(Section):
    margin: float = 0.0  # loss = -log sigmoid(r_chosen - r_rejected - margin)


class RMRecipe(RecipeBase):
    kind: Literal["rm"] = "rm"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: RMLossConfig = Field(default_factory=RMLossConfig)


# ------------------------------------------------------------------------------------ align
class GenerationConfig(Section):
    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    top_k: NonNegInt = 0  # 0 = disabled
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    # Prompts per generate() call (a "chunk"; chunk j is sampled by rank j % world size with a
    # seed derived from (run.seed, iteration, j)). None: rollout_batch_size / world size (one
    # chunk per rank). Set it to make the samples independent of the world size.
    batch_size: PositiveInt | None = None
    # CPU only: decode with weight-major matmuls (W @ x^T), ~1.5x faster per step at small
    # batch on MKL; same results up to float summation order. False: plain F.linear.
    weight_major_matmul: bool = True
    # "apactl": a plain KV-cache sampling loop (same tokens as generate(), less per-step
    # overhead); "transformers": model.generate() (models with exotic caches).
    loop: Literal["apactl", "transformers"] = "apactl"


class RewardConfig(Section):
    # "reward-model" (a sequence-classifier folder) or a registered programmatic judge.
    judge: str = "reward-model"
    name_or_path: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the judge
    normalize: bool = True  # reward models: use the mean/std saved by `apactl rm`
    clip: PositiveFloat | None = None  # clip the (normalised) score to [-clip, clip]
    batch_size: PositiveInt = 16

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        from apactl.judges import check_judge

        check_judge(self.judge, self.name_or_path)
        return self


class CriticConfig(Section):
    init: Literal["reward", "policy"] = "reward"
    lr: PositiveFloat | None = None  # None: same as train.lr
    clip: PositiveFloat | None = None  # PPO-style value clipping range
    warmup_iterations: NonNegInt = 0  # iterations that train only the critic
    freeze_bottom_layers: NonNegInt | None = None  # None: same as train.freeze_bottom_layers


class KLConfig(Section):
    # None: the algorithm's default (0 for APA/AWR whose KL control is through lam; 0.05 for PPO).
    beta: NonNegFloat | None = None
    adaptive: bool | None = None
    target: PositiveFloat = 6.0
    horizon: PositiveInt = 10000


class GAEConfig(Section):
    gamma: Fraction = 1.0
    lam: Fraction = 0.95
    whiten: bool = True


class APAConfig(Section):
    """APA (Zhu et al. 2023): mean_t (logp_t - anchor_t - A_t / lam)^2."""

    name: Literal["apa"] = "apa"
    lam: PositiveFloat = 0.1  # the paper's 1/lambda = 10
    anchor: Literal["init", "old"] = "init"
    vf_coef: NonNegFloat = 1.0
    default_beta: ClassVar[float] = 0.0
    default_adaptive: ClassVar[bool] = False


class PPOConfig(Section):
    """PPO clipped surrogate (Schulman et al. 2017)."""

    name: Literal["ppo"] = "ppo"
    clip_eps: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # 0.5 for PPO: the critic has its own parameters and optimizer, so the coefficient only
    # rescales critic gradients (before clipping); 0.5 is the common CleanRL/OpenAI default.
    vf_coef: NonNegFloat = 0.5
    default_beta: ClassVar[float] = 0.05
    default_adaptive: ClassVar[bool] = True


class AWRConfig(Section):
    """AWR (Peng et al. 2019): -mean_t min(exp(A_t / lam), max_weight) * logp_t."""

    name: Literal["awr"] = "awr"
    lam: PositiveFloat = 1.0
    max_weight: PositiveFloat = 20.0
    vf_coef: NonNegFloat = 1.0
    default_beta: ClassVar[float] = 0.0
    default_adaptive: ClassVar[bool] = False


AlgoConfig = Annotated[APAConfig | PPOConfig | AWRConfig, Field(discriminator="name")]


class AlignTrainConfig(Section):
    iterations: PositiveInt = 100
    rollout_batch_size: PositiveInt = 16  # episodes generated per iteration
    minibatch_size: PositiveInt = 8  # episodes per optimizer step
    grad_accum: PositiveInt = 1
    epochs_per_rollout: PositiveInt = 1
    lr: PositiveFloat = 1e-5
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: NonNegInt = 0
    max_grad_norm: PositiveFloat | None = 1.0
    freeze_bottom_layers: NonNegInt = 0
    eval_every: NonNegInt = 0
    save_every: NonNegInt = 0
    keep_checkpoints: PositiveInt = 2
    forward_batch_size: PositiveInt | None = None  # scoring micro-batch; None = minibatch/accum
    # Compute the frozen bottom (embeddings + freeze_bottom_layers) once per rollout: shared by
    # policy and reference (and a critic initialised from the policy), cached for the update,
    # which then runs the top layers only. Costs episodes x length x hidden floats per model.
    reuse_frozen_trunk: bool = True

    @model_validator(mode="after")
    def _check(self) -> AlignTrainConfig:
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(
                f"rollout_batch_size ({self.rollout_batch_size}) must be divisible by "
                f"minibatch_size ({self.minibatch_size})"
            )
        if self.minibatch_size % self.grad_accum:
            raise ValueError(
                f"minibatch_size ({self.minibatch_size}) must be divisible by "
                f"grad_accum ({self.grad_accum})"
            )
        return self

    def check_world_size(self, world_size: int) -> None:
        """rollout_batch_size and minibatch_size are global; micro-batches are split over ranks."""
        _check_split("train.minibatch_size", self.minibatch_size, self.grad_accum, world_size)

    def derived(self, world_size: int = 1) -> dict[str, int]:
        self.check_world_size(world_size)
        steps = self.rollout_batch_size // self.minibatch_size * self.epochs_per_rollout
        out = {
            "episodes_per_iteration": self.rollout_batch_size,
            "optimizer_steps_per_iteration": steps,
            "micro_batch_size": self.minibatch_size // (self.grad_accum * world_size),
            "total_episodes": self.rollout_batch_size * self.iterations,
            "total_optimizer_steps": steps * self.iterations,
        }
        if world_size > 1:
            out = {"world_size": world_size, **out,
                   "episodes_per_rank_per_iteration": self.rollout_batch_size // world_size,
                   "micro_batches_per_rank_per_step": self.grad_accum}
        return out

    def forward_batch(self, world_size: int = 1) -> int:
        """Scoring micro-batch: the update's micro-batch unless forward_batch_size is set."""
        return self.forward_batch_size or max(
            self.minibatch_size // (self.grad_accum * world_size), 1)


class AlignRecipe(RecipeBase):
    kind: Literal["align"] = "align"
    policy: ModelConfig = Field(default_factory=ModelConfig)
    reward: RewardConfig
    critic: CriticConfig = Field(default_factory=CriticConfig)
    data: DataConfig
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    gae: GAEConfig = Field(default_factory=GAEConfig)
    algo: AlgoConfig = Field(default_factory=APAConfig)
    train: AlignTrainConfig = Field(default_factory=AlignTrainConfig)

    @model_validator(mode="after")
    def _critic_source(self) -> AlignRecipe:
        if self.critic.init == "reward" and self.reward.judge != "reward-model":
            raise ValueError(
                "critic.init: 'reward' needs a reward-model judge to copy; set critic.init=policy"
            )
        return self

    @model_validator(mode="after")
    def _algo_defaults(self) -> AlignRecipe:
        # Resolve the KL defaults from the algorithm so `recipe show` prints what will run.
        if self.kl.beta is None:
            self.kl.beta = type(self.algo).default_beta
        if self.kl.adaptive is None:
            self.kl.adaptive = type(self.algo).default_adaptive
        return self


# ------------------------------------------------------------------------------------- eval
class PolicySpec(Section):
    name: str
    # An HF model folder, an apactl run folder (its final/policy), an alias or a hub id. Existence
    # is checked when `apactl eval` runs, not by `recipe validate` (see _path_fields).
    path: str
    checkpoints: bool = False  # evaluate every checkpoint of a run folder too (as name@step)


class JudgeSpec(Section):
    name: str  # "reward-model" or a registered programmatic judge, e.g. "sentiment"
    path: str | None = None  # reward-model folder
    args: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None  # column name in reports; default: name
    normalize: bool = False  # reward models: use the mean/std saved by `apactl rm`

    @model_validator(mode="after")
    def _check(self) -> JudgeSpec:
        from apactl.judges import check_judge

        check_judge(self.name, self.path)
        return self

    @property
    def key(self) -> str:
        """The judge's column name in reports."""
        return self.label or self.name


class EvalConfig(Section):
    samples_per_prompt: PositiveInt = 1
    bootstrap: PositiveInt = 1000  # bootstrap resamples (over prompts) per interval
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    batch_size: PositiveInt = 16  # sequences per generation / scoring chunk
    plots: bool = True


class EvalRecipe(RecipeBase):
    kind: Literal["eval"] = "eval"
    policies: list[PolicySpec] = Field(min_length=1)
    # Also the reference of the KL. Default: the initial policy of the first policy that is an
    # apactl run folder (policy.name_or_path in its recipe.yaml).
    baseline: PolicySpec | None = None
    # Held-out prompts: with eval_rows/eval_fraction/eval_split set, the held-out rows; else all
    # rows (up to max_rows).
    data: DataConfig
    judges: list[JudgeSpec] = Field(min_length=1)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _names(self) -> EvalRecipe:
        names = [p.name for p in self.policies] + ([self.baseline.name] if self.baseline else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"policy names must be unique (the baseline's too): "
                             f"{', '.join(repeated)}")
        if any("@" in n for n in names):
            raise ValueError("policy names cannot contain '@' (it marks checkpoints: name@step)")
        keys = [j.key for j in self.judges]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"judge names must be unique; set judges[].label to tell "
                             f"{', '.join(repeated)} apart")
        if self.baseline is not None and self.baseline.checkpoints:
            raise ValueError("baseline.checkpoints: the baseline is one model; list the run "
                             "under policies to evaluate its checkpoints")
        return self

    def with_judges(self, names: list[str]) -> EvalRecipe:
        """``--judge`` on the command line: keep the recipe's judges named (or labelled) in
        ``names``; add a registered judge the recipe lacks if it needs no path."""
        from apactl.judges import JUDGES, available

        kept: list[JudgeSpec] = []
        problems = []
        for name in dict.fromkeys(names):
            found = [j for j in self.judges if name in (j.name, j.label)]
            if found:
                kept += [j for j in found if j not in kept]
            elif name not in JUDGES:
                problems.append(f"--judge {name}: unknown judge; available judges: {available()}")
            elif JUDGES[name].needs_path:
                problems.append(f"--judge {name}: this judge needs a path; add it to the "
                                f"recipe's judges with a path")
            else:
                kept.append(JudgeSpec(name=name))
        if problems:
            raise RecipeError(problems)
        return self.model_copy(update={"judges": kept})


# ------------------------------------------------------------------------------------ label
class LabelConfig(Section):
    samples: Annotated[int, Field(ge=2)] = 2  # responses sampled per prompt
    max_prompts: PositiveInt | None = None  # label at most this many (training) prompts
    min_margin: NonNegFloat = 0.0  # drop pairs whose judge gap is <= this
    batch_size: PositiveInt = 16
    # "best-worst": one pair per prompt (its best and worst response); "all": every pair of
    # responses with a gap > min_margin (up to samples*(samples-1)/2 pairs per prompt, for the
    # same sampling cost).
    pairs: Literal["best-worst", "all"] = "best-worst"


class LabelRecipe(RecipeBase):
    """Sample responses from a model and let a judge pick chosen/rejected (RLAIF-style)."""

    kind: Literal["label"] = "label"
    policy: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig  # prompts; with a held-out split only the training part is labelled
    judge: JudgeSpec
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)


RECIPES: dict[str, type[RecipeBase]] = {
    "sft": SFTRecipe,
    "rm": RMRecipe,
    "align": AlignRecipe,
    "eval": EvalRecipe,
    "label": LabelRecipe,
}


# ----------------------------------------------------------------------------------- loading
class RecipeError(Exception):
    """A user error in a recipe: ``problems`` are one-line messages naming the dotted path."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # Drop the discriminator tag pydantic inserts for the union member (algo.apa.lam).
        if len(loc) >= 2 and loc[0] == "algo" and loc[1] in ("apa", "ppo", "awr"):
            loc = [loc[0]] + loc[2:]
        path = ".".join(loc) or "<recipe>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if loc and loc[0] == "algo":
                msg += " for this algorithm (keys of another algo.name?)"
        elif e["type"] == "union_tag_invalid":
            msg = "unknown algorithm; expected one of: apa, ppo, awr"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(
            e["input"], (dict, list)
        ):
            msg += f", got {e['input']!r}"
        problems.append(f"{path}: {msg}")
    return problems


def load_raw(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Read YAML and merge dotted ``key=value`` overrides (OmegaConf syntax)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    p = Path(path)
    if not p.is_file():
        raise RecipeError([f"recipe: file not found: {p}"])
    try:
        base = OmegaConf.load(p)
    except Exception as exc:  # yaml errors carry multi-line context; keep the first line
        raise RecipeError([f"recipe: cannot parse {p}: {str(exc).splitlines()[0]}"]) from None
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise RecipeError([f"override {o!r}: expected key=value" for o in bad])
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        # e.g. a list index into a mapping (policies.0.path=...) raises TypeError in OmegaConf.
        raise RecipeError([f"override: {str(exc).splitlines()[0]}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"recipe: {p} must be a mapping at the top level"])
    return data


def parse_recipe(data: dict[str, Any], kind: str | None = None,
                 check_files: bool = True) -> RecipeBase:
    """Validate a raw mapping; ``kind`` (the command) must agree with the recipe's ``kind``."""
    rkind = data.get("kind", kind)
    if rkind is None:
        raise RecipeError([f"kind: missing; expected one of: {', '.join(RECIPES)}"])
    if rkind not in RECIPES:
        raise RecipeError([f"kind: unknown recipe kind {rkind!r}; expected one of: "
                           f"{', '.join(RECIPES)}"])
    if kind is not None and rkind != kind:
        raise RecipeError([f"kind: this is a {rkind!r} recipe, but the command runs {kind!r}"])
    data = {**data, "kind": rkind}
    try:
        recipe = RECIPES[rkind].model_validate(data)
    except ValidationError as err:
        raise RecipeError(_format_errors(err)) from None
    problems = check_paths(recipe) if check_files else []
    if problems:
        raise RecipeError(problems)
    return recipe


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), kind: str | None = None,
    check_files: bool = True,
) -> RecipeBase:
    """YAML + overrides -> a validated recipe; ``check_files=False`` skips missing-file checks
    (for pipelines whose later stages read files the earlier stages write)."""
    return parse_recipe(load_raw(path, overrides), kind, check_files)


_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".gguf", ".txt")
BUILTIN = "builtin:"


def builtin_data() -> dict[str, Path]:
    """Datasets shipped inside the package, usable as ``data.source: builtin:NAME``."""
    folder = Path(__file__).parent / "assets" / "data"
    return {p.name.split(".")[0]: p for p in sorted(folder.glob("*.jsonl"))}


def resolve_source(ref: str) -> str:
    """``builtin:NAME`` -> the shipped file's path; anything else unchanged."""
    if ref.startswith(BUILTIN):
        name = ref[len(BUILTIN):]
        files = builtin_data()
        if name not in files:
            raise RecipeError([f"data.source: unknown built-in dataset {name!r}; available: "
                               f"{', '.join(files) or 'none'}"])
        return str(files[name])
    return ref


def looks_local(ref: str) -> bool:
    """A reference is a local path if it exists, starts like a path or has a file suffix."""
    parts = Path(ref).parts
    return (
        ref.startswith(BUILTIN)
        or Path(ref).exists()
        or ref.startswith((".", "/", "~"))
        or ref.endswith(_LOCAL_SUFFIXES)
        # Hub ids are "owner/name": deeper paths, or our own run folders, are local.
        or len(parts) > 2
        or (len(parts) > 1 and (parts[0] == "apactl-runs" or Path(parts[0]).is_dir()))
    )


def check_paths(recipe: RecipeBase) -> list[str]:
    """Missing local files are reported before any model loads."""
    problems = []
    for dotted, value in _path_fields(recipe):
        if value and value.startswith(BUILTIN):
            try:
                resolve_source(value)
            except RecipeError as exc:
                problems += exc.problems
        elif value and looks_local(value) and not Path(value).expanduser().exists():
            problems.append(f"{dotted}: file not found: {value}")
    return problems


def _path_fields(recipe: RecipeBase) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    data = getattr(recipe, "data", None)
    if data is not None:
        out.append(("data.source", data.source))
    judge = getattr(recipe, "judge", None)
    if judge is not None and judge.path:
        out.append(("judge.path", judge.path))
    for section in ("model", "policy"):
        m = getattr(recipe, section, None)
        if m is not None:
            out.append((f"{section}.name_or_path", m.name_or_path))
    if isinstance(recipe, AlignRecipe) and recipe.reward.name_or_path:
        out.append(("reward.name_or_path", recipe.reward.name_or_path))
    if isinstance(recipe, EvalRecipe):
        # Eval policies are usually run folders that other commands create first (apactl align),
        # so a shipped eval recipe must validate before they exist: `apactl eval` checks
        # policies.N.path when it runs. The baseline and judge paths are checked here.
        if recipe.baseline is not None:
            out.append(("baseline.path", recipe.baseline.path))
        out += [(f"judges.{i}.path", j.path) for i, j in enumerate(recipe.judges)]
    return out


def recipe_to_yaml(recipe: RecipeBase) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema(kind: str) -> dict[str, Any]:
    if kind not in RECIPES:
        raise RecipeError([f"kind: unknown recipe kind {kind!r}; expected one of: "
                           f"{', '.join(RECIPES)}"])
    return RECIPES[kind].model_json_schema()
