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

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..tensors import TensorRef
from .torch_file import TorchArchive

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict"},
}


def is_dcp_folder(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file()


class _MetadataUnpickler(pickle._Unpickler):  # pure Python: see torch_file._Unpickler
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"class {module}.{name} is not DCP metadata")


def _reader_classes():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        """DCP's file reader, with `.metadata` read by a restricted unpickler and cached."""

        _cached = None

        def read_metadata(self, *args, **kwargs):
            if self._cached is None:
                path = Path(self.path) / ".metadata"
                try:
                    # From memory, not the file: a damaged length field then reads short instead of
                    # making pickle allocate whatever the field claims.
                    metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
                except Exception as exc:
                    raise InputError(f"{path}: cannot read DCP metadata ({type(exc).__name__}: {exc})"[:300],
                                     "the folder is damaged or not a torch.distributed.checkpoint") from None
                _validate(metadata, Path(self.path))
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
        self.reader = reader_cls(str(path))
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
                raise cause from None
            raise InputError(f"{self.path}: reading {', '.join(list(request)[:2])} failed "
                             f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})"[:400],
                             "a shard file is missing or damaged") from None
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


def _validate(metadata: Any, path: Path) -> None:
    """Check the unpickled metadata has the shape DCP's own classes promise (a flipped byte may not)."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta, TensorStorageMetadata

    if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_meta", None), (StorageMeta, type(None))):
        raise InputError(f"{path}/.metadata does not hold DCP metadata", "the folder is damaged")
    entries = getattr(metadata, "state_dict_metadata", None)
    paths = getattr(metadata, "planner_data", None)
    ok = isinstance(entries, dict) and isinstance(getattr(metadata, "storage_data", None), dict)
    ok = ok and (paths is None or (isinstance(paths, dict) and all(
        isinstance(p, tuple) and p and all(type(part) in (str, int) for part in p) for p in paths.values())))
    for key, md in (entries or {}).items():
        if not ok:
            break
        if isinstance(md, TensorStorageMetadata):
            dtype = getattr(getattr(md, "properties", None), "dtype", None)
            size = getattr(md, "size", None)
            ok = isinstance(key, str) and isinstance(dtype, torch.dtype) and isinstance(size, tuple) \
                and all(type(n) is int and n >= 0 for n in size)
        else:
            ok = isinstance(key, str) and isinstance(md, BytesStorageMetadata)
    if not ok:
        raise InputError(f"{path}/.metadata does not describe a checkpoint DCP can read", "the folder is damaged")


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
