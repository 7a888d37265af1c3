"""Small pieces every workflow prints or builds the same way."""

from __future__ import annotations

from typing import Any


def data_summary(report: Any, n_train: int, n_eval: int, what: str = "examples") -> str:
    """``data: SOURCE (format 'sft' (detected: 40 of 40 rows)): N train / M held-out examples;
    3 bad rows skipped: row 4 (...), ...; 2 duplicated training rows (kept)``, and a warning
    line when held-out rows copy training rows (``report``: the ``DataReport`` that loading and
    tokenising filled)."""
    msg = (f"data: {report.source} ({report.format_note()}): {n_train} train / {n_eval} "
           f"held-out {what}")
    msg += f"; {report.skipped_summary()}" if report.n_skipped else ""
    if report.n_duplicates:
        msg += (f"; {report.n_duplicates} duplicated training row"
                f"{'s' if report.n_duplicates > 1 else ''} (kept)")
    if report.n_eval_copies:
        msg += (f"\n[yellow]warning:[/] {report.n_eval_copies} of {report.n_eval} held-out rows "
                "copy a training row: held-out metrics overstate how well the model "
                "generalises")
    return msg


def check_positions(model, total: int, what: str) -> None:
    """Refuse sequences longer than the model's positions (a 3000-token decode on a
    1024-position model would run for minutes, then produce garbage)."""
    from apactl.errors import UserError
    from apactl.models import unwrap

    limit = getattr(unwrap(model).config, "max_position_embeddings", None)
    if isinstance(limit, int) and total > limit:
        raise UserError(f"{what} = {total} tokens, more than the model's {limit} positions")


def tokenized_pairs(tok, d, train_ex: list, eval_ex: list, report: Any
                    ) -> tuple[list[dict], list[dict]]:
    """(training, held-out) preference pairs as ``apactl rm`` and ``apactl dpo`` read them:
    prompts fitted to ``d.max_prompt_len`` (``DataConfig`` d), ``data.tokenize_preference``
    items; prints the data summary."""
    from apactl.data import fit_prompts, tokenize_preference
    from apactl.metrics import console

    args = (d.max_prompt_len, d.max_len, d.on_bad_row, report.source, report)
    train, _ = tokenize_preference(tok, fit_prompts(tok, train_ex, d), *args)
    held, _ = tokenize_preference(tok, fit_prompts(tok, eval_ex, d), *args)
    console.print(data_summary(report, len(train), len(held), "pairs"))
    return train, held
