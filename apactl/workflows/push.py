"""``apactl push RUN_FOLDER --repo-id NAME``: a run's final model folder to the Hugging Face Hub.

What goes up is the model folder as a user would download it: the card (README.md), the
weights (safetensors), config and tokenizer files, ``recipe.yaml``; never checkpoints,
optimizer or trainer state (they are not in ``final/``, and the file list below would not
take them if they were). Nothing local changes, whatever happens.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from apactl.errors import UserError

# The files of a model folder that are uploaded (matched against names in the folder).
UPLOADED = ("README.md", "recipe.yaml", "*.safetensors", "*.safetensors.index.json",
            "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
            "added_tokens.json", "chat_template.*", "vocab.*", "merges.txt", "*.model",
            "reward_stats.json", "adapter_config.json")
WHAT = ("policy", "critic")


def model_folder(run: Path, what: str = "policy") -> Path:
    """The folder ``push`` uploads: ``final/`` of an sft/rm run, ``final/policy`` (or
    ``final/critic``) of an align run, or ``run`` itself when it is a model folder."""
    from apactl.models.refs import is_model_folder

    if what not in WHAT:
        raise UserError(f"--what: {what!r}; expected policy or critic")
    final = run / "final"
    if is_model_folder(final / "policy"):
        return final / what
    if what == "critic":
        raise UserError(f"--what critic: {run} has no critic (only align runs have one)")
    for folder in (final, run):
        if is_model_folder(folder):
            return folder
    raise UserError(f"{run}: no finished model in it (no final/ model folder); a run is "
                    "pushed once it has finished")


def upload_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that are uploaded, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file()
                  and any(fnmatch.fnmatch(p.name, pat) for pat in UPLOADED))


def listing(folder: Path, files: list[Path]) -> list[str]:
    """One line per file with its size, then the total."""
    from apactl.workflows.quickstart import human_bytes

    sizes = [f.stat().st_size for f in files]
    width = max(len(f.name) for f in files)
    lines = [f"  {f.name:<{width}}  {human_bytes(s):>9}" for f, s in zip(files, sizes)]
    return lines + [f"  {len(files)} files, {human_bytes(sum(sizes))}"]


def push(run: str, repo_id: str, private: bool = False, revision: str | None = None,
         dry_run: bool = False, what: str = "policy", echo=print) -> list[Path]:
    """Upload (or with ``dry_run`` list) the model folder of ``run``; returns its files."""
    folder = model_folder(Path(run), what)
    files = upload_files(folder)
    if not (folder / "README.md").is_file():
        echo(f"note: {folder} has no model card (README.md): it was not made by this "
             "version of apactl")
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "") \
        + (" as a private repo" if private else "")
    if dry_run:
        echo(f"would upload {folder} to {where}:")
        for line in listing(folder, files):
            echo(line)
        return files
    import huggingface_hub as hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError("push: offline (HF_HUB_OFFLINE is set): nothing uploaded")
    if not hub.get_token():
        raise UserError("push: no Hugging Face token (run `hf auth login` or set HF_TOKEN): "
                        "nothing uploaded")
    api = hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
            allow_patterns=[f.name for f in files],
            commit_message=f"apactl push: {folder.relative_to(Path(run).parent)}")
    except Exception as exc:  # noqa: BLE001 - the Hub's errors (HTTP, network): one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"push: uploading to {repo_id} failed: {first}") from None
    echo(f"uploaded {len(files)} files from {folder} to {where}: "
         f"{getattr(commit, 'commit_url', None) or commit}")
    return files
