"""User-facing errors: every one subclasses ``UserError``; the CLI prints the message on one
line per problem and exits 2, without a traceback.

Anything else that escapes a command is a bug in apactl (or an environment fault) and keeps its
traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a recipe, a file, a model reference, an output folder.

    ``problems`` holds one line per problem (the CLI prints each); ``str(exc)`` joins them.
    """

    def __init__(self, *problems: str):
        lines = [p for p in problems if p] or ["bad input"]
        super().__init__("\n".join(lines))
        self.problems = lines


class RecipeError(UserError):
    """A recipe or override problem; each line names the dotted key (``train.lr: ...``)."""

    def __init__(self, problems: list[str] | str):
        super().__init__(*([problems] if isinstance(problems, str) else problems))


class DataError(UserError):
    """A problem in the data: ``source: row N: field 'f': problem``.

    ``row`` is the 0-based source row (None for a problem with the whole file) and ``detail``
    the text after the row, so a report can list skipped rows as ``row N (detail)``.
    """

    def __init__(self, message: str, source: str | None = None, row: int | None = None,
                 detail: str | None = None):
        super().__init__(message)
        self.source, self.row, self.detail = source, row, detail or message


class ModelError(UserError):
    """A model reference, a model folder or a device that cannot be used."""


class RunFolderError(UserError):
    """The output folder cannot be used by this run (another run's, locked, or changed).

    ``reason``: for a checkpoint that cannot be read, why (a damaged one is skipped on resume).
    """

    def __init__(self, *problems: str, reason: str | None = None):
        super().__init__(*problems)
        self.reason = reason


class Stopped(Exception):
    """The run stopped on request (SIGTERM) at a step boundary, after writing a checkpoint:
    ``--resume`` continues it. Not a user error: the CLI exits with ``EXIT_STOPPED``."""

    def __init__(self, signal: str, step: int, checkpoint: str):
        super().__init__(f"{signal} after step {step}: checkpoint {checkpoint} written")
        self.signal, self.step, self.checkpoint = signal, step, checkpoint


class Terminated(BaseException):
    """A second stop signal: leave at once (like KeyboardInterrupt, not caught by
    ``except Exception``); files are left as a SIGKILL would leave them, whole."""
