"""Typed recipes: YAML -> OmegaConf (with ``key=value`` overrides) -> pydantic.

Every section is a pydantic model with ``extra="forbid"`` so a typo is an error, not a silently
ignored key. Cross-field checks live on the model that owns the fields. Nothing here imports torch:
``apactl recipe validate`` must be instant.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1: run.num_threads=true would mean one thread.
    if isinstance(value, bool):
        raise ValueError("expected a number, not a boolean")
    return value


def _not_zero(value: Any) -> Any:
    if value == 0 and not isinstance(value, bool):
        raise ValueError("expected a period > 0 (unset it, or null, to save only at the end)")
    return value


NotBool = BeforeValidator(_not_bool)
Float = Annotated[float, NotBool]
PositiveInt = Annotated[int, NotBool, Field(gt=0)]
NonNegInt = Annotated[int, NotBool, Field(ge=0)]
PositiveFloat = Annotated[float, NotBool, Field(gt=0)]
NonNegFloat = Annotated[float, NotBool, Field(ge=0)]
Fraction = Annotated[float, NotBool, Field(ge=0, le=1)]
# Every N steps; None (unset) = only at the end. 0 is refused: "every 0 steps" means nothing.
Period = Annotated[PositiveInt | None, BeforeValidator(_not_zero)]


class Section(BaseModel):
    # allow_inf_nan=False: no float of a recipe may be inf or nan (temperature=inf, lam=inf
    # used to run to exit 0; lr=inf failed only at run time, blaming train.lr).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------- run
class RunConfig(Section):
    name: str = "run"
    output_dir: str = "apactl-runs/run"
    seed: NonNegInt = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The compute dtype. auto: bfloat16 on a CUDA device that has it, else float32 (bf16 matmul
    # has no native support on most CPUs: about 100x slower there).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # How trained weights are kept when the compute dtype is 16-bit. bf16/fp16: fp32 master
    # weights and optimizer state, forward/backward under autocast, frozen weights stored in the
    # compute dtype (fp16 adds a loss scaler). no: every weight stored in run.dtype ("pure
    # bf16": half the memory, but AdamW updates below bf16's resolution round away, so small
    # learning rates do not move the weights). auto: the mixed mode matching run.dtype when it
    # is 16-bit on CUDA, else no.
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    num_threads: PositiveInt | None = None
    deterministic: bool = False
    # Seconds a rank waits in a collective (all-reduce, barrier) before the job fails. It only
    # bounds a hang when the launcher does not tear the job down itself (torchrun and accelerate
    # launch do, as soon as one rank exits non-zero); long enough for rank 0 to save a
    # checkpoint while the others wait.
    dist_timeout_s: PositiveInt = 600
    # ddp: every rank holds the whole model. fsdp: weights, gradients and optimizer
    # state sharded over the ranks (torch FSDP2), for models that do not fit on one device.
    strategy: Literal["ddp", "fsdp"] = "ddp"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` must mean "no".
        return "no" if v is False else v

    @model_validator(mode="after")
    def _precision(self) -> RunConfig:
        expected = {"bf16": "bfloat16", "fp16": "float16"}.get(self.mixed_precision)
        if expected and self.dtype not in ("auto", expected):
            raise ValueError(f"mixed_precision {self.mixed_precision} computes in {expected}, "
                             f"but dtype is {self.dtype}; set run.dtype={expected} or auto")
        return self


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
    # on_bad_row=skip stops the run when more than this fraction of the rows read are bad
    # (malformed rows; prompts over max_prompt_len are not counted): a mostly-bad file is the
    # wrong file or the wrong format, not one to train on what is left of.
    max_bad_fraction: Fraction = 0.1
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
        if self.max_rows is not None and self.eval_rows >= self.max_rows:
            # Caught here, before any model loads: a small max_rows with a recipe's eval_rows.
            raise ValueError(f"eval_rows ({self.eval_rows}) must be < max_rows "
                             f"({self.max_rows}): the held-out rows are the last eval_rows of "
                             "the max_rows read; pass a smaller data.eval_rows")
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
    save_every: Period = None  # optimizer steps; None = only at the end
    log_every: PositiveInt = 1
    # Checkpoints kept while the run goes on; 0: only the newest, and none once final/ is
    # written (a finished run can then not be extended with --resume; saves disk).
    keep_checkpoints: NonNegInt = 2
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


TRACKERS = ("tensorboard", "wandb", "mlflow")


class LoggingConfig(Section):
    """Where metrics go besides metrics.jsonl (always written): ``report_to`` trackers.

    ``tensorboard`` is the older switch, kept: ``false`` takes tensorboard out of report_to,
    ``true`` puts it in; once applied it is null (report_to alone says where metrics go).
    """

    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = Field(
        default_factory=lambda: ["tensorboard"])
    tensorboard: bool | None = None
    # W&B project / MLflow experiment. Unset: the tracker's own setting (WANDB_PROJECT,
    # MLFLOW_EXPERIMENT_NAME) when there is one, else "apactl".
    project: str | None = None
    # W&B group / MLflow tag apactl.group: the runs of one `apactl sweep` (it sets this).
    group: str | None = None
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _resolve_trackers(cls, data: Any) -> Any:
        # A "before" validator: assigning fields after validation would re-validate forever.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        report = data.get("report_to", ["tensorboard"])
        if isinstance(report, str):  # report_to: wandb
            report = [report]
        if not isinstance(report, list):
            return data  # the field's own check names the problem
        report = list(dict.fromkeys(report))
        tb = data.get("tensorboard")
        if "none" in report and len(report) > 1:
            raise ValueError("report_to: 'none' cannot be combined with a tracker")
        if "none" in report and tb is True:
            raise ValueError("tensorboard: true, but report_to is none")
        if tb is False and "tensorboard" in report:
            report.remove("tensorboard")
        elif tb is True and "tensorboard" not in report:
            report.append("tensorboard")
        data["report_to"] = report or ["none"]
        if isinstance(tb, bool):
            data["tensorboard"] = None  # applied: report_to alone says where metrics go
        return data

    @property
    def trackers(self) -> list[str]:
        """The trackers asked for, in report_to order (``none`` is no tracker)."""
        return [t for t in self.report_to if t != "none"]


class RecipeBase(Section):
    kind: str
    run: RunConfig = Field(default_factory=RunConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    # Commands whose training loop can shard a model (run.strategy: fsdp).
    shardable: ClassVar[bool] = False

    @property
    def unused_sections(self) -> tuple[str, ...]:
        """Sections this run does not use, left out of its resolved recipe.yaml (a recipe that
        sets them is refused, so the written file must not)."""
        return ()

    @model_validator(mode="after")
    def _strategy(self) -> RecipeBase:
        if self.run.strategy == "fsdp":
            if not self.shardable:
                raise ValueError(f"run.strategy: fsdp shards what trains (sft, rm, align, dpo), "
                                 f"not {self.kind}; use ddp")
            for section in ("model", "policy"):
                if getattr(getattr(self, section, None), "lora", None) is not None:
                    raise ValueError(f"run.strategy: fsdp is not combined with {section}.lora; "
                                     "use ddp")
        return self


# --------------------------------------------------------------------------------- sft / rm
class SFTRecipe(RecipeBase):
    kind: Literal["sft"] = "sft"
    shardable: ClassVar[bool] = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)


class RMLossConfig(Section):
    margin: Float = 0.0  # loss = -log sigmoid(r_chosen - r_rejected - margin)


class RMRecipe(RecipeBase):
    kind: Literal["rm"] = "rm"
    shardable: ClassVar[bool] = True
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    loss: RMLossConfig = Field(default_factory=RMLossConfig)


# -------------------------------------------------------------------------------------- dpo
class ReferenceConfig(Section):
    # The frozen model the policy's log-ratios are taken against. None: the initial policy
    # (with policy.lora, the policy with its adapter disabled: no second copy in memory).
    path: str | None = None


class DPOConfig(Section):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), with h the chosen minus the
    rejected log-ratio to the reference; ipo (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2."""

    beta: PositiveFloat = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"


class DPOTrainConfig(TrainConfig):
    # batch_size counts pairs. Reference log-probs computed once per pair before training and
    # kept for the run: an epoch then costs one policy forward/backward per pair and no
    # reference forward (the reference model is freed once they are computed). Off: the
    # reference scores every micro-batch (same numbers, a third more compute).
    precompute_reference: bool = True


class DPORecipe(RecipeBase):
    kind: Literal["dpo"] = "dpo"
    shardable: ClassVar[bool] = True
    policy: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    train: DPOTrainConfig = Field(default_factory=DPOTrainConfig)


# ------------------------------------------------------------------------------------ align
class GenerationConfig(Section):
    """How responses are sampled: the distribution (temperature, top_k, top_p) and its cost.

    The distribution is the ``SamplingSpec`` of ``apactl.sampling``, the one object that both
    samples and scores; how the decode runs on a device is chosen there (``backend: auto``).
    """

    max_new_tokens: PositiveInt = 64
    temperature: PositiveFloat = 1.0
    top_k: NonNegInt = 0  # 0 = disabled
    top_p: Annotated[float, NotBool, Field(gt=0, le=1)] = 1.0
    # Prompts per generate() call (a "chunk"; chunk j is sampled by rank j % world size with a
    # seed derived from (run.seed, iteration, j)). None: rollout_batch_size / world size (one
    # chunk per rank). Set it to make the samples independent of the world size.
    batch_size: PositiveInt | None = None
    # auto: the fastest decode for the device (CPU: apactl's KV-cache loop with weight-major
    # matmuls; CUDA: a static cache replayed as a CUDA graph); "transformers": model.generate()
    # (models with exotic caches). Every backend samples the same distribution.
    backend: Literal["auto", "transformers"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("loop", "weight_major_matmul"):
                if key in data:
                    raise ValueError(f"{key}: removed; the decode is chosen per device "
                                     "(generation.backend: auto | transformers)")
        return data


class AlignGenerationConfig(GenerationConfig):
    """align's sampling: ``generation`` plus the answers drawn per prompt."""

    # k answers per prompt: a rollout is rollout_batch_size / k prompts x k answers, the k of a
    # prompt sampled in one decode call (one chunk: generation.batch_size counts prompts) and
    # kept together, so group baselines (advantage: group | leave_one_out) see whole groups.
    samples_per_prompt: PositiveInt = 1


class JudgeSpec(Section):
    """One judge of (prompt, response) pairs, the same schema wherever a judge is named.

    ``name``: a registered judge (``apactl.judges``: "reward-model", "sentiment", ...) or an
    import path ``package.module:factory`` of your own (called with ``**args``).
    """

    name: str
    path: str | None = None  # reward-model folder
    args: dict[str, Any] = Field(default_factory=dict)  # keyword arguments of the judge
    label: str | None = None  # column name in reports; default: name
    # What the judge is to the policies compared: "proxy" (the reward the RL optimised), "gold"
    # (the labeller the proxy learned from: trusted, but not independent), "held-out" (neither).
    role: Literal["proxy", "gold", "held-out"] | None = None
    # Reward models: use the mean/std saved by `apactl rm` (other judges ignore it).
    normalize: bool = False
    batch_size: PositiveInt = 16  # texts per reward-model forward

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict):
            old = [k for k in ("judge", "name_or_path") if k in data]
            if old:
                raise ValueError(f"{' and '.join(old)}: renamed; a judge is "
                                 "{name, path, args, normalize, batch_size} everywhere "
                                 "(judge -> name, name_or_path -> path)")
        return data

    @model_validator(mode="after")
    def _check(self) -> JudgeSpec:
        from apactl.judges import check_judge

        check_judge(self.name, self.path, self.args)
        return self

    @property
    def key(self) -> str:
        """The judge's column name in reports."""
        return self.label or self.name


class RewardConfig(JudgeSpec):
    """The judge whose score align maximises (usually the proxy reward model)."""

    name: str = "reward-model"
    normalize: bool = True  # reward models: scores in units of the RM's std over its data
    clip: PositiveFloat | None = None  # clip the (normalised) score to [-clip, clip]


class CriticConfig(Section):
    # "reward": the reward model's weights and head; "policy": the policy's backbone and a new
    # head; or a path: a critic saved by an earlier run (<run>/final/critic), warm-started.
    init: str = "reward"
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
    # gae: the paper's (a critic); group / leave_one_out: critic-free, the baseline of A is the
    # other answers to the same prompt (generation.samples_per_prompt >= 2).
    advantage: Literal["gae", "group", "leave_one_out"] = "gae"
    scale: Literal["group", "batch", "none"] = "group"  # advantage: group only (as GRPO's)
    default_beta: ClassVar[float] = 0.0
    default_adaptive: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = False


class PPOConfig(Section):
    """PPO clipped surrogate (Schulman et al. 2017)."""

    name: Literal["ppo"] = "ppo"
    clip_eps: Annotated[float, NotBool, Field(gt=0, lt=1)] = 0.2
    # 0.5 for PPO: the critic has its own parameters and optimizer, so the coefficient only
    # rescales critic gradients (before clipping); 0.5 is the common CleanRL/OpenAI default.
    vf_coef: NonNegFloat = 0.5
    advantage: ClassVar[str] = "gae"
    default_beta: ClassVar[float] = 0.05
    default_adaptive: ClassVar[bool] = True
    kl_in_loss: ClassVar[bool] = False


class AWRConfig(Section):
    """AWR (Peng et al. 2019): -mean_t min(exp(A_t / lam), max_weight) * logp_t."""

    name: Literal["awr"] = "awr"
    lam: PositiveFloat = 1.0
    max_weight: PositiveFloat = 20.0
    vf_coef: NonNegFloat = 1.0
    advantage: ClassVar[str] = "gae"
    default_beta: ClassVar[float] = 0.0
    default_adaptive: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = False


# --- critic-free online algorithms (issue 21, section 1) ---
class GRPOConfig(Section):
    """GRPO (Shao et al. 2024): the clipped ratio loss per token with a group advantage
    (r - mean_group) / (std + eps), and beta * k3(pi || ref) per token in the loss."""

    name: Literal["grpo"] = "grpo"
    clip_eps: Annotated[float, Field(gt=0, lt=1)] = 0.2
    # group: the group's std (the paper); batch: the rollout's std; none: unscaled (Dr. GRPO).
    scale: Literal["group", "batch", "none"] = "group"
    # token: the mean over the minibatch's tokens (DAPO, TRL's default); sequence: the mean of
    # each answer's token mean (the paper).
    loss_aggregation: Literal["token", "sequence"] = "token"
    advantage: ClassVar[str] = "group"
    default_beta: ClassVar[float] = 0.0  # TRL's default; the paper used 0.04
    default_adaptive: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = True


class RLOOConfig(Section):
    """RLOO (Ahmadian et al. 2024): REINFORCE on whole answers with the leave-one-out baseline
    A_i = r_i - mean_{j != i} r_j; the KL penalty is in the reward (r = score - beta * k1)."""

    name: Literal["rloo"] = "rloo"
    # The answer's ratio exp(sum_t logp - old) is clipped to [1-eps, 1+eps] (TRL's default);
    # null: unclipped (plain REINFORCE on the first epoch, importance-weighted after).
    clip_eps: Annotated[float, Field(gt=0, lt=1)] | None = 0.2
    advantage: ClassVar[str] = "leave_one_out"
    default_beta: ClassVar[float] = 0.05  # TRL's default
    default_adaptive: ClassVar[bool] = False
    kl_in_loss: ClassVar[bool] = False


AlgoConfig = Annotated[APAConfig | PPOConfig | AWRConfig | GRPOConfig | RLOOConfig,
                       Field(discriminator="name")]
# Estimators that need k >= 2 answers per prompt and no critic.
GROUP_ESTIMATORS = ("group", "leave_one_out")
# --- end critic-free online algorithms ---


class AlignTrainConfig(Section):
    iterations: Annotated[int, NotBool, Field(gt=0, le=10_000_000)] = 100
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
    eval_prompts: PositiveInt = 64  # held-out prompts per evaluation (the first N)
    save_every: Period = None  # iterations; None = only at the end
    # Checkpoints kept while the run goes on; 0: only the newest, and none once final/ is
    # written (a finished run can then not be extended with --resume; saves disk).
    keep_checkpoints: NonNegInt = 2
    # Rows per scoring forward. None: the update micro-batch (minibatch/accum) on CPU, a budget
    # of 16384 tokens per forward on a GPU.
    forward_batch_size: PositiveInt | None = None
    # Compute the frozen bottom (embeddings + freeze_bottom_layers) once per rollout: shared by
    # policy and reference (and a critic initialised from the policy), cached for the update,
    # which then runs the top layers only. Costs episodes x length x hidden floats per model.
    reuse_frozen_trunk: bool = True
    # Keep the frozen reference and reward model(s) in host memory and bring them to the GPU
    # only to score a rollout: the GPU then holds them only during scoring, not through
    # generation and the update. Costs one host-to-device copy of their weights per rollout.
    # Turns reuse_frozen_trunk off (its shared layers would pin the reference to the GPU).
    offload_frozen: bool = False

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
    shardable: ClassVar[bool] = True
    policy: ModelConfig = Field(default_factory=ModelConfig)
    reward: RewardConfig
    critic: CriticConfig = Field(default_factory=CriticConfig)
    data: DataConfig
    generation: AlignGenerationConfig = Field(default_factory=AlignGenerationConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    gae: GAEConfig = Field(default_factory=GAEConfig)
    algo: AlgoConfig = Field(default_factory=APAConfig)
    train: AlignTrainConfig = Field(default_factory=AlignTrainConfig)
    # Judges that score the held-out prompts every train.eval_every iterations and are never
    # trained on: the gold or held-out judges of an over-optimisation study
    # (metrics eval/<label>_mean beside the proxy's eval/score_mean).
    eval_judges: list[JudgeSpec] = Field(default_factory=list)

    @property
    def has_critic(self) -> bool:
        """False for a critic-free advantage estimator (GRPO, RLOO, APA with a group baseline)."""
        return self.algo.advantage not in GROUP_ESTIMATORS

    @property
    def unused_sections(self) -> tuple[str, ...]:
        return () if self.has_critic else ("critic", "gae")

    @model_validator(mode="after")
    def _groups(self) -> AlignRecipe:
        k, n = self.generation.samples_per_prompt, self.train.rollout_batch_size
        if n % k:
            raise ValueError(f"generation.samples_per_prompt: train.rollout_batch_size ({n}) "
                             f"is not divisible by samples_per_prompt ({k}); a rollout is "
                             "rollout_batch_size / samples_per_prompt prompts x "
                             "samples_per_prompt answers")
        if not self.has_critic:
            if k < 2:
                raise ValueError(f"generation.samples_per_prompt: algo.name={self.algo.name} "
                                 f"with advantage {self.algo.advantage} compares the answers to "
                                 f"one prompt; set generation.samples_per_prompt >= 2 (it is {k})")
            # critic.* and gae.* would be silently unused: say so instead.
            for section, what in (("critic", "trains no critic"), ("gae", "uses no GAE")):
                if section not in self.model_fields_set:
                    continue
                part = getattr(self, section)
                keys = [f"{section}.{k}" for k in sorted(part.model_fields_set)] or [section]
                raise ValueError(f"{keys[0]}: algo.name={self.algo.name} with advantage "
                                 f"{self.algo.advantage} {what}; remove "
                                 f"{', '.join(keys)} from the recipe")
        return self

    @model_validator(mode="after")
    def _critic_source(self) -> AlignRecipe:
        if not self.has_critic:
            return self
        if self.critic.init == "reward" and self.reward.name != "reward-model":
            raise ValueError(
                "critic.init: 'reward' needs a reward-model judge to copy; set critic.init=policy"
            )
        return self

    @model_validator(mode="after")
    def _full_distribution(self) -> AlignRecipe:
        # old_logprobs, ref_logprobs and the KL describe the temperature-scaled distribution;
        # with top-k/top-p the sampled one differs, and a token outside a later policy's top-k
        # has probability 0 there (infinite log-ratio): refuse rather than compute wrong ratios.
        g = self.generation
        for key, off in (("top_k", g.top_k == 0), ("top_p", g.top_p == 1.0)):
            if not off:
                raise ValueError(f"generation.{key}: align samples the full (temperature-scaled) "
                                 f"distribution that its log-probs and KL describe; unset {key} "
                                 "(use generation.temperature to sharpen sampling)")
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


class EvalConfig(Section):
    samples_per_prompt: PositiveInt = 1
    bootstrap: PositiveInt = 1000  # bootstrap resamples (over prompts) per interval
    confidence: Annotated[float, NotBool, Field(gt=0, lt=1)] = 0.95
    batch_size: PositiveInt = 16  # sequences per generation / scoring chunk
    plots: bool = True
    # Add the results to the model cards (README.md) of the evaluated apactl policies: a
    # section of the card and model-index entries in its metadata.
    update_model_cards: bool = False


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
            from apactl.errors import RecipeError

            raise RecipeError(problems)
        return self.model_copy(update={"judges": kept})


# ------------------------------------------------------------------------------------ label
class LabelConfig(Section):
    samples: Annotated[int, NotBool, Field(ge=2)] = 2  # responses sampled per prompt
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
    "dpo": DPORecipe,
}
