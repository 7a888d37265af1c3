"""Loading models and tokenizers for every workflow: trainable (LoRA, frozen bottom layers,
gradient checkpointing) or frozen, in the dtypes a ``Precision`` asks for.

Nothing here reads environment variables; paths come in as arguments (the CLI owns the env).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apactl.errors import ModelError
from apactl.models.common import quiet_transformers
from apactl.models.heads import decoder_layers, unwrap
from apactl.models.refs import resolve_model_ref

if TYPE_CHECKING:
    from apactl.config import LoraConfig, ModelConfig


def _hub_kwargs(ref: str, cfg: ModelConfig | None) -> dict[str, Any]:
    """``revision`` only means something for hub ids; ``trust_remote_code`` always applies."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg and cfg.trust_remote_code)}
    if cfg is not None and cfg.revision and not Path(ref).exists():
        kwargs["revision"] = cfg.revision
    return kwargs


def load_tokenizer(ref_resolved: str, cfg: ModelConfig | None = None, padding_side: str = "right"):
    """Tokenizer with a pad token (eos when missing) and right padding by default."""
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = _from_pretrained(AutoTokenizer, ref_resolved, cfg)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"{ref_resolved}: tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def freeze_bottom_layers(model, n: int) -> None:
    """Freeze the input embeddings and the bottom ``n`` decoder layers (no-op for ``n == 0``).

    With tied embeddings the LM head shares the embedding matrix and is frozen with it.
    """
    if n <= 0:
        return
    layers = decoder_layers(model)
    if n > len(layers):
        raise ModelError(f"freeze_bottom_layers={n} but the model has only {len(layers)} layers")
    unwrap(model).get_input_embeddings().requires_grad_(False)
    for layer in layers[:n]:
        layer.requires_grad_(False)


def _peft_config(lora: LoraConfig, task_type: str, modules_to_save: list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type=task_type,
                          modules_to_save=modules_to_save)


def _enable_checkpointing(model) -> None:
    # Non-reentrant checkpointing works when the inputs need no grad (frozen embeddings, LoRA).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x: new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _add_lora(model, lora: LoraConfig, task_type: str):
    from peft import get_peft_model

    save = ["score"] if task_type == "SEQ_CLS" else None  # the new head must train fully
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, _peft_config(lora, task_type, save))
    except ValueError as exc:  # e.g. target_modules that match no module of this model
        raise ModelError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None


def _prepare(model, cfg: ModelConfig | None, trainable: bool, freeze_n: int, task_type: str):
    """Checkpointing, LoRA and freezing for a trainable model; eval + no grads otherwise."""
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if cfg is not None and cfg.gradient_checkpointing:
        _enable_checkpointing(model)
        model.config.use_cache = False  # a KV cache is useless and wrong with checkpointing
    if cfg is not None and cfg.lora is not None:
        model = _add_lora(model, cfg.lora, task_type)
    freeze_bottom_layers(model, freeze_n)
    return model.train()


def _first_line(exc: BaseException) -> str:
    return next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _cached(ref: str, revision: str | None) -> bool:
    """True when the hub id's config is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(ref, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an id the cache cannot even name: not cached
        return False
    return isinstance(found, str)


def _check_hub(ref: str, revision: str | None) -> None:
    """One quick question to the hub for an id that is not cached locally, so that a typo or
    an offline machine is one line at once, not a minute of download retries."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        model_info(ref, revision=revision, timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise ModelError(f"{ref}: no such local folder, and no such model on the Hugging Face "
                         "hub (a typo? a private model needs `huggingface-cli login`)") from None
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, timeout, HF_HUB_OFFLINE
        raise ModelError(f"{ref}: not a local folder, not in the Hugging Face cache, and the hub "
                         f"cannot be reached ({_first_line(exc)[:120]}); offline, give a local "
                         "model folder or .gguf file instead") from None


def _from_pretrained(auto_cls, ref: str, cfg: ModelConfig | None, **kwargs):
    """``auto_cls.from_pretrained`` with one-line errors for missing or unreadable models; a hub
    id that is not cached is checked with one quick request first."""
    hub = _hub_kwargs(ref, cfg)
    if not Path(ref).exists() and not _cached(ref, hub.get("revision")):
        _check_hub(ref, hub.get("revision"))
    try:
        return auto_cls.from_pretrained(ref, **kwargs, **hub)
    except OSError as exc:  # unreadable files, a download that broke off
        raise ModelError(f"{ref}: cannot load: {_first_line(exc)}") from None


def load_causal_lm(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                   freeze_bottom_layers: int = 0, trainable: bool = True):
    """A causal LM from ``cfg``: trainable (train mode, LoRA/freezing applied) or frozen (eval)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    ref = resolve_model_ref(cfg.name_or_path, cfg.cache_dir, kind="causal")
    model = _from_pretrained(AutoModelForCausalLM, ref, cfg, dtype=dtype)
    model.to(device)
    return _prepare(model, cfg, trainable, freeze_bottom_layers, "CAUSAL_LM")


def _sync_pad(model, tokenizer) -> None:
    """Generation and sequence pooling read the pad id from the config; take the tokenizer's."""
    inner = unwrap(model)
    inner.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(inner, "generation_config", None)
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


def load_policy(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                freeze_bottom_layers: int = 0, trainable: bool = True):
    """``(model, tokenizer)``: ``load_causal_lm`` + tokenizer (``cfg.tokenizer`` or the model)."""
    model = load_causal_lm(cfg, device, dtype, freeze_bottom_layers, trainable)
    tok_ref = resolve_model_ref(cfg.tokenizer or cfg.name_or_path, cfg.cache_dir, kind="causal")
    tokenizer = load_tokenizer(tok_ref, cfg)
    _sync_pad(model, tokenizer)
    return model, tokenizer


def load_reference(policy, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype):
    """The frozen reference policy, or None with LoRA (the policy with its adapter disabled).

    With LoRA the base weights never change, so disabling the adapter *is* the reference and no
    second copy is kept in memory. Otherwise the initial weights are reloaded from ``cfg``.
    """
    if cfg.lora is not None:
        if not hasattr(policy, "disable_adapter"):
            raise ModelError("cfg.lora is set but the policy is not a peft model")
        return None
    return load_causal_lm(cfg, device, dtype, trainable=False)


@contextlib.contextmanager
def reference_logits_context(policy, ref_model) -> Iterator[Any]:
    """Yield the module computing reference outputs (``ref_model``, or the adapter-less policy).

    Gradients are off inside: the reference is never trained.
    """
    with torch.no_grad():
        if ref_model is not None:
            yield ref_model
        else:
            with policy.disable_adapter():
                yield policy


# Where sequence classifiers keep their head: ``score`` (decoder LMs), ``classifier`` (BERT
# family), ``classification_head`` (T5, BART), ``v_head`` (value-head checkpoints).
HEAD_MODULES = ("score", "classifier", "classification_head", "v_head")
NOT_A_SCORER = ("not a reward model (a sequence classifier with a trained score head, "
                "from apactl rm)")


def _architecture(folder: Path) -> str | None:
    """The first ``architectures`` entry of ``folder/config.json``; None when unreadable."""
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return None
    return str(archs[0]) if isinstance(archs, list) and archs else None


def _weight_names(folder: Path) -> set[str] | None:
    """The tensor names of ``folder``'s safetensors weights, read from the file headers only
    (no tensor is loaded); None when the folder has no safetensors weights to read."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return set(json.loads(index.read_text())["weight_map"])
        single = folder / "model.safetensors"
        if not single.is_file():
            return None
        with safe_open(str(single), framework="pt") as f:
            return set(f.keys())
    except Exception:  # noqa: BLE001 - a damaged file: from_pretrained names the problem
        return None


def _has_head(names: set[str] | list[str]) -> bool:
    return any(n.split(".")[0] in HEAD_MODULES for n in names)


def check_trained_head(ref: str, resolved: str) -> None:
    """Refuse a local folder that is not a sequence classifier holding its head's weights
    (``ref``: as the user wrote it), before any weight is loaded. A causal LM would otherwise
    load with a randomly initialised head and score noise, without a word."""
    folder = Path(resolved)
    if not folder.is_dir():
        return  # a hub id: the loaded checkpoint's missing keys are checked instead
    arch = _architecture(folder)
    if arch is not None and not arch.endswith("ForSequenceClassification"):
        what = f"a causal LM ({arch})" if arch.endswith("ForCausalLM") else f"a {arch} model"
        raise ModelError(f"{ref}: {what}, {NOT_A_SCORER}")
    names = _weight_names(folder)
    if names is not None and not _has_head(names):
        raise ModelError(f"{ref}: its weights hold no score head ({arch or 'no architecture'}"
                         f"), {NOT_A_SCORER}")


def load_sequence_classifier(ref: str, device: torch.device | str, dtype: torch.dtype,
                             trainable: bool, cfg: ModelConfig | None = None,
                             freeze_bottom_layers: int = 0, kind: str = "reward",
                             trained_head: bool = False):
    """``(model, tokenizer)``: a scalar-head classifier (``num_labels=1``) for rewards or values.

    From a causal-LM folder the backbone weights are loaded and a new ``score`` head is created;
    from a saved reward-model folder everything is loaded. Any other missing weight is an error
    (a backbone that silently stayed random would train a reward model on noise).
    ``trained_head``: the head must come from the checkpoint too (a reward model or a saved
    critic); a folder without one is a ``ModelError`` naming what the folder is.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    resolved = resolve_model_ref(ref, cfg.cache_dir if cfg is not None else None, kind=kind)
    if trained_head:
        check_trained_head(ref, resolved)
    model, info = _from_pretrained(AutoModelForSequenceClassification, resolved, cfg,
                                   num_labels=1, dtype=dtype, output_loading_info=True)
    head = sorted(k for k in info["missing_keys"] if k.split(".")[0] in HEAD_MODULES)
    if trained_head and head:
        raise ModelError(f"{ref}: the checkpoint has no {head[0]}: {NOT_A_SCORER}")
    missing = sorted(k for k in info["missing_keys"] if not k.startswith("score."))
    if missing:
        raise ModelError(f"{ref}: {len(missing)} backbone weights not found in the checkpoint "
                         f"(e.g. {missing[0]}); is it a causal LM or reward model of a supported "
                         "type?")
    tokenizer = load_tokenizer(resolved, cfg)
    # Required: transformers pools at the last non-pad token using config.pad_token_id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    return _prepare(model, cfg, trainable, freeze_bottom_layers, "SEQ_CLS"), tokenizer
