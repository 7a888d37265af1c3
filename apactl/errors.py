"""User-facing errors: the CLI prints their message on one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (a recipe, a file, a model reference)."""
