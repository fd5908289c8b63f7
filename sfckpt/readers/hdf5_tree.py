"""Read the datasets of an HDF5 file (Keras weights) as `TensorRef`s, refusing anything that reads outside it.

The file is handed to h5py as a file object over an opened input (`inputs.InputFile`), a window of
it (a `.keras` zip member stored uncompressed), never as a path, so HDF5 itself opens no file.
HDF5 can still point outside: external links, external raw-data storage, virtual datasets (whose
sources are other files). The walk looks at every link before following it and every dataset's
creation properties before reading it, and refuses all three, as well as soft links (names that
alias other objects) and hard links back to a group already seen (a cycle). Tensor data is read with
positioned reads at the dataset's own offset, checked to lie inside the window; datasets whose
bytes are not stored plainly (chunks, filters) are refused, since Keras writes none.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from .. import limits
from ..errors import DamagedInput, InputError
from ..inputs import InputFile
from ..tensors import DTYPES, TensorRef

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
OBJECTS = limits.Limit("SFCKPT_MAX_H5_OBJECTS", 1_000_000, "groups and datasets one HDF5 file may hold")
_NUMPY_DTYPES = {"<f2": "float16", "<f4": "float32", "<f8": "float64", "<i1": "int8", "|i1": "int8",
                 "<i2": "int16", "<i4": "int32", "<i8": "int64", "|u1": "uint8", "<u2": "uint16",
                 "<u4": "uint32", "<u8": "uint64", "|b1": "bool"}


def need_h5py():
    """The h5py module, or the one-line error naming the extra that installs it."""
    try:
        import h5py
    except ImportError:
        raise InputError("reading Keras files needs h5py, which is not installed",
                         "pip install 'sfckpt[keras]'") from None
    return h5py


class Window(io.RawIOBase):
    """Bytes [start, start + size) of an opened input, as a read-only file object (positioned reads)."""

    def __init__(self, file: InputFile, start: int, size: int):
        super().__init__()
        self.file, self.start, self.size, self.pos = file, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        n = max(0, min(len(buf), self.size - self.pos))
        if n:
            self.file.readinto(memoryview(buf)[:n], self.start + self.pos)
        self.pos += n
        return n


@dataclass
class Dataset:
    """One dataset of the tree: where it is and what it holds."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    ref: TensorRef
    h5dtype: Any  # the file's own type (Keras stores bfloat16 as 2-byte opaque data), for writing it back


@dataclass
class Tree:
    """An HDF5 file's datasets by path, in a stable order, and its groups' attributes."""

    datasets: dict[str, Dataset]
    groups: dict[str, dict[str, Any]]  # path -> attributes ("" is the root)
    handle: Any  # the open h5py.File: compact datasets were read from it
    # path -> where the group's header lies in the file: HDF5 allocates in write order, and Keras writes
    # layers in model order, which the file keeps no other record of
    written: dict[str, int] = field(default_factory=dict)


def read_tree(file: InputFile, start: int, size: int, where: str) -> Tree:
    """Walk the HDF5 file in bytes [start, start + size) of `file`; `where` names it in messages."""
    h5py = need_h5py()
    window = Window(file, start, size)
    head = window.read(8)
    window.seek(0)
    if head != HDF5_MAGIC:
        raise InputError(f"{where}: not an HDF5 file", "the file is damaged or not what its name says")
    try:
        handle = h5py.File(window, "r")
    except (OSError, ValueError) as exc:
        raise DamagedInput(f"{where}: HDF5 cannot open it ({str(exc)[:120]})", "the file is truncated or damaged") from exc
    if handle.userblock_size:
        raise InputError(f"{where}: the HDF5 file has a user block, which Keras never writes", "the file is damaged or crafted")
    tree = Tree({}, {"": _attrs(handle, where)}, handle)
    _walk(h5py, handle, "", tree, file, start, size, where, set(), 0)
    return tree


def _attrs(obj, where: str) -> dict[str, Any]:
    """A group's attributes that are short text (Keras keeps the layer's name there); others are dropped."""
    out = {}
    for key in obj.attrs:
        value = obj.attrs[key]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(key, str) and isinstance(value, str) and len(value) <= 4096:
            out[key] = value
    return out


def _walk(h5py, group, prefix: str, tree: Tree, file: InputFile, start: int, size: int, where: str,
          seen: set, depth: int) -> None:
    if depth > limits.NESTING_DEPTH.value:
        raise limits.NESTING_DEPTH.exceeded(f"{where}: HDF5 groups nested more than {limits.NESTING_DEPTH.value} deep")
    for name in group:
        path = f"{prefix}{name}"
        link = group.get(name, getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise InputError(f"{where}: '{path[:200]}' is an external link to {link.filename[:200]!r}, a file outside the input",
                             "refusing to follow it; Keras never writes links")
        if not isinstance(link, h5py.HardLink):
            raise InputError(f"{where}: '{path[:200]}' is a {type(link).__name__}, which Keras never writes",
                             "refusing to follow it; the file is damaged or crafted")
        obj = group[name]
        key = h5py.h5o.get_info(obj.id).addr
        if key in seen:
            raise InputError(f"{where}: '{path[:200]}' links back to an object already read (a cycle or an alias)",
                             "the file is damaged or crafted")
        seen.add(key)
        if len(seen) > OBJECTS.value:
            raise OBJECTS.exceeded(f"{where}: more than {OBJECTS.value} HDF5 objects")
        if isinstance(obj, h5py.Dataset):
            tree.datasets[path] = _dataset(h5py, obj, path, file, start, size, where)
        elif not isinstance(obj, h5py.Group):
            raise InputError(f"{where}: '{path[:200]}' is a {type(obj).__name__}, which Keras never writes",
                             "the file is damaged or crafted")
        else:
            tree.groups[path] = _attrs(obj, where)
            tree.written[path] = key
            _walk(h5py, obj, path + "/", tree, file, start, size, where, seen, depth + 1)


def _dataset(h5py, d, path: str, file: InputFile, start: int, size: int, where: str) -> Dataset:
    """A TensorRef over a dataset's bytes, after refusing storage that lies elsewhere or is transformed."""
    plist = d.id.get_create_plist()
    if d.is_virtual:
        raise InputError(f"{where}: dataset '{path[:200]}' is virtual (its data lie in other files)",
                         "refusing to read it; Keras never writes virtual datasets")
    if plist.get_external_count():
        raise InputError(f"{where}: dataset '{path[:200]}' keeps its data in an external file",
                         "refusing to read it; Keras never writes external storage")
    layout = plist.get_layout()
    if plist.get_nfilters() or layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.COMPACT):
        raise InputError(f"{where}: dataset '{path[:200]}' is stored chunked or compressed, which Keras never writes",
                         "re-save the weights with Keras")
    dtype = _dtype_of(d, path, where)
    shape = tuple(int(n) for n in d.shape) if d.shape is not None else ()
    itemsize = DTYPES[dtype][0]
    nbytes = itemsize
    for n in shape:
        nbytes *= n
    offset = d.id.get_offset()
    if layout == h5py.h5d.CONTIGUOUS and offset is not None:
        if offset < 0 or offset + nbytes > size:
            raise InputError(f"{where}: dataset '{path[:200]}' claims {nbytes} bytes past the end of the file",
                             "the file is truncated or damaged")
        at = start + offset
        ref = TensorRef(dtype, shape, (lambda: file.read_tensor(at, dtype, shape)), storage_id=(where, path),
                        location=(file, at),
                        reader=(lambda first, count, out: file.read_tensor(at + first * itemsize, dtype, (count,), out)))
    elif nbytes <= 64 << 10 and (layout == h5py.h5d.COMPACT or nbytes == 0):
        data = _read_small(d, nbytes, shape)
        ref = TensorRef(dtype, shape, (lambda: _as_tensor(data, dtype, shape)), storage_id=(where, path),
                        array=(lambda: data))
    else:
        raise InputError(f"{where}: dataset '{path[:200]}' has no data stored", "the file is truncated or damaged")
    return Dataset(path, dtype, shape, ref, d.dtype)


def _read_small(d, nbytes: int, shape: tuple[int, ...]):
    """A compact (or empty) dataset's bytes, read whole through h5py: at most 64 KiB by HDF5's own rule."""
    import numpy as np

    raw = np.empty(shape, dtype=d.dtype)
    if nbytes:
        d.read_direct(raw)
    return raw.reshape(-1).view(np.uint8).copy()


def _as_tensor(data, dtype: str, shape: tuple[int, ...]):
    """A small dataset's bytes as a tensor of its own."""
    import torch

    from ..tensors import torch_dtype

    return torch.from_numpy(data.copy()).view(torch_dtype(dtype)).reshape(shape)


def _dtype_of(d, path: str, where: str) -> str:
    """The torch dtype name of a dataset: Keras marks bfloat16 (2-byte opaque data) with a `dtype` attribute."""
    code = d.dtype.str
    marked = d.attrs.get("dtype") if "dtype" in d.attrs else None
    if isinstance(marked, bytes):
        marked = marked.decode("utf-8", "replace")
    if code == "|V2" and marked == "bfloat16":
        return "bfloat16"
    if code in _NUMPY_DTYPES:
        return _NUMPY_DTYPES[code]
    raise InputError(f"{where}: dataset '{path[:200]}' has type {code[:20]}, which Keras does not write for variables",
                     "the file is damaged, big-endian or not a Keras weights file")
