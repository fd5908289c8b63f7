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


# Options as the CLI spells them -> as the Python API does. Messages are written for the CLI, which
# most people use; the public functions (sfckpt.load, reconstruct, save, convert) translate them.
_API_TERMS = {
    "--force": "force=True",
    "--allow-nonfinite": "allow_nonfinite=True",
    "--max-shard-size": "max_shard_size",
    "--beta": "beta=",
    "--optimizer": "optimizer=",
    "--params-are": "params_are=",
    "--param-order": "param_order=",
    "--strip-prefix": "strip_prefix=",
    "--model-key": "model_key=",
    "--optimizer-key": "optimizer_key=",
    "--dtype": "dtype=",
    "--twins": "twins=",
}


def in_api_terms(text: str | None) -> str | None:
    """`pass --force to replace it` -> `pass force=True to replace it`."""
    import re

    if not text:
        return text
    return re.sub(r"--[a-z][a-z-]*", lambda m: _API_TERMS.get(m.group(0), m.group(0)), text)


def speaks_api(func):
    """Wrap a public function so that its errors name keyword arguments, not command-line options."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except SfckptError as exc:
            exc.message, exc.hint = in_api_terms(exc.message), in_api_terms(exc.hint)
            exc.args = (exc.message,)
            raise

    return wrapper
