"""What every part of the models package shares: the cache folder and quiet transformers."""

from __future__ import annotations

from pathlib import Path

# Converted GGUF models and the tiny random model are cached here unless a recipe says
# model.cache_dir (tests point it at a temporary folder).
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "apactl" / "models"


def cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE_DIR


def quiet_transformers() -> None:
    """Silence transformers' progress bars and load reports (users see our own messages)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
