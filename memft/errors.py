"""Errors memft reports to users as one clear paragraph (exit code 2 from the CLI), never a traceback."""


class MemftError(Exception):
    """Base class: the message says what is wrong, where (key or file) and how to fix it."""


class RecipeError(MemftError, ValueError):
    """The recipe or an override is invalid (a ValueError, so Python callers of the HF entry points catch it
    as one)."""


class DataError(MemftError):
    """A dataset is missing, unreadable, lacks columns, or has no rows."""


class ModelError(MemftError):
    """A model or tokenizer cannot be loaded or does not fit the recipe."""


class RunError(MemftError):
    """The run cannot start or continue (output directory, checkpoints, non-finite loss)."""
