"""Read safetensors files, sharded indexes and release folders as `TensorRef`s.

Each file is opened once through the gate (sfckpt/inputs.py); a tensor is read on
demand with positioned reads from that descriptor (not a memory map: a file that
shrinks while it is read ends in exit 2, not SIGBUS). The header is checked as the
safetensors library checks it, so damaged input gets a clear message.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from ..inputs import InputFile, confined, parse_json
from ..tensors import DTYPES, SAFETENSORS_TO_DTYPE, TensorRef



def read_header(file: InputFile) -> tuple[dict, int]:
    """The JSON header of an opened safetensors file and where its data start, checked as the
    safetensors library checks it (so whatever sfckpt accepts, `safe_open` opens): tensors packed
    from offset 0 to the end of the file, sizes that match shapes, string metadata."""
    path = file.path
    try:
        if file.size < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", file.pread(8, 0))
        data_len = file.size - 8 - n
        if data_len < 0:
            raise ValueError("header length is past the end of the file")
        if n > limits.JSON_BYTES.value:
            raise limits.JSON_BYTES.exceeded(f"{path}: safetensors header of {n} bytes")
        raw = file.pread(n, 8)
    except ValueError as exc:
        raise DamagedInput(f"{path}: not a readable safetensors file ({exc})", "the file is truncated or damaged") from exc
    if not raw.startswith(b"{"):
        raise DamagedInput(f"{path}: not a readable safetensors file (the header is not a JSON object)", "the file is damaged")
    header = parse_json(raw, f"{path}: the safetensors header")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DamagedInput(f"{path}: safetensors header is not a JSON object with string metadata", "the file is damaged")
    _refuse_what_its_parser_refuses(path, header)
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
            ok = (
                isinstance(shape, list)
                and all(type(v) is int for v in (begin, end, *shape))
                and all(0 <= v < 1 << 62 for v in shape)
                and 0 <= begin <= end <= data_len
                and end - begin == math.prod(shape) * DTYPES[dtype][0]
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise DamagedInput(
                f"{path}: tensor '{name[:200]}' has a bad entry in the safetensors header",
                "the file is truncated or damaged",
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise DamagedInput(f"{path}: tensor '{name[:200]}' " + ("overlaps another" if begin < position else
                             "starts after a gap") + " in the safetensors data", "the file is damaged")
        position = end
    if position != data_len:
        raise DamagedInput(f"{path}: the safetensors data is {data_len} bytes but its tensors cover {position}",
                         "the file is truncated or damaged")
    return header, 8 + n


LIBRARY_DEPTH = 128  # serde_json's recursion limit in the safetensors library: it refuses headers this deeply nested


def _refuse_what_its_parser_refuses(path: Path, header: dict) -> None:
    """Refuse headers that Python's JSON parser reads but the safetensors library's (serde_json)
    does not: an escaped lone surrogate (`"\\ud800"`) anywhere, or containers nested 128 deep
    (possible in fields the library otherwise ignores)."""
    for name, info in header.items():
        where = "its metadata" if name == "__metadata__" else f"tensor '{name[:200]}'"
        stack, deepest = [(info, 2)], 1
        while stack:
            value, depth = stack.pop()
            if isinstance(value, (dict, list)):
                deepest = max(deepest, depth)
                stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        if deepest >= LIBRARY_DEPTH:
            raise DamagedInput(f"{path}: the safetensors header nests {deepest} levels deep in {where}; the safetensors "
                             f"library refuses {LIBRARY_DEPTH} or more", "the file is damaged or crafted")
        try:
            json.dumps([name, info], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DamagedInput(f"{path}: the safetensors header holds a lone surrogate escape (not UTF-8 text) in {where}, "
                             "which the safetensors library refuses", "the file is damaged or crafted") from None


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors (lazily) and string metadata of one safetensors file."""
    file = inputs.open_input(path)
    header, data_start = read_header(file)
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_TO_DTYPE[info["dtype"]]
        offsets = tuple(info["data_offsets"])
        shape = tuple(int(n) for n in info["shape"])
        refs[name] = TensorRef(
            dtype,
            shape,
            (lambda at=data_start + offsets[0], d=dtype, s=shape: file.read_tensor(at, d, s)),
            storage_id=(str(path), offsets),
            view=offsets,
            location=(file, data_start + offsets[0]),
            reader=(lambda start, count, out, at=data_start + offsets[0], d=dtype:
                    file.read_tensor(at + start * DTYPES[d][0], d, (count,), out)),
        )
    return refs, dict(header.get("__metadata__") or {})


def read_index(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors of a sharded checkpoint described by `model.safetensors.index.json`.

    Every shard it names must be a file inside the index's own folder.
    """
    with inputs.scope(path):
        return _read_index(path)


def _read_index(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    index = inputs.read_json(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise DamagedInput(f"{path}: not a readable safetensors index (no weight_map object)", "the file is damaged")
    shards = {}
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard in shards):  # confined() refuses what is not a name
            shards[shard] = confined(path.parent, shard, f"{path}: weight_map entry '{name[:200]}'")
    refs: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    inputs.allow_open_files(len(shards) + 64)  # every shard stays open until its tensors are read
    for shard in sorted(shards):
        shard_path = shards[shard]
        if not shard_path.exists():
            raise InputError(f"{path}: shard '{shard}' named in the index is missing", "copy the whole folder")
        shard_refs, shard_meta = read_safetensors(shard_path)
        metadata.update(shard_meta)
        for name in shard_refs:
            if weight_map.get(name) == shard:
                refs[name] = shard_refs[name]
    missing = sorted(set(weight_map) - set(refs))
    if missing:
        raise InputError(f"{path}: tensor '{missing[0][:200]}' is in the index but not in its shard",
                         "the shards do not match the index")
    return dict(sorted(refs.items())), metadata


def save_complete(path: Path) -> bool:
    """Whether a safetensors file (or every shard an index names) holds all the data its header lists."""
    from .completeness import safetensors_complete

    if path.name.endswith(".json"):
        try:
            weight_map = inputs.read_json(path, "the safetensors index", root=inputs.Root.of(path)).get("weight_map", {})
        except (InputError, AttributeError, OSError):
            return False
        return all(safetensors_complete(path.parent / Path(str(name)).name) for name in set(weight_map.values()))
    return safetensors_complete(path)
