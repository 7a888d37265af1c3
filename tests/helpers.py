"""Shared test helpers: paths, quiet-run overrides, recipe loaders, a CLI runner, small data
writers and the failure-injection judge (used through its import path, never registered)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
# No progress bar or TensorBoard, one thread: fast, quiet, reproducible tiny runs.
QUIET = ["logging.progress=false", "logging.tensorboard=false", "run.num_threads=1"]
runner = CliRunner()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def t(values, dtype=torch.float64) -> torch.Tensor:
    """A tensor from nested lists (float64 by default: hand-computed expectations)."""
    return torch.tensor(values, dtype=dtype)


def tiny_recipe(kind: str, out: Path, *overrides: str):
    """recipes/tiny/<kind>.yaml into ``out``, quiet, with ``overrides``."""
    from apactl.recipe import load_recipe

    return load_recipe(TINY / f"{kind}.yaml", [f"run.output_dir={out}", *QUIET, *overrides])


def cli(*args: str):
    """``apactl ARGS`` in-process (CliRunner); returns the result."""
    from apactl.cli import app

    return runner.invoke(app, [str(a) for a in args])


class FailOnRankJudge:
    """Scores 0, except on rank ``rank`` of a distributed job, where it raises: the fault that
    tests use to check that one failing rank stops the whole job, with its error shown once.
    Named in recipes as ``helpers:fail_on_rank`` (tests/ on PYTHONPATH)."""

    name = "fail-on-rank"

    def __init__(self, rank: int = 1):
        self.rank = rank

    def score(self, prompts, responses):
        import torch.distributed as td

        rank = td.get_rank() if td.is_available() and td.is_initialized() else 0
        if rank == self.rank:
            raise RuntimeError(f"injected failure on rank {rank}")
        return [0.0] * len(responses)


def fail_on_rank(rank: int = 1, **toy_args) -> FailOnRankJudge:
    """``toy_args``: the tiny align recipe's own judge args (chars), merged in by overrides."""
    return FailOnRankJudge(rank)


class KillOnceJudge:
    """The fraction of ``chars`` in a reply; on its ``at``-th call, if ``marker`` does not
    exist yet, it creates it and SIGKILLs its own process: a real kill at a known point (in
    the middle of iteration ``at``) that a resumed run, finding the marker, does not repeat.
    Named in recipes as ``helpers:kill_once`` (tests/ on PYTHONPATH)."""

    name = "kill-once"

    def __init__(self, marker: str, at: int, chars: str = "a"):
        self.marker, self.at, self.chars, self.calls = Path(marker), at, chars, 0

    def score(self, prompts, responses):
        import os
        import signal

        self.calls += 1
        if self.calls == self.at and not self.marker.exists():
            self.marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)
        return [sum(c in self.chars for c in r) / max(len(r), 1) for r in responses]


def kill_once(marker: str, at: int, chars: str = "a") -> KillOnceJudge:
    return KillOnceJudge(marker, at, chars)


class CountingJudge:
    """The tiny recipe's char-fraction reward that also appends, per call, the number of replies
    it scored to ``<folder>/rank-<r>.txt``: which rank generated and scored what. Named in
    recipes as ``helpers:counting``."""

    name = "counting"

    def __init__(self, folder: str, chars: str = "a"):
        from apactl.judges.builtin import CharFractionJudge

        self.folder, self.inner = Path(folder), CharFractionJudge(chars)

    def score(self, prompts, responses):
        import torch.distributed as td

        rank = td.get_rank() if td.is_available() and td.is_initialized() else 0
        with open(self.folder / f"rank-{rank}.txt", "a") as f:
            f.write(f"{len(responses)}\n")
        return self.inner.score(prompts, responses)


def counting(folder: str, chars: str = "a") -> CountingJudge:
    return CountingJudge(folder, chars)
