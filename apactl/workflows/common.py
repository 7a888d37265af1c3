"""Small pieces every workflow prints or builds the same way."""

from __future__ import annotations

from typing import Any


def data_summary(report: Any, extra_skipped: int, n_train: int, n_eval: int,
                 what: str = "examples") -> str:
    """``data: SOURCE: N train / M eval examples (K bad rows skipped: ...)``."""
    skipped = report.n_skipped + extra_skipped
    msg = f"data: {report.source}: {n_train} train / {n_eval} held-out {what}"
    if skipped:
        first = "; ".join(getattr(report, "skipped", [])[:3])
        msg += f" ({skipped} bad rows skipped" + (f"; first: {first}" if first else "") + ")"
    return msg
