"""Errors that the CLI turns into exit codes.

`InputError` means the input or the options are wrong (exit 2). Each carries a
message saying what is wrong and a hint saying what to do, so that the CLI can
print one line and no traceback.
"""
from __future__ import annotations


class SfckptError(Exception):
    """Base class: a problem sfckpt can explain to the user."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class InputError(SfckptError):
    """The checkpoint, the weights or the options cannot be used as given (exit 2)."""


class OutputError(SfckptError):
    """The output cannot be written where asked (exit 2); nothing was written."""
