"""Atomic checkpoints: write into a temp folder, then rename.

A checkpoint is ``<output_dir>/checkpoints/step-00000042/`` holding the model folder(s) written by a
callback, ``trainer_state.pt`` (optimizer, scheduler, RNG, data position, anything else) and
``meta.json``. ``meta.json`` is written last inside the temp folder and the folder is renamed only
after that, so a SIGKILL at any moment leaves every ``step-*`` folder whole; half-written temp
folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CKPT_DIR = "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    write_models: Callable[[Path], None],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` checkpoints."""
    root = Path(output_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_models(tmp)
    torch.save(state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time()}))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. final save after a periodic one)
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    _prune(root, keep)
    return final


def _complete(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def _prune(root: Path, keep: int) -> None:
    for p in _complete(root)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    return _complete(root) if root.exists() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_state(ckpt: Path) -> dict[str, Any]:
    # Our own file: it holds RNG states and optimizer tensors, not arbitrary objects.
    return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Load weights saved by ``save_pretrained`` (full model or peft adapter) into ``model``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter = folder / "adapter_model.safetensors"
    if adapter.exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {sorted(set(missing) - tied)}"
            f", unexpected {sorted(unexpected)}"
        )


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    # save_pretrained drops tied weights (lm_head tied to the embeddings).
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return bool(tie) and key.endswith("lm_head.weight")


def write_folder_atomic(dest: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temp sibling of ``dest`` with ``write(tmp)``, then swap it in by renames.

    A kill leaves either the old folder or the new one whole (plus a stray temp folder, never a
    half folder at ``dest``).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    _fsync_dir(dest.parent)
    return dest
