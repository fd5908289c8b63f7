"""Container readers: turn a path into Python objects whose tensors are `TensorRef`s.

Which reader applies is decided from the bytes, not the file name, so a
renamed file still reads and a wrong one is named for what it is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import inputs
from ..errors import InputError, Opt
from ..conventions import INDEX_NAME, SINGLE_NAME
from .safetensors_file import read_index, read_safetensors
from . import keras_file
from .torch_file import Opaque, TorchArchive

LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def sniff(path: Path) -> str:
    """The container kind of `path`: 'torch', 'safetensors', 'safetensors-index', 'folder', or one of Keras'
    ('keras' for a `.keras` zip, 'keras-weights' for HDF5, 'keras-sharded' for a `.weights.json`)."""
    try:
        if not path.exists():
            raise InputError(f"{path}: no such file or folder", "check the path")
        if path.is_dir():
            return "folder"
    except OSError as exc:  # a name too long, a loop of links: the path, not the file, is wrong
        raise InputError(f"{str(path)[:200]}: cannot be used ({exc.strerror})", "check the path") from exc
    with inputs.open_input(path) as f:
        head = f.pread(min(64, f.size), 0)
    if not head:
        raise InputError(f"{path}: the file is empty", "the copy or the save did not complete")
    if head.startswith(LFS_POINTER):
        raise InputError(
            f"{path}: this is a Git LFS pointer file, not the weights",
            "fetch the real file with `git lfs pull` (in GitHub Actions, set `lfs: true` on actions/checkout)",
        )
    if head.startswith(b"PK\x03\x04"):
        with inputs.open_input(path) as f:
            return keras_file.sniff_zip(f) or "torch"
    keras_kind = keras_file.sniff_file(path, head)
    if keras_kind:
        return keras_kind
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head.lstrip().startswith(b"{") and path.name.endswith(".json"):
        return "safetensors-index"
    if head[:1] == b"\x80":
        raise InputError(
            f"{path}: a legacy (pre-1.6, non-zip) torch file, which cannot be read without running its code",
            "load it in a trusted session and re-save it with a current torch.save",
        )
    raise InputError(f"{path}: not a checkpoint sfckpt can read", "expected a torch.save file, a safetensors file or a folder")


def load_torch(path: Path) -> tuple[Any, list[str]]:
    """The object a `torch.save` file holds, and the classes replaced by placeholders."""
    archive = TorchArchive(path)
    obj = archive.load_object()
    return obj, sorted(archive.opaque)


def read_weights(path: Path):
    """A flat name -> TensorRef map from a safetensors file, index or release folder."""
    with inputs.scope(path):
        return _read_weights(path)


def _read_weights(path: Path):
    kind = sniff(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "safetensors-index":
        return read_index(path)
    if kind in keras_file.KINDS:
        return keras_file.read_weights(path, kind), {}
    if kind == "folder":
        if (path / INDEX_NAME).is_file() and (path / SINGLE_NAME).exists():
            raise InputError(
                f"{path}: the folder holds both {SINGLE_NAME} and {INDEX_NAME}; from_pretrained loads {SINGLE_NAME}, "
                "so one of them is left over from an older release",
                "remove the stale one (converting with " + Opt("force") + " replaces a whole release layout)",
            )
        if (path / INDEX_NAME).is_file():
            return read_index(path / INDEX_NAME)
        if (path / SINGLE_NAME).is_file():
            return read_safetensors(path / SINGLE_NAME)
        if (path / "adapter_model.safetensors").is_file():  # a PEFT adapter folder
            return read_safetensors(path / "adapter_model.safetensors")
        raise InputError(f"{path}: the folder holds no {SINGLE_NAME} or {INDEX_NAME}", "point at the weights file itself")
    raise InputError(f"{path}: not a weights file", "expected safetensors")


__all__ = ["Opaque", "TorchArchive", "load_torch", "read_weights", "sniff"]
