"""What a recipe's path-like strings mean: a shipped dataset, a local path, or a hub id.

No apactl imports and no heavy ones: the recipe schema, the data layer and the model loader all
ask these questions, so this module sits below all of them.
"""

from __future__ import annotations

from pathlib import Path

from apactl.errors import RecipeError

BUILTIN = "builtin:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz", ".gguf", ".txt")


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
        or ref.endswith(LOCAL_SUFFIXES)
        # Hub ids are "owner/name": deeper paths, or our own run folders, are local.
        or len(parts) > 2
        or (len(parts) > 1 and (parts[0] == "apactl-runs" or Path(parts[0]).is_dir()))
    )


def hub_offline() -> bool:
    """huggingface_hub's own offline switch (``HF_HUB_OFFLINE``, read by that library)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_reachable(repo_id: str, repo_type: str = "dataset", timeout: float = 10) -> bool:
    """Whether the Hugging Face hub answers one quick request about ``repo_id`` (no retries).

    Any answer counts, "not found" and "gated" included (the loader then says what it is);
    only the hub's offline switch or a failed connection (no network, DNS, proxy, timeout)
    mean unreachable: a second of checking instead of half a minute of download retries.
    """
    if hub_offline():
        return False
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout)
    except (HfHubHTTPError, ValueError):  # the hub answered, or the id is malformed:
        return True                        # the loader says which
    except Exception:  # noqa: BLE001 - the HTTP client's connect/DNS/proxy/timeout errors
        return False
    return True
