"""Saving models as plain Hugging Face folders (safetensors + tokenizer), all or nothing."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

from apactl.atomic import write_folder


def _save_pretrained(model, folder: Path, state_dict: dict | None = None) -> None:
    """``save_pretrained`` as safetensors (the kwarg is gone in transformers 5: always on);
    ``state_dict``: the weights to write instead of the model's own (a sharded model's)."""
    kwargs: dict[str, Any] = {} if state_dict is None else {"state_dict": state_dict}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True
    model.save_pretrained(str(folder), **kwargs)


def merged_copy(model):
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


def write_model(model, tokenizer, folder: str | Path, merge_lora: bool = False,
                state_dict: dict | None = None,
                extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write model, tokenizer and extra files into ``folder`` (inside an atomic write: a
    checkpoint's temporary folder, or ``save_model``'s). A peft model is saved as its adapter;
    with ``merge_lora`` the folder holds the merged plain model and the adapter goes to
    ``<folder>/adapter``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload") and merge_lora:
        _save_pretrained(merged_copy(model), folder)
        _save_pretrained(model, folder / "adapter")
    else:
        _save_pretrained(model, folder, state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    _write_extra(folder, extra_files or {})
    return folder


def save_model(model, tokenizer, folder: str | Path, merge_lora: bool = False,
               state_dict: dict | None = None,
               extra_files: dict[str, str | bytes] | None = None) -> Path:
    """``write_model`` all or nothing: a killed run leaves the old folder or the new one."""
    return write_folder(folder, lambda tmp: write_model(model, tokenizer, tmp, merge_lora,
                                                        state_dict, extra_files))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    params = list(model.parameters())  # parameters() already yields a tied tensor only once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)
