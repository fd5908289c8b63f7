"""Read safetensors files, sharded indexes and release folders as `TensorRef`s.

`safetensors.safe_open` already memory-maps and reads lazily; we only add the
checks that turn damaged input into a clear message.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import InputError
from ..tensors import DTYPES, SAFETENSORS_TO_DTYPE, TensorRef

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated enough to trust its offsets."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
            f.seek(0, 2)
            data_len = f.tell() - 8 - n
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})", "the file is truncated or damaged") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
        raise InputError(f"{path}: safetensors header is not a JSON object", "the file is damaged")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
            ok = (
                all(type(v) is int for v in (begin, end, *shape))
                and all(v >= 0 for v in shape)
                and 0 <= begin <= end <= data_len
                and end - begin == math.prod(shape) * DTYPES[dtype][0]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise InputError(
                f"{path}: tensor '{name}' has a bad entry in the safetensors header",
                "the file is truncated or damaged",
            )
    return header


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors (lazily) and string metadata of one safetensors file."""
    header = read_header(path)
    handle = {}

    def opener():
        if "f" not in handle:
            from safetensors import safe_open

            handle["f"] = safe_open(str(path), framework="pt")
        return handle["f"]

    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
        offsets = tuple(info["data_offsets"])
        refs[name] = TensorRef(
            dtype,
            tuple(int(s) for s in info["shape"]),
            (lambda n=name: opener().get_tensor(n)),
            storage_id=(str(path), offsets),
            view=offsets,
        )
    return refs, dict(header.get("__metadata__") or {})


def read_index(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors of a sharded checkpoint described by `model.safetensors.index.json`."""
    try:
        index = json.loads(path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: not a readable safetensors index ({exc})", "the file is damaged") from None
    refs: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = path.parent / shard
        if not shard_path.is_file():
            raise InputError(f"{path}: shard '{shard}' named in the index is missing", "copy the whole folder")
        shard_refs, shard_meta = read_safetensors(shard_path)
        metadata.update(shard_meta)
        for name in shard_refs:
            if weight_map.get(name) == shard:
                refs[name] = shard_refs[name]
    missing = sorted(set(weight_map) - set(refs))
    if missing:
        raise InputError(f"{path}: tensor '{missing[0]}' is in the index but not in its shard", "the shards do not match the index")
    return dict(sorted(refs.items())), metadata
