"""Process-level setup shared by every workflow: seeds, threads, device, dtype, output folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from apactl.config import RecipeBase, recipe_to_yaml


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    output_dir: Path
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_run(recipe: RecipeBase, save_recipe: bool = True) -> Runtime:
    """Seed, set threads and determinism, resolve device/dtype, write ``recipe.yaml``."""
    from apactl.checkpoint import seed_everything
    from apactl.models import resolve_device, resolve_dtype

    run = recipe.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(run.seed)
    device = resolve_device(run)
    dtype = resolve_dtype(run, device)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if save_recipe:
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    _quiet_libraries()
    return Runtime(device=device, dtype=dtype, output_dir=out)


def _quiet_libraries() -> None:
    # Loading bars and advisory warnings from transformers drown our own progress display.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
