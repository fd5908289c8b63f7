"""DCP's metadata classes as plain records, so that `.metadata` is read without importing torch.distributed.

`.metadata` pickles instances of `torch.distributed.checkpoint.metadata`'s dataclasses (and
`filesystem._StorageInfo`) together with torch dtypes, layouts and sizes. Importing those
modules costs most of a second on top of `import torch`; sfckpt needs only their fields. The
restricted unpickler (dcp_folder.py) builds these records in their place, with the same class
and field names, and torch globals become `TorchName`s. Only when a chunk must be read by DCP's
own reader is torch.distributed imported and the metadata turned into DCP's classes (`to_dcp`).
"""
from __future__ import annotations

from typing import Any

from ..tensors import ITEMSIZES

LAYOUTS = frozenset({"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"})
MEMORY_FORMATS = frozenset({"contiguous_format", "channels_last", "channels_last_3d", "preserve_format"})


class TorchName:
    """A torch global (a dtype, layout or memory format) a pickle names, kept as its name."""

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchName) and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def torch_name(name: str) -> TorchName | None:
    """The torch global `name` if it is a dtype, layout or memory format, else None (torch is
    imported only for a name sfckpt does not know)."""
    if name in ITEMSIZES:
        return TorchName("dtype", name)
    if name in LAYOUTS:
        return TorchName("layout", name)
    if name in MEMORY_FORMATS:
        return TorchName("memory_format", name)
    import torch

    value = getattr(torch, name, None)
    for kind, cls in (("dtype", torch.dtype), ("layout", torch.layout), ("memory_format", torch.memory_format)):
        if isinstance(value, cls):
            return TorchName(kind, name)
    return None


def element_size(dtype: TorchName) -> int:
    """Bytes per element of a dtype."""
    if dtype.name in ITEMSIZES:
        return ITEMSIZES[dtype.name]
    import torch

    return torch.empty(0, dtype=getattr(torch, dtype.name)).element_size()


class Record:
    """A DCP metadata object: its fields, set by the pickle's BUILD (checked by the unpickler)."""

    FIELDS: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class Metadata(Record):
    FIELDS = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")
    planner_data = storage_data = storage_meta = version = None


class TensorStorageMetadata(Record):
    FIELDS = ("properties", "size", "chunks")


class BytesStorageMetadata(Record):
    FIELDS = ()


class ChunkStorageMetadata(Record):
    FIELDS = ("offsets", "sizes")


class TensorProperties(Record):
    """Pickled as the 5-tuple its `__getstate__` gives (dtype, layout, requires_grad, memory format code, pin_memory)."""

    FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")


class MetadataIndex(Record):
    """A key of `storage_data`: equal and hashed by (fqn, offset), as DCP's."""

    FIELDS = ("fqn", "offset", "index")
    offset = index = None

    def _key(self) -> tuple:
        return self.fqn, None if self.offset is None else tuple(self.offset)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MetadataIndex) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class StorageMeta(Record):
    FIELDS = ("checkpoint_id", "save_id", "load_id", "modules")
    checkpoint_id = save_id = load_id = modules = None


class StorageInfo(Record):
    FIELDS = ("relative_path", "offset", "length", "transform_descriptors")
    transform_descriptors = None


CLASSES: dict[tuple[str, str], type[Record]] = {
    **{("torch.distributed.checkpoint.metadata", c.__name__): c for c in (
        Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties, MetadataIndex,
        StorageMeta)},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): StorageInfo,
}


def to_dcp(md: Metadata, load_id: Any) -> Any:
    """The same metadata as DCP's own classes (for its reader), importing torch.distributed."""
    import torch
    from torch.distributed.checkpoint import filesystem, metadata as m

    entries: dict[str, Any] = {}
    for key, v in md.state_dict_metadata.items():
        if isinstance(v, BytesStorageMetadata):
            entries[key] = m.BytesStorageMetadata()
        else:
            entries[key] = m.TensorStorageMetadata(
                m.TensorProperties(dtype=getattr(torch, v.properties.dtype.name)), torch.Size(v.size),
                [m.ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in v.chunks])
    storage = {m.MetadataIndex(i.fqn, i.offset, i.index): filesystem._StorageInfo(s.relative_path, s.offset, s.length)
               for i, s in md.storage_data.items()}
    return m.Metadata(entries, planner_data=md.planner_data, storage_data=storage,
                      storage_meta=m.StorageMeta(load_id=load_id), version=md.version)
