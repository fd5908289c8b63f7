"""Hints for names that differ only by a prefix (a Lightning attribute such as `model.`).

A Lightning checkpoint converted without `--strip-prefix model.` writes `model.0.weight`; checked
with the option (or the other way round), every tensor is both missing and extra. Listing them
says nothing useful; the prefix, and which side has it, says what to do.
"""
from __future__ import annotations

from collections.abc import Collection


def prefix_between(missing: Collection[str], extra: Collection[str]) -> tuple[str, str] | None:
    """(prefix, side) when the `extra` names are the `missing` ones with `prefix` in front (side
    "release": the release has it) or without it (side "x"); None when no one prefix explains both."""
    if not missing or len(missing) != len(extra):
        return None
    for longer, shorter, side in ((extra, missing, "release"), (missing, extra, "x")):
        first = min(longer)
        shorter_set = set(shorter)
        for i, ch in enumerate(first):
            if ch != ".":
                continue
            prefix = first[: i + 1]
            if {prefix + n for n in shorter_set} == set(longer):
                return prefix, side
    return None


def prefix_verdict(prefix: str, side: str, strip_prefix: str | None) -> str:
    """The check verdict for names that differ by `prefix` (see `prefix_between`)."""
    if side == "release":
        fix = (f"check without --strip-prefix {strip_prefix}, or convert again with it" if strip_prefix == prefix
               else f"convert again with --strip-prefix {prefix}")
        return (f"the released tensor names are x's with '{prefix}' in front (the release was converted without "
                f"--strip-prefix {prefix}); {fix}")
    return (f"the released tensor names are x's without '{prefix}' (the release was converted with --strip-prefix "
            f"{prefix}); check with --strip-prefix {prefix} too")
