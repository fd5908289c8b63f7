"""The one place where text from an input (tensor names, keys, file names, messages quoting them) is printed.

The library's reports keep the real names; this module turns them into each output form once,
where they leave the process:

- terminal/log form (`terminal`, `echo`): one line per string, control characters shown as
  escapes, so that nothing in an input can move the cursor, set the title, split a line or
  hide or reorder text; and no printed line can be a CI workflow command (`::…` at a line's
  start, `##[…` anywhere), in every mode, since logs reach a runner without GITHUB_ACTIONS too.
- GitHub form: sfckpt's own workflow commands (`annotate_error`), their data and properties
  escaped as GitHub's toolkit escapes them; and markdown for $GITHUB_STEP_SUMMARY
  (`markdown_code`, `markdown_text`) that cannot open a heading, a table row, HTML or a link.
- strict JSON (`json_text`): no NaN/Infinity tokens (non-finite numbers become the strings
  "NaN", "Infinity", "-Infinity") and only Unicode scalar values (a lone surrogate is written
  as its escape, `\\ud800`), so any JSON parser reads the document.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from typing import Any, Iterator

import click

_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
# Bidirectional embeddings, overrides, isolates and marks: they reorder what a terminal, a log
# viewer or a browser shows (Trojan Source), so a name could display as another one.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# C0, DEL, C1 (U+009B is a one-byte CSI), U+2028/U+2029 (line breaks to some viewers), bidi
# controls, lone surrogates (unencodable: printing them raises) and the backslash itself, so
# that the escaped form of a name is never the form of another name.
_CONTROL = f"\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}\ud800-\udfff"
_ESCAPE = re.compile(f"[\\\\{_CONTROL}]")
_ESCAPE_CONTROL = re.compile(f"[{_CONTROL}]")
# A workflow command: `::name …::` at a line's start after whitespace (GitHub), or `##[name]` and
# `##vso[name]` anywhere in a line (the runner's legacy form, Azure Pipelines).
_LINE_COMMAND = re.compile(r"^(\s*):(?=:)")
_LEGACY_COMMAND = re.compile(r"##(vso)?\[")


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text: str) -> str:
    """One line with every control character shown as an escape (`\\x1b`, `\\n`, `\\u202e`, `\\ud800`).

    Args:
        text: anything, typically a tensor name or a message quoting one.
    Returns:
        Printable text without line breaks; text without such characters (or backslashes) is unchanged.
    Example:
        `terminal("fc1.weight\\x1b[2J")` is `fc1.weight\\x1b[2J` with a visible backslash.
    """
    return _ESCAPE.sub(_escape_char, text)


def terminal_view(value: Any) -> Any:
    """A report with every string in it, dictionary keys included, in the terminal form (for tables)."""
    if isinstance(value, str):
        return terminal(value)
    if isinstance(value, dict):
        return {terminal_view(k): terminal_view(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [terminal_view(v) for v in value]
    return value


def _defuse_legacy(text: str) -> str:
    return _LEGACY_COMMAND.sub(lambda m: m.group(0)[:-1] + "\\x5b", text)


def _log_line(line: str) -> str:
    # Control characters again: a safety net that changes nothing in text built from terminal() pieces.
    line = _defuse_legacy(_ESCAPE_CONTROL.sub(_escape_char, line))
    return _LINE_COMMAND.sub(lambda m: m.group(1) + "\\x3a", line)


def log_text(text: str) -> str:
    """Text as sfckpt prints it: each of its lines (split at `\\n`, the only break sfckpt puts in) with
    control characters shown as escapes and anything a CI runner would take for a workflow command
    defused (`::` opening a line becomes `\\x3a:`, `##[` becomes `##\\x5b`)."""
    return "\n".join(_log_line(line) for line in text.split("\n"))


def echo(text: str, err: bool = False) -> None:
    """Print text built from terminal() pieces and sfckpt's own words (a table), on stdout or, with `err`,
    stderr, in the log form."""
    click.echo(log_text(text), err=err)


def echo_line(text: str, err: bool = False) -> None:
    """Print one line that may quote an input as it is (a message): it stays one line, escaped."""
    echo(terminal(text), err=err)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
    """`warnings.showwarning` while a command runs: a library's warning as one escaped line on stderr."""
    echo_line(f"warning: {category.__name__}: {message}", err=True)


# Libraries sfckpt hands input to: their loggers write their own text (which may quote a config value).
LIBRARY_LOGGERS = ("transformers", "peft", "huggingface_hub", "torch.distributed")


class _EscapingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo_line(f"warning: {record.name}: {record.getMessage()}", err=True)
        except Exception:  # a handler must not raise into the library that logs
            self.handleError(record)


@contextlib.contextmanager
def library_logs(names: tuple[str, ...] = LIBRARY_LOGGERS) -> Iterator[None]:
    """While the block runs, records of these libraries' loggers are printed as one escaped `warning:`
    line each instead of by their own handlers (which write raw text); the handlers come back after."""
    handler = _EscapingHandler()
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate


def github_actions() -> bool:
    """Whether this runs in a GitHub Actions job (where workflow commands and the step summary apply)."""
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _command_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _command_property(text: str) -> str:
    return _command_data(text).replace(":", "%3A").replace(",", "%2C")


def workflow_command(command: str, data: str, **properties: str) -> str:
    """`::command key=value,…::data`, escaped as GitHub's toolkit escapes it; data and properties in the
    terminal form first, so an annotation shows what the log would."""
    props = ",".join(f"{k}={_command_property(_defuse_legacy(terminal(v)))}" for k, v in properties.items())
    return f"::{command}{' ' + props if props else ''}::{_command_data(_defuse_legacy(terminal(data)))}"


def annotate_error(title: str, message: str, err: bool) -> None:
    """An `::error` annotation (the runner reads workflow commands on stdout and stderr alike)."""
    click.echo(workflow_command("error", message, title=title), err=err)


# ---- markdown ($GITHUB_STEP_SUMMARY) ------------------------------------------------------------

_PUNCTUATION = re.compile(r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]""")


def markdown_code(text: str, in_table: bool = False) -> str:
    """Text as a code span: literal to markdown (no HTML, emphasis or links inside one), fenced by more
    backticks than any run in the text, on one line; `|` escaped inside a table cell (GFM splits cells
    at a bare `|` even within a code span).

    Example:
        `markdown_code("conv.weight")` is the name between single backticks; `markdown_code("a`b")` is fenced
        by two, and a name that starts or ends with a backtick is also padded with one space each side.
    """
    text = terminal(text)
    if in_table:
        text = text.replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def markdown_text(text: str) -> str:
    """Text as literal markdown prose on one line: every ASCII punctuation character backslash-escaped
    (CommonMark makes each literal), so no heading, list, table cell, HTML, link or emphasis can start."""
    text = _PUNCTUATION.sub(lambda m: "\\" + m.group(0), terminal(text))
    stripped = text.lstrip()
    # leading blanks could make an indented code block; a character reference is text, not indentation
    return "&#32;" * (len(text) - len(stripped)) + stripped


# ---- JSON -----------------------------------------------------------------------------------------

_NONFINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}
_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_string(text: str) -> str:
    return _SURROGATE.sub(_escape_char, text)


def strict_json(value: Any) -> Any:
    """`value` with non-finite floats as the strings "NaN", "Infinity", "-Infinity" and lone surrogates
    written as their escapes (JSON can carry neither)."""
    if isinstance(value, str):
        return _json_string(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else _NONFINITE[value]
    if isinstance(value, dict):
        return {strict_json(k) if isinstance(k, (str, float)) else k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def json_text(value: Any) -> str:
    """One strict JSON document (ASCII, so valid UTF-8); `##[` inside strings is written `##\\u005b`, which
    decodes to the same text but is no workflow command to a CI runner reading the log."""
    text = json.dumps(strict_json(value), indent=2, sort_keys=False, allow_nan=False)
    return _LEGACY_COMMAND.sub(lambda m: m.group(0)[:-1] + "\\u005b", text)


def echo_json(value: Any) -> None:
    """Print one strict JSON document on stdout."""
    click.echo(json_text(value))
