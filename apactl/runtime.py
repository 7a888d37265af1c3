"""Process-level setup shared by every workflow: seeds, threads, device, dtype, output folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from apactl.config import RecipeBase, recipe_to_yaml
from apactl.distributed import Dist, init_dist
from apactl.errors import UserError


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    output_dir: Path
    dist: Dist = field(default_factory=Dist)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def setup_run(recipe: RecipeBase, save_recipe: bool = True) -> Runtime:
    """Join the process group (if launched so), seed, set threads and determinism, resolve
    device/dtype, write ``recipe.yaml`` (rank 0 only)."""
    from apactl.checkpoint import seed_everything
    from apactl.metrics import console
    from apactl.models import resolve_device, resolve_dtype

    run = recipe.run
    if run.num_threads:
        torch.set_num_threads(run.num_threads)
    if run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if run.strategy == "fsdp" and recipe.kind != "sft":
        raise UserError(f"run.strategy: fsdp is implemented for sft only, not {recipe.kind}; "
                        "use ddp")
    dist, rank_device = init_dist(run.device, run.dist_timeout_s)
    check = getattr(getattr(recipe, "train", None), "check_world_size", None)
    if callable(check):
        try:
            check(dist.world_size)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    # Every rank draws the same seed: identical initial weights and identical global batches.
    seed_everything(run.seed)
    device = rank_device or resolve_device(run)
    dtype = resolve_dtype(run, device)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Only rank 0 talks: the other ranks' messages, bars and warnings would repeat its own.
    console.quiet = not dist.is_main
    if save_recipe and dist.is_main:
        (out / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    _quiet_libraries()
    return Runtime(device=device, dtype=dtype, output_dir=out, dist=dist)


def _quiet_libraries() -> None:
    # Loading bars and advisory warnings from transformers drown our own progress display.
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
