"""The GitHub Action's check step (action.yml), and what exit 2 leaves in a workflow.

The Action hands its inputs over as environment variables. `args` and `weights` are split as a
shell splits words (`shlex`: quotes and backslashes honoured) but nothing is executed: no
expansion of variables, globs or command substitution, since an input string is data, not a
script. The step's outputs say `passed` (`true`/`false`) and `result`: `x` (exit 0), `not-x`
(exit 1) or `error` (exit 2: the check could not be made), so a workflow can tell "not x" from
"could not decide".

Run as `python -m sfckpt.github_action` with SFCKPT_WEIGHTS, SFCKPT_CKPT and SFCKPT_ARGS set.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

RESULTS = {0: "x", 1: "not-x"}
HELP = {"-h", "--help"}


def append_step_summary(markdown: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY when the runner gives one (nothing otherwise)."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8", errors="backslashreplace") as f:  # a lone surrogate in a name
            f.write(markdown)


def error_summary(command: str, line: str) -> str:
    """The step summary of a command that could not decide (exit 2): the error line, escaped."""
    from .textout import markdown_text

    return f"### ⚠️ {command}: could not decide (exit 2)\n\n{markdown_text(line)}\n"


def _split(name: str) -> list[str]:
    """An input as words, as a shell splits them (quotes honoured), never run through a shell."""
    try:
        return shlex.split(os.environ.get(name, ""))
    except ValueError as exc:  # an unclosed quote
        raise SystemExit(_refuse(f"the action's input in {name} cannot be split into words ({exc})"))


def _refuse(message: str, hint: str = "quote each value once, as in a shell") -> int:
    from . import textout

    textout.echo_line(f"error: {message}; {hint}", err=True)
    textout.annotate_error("sfckpt", message, err=True)
    append_step_summary(error_summary("sfckpt check", message))
    _outputs(2)
    return 2


def _outputs(code: int) -> None:
    output = os.environ.get("GITHUB_OUTPUT")
    if output:
        with open(output, "a", encoding="utf-8") as f:
            f.write(f"passed={'true' if code == 0 else 'false'}\nresult={RESULTS.get(code, 'error')}\n")


def main() -> int:
    """Run `sfckpt check WEIGHTS --ckpt CKPT ARGS` and set the step's outputs; returns its exit code."""
    weights, args = _split("SFCKPT_WEIGHTS"), _split("SFCKPT_ARGS")
    # `check --help` prints usage and exits 0: the step would pass, and say `x`, having checked nothing
    if HELP.intersection(weights + args):
        return _refuse("the action's inputs ask for --help, which prints the usage instead of checking (exit 0)",
                       "remove it from args")
    command = [sys.executable, "-m", "sfckpt", "check", *weights, "--ckpt", os.environ.get("SFCKPT_CKPT", ""), *args]
    code = subprocess.call(command)
    _outputs(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
