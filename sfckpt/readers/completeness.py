"""Whether a file a training run is writing is whole yet, from its own structure (for `sfckpt watch`).

A zip (every `torch.save` file) is finished when its end-of-central-directory record is there and
the directory it points to lies before it: torch writes both last. A safetensors file is finished
when its data reach as far as its header says. Each container reader's `save_complete` adds what
that container writes last (trainer_state.json, `latest`, `.metadata`, ...). A file that cannot be
read yet (shorter than its header, a folder being renamed) is simply not complete.
"""
from __future__ import annotations

import struct
from pathlib import Path

from .. import inputs
from ..errors import InputError

_EOCD, _EOCD64 = b"PK\x05\x06", b"PK\x06\x06"
_EOCD_SIZE, _MAX_COMMENT = 22, 65535


def zip_complete(path: Path) -> bool:
    """A torch.save (zip) file whose end-of-central-directory record is written."""
    try:
        with inputs.open_input(path, root=inputs.Root.of(path)) as f:
            size = f.size
            if size < _EOCD_SIZE:
                return False
            span = min(size, _EOCD_SIZE + _MAX_COMMENT)
            tail = f.pread(span, size - span)
    except (InputError, OSError):
        return False
    at = tail.rfind(_EOCD)
    if at < 0 or at + _EOCD_SIZE > len(tail):
        return False
    directory_size, directory_offset = struct.unpack_from("<II", tail, at + 12)
    if 0xFFFFFFFF in (directory_size, directory_offset):  # zip64: its own end record comes first
        return tail.rfind(_EOCD64, 0, at) >= 0
    return directory_offset + directory_size <= size - span + at


def safetensors_complete(path: Path) -> bool:
    """A safetensors file whose tensors are all written (its header checks out against its size)."""
    from .safetensors_file import read_header

    try:
        with inputs.open_input(path, root=inputs.Root.of(path)) as f:
            read_header(f)
    except (InputError, OSError):
        return False
    return True


def file_complete(path: Path) -> bool:
    """Whether a weights or state file is whole, by its format (other files count as whole)."""
    if path.suffix == ".safetensors":
        return safetensors_complete(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return zip_complete(path)
    return True


def files_complete(folder: Path) -> bool:
    """Every weights or state file directly in `folder` is whole."""
    try:
        return all(file_complete(p) for p in folder.iterdir() if p.is_file())
    except OSError:
        return False
