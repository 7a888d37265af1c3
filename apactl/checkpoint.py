"""Checkpoints: a folder per step, written atomically, read without executing anything.

A checkpoint is ``<output_dir>/checkpoints/step-00000042/`` holding the model folder(s) written
by a callback, ``trainer_state.pt`` (optimizer and scheduler states, RNG, data position, the
resolved recipe, anything else) and ``meta.json``. The folder is filled under a temporary name
and renamed only when complete (``apactl.atomic``), so a SIGKILL at any moment leaves every
``step-*`` folder whole. ``trainer_state.pt`` holds only tensors and plain Python values and is
read with ``torch.load(weights_only=True)``: a crafted file cannot run code on ``--resume``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apactl.atomic import write_folder
from apactl.errors import RunFolderError

CKPT_DIR = "checkpoints"
STATE = "trainer_state.pt"
FORMAT = 2  # trainer_state.pt layout; 1 = apactl 0.1.0 (pickled, not resumable)


def save_checkpoint(output_dir: str | Path, step: int, write_models: Callable[[Path], None],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` (never dropping this one)."""
    root = Path(output_dir) / CKPT_DIR

    def write(tmp: Path) -> None:
        write_models(tmp)
        torch.save({**state, "format": FORMAT}, tmp / STATE)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time()}))

    final = write_folder(root / f"step-{step:08d}", write)
    prune(root, keep, protect=final)
    return final


def _complete(root: Path) -> list[Path]:
    found = [p for p in root.glob("step-*") if (p / "meta.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(root: Path, keep: int, protect: Path | None = None) -> None:
    """Keep ``keep`` checkpoints: ``protect`` (the one just written) and the newest others;
    the one just written is never deleted, even when older runs left higher step numbers."""
    others = [p for p in _complete(root) if p != protect]
    n_others = max(keep - 1, 0) if protect is not None else keep
    for p in others[:max(len(others) - n_others, 0)]:
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CKPT_DIR
    return _complete(root) if root.exists() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def problem(ckpt: Path) -> str | None:
    """Why checkpoint ``ckpt`` cannot be resumed (a damaged state or weights file), or None.
    Cheap: the state archive's directory and every safetensors header, not the tensors (a
    1.7B run's optimizer state is ~27 GB); ``load_state`` still refuses what these miss."""
    import zipfile

    from safetensors import safe_open

    try:
        with zipfile.ZipFile(ckpt / STATE) as z:  # torch.save writes a zip archive
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "not a torch checkpoint archive"
        for f in ckpt.rglob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                st.keys()
    except Exception as exc:  # noqa: BLE001 - any damage means: not this one
        return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return None


_LOADED: dict[tuple, dict[str, Any]] = {}  # the last state read: resume checks, then loads it


def load_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint, loaded without unpickling code. The last one read
    is kept (one entry), so checking a resume and then resuming reads the file once."""
    path = ckpt / STATE
    key = (str(path), *((path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else ()))
    if key in _LOADED:
        return _LOADED[key]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt, truncated, crafted, or pickled
        raise RunFolderError(f"{path}: cannot read the checkpoint state: {_why(exc)}",
                             reason=_why(exc)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        version = state.get("format", 1) if isinstance(state, dict) else "?"
        raise RunFolderError(f"{path}: written by another apactl version (format {version}, "
                             f"expected {FORMAT}); its model folders load as usual, but it "
                             "cannot be resumed")
    _LOADED.clear()
    _LOADED[key] = state
    return state


def _why(exc: Exception) -> str:
    """torch.load's error in a few words; never torch's advice to load with
    ``weights_only=False`` (that would run whatever the file holds)."""
    text = str(exc)
    if "Weights only load failed" in text or "weights_only" in text:
        return ("it holds objects other than tensors and plain values (refused: loading them "
                "could run code)")
    return text.splitlines()[0][:200] if text else type(exc).__name__


def forget_states() -> None:
    """Drop the kept state (its tensors are loaded into the models and optimizers by now)."""
    _LOADED.clear()


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values only."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
    state = read_weights(folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another architecture
        raise RunFolderError(f"{folder}: does not fit the model: "
                             f"{str(exc).splitlines()[-1].strip()[:200]}") from None
    tied = {k for k in missing if is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise RunFolderError(
            f"{folder}: does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}")


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model folder's safetensors files (shards merged), on the CPU."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(f))
    return state


def is_tied(model: torch.nn.Module, key: str) -> bool:
    """True for a tied LM head weight (save_pretrained drops it: it is the embedding matrix)."""
    tie = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return bool(tie) and key.endswith("lm_head.weight")
