"""Errors sfckpt can explain, as values: what is wrong, where, and which option fixes it.

Each error keeps its text as parts: words, and `Opt`s, the options it names. The library
never spells an option: the CLI's edge (sfckpt/cli_words.py) writes `--twins tied`, and
`.message`/`.hint`/`str()` write the Python API's `twins="tied"` (the table below), so that
each edge has one table and no text is rewritten after the fact. A name from an input is
always a word, never parsed for options.

`InputError` (exit 2) means the input or the options are wrong; its subclasses say how.
`OutputError` (exit 2) means the output cannot be written; nothing was written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union

BOOLEAN_OPTIONS = frozenset({"force", "allow_nonfinite"})


@dataclass(frozen=True)
class Opt:
    """An option named in an error's text, spelled by whoever prints it.

    `Opt("param_order")` is the option itself (`--param-order`, `param_order`); with a value,
    a setting (`--twins tied`, `twins="tied"`; `Opt("force", True)` is `--force`, `force=True`);
    with `usage`, the option with its argument's placeholder (`--param-order FILE`,
    `param_order=[names in optimizer order]`). Join it to text with `+`.
    """

    name: str
    value: Any = None
    usage: bool = False

    def __add__(self, other: Words) -> Text:
        return Text((self,)) + other

    def __radd__(self, other: Words) -> Text:
        return Text.of(other) + Text((self,))

    def __format__(self, spec: str) -> str:
        # Formatting would freeze one spelling into the text: the edges must see the option.
        raise TypeError(f"Opt({self.name!r}) is spelled where the error is printed; join it with + instead")


class Text(tuple):
    """Words and `Opt`s, in order: an error's message or hint before an edge spells its options."""

    @classmethod
    def of(cls, words: Words) -> Text:
        if isinstance(words, Text):
            return words
        return cls((words,)) if isinstance(words, (str, Opt)) else cls(words)

    def __add__(self, other: Words) -> Text:
        return Text(tuple(self) + tuple(Text.of(other)))

    def __radd__(self, other: Words) -> Text:
        return Text(tuple(Text.of(other)) + tuple(self))

    def options(self) -> list[str]:
        return [p.name for p in self if isinstance(p, Opt)]

    def spelled(self, spell: Callable[[Opt], str]) -> str:
        return "".join(spell(p) if isinstance(p, Opt) else p for p in self)


Words = Union[str, Opt, Text]

# How the Python API writes the argument of an option named with `usage`.
_API_PLACEHOLDERS = {
    "param_order": "[names in optimizer order]",
    "param_order_from": '"file.py:callable"',
    "model_config": '"config.json"',
    "beta": "β",
    "optimizer": '"FAMILY"',
    "params_are": '"y" or "x"',
    "twins": '"tied" or "frozen"',
    "max_shard_size": '"5GB"',
    "model_key": '"KEY"',
    "optimizer_key": '"KEY"',
    "strip_prefix": '"PREFIX"',
    "dtype": '"DTYPE"',
    "bn_calib": '"DATA"',
    "bn_model": '"file.py:callable"',
    "bn_mode": '"reset" or "momentum"',
}


def api_words(opt: Opt) -> str:
    """An option as a keyword argument of the public functions: `twins="tied"`, `force=True`."""
    if opt.value is not None:
        value = "True" if opt.value is True else (f'"{opt.value}"' if isinstance(opt.value, str) else repr(opt.value))
        return f"{opt.name}={value}"
    if opt.name in BOOLEAN_OPTIONS:
        return f"{opt.name}=True"
    if opt.usage:
        return f"{opt.name}={_API_PLACEHOLDERS.get(opt.name, '…')}"
    return opt.name


class SfckptWarning(UserWarning):
    """What a conversion wrote but you should know (BatchNorm statistics gathered at y, a mode the file
    does not record, objects left unloaded): `warnings.warn`ed by `save` and `convert`, filterable by
    this category. The same texts are `Reconstruction.all_warnings()`."""


class SfckptError(Exception):
    """A problem sfckpt can explain to the user.

    Attributes:
        text, fix: what is wrong and what to do, as `Text` (words and `Opt`s).
        where: the tensor, key or path it concerns, when there is one.
        option: the name of the option that fixes it (the first one the fix names), or None.
        exit_code: what the CLI exits with.
    """

    exit_code = 2

    def __init__(self, message: Words, hint: Words | None = None, *, where: str | None = None,
                 option: str | None = None):
        self.text = Text.of(message)
        self.fix = None if hint is None else Text.of(hint)
        self.where = where
        fixes = self.fix.options() if self.fix is not None else []
        self.option = option if option is not None else (fixes[0] if fixes else None)
        super().__init__(self.message)

    def about(self, place: str) -> SfckptError:
        """This error, its message now led by `place: ` (the file it concerns); returned to be raised."""
        self.text = f"{place}: " + self.text
        self.where = place if self.where is None else self.where
        self.args = (self.message,)
        return self

    def in_words(self, spell: Callable[[Opt], str]) -> tuple[str, str | None]:
        """(message, hint) with every option spelled by `spell`."""
        return self.text.spelled(spell), None if self.fix is None else self.fix.spelled(spell)

    @property
    def message(self) -> str:
        return self.text.spelled(api_words)

    @property
    def hint(self) -> str | None:
        return None if self.fix is None else self.fix.spelled(api_words)

    def __str__(self) -> str:
        message, hint = self.in_words(api_words)
        return f"{message}; {hint}" if hint else message


class InputError(SfckptError):
    """The checkpoint, the weights or the options cannot be used as given (exit 2)."""


class DamagedInput(InputError):
    """A file of the input cannot be read as what it claims to be: truncated, damaged or crafted."""


class NotScheduleFree(InputError):
    """The input holds no Schedule-Free optimizer state to make x from."""


class MappingUndecided(InputError):
    """Which tensor an optimizer entry belongs to cannot be established from the checkpoint."""


class OptionConflict(InputError):
    """An option's value is invalid, or contradicts another option or the checkpoint."""


class LimitExceeded(InputError):
    """The input is past one of the limits in sfckpt/limits.py; `env` names the variable that raises it."""

    def __init__(self, message: Words, hint: Words | None = None, *, env: str, where: str | None = None):
        super().__init__(message, hint, where=where)
        self.env = env


class OutputError(SfckptError):
    """The output cannot be written where asked (exit 2); nothing was written."""


class OutputExists(OutputError):
    """The output `where` exists and `force` was not given."""

    def __init__(self, path: Any, message: Words | None = None):
        super().__init__(f"{path} already exists" if message is None else message,
                         "pass " + Opt("force") + " to replace it", where=str(path))
