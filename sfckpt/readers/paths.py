"""Paths that a checkpoint names (index shards, DCP storage files) stay inside its folder."""
from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import InputError


def confined(folder: Path, name: object, named_by: str) -> Path:
    """`folder / name`, refusing any `name` that leads outside `folder` once symlinks are resolved.

    The one link allowed out is the Hugging Face hub cache's own layout, where
    `snapshots/<rev>/<file>` links to `../../blobs/<hash>` of the same repository.
    """
    if not isinstance(name, str) or not name:
        raise InputError(f"{named_by} names a file by {type(name).__name__} {str(name)[:60]!r}, not by a file name",
                         "the file is damaged or crafted")
    shown = name[:200]
    lexical = PurePosixPath(name)
    if lexical.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in lexical.parts or "\\" in name:
        raise InputError(f"{named_by} names '{shown}', which is outside the checkpoint folder {folder}",
                         "refusing to read it; only files inside the folder are read")
    root = folder.resolve()
    target = (folder / name).resolve()
    if target.is_relative_to(root):
        return folder / name
    if root.parent.name == "snapshots" and target.is_relative_to(root.parent.parent / "blobs"):
        return folder / name
    raise InputError(f"{named_by} names '{shown}', which is outside the checkpoint folder {folder} "
                     f"(a link to {str(target)[:200]})", "refusing to read it; only files inside the folder are read")
