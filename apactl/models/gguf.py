"""GGUF files dequantised once into a plain safetensors folder under a cache directory.

transformers cannot save or train a GGUF-loaded model, and the load takes ~20-40 s, so the
converted folder is cached, keyed by the file's path, size and mtime.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from apactl.atomic import write_folder
from apactl.errors import ModelError
from apactl.models.common import cache_root, quiet_transformers
from apactl.models.saving import write_model

log = logging.getLogger(__name__)
# Written last into a converted folder: its presence (after the atomic rename) marks it complete.
MARKER = "apactl-gguf.json"


@dataclass
class GGUFConversion:
    """Result of ``convert_gguf_with_info``: the folder and how long it took."""

    folder: Path
    converted: bool  # False: the cached folder was reused
    seconds: float


def cache_key(path: Path) -> str:
    """Folder name of a GGUF file's conversion: path, size and mtime identify the file
    cheaply (hashing 100 MB+ would cost seconds)."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def load_gguf(folder: Path, filename: str):
    """(model, tokenizer) dequantised by transformers from ``folder/filename`` (slow)."""
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


def convert_gguf_with_info(gguf_path: str | Path, cache_dir: str | Path | None = None,
                           notify=None) -> GGUFConversion:
    """Dequantise a GGUF file once into ``<cache_dir>/<stem>-<hash>`` (safetensors + tokenizer).

    ``notify(message)`` is told before a (slow) conversion starts.
    """
    quiet_transformers()
    start = time.perf_counter()
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelError(f"{gguf_path}: GGUF file not found")
    target = cache_root(cache_dir) / cache_key(src)
    if (target / MARKER).is_file():
        return GGUFConversion(target, False, time.perf_counter() - start)
    if notify is not None:
        notify(f"converting {src.name} to a safetensors folder (once; ~20-40 s) -> {target}")

    def convert(tmp: Path) -> None:
        model, tokenizer = load_gguf(src.parent, src.name)
        write_model(_plain_copy(model), tokenizer, tmp)
        marker = {"source": str(src.resolve()), "size": src.stat().st_size,
                  "seconds": time.perf_counter() - start}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    write_folder(target, convert, exist="keep")  # a concurrent conversion may finish first
    seconds = time.perf_counter() - start
    log.info("converted %s -> %s in %.1f s", src, target, seconds)
    return GGUFConversion(target, True, seconds)


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Cached plain HF folder for a GGUF file (converted on first use, then reused instantly)."""
    from apactl.metrics import console

    return convert_gguf_with_info(gguf_path, cache_dir, notify=console.print).folder
