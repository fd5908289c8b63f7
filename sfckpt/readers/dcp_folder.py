"""Read torch.distributed.checkpoint (DCP) folders on one CPU process, tensor by tensor.

FSDP/FSDP2 runs save `get_state_dict(model, optimizer)` with `dcp.save`: a
`.metadata` file and `__<rank>_<n>.distcp` shards. We use DCP's own
`FileSystemReader` and `dcp.load(no_dist=True)` to read one tensor at a time,
with two safety changes, because DCP unpickles with the full `pickle`
module: `.metadata` is read by an unpickler that allows only DCP's metadata
classes, and non-tensor entries (parameter groups) are read by sfckpt's own
torch-file reader instead of `torch.load(weights_only=False)`.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from ..tensors import TensorRef
from . import pickle_guard
from .base import LoadRequest, Opened, Reader
from ..inputs import confined
from .torch_file import _ORDERED_DICT, _SAFE_BUILTINS, TorchArchive

# Failures inside DCP that are bugs of sfckpt's planner or reader, not damage in the folder
_BUGS = (AttributeError, NameError, AssertionError, ImportError)

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "torch": {"Size"},
}


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _text_only(args: tuple) -> None:
    if len(args) != 1 or type(args[0]) is not str:
        raise pickle.UnpicklingError("refusing a layout that is not named by text")


def _int_only(args: tuple) -> None:
    if len(args) != 1 or type(args[0]) is not int:
        raise pickle.UnpicklingError("refusing a memory format that is not a number")


class _MetadataUnpickler(pickle_guard.GuardedUnpickler):
    """Only DCP's metadata classes, a few builtins, torch dtypes, layouts and sizes.

    BUILD reaches only instances of the metadata dataclasses made by this load, and sets only
    their own fields; every callable handed out checks what it would hash.
    """

    def find_class(self, module: str, name: str) -> Any:
        import torch
        import torch.serialization
        from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return _SAFE_BUILTINS[name]
        if (module, name) == ("collections", "OrderedDict"):
            return _ORDERED_DICT
        if (module, name) == ("torch.serialization", "_get_layout"):
            return pickle_guard.guarded_call(torch.serialization._get_layout, _text_only)
        if (module, name) == ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
            return pickle_guard.guarded_call(_MEM_FORMAT_ENCODING, _int_only)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"class {module}.{name} is not DCP metadata")

    def build(self, inst: Any, state: Any) -> None:
        from torch.distributed.checkpoint.metadata import TensorProperties

        fields = _dataclass_fields().get(type(inst))
        if fields is None:
            super().build(inst, state)
        elif type(inst) is TensorProperties:
            if not (type(state) is tuple and len(state) == 5):
                raise pickle.UnpicklingError("TensorProperties with a state that is not 5 values")
            inst.__setstate__(state)
        elif type(state) is dict and set(state) <= fields:
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"{type(inst).__name__} with a state that is not its own fields")

    def key_fields(self, key: Any):
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if type(key) is MetadataIndex:  # hashed by (fqn, offset); offset is a torch.Size
            offset = getattr(key, "offset", None)
            return (getattr(key, "fqn", None), tuple(offset) if isinstance(offset, tuple) else offset)
        return None

    def children(self, obj: Any):
        if type(obj) in _dataclass_fields():
            return list(vars(obj).values())
        return None


@functools.cache
def _dataclass_fields() -> dict[type, set[str]]:
    import dataclasses

    from torch.distributed.checkpoint import filesystem, metadata

    classes = [getattr(metadata, n) for n in _METADATA_CLASSES["torch.distributed.checkpoint.metadata"]]
    classes.append(filesystem._StorageInfo)
    return {c: {f.name for f in dataclasses.fields(c)} for c in classes}


def _reader_classes():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    from torch.distributed.checkpoint.filesystem import FileSystem

    class GatedFileSystem(FileSystem):
        """DCP's file access with every shard opened through the gate, confined to the input's root."""

        def __init__(self, root: inputs.Root):
            super().__init__()
            self.root = root

        @contextlib.contextmanager
        def create_stream(self, path, mode: str):
            if mode != "rb":
                raise InputError(f"{path}: sfckpt only reads checkpoints", "this is a bug in sfckpt")
            with inputs.open_input(path, root=self.root) as file, file.fileobj() as stream:
                yield stream

    class SafeReader(dcp.FileSystemReader):
        """DCP's file reader, with `.metadata` read by a restricted unpickler and cached, and every
        file opened through the gate."""

        _cached = None

        def __init__(self, path: str, root: inputs.Root):
            super().__init__(path)
            self.root = root
            self.fs = GatedFileSystem(root)

        def read_metadata(self, *args, **kwargs):
            if self._cached is None:
                path = Path(self.path) / ".metadata"
                # From memory, not the file: a damaged length field then reads short instead of
                # making pickle allocate whatever the field claims.
                with inputs.open_input(path, root=self.root) as file:
                    data = file.read_all(limits.PICKLE_BYTES, "DCP metadata")
                try:
                    metadata = _MetadataUnpickler(io.BytesIO(data), len(data)).load_checked()
                except pickle_guard.GuardError as exc:
                    if exc.limit is None:
                        raise DamagedInput(f"{path}: {exc}", "the folder is damaged or crafted") from exc
                    raise exc.limit.exceeded(f"{path}: {exc}") from exc
                except RecursionError:
                    raise DamagedInput(f"{path}: the metadata is nested too deeply", "the file is damaged or crafted") from None
                except Exception as exc:
                    raise DamagedInput(f"{path}: cannot read DCP metadata ({type(exc).__name__}: {exc})"[:300],
                                     "the folder is damaged or not a torch.distributed.checkpoint") from exc
                _validate(metadata, Path(self.path), self.root)
                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._cached = metadata
            return self._cached

    class SafePlanner(DefaultLoadPlanner):
        """Loads non-tensor entries with sfckpt's code-free reader instead of torch.load(weights_only=False)."""

        def __init__(self, folder: Path):
            super().__init__()
            self.folder = folder
            self.loaded: dict[str, Any] = {}
            self.opaque: set[str] = set()

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            archive = TorchArchive(f"{self.folder}:{fqn}", data=value.getvalue())
            self.loaded[fqn] = archive.load_object()
            self.opaque |= archive.opaque

    return SafeReader, SafePlanner


class DcpFolder:
    """A DCP checkpoint: its metadata now, any tensor on demand."""

    def __init__(self, path: Path):
        self.path = path
        reader_cls, self._planner_cls = _reader_classes()
        self.reader = reader_cls(str(path), inputs.current_root(path))
        self.metadata = self.reader.read_metadata()

    def _load(self, request: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        planner = self._planner_cls(self.path)
        self.planner = planner
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(request, storage_reader=self.reader, planner=planner, no_dist=True)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException is a BaseException wrapping the cause
            cause = _first_failure(exc)
            if isinstance(cause, InputError):
                raise cause from None  # raised by sfckpt's own reader inside DCP, with its own traceback
            if isinstance(cause, _BUGS):  # sfckpt's planner or reader failed, not the input: an internal error
                raise cause from None
            if isinstance(cause, EOFError):  # a shard ends inside an entry .metadata says it holds
                raise inputs.truncated(self.path) from exc
            raise DamagedInput(f"{self.path}: reading {', '.join(list(request)[:2])} failed "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"[:400],
                             "a shard file is missing or damaged") from exc
        return planner.loaded

    def tensor(self, key: str):
        import torch

        md = self.metadata.state_dict_metadata[key]
        out = torch.empty(md.size, dtype=md.properties.dtype)
        self._load({key: out})
        return out

    def load_object(self) -> dict[str, Any]:
        """The saved state dict, nested as it was saved: tensors as TensorRefs, the rest loaded."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

        entries = self.metadata.state_dict_metadata
        byte_keys = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
        values: dict[str, Any] = self._load({k: None for k in byte_keys}) if byte_keys else {}
        self.opaque = sorted(self.planner.opaque) if byte_keys else []
        for key, md in entries.items():
            if isinstance(md, TensorStorageMetadata):
                dtype = str(md.properties.dtype).removeprefix("torch.")
                values[key] = TensorRef(dtype, tuple(md.size), (lambda k=key: self.tensor(k)), storage_id=(str(self.path), key))
        paths = getattr(self.metadata, "planner_data", None) or {}
        root: dict[Any, Any] = {}
        for key, value in values.items():
            path = paths.get(key, (key,))
            node = root
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
        return _lists(root)


def _validate(metadata: Any, path: Path, root: inputs.Root) -> None:
    """Check the unpickled metadata has the shape DCP's own classes promise (a flipped byte may not),
    names only files inside the folder, and describes no more data than the folder holds."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, StorageMeta, TensorStorageMetadata)

    damaged = DamagedInput(f"{path}/.metadata does not describe a checkpoint DCP can read", "the folder is damaged")
    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise DamagedInput(f"{path}/.metadata does not hold DCP metadata", "the folder is damaged")
    entries = getattr(metadata, "state_dict_metadata", None)
    paths = getattr(metadata, "planner_data", None)
    storage = getattr(metadata, "storage_data", None)
    if not (isinstance(entries, dict) and isinstance(storage, dict)):
        raise damaged
    if not (paths is None or (isinstance(paths, dict) and all(
            type(p) is tuple and p and all(type(part) in (str, int) for part in p) for p in paths.values()))):
        raise damaged

    # Where each entry's bytes are: files confined to the folder, slices inside them.
    stored: dict[str, int] = {}  # fqn -> bytes stored for it
    files: dict[str, int] = {}  # relative path -> size
    for index, info in storage.items():
        if type(index) is not MetadataIndex or type(info) is not _StorageInfo or type(getattr(index, "fqn", None)) is not str:
            raise damaged
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if type(rel) is not str or type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
            raise damaged
        if getattr(info, "transform_descriptors", None):
            raise InputError(f"{path}/.metadata: entry '{index.fqn}' is stored with transforms "
                             f"{list(info.transform_descriptors)[:3]!r:.100}", "sfckpt reads only untransformed DCP shards")
        if rel not in files:
            files[rel] = _confined_size(path, rel, root)
            if files[rel] < 0:
                raise InputError(f"{path}: shard file '{rel}' named in .metadata is missing", "copy the whole folder")
        if offset + length > files[rel]:
            raise DamagedInput(f"{path}/{rel}: entry '{index.fqn}' lies past the end of the file", "the folder is damaged")
        stored[index.fqn] = stored.get(index.fqn, 0) + length

    max_chunks = limits.DCP_CHUNKS.value
    for key, md in entries.items():
        if type(key) is not str:
            raise damaged
        if isinstance(md, BytesStorageMetadata):
            continue
        if not isinstance(md, TensorStorageMetadata):
            raise damaged
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        size, chunks = getattr(md, "size", None), getattr(md, "chunks", None)
        if not (isinstance(dtype, torch.dtype) and isinstance(size, tuple) and all(type(n) is int and 0 <= n < 1 << 62 for n in size)
                and isinstance(chunks, list)):
            raise damaged
        if len(chunks) > max_chunks:
            raise limits.DCP_CHUNKS.exceeded(f"{path}/.metadata: tensor '{key}' is split into {len(chunks)} chunks")
        for chunk in chunks:
            offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
            if not (type(chunk) is ChunkStorageMetadata and isinstance(offsets, tuple) and isinstance(sizes, tuple)
                    and len(offsets) == len(sizes) == len(size)
                    and all(type(o) is int and type(n) is int and 0 <= o and 0 <= n and o + n <= d
                            for o, n, d in zip(offsets, sizes, size))):
                raise damaged
        # Chunks must tile the tensor: an element no chunk covers would be written uninitialised.
        if sum(math.prod(chunk.sizes) for chunk in chunks) != math.prod(size) or not _tile(size, chunks, path, key):
            raise DamagedInput(f"{path}/.metadata: the chunks of tensor '{key}' do not cover its shape {tuple(size)} "
                             "exactly once", "the folder is damaged or incomplete")
        nbytes = math.prod(size) * torch.empty(0, dtype=dtype).element_size()
        if nbytes > stored.get(key, 0):
            raise DamagedInput(f"{path}/.metadata: tensor '{key}' of shape {tuple(size)} needs {nbytes} bytes but its "
                             f"shards hold {stored.get(key, 0)}", "the folder is damaged or incomplete")

    _check_nesting(entries, paths or {}, path)


GRID_CELLS = 1 << 22  # cells of the grid a tensor's chunk boundaries make; honest saves split one or two dimensions


def _tile(size: tuple, chunks: list, path: Path, key: str) -> bool:
    """Whether the chunks cover every element of the tensor exactly once (sizes that add up are not
    enough: two copies of the top half add up to the whole). Counted on the grid the chunks' own
    boundaries cut the tensor into, so the cost is that grid's size, not the tensor's."""
    import numpy as np

    bounds = [sorted({0, n} | {c.offsets[d] for c in chunks} | {c.offsets[d] + c.sizes[d] for c in chunks})
              for d, n in enumerate(size)]
    cells = math.prod(len(b) - 1 for b in bounds)
    if cells > GRID_CELLS:
        raise DamagedInput(f"{path}/.metadata: the chunks of tensor '{key}' cut it into {cells} pieces",
                         "the folder is damaged or crafted; a save splits a tensor along one or two dimensions")
    where = [{v: i for i, v in enumerate(b)} for b in bounds]
    counts = np.zeros([len(b) - 1 for b in bounds], dtype=np.int64)
    for c in chunks:
        counts[tuple(slice(where[d][o], where[d][o + n]) for d, (o, n) in enumerate(zip(c.offsets, c.sizes)))] += 1
    return bool((counts == 1).all())


def _check_nesting(entries: dict, paths: dict, path: Path) -> None:
    """planner_data (where each flat key sits in the nested state dict) must place every entry on its own
    leaf: no path inside another's (a tensor would be asked to hold a key), none twice (one entry would
    replace another), none deeper than the nesting limit (the rebuild recurses)."""
    leaves = [paths.get(key, (key,)) for key in entries]
    depth = limits.NESTING_DEPTH.value
    deep = next((p for p in leaves if len(p) > depth), None)
    if deep is not None:
        raise limits.NESTING_DEPTH.exceeded(f"{path}/.metadata: planner_data nests an entry {len(deep)} levels deep")
    seen: set[tuple] = set()
    twice = [p for p in leaves if p in seen or seen.add(p)]
    clash = twice[0] if twice else next((p for p in leaves if any(p[:i] in seen for i in range(1, len(p)))), None)
    if clash is not None:
        raise DamagedInput(f"{path}/.metadata: planner_data places two entries at {'.'.join(map(str, clash))[:200]} "
                         "(one inside or on top of the other)", "the folder is damaged or crafted")


def _confined_size(folder: Path, rel: str, root: inputs.Root) -> int:
    """The size of `rel`, a file the metadata names, which must be a file inside the input (-1: missing)."""
    target = confined(folder, rel, f"{folder}/.metadata")
    if not os.path.lexists(target):
        return -1
    with inputs.open_input(target, root=root) as file:
        return file.size


def _first_failure(exc: BaseException) -> BaseException:
    """The original exception inside DCP's CheckpointException (rank -> (exception, traceback))."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, BaseException):
                return inner
    return exc


def _lists(node: Any, key: Any = None) -> Any:
    """Turn dicts keyed 0..n-1 (flattened lists, like param_groups) back into lists.

    An optimizer's `state` stays a dict: it is keyed by parameter, not a list."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v, k) for k, v in node.items()}
    if key != "state" and node and all(isinstance(k, int) for k in node) and sorted(node) == list(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def save_complete(path: Path) -> bool:
    """Whether a torch.distributed.checkpoint save is finished: the coordinator writes `.metadata`
    once every rank's `.distcp` files are written."""
    try:
        return (path / ".metadata").is_file() and (path / ".metadata").stat().st_size > 0
    except OSError:
        return False


class DcpReader(Reader):
    """Any torch.distributed.checkpoint folder (`.metadata` + `.distcp` shards)."""

    name = "torch.distributed.checkpoint"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_dcp_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        folder = DcpFolder(path)
        obj = folder.load_object()
        return Opened(obj, folder.opaque, self.name, ties_visible=False)  # DCP saves tied weights as copies

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)
