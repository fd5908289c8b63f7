"""Read torch.distributed.checkpoint (DCP) folders on one CPU process, tensor by tensor.

FSDP/FSDP2 runs save `get_state_dict(model, optimizer)` with `dcp.save`: a
`.metadata` file and `__<rank>_<n>.distcp` shards. Each entry of a shard is
a `torch.save` archive of one chunk (or of one non-tensor value) at the offset
and length `.metadata` records (torch's `filesystem._write_item`). sfckpt opens
each shard once through the gate and reads those archives in place with its
own torch-file reader: a chunk's data with positioned reads, only the
elements asked for (a lerp slice, the mapping's sample), and non-tensor
entries (parameter groups) without `torch.load(weights_only=False)`.
`.metadata` is read by an unpickler that allows only DCP's metadata classes,
built as sfckpt's own records of the same names and fields (dcp_records.py),
so neither `inspect` nor `convert` imports torch.distributed.checkpoint.
A chunk that is not such an archive is read through DCP's own
`FileSystemReader` and `dcp.load(no_dist=True)`, its files opened through the gate.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from ..tensors import Part, TensorRef, joined_reader, joined_runs, torch_dtype
from . import dcp_records as records, pickle_guard
from .base import LoadRequest, Opened, Reader
from .window import Window
from ..inputs import confined
from .torch_file import _ORDERED_DICT, _SAFE_BUILTINS, TorchArchive

# Failures inside DCP that are bugs of sfckpt's planner or reader, not damage in the folder
_BUGS = (AttributeError, NameError, AssertionError, ImportError)

_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"}  # checkpoint ids
_MEMORY_FORMATS = {0: "contiguous_format", 1: "channels_last", 2: "preserve_format"}  # DCP's _MEM_FORMAT_ENCODING


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


def _text_only(args: tuple) -> None:
    if len(args) != 1 or type(args[0]) is not str:
        raise pickle.UnpicklingError("refusing a layout that is not named by text")


def _int_only(args: tuple) -> None:
    if len(args) != 1 or type(args[0]) is not int:
        raise pickle.UnpicklingError("refusing a memory format that is not a number")


def _layout(name: str) -> records.TorchName:
    # torch.serialization._get_layout("torch.strided"), without torch
    found = records.torch_name(name.removeprefix("torch.")) if name.startswith("torch.") else None
    if found is None or found.kind != "layout":
        raise pickle.UnpicklingError(f"unknown layout {name[:40]!r}")
    return found


class _MetadataUnpickler(pickle_guard.GuardedUnpickler):
    """Only DCP's metadata classes (as sfckpt's records: dcp_records.py), a few builtins, torch
    dtypes, layouts and sizes.

    BUILD reaches only records made by this load, and sets only their own fields; every
    callable handed out checks what it would hash.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            if name == "Size":
                return tuple
            found = records.torch_name(name)
            if found is not None:
                return found
        if module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            return _SAFE_BUILTINS[name]
        if (module, name) == ("collections", "OrderedDict"):
            return _ORDERED_DICT
        if (module, name) == ("torch.serialization", "_get_layout"):
            return pickle_guard.guarded_call(_layout, _text_only)
        if (module, name) == ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"):
            return pickle_guard.guarded_call(lambda code: code, _int_only)
        if (module, name) in records.CLASSES:
            return records.CLASSES[(module, name)]
        if module == "pathlib" and name in _PATH_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"class {module}.{name} is not DCP metadata")

    def build(self, inst: Any, state: Any) -> None:
        if not isinstance(inst, records.Record):
            super().build(inst, state)
        elif type(inst) is records.TensorProperties:
            if not (type(state) is tuple and len(state) == 5 and state[3] in _MEMORY_FORMATS):
                raise pickle.UnpicklingError("TensorProperties with a state that is not its 5 values")
            dtype, layout, requires_grad, code, pin_memory = state
            inst.__dict__.update(dtype=dtype, layout=layout, requires_grad=requires_grad, pin_memory=pin_memory,
                                 memory_format=records.TorchName("memory_format", _MEMORY_FORMATS[code]))
        elif type(state) is dict and set(state) <= set(inst.FIELDS):
            inst.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"{type(inst).__name__} with a state that is not its own fields")

    def key_fields(self, key: Any):
        if type(key) is records.MetadataIndex:  # hashed by (fqn, offset)
            offset = getattr(key, "offset", None)
            return (getattr(key, "fqn", None), tuple(offset) if isinstance(offset, tuple) else offset)
        return None

    def children(self, obj: Any):
        if isinstance(obj, records.Record):
            return list(vars(obj).values())
        return None


def read_metadata(path: Path, root: inputs.Root) -> records.Metadata:
    """A DCP folder's `.metadata`, read by the restricted unpickler and checked (`_validate`)."""
    md_path = path / ".metadata"
    # From memory, not the file: a damaged length field then reads short instead of making pickle
    # allocate whatever the field claims.
    with inputs.open_input(md_path, root=root) as file:
        data = file.read_all(limits.PICKLE_BYTES, "DCP metadata")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data), len(data)).load_checked()
    except pickle_guard.GuardError as exc:
        if exc.limit is None:
            raise DamagedInput(f"{md_path}: {exc}", "the folder is damaged or crafted") from exc
        raise exc.limit.exceeded(f"{md_path}: {exc}") from exc
    except RecursionError:
        raise DamagedInput(f"{md_path}: the metadata is nested too deeply", "the file is damaged or crafted") from None
    except Exception as exc:  # a pickle of damaged bytes fails in any way; nothing of it runs (restricted)
        raise DamagedInput(f"{md_path}: cannot read DCP metadata ({type(exc).__name__}: {exc})"[:300],
                           "the folder is damaged or not a torch.distributed.checkpoint") from exc
    _validate(metadata, path, root)
    return metadata


def _reader_classes():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
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
        """DCP's file reader, with the metadata sfckpt read and checked (as DCP's classes), and every
        file opened through the gate."""

        def __init__(self, path: str, root: inputs.Root, metadata: records.Metadata):
            super().__init__(path)
            self.root = root
            self.fs = GatedFileSystem(root)
            self._metadata = records.to_dcp(metadata, self.load_id)

        def read_metadata(self, *args, **kwargs):
            return self._metadata

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
        self.root = inputs.current_root(path)
        self.metadata = read_metadata(path, self.root)
        self._dcp = None  # DCP's own reader and planner class, made only if a chunk needs them
        # (fqn, chunk offsets) -> where its archive lies; MetadataIndex compares the same two fields
        self._stored = {(index.fqn, None if index.offset is None else tuple(index.offset)): info
                        for index, info in self.metadata.storage_data.items()}
        self._files: dict[str, inputs.InputFile] = {}
        self._kept: dict[str, Any] = {}

    def _window(self, info: Any, what: str) -> Window:
        """The bytes of one entry of a shard file, the file opened once through the gate."""
        rel = info.relative_path
        if rel not in self._files:
            inputs.allow_open_files(len(self._files) + 64)
            self._files[rel] = inputs.open_input(confined(self.path, rel, f"{self.path}/.metadata"), root=self.root)
        return Window(self._files[rel], info.offset, info.length, f"{self.path}/{rel}:{what}")

    def _chunks(self, key: str, md: Any) -> list[tuple[TensorRef, Any]] | None:
        """Each chunk of tensor `key` as a TensorRef inside its shard, in order; None when one is not a
        torch.save archive of a tensor of the chunk's dtype and shape (DCP's own reader then reads it)."""
        dtype = md.properties.dtype.name
        out = []
        for chunk in sorted(md.chunks, key=lambda c: tuple(c.offsets)):
            info = self._stored.get((key, tuple(chunk.offsets)))
            if info is None:
                return None
            try:
                ref = TorchArchive(f"{self.path}/{info.relative_path}:{key}", opened=self._window(info, key)).load_object()
            except InputError:
                return None
            if not (isinstance(ref, TensorRef) and ref.dtype == dtype and ref.shape == tuple(chunk.sizes)):
                return None
            out.append((ref, chunk))
        return out

    def _ref(self, key: str, md: Any) -> TensorRef:
        """Tensor `key`, read chunk by chunk from the shards; a range of it from just the chunks it falls in
        when the chunks split only the first dimension (FSDP's sharding), so each is a run of elements."""
        dtype, size = md.properties.dtype.name, tuple(md.size)
        chunks = functools.cache(lambda: self._chunks(key, md))
        rows = all(tuple(c.offsets[1:]) == (0,) * (len(size) - 1) and tuple(c.sizes[1:]) == size[1:] for c in md.chunks)

        def parts() -> list[Part] | None:
            found = chunks()
            return None if found is None or not rows else [(ref, 0, ref.numel) for ref, _ in found]

        def load():
            import torch

            if chunks() is None:
                return self.tensor(key)
            out = torch.empty(size, dtype=torch_dtype(dtype))
            if parts() is not None:
                joined_reader(parts())(0, out.numel(), out.view(-1))
                return out
            for ref, chunk in chunks():
                region = out
                for d, (o, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                    region = region.narrow(d, o, n)
                region.copy_(ref.load())
            return out

        def read(start: int, count: int, out):
            if parts() is None:  # read by DCP's reader: whole, kept while its slices are asked for
                part = self._recent(key, load).reshape(-1).narrow(0, start, count)
                return part if out is None else out.copy_(part)
            return joined_reader(parts())(start, count, out)

        def runs():
            found = parts()
            return joined_runs(found) if found is not None else None

        # Chunks that split more than rows (2-D sharding) are no runs of elements: read whole.
        return TensorRef(dtype, size, load, storage_id=(str(self.path), key), reader=read if rows and math.prod(size) else None,
                         runs=runs if rows else None)

    def _recent(self, key: str, load) -> Any:
        """Tensor `key` loaded whole, kept with the one loaded before it (y and z of one lerp), no more."""
        if key not in self._kept:
            self._kept = {**dict(list(self._kept.items())[-1:]), key: load()}
        return self._kept[key]

    def _bytes_entry(self, key: str) -> Any:
        """A non-tensor entry (a parameter group's value), read by sfckpt's code-free torch-file reader."""
        info = self._stored.get((key, None))
        if info is None:  # no entry where DCP's own reader looks either: let it say what is missing
            value, opaque = self._load({key: None})[key], self.planner.opaque
        else:
            archive = TorchArchive(f"{self.path}:{key}", opened=self._window(info, key))
            value, opaque = archive.load_object(), archive.opaque
        self.opaque = sorted(set(self.opaque) | opaque)
        return value

    def _load(self, request: dict[str, Any]) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp

        if self._dcp is None:
            reader_cls, planner_cls = _reader_classes()
            self._dcp = reader_cls(str(self.path), self.root, self.metadata), planner_cls
        reader, planner_cls = self._dcp
        planner = planner_cls(self.path)
        self.planner = planner
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp.load(request, storage_reader=reader, planner=planner, no_dist=True)
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
        out = torch.empty(md.size, dtype=torch_dtype(md.properties.dtype.name))
        self._load({key: out})
        return out

    def load_object(self) -> dict[str, Any]:
        """The saved state dict, nested as it was saved: tensors as TensorRefs, the rest loaded."""
        from .dcp_records import BytesStorageMetadata, TensorStorageMetadata

        entries = self.metadata.state_dict_metadata
        self.opaque: list[str] = []
        values: dict[str, Any] = {}
        for key, md in entries.items():
            if isinstance(md, BytesStorageMetadata):
                values[key] = self._bytes_entry(key)
            elif isinstance(md, TensorStorageMetadata):
                values[key] = self._ref(key, md)
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
    from .dcp_records import Metadata, StorageMeta

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
    stored = _stored_bytes(storage, path, root, damaged)
    max_chunks = limits.DCP_CHUNKS.value
    for key, md in entries.items():
        _check_entry(key, md, stored, max_chunks, path, damaged)
    _check_nesting(entries, paths or {}, path)


def _stored_bytes(storage: dict, path: Path, root: inputs.Root, damaged: DamagedInput) -> dict[str, int]:
    """Where each entry's bytes are, checked (files confined to the folder, slices inside them);
    return the bytes stored per entry name."""
    from .dcp_records import MetadataIndex
    from .dcp_records import StorageInfo as _StorageInfo

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
    return stored


def _check_entry(key: Any, md: Any, stored: dict[str, int], max_chunks: int, path: Path,
                 damaged: DamagedInput) -> None:
    """Check one entry's metadata: a tensor's dtype, shape and chunks, the chunks tiling the tensor,
    and its shards holding all its bytes."""
    from .dcp_records import BytesStorageMetadata, ChunkStorageMetadata, TensorStorageMetadata, TorchName

    if type(key) is not str:
        raise damaged
    if isinstance(md, BytesStorageMetadata):
        return
    if not isinstance(md, TensorStorageMetadata):
        raise damaged
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    size, chunks = getattr(md, "size", None), getattr(md, "chunks", None)
    if not (isinstance(dtype, TorchName) and dtype.kind == "dtype" and isinstance(size, tuple) and all(type(n) is int and 0 <= n < 1 << 62 for n in size)
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
    nbytes = math.prod(size) * records.element_size(dtype)
    if nbytes > stored.get(key, 0):
        raise DamagedInput(f"{path}/.metadata: tensor '{key}' of shape {tuple(size)} needs {nbytes} bytes but its "
                         f"shards hold {stored.get(key, 0)}", "the folder is damaged or incomplete")


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
    (a temporary renamed into place) once every rank's `.distcp` files are written, so it is no
    older than any shard. A `.metadata` older than a shard is the previous save's, with a new save
    overwriting the folder in place (Lightning's sharded `last.ckpt/`): old offsets over new data."""
    try:
        meta = (path / ".metadata").stat()
        newest_shard = max((p.stat().st_mtime_ns for p in path.glob("*.distcp")), default=0)
    except OSError:
        return False
    return stat.S_ISREG(meta.st_mode) and meta.st_size > 0 and newest_shard <= meta.st_mtime_ns


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
