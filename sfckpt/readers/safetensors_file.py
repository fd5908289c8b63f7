"""Read safetensors files, sharded indexes and release folders as `TensorRef`s.

`safetensors.safe_open` already memory-maps and reads lazily; we only add the
checks that turn damaged input into a clear message.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .. import limits
from ..errors import InputError
from ..layout import check_text
from .paths import confined
from ..tensors import DTYPES, SAFETENSORS_TO_DTYPE, TensorRef

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def parse_json(text: bytes, what: str):
    """JSON from bytes that must be UTF-8, as the safetensors library and transformers require."""
    try:
        return json.loads(text.decode("utf-8"))
    except RecursionError:
        raise InputError(f"{what} is nested too deeply for a JSON parser", "the file is damaged or crafted") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} is not valid JSON ({str(exc)[:120]})", "the file is truncated or damaged") from None


def read_json_file(path: Path, what: str):
    """A JSON file read whole, refused past the JSON size limit."""
    try:
        size = path.stat().st_size
        if size > limits.JSON_BYTES.value:
            raise limits.JSON_BYTES.exceeded(f"{path}: {what} of {size} bytes")
        text = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})", "check the path and its permissions") from None
    return parse_json(text, f"{path}")


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked as the safetensors library checks it
    (so whatever sfckpt accepts, `safe_open` opens): tensors packed from offset 0 to the end of
    the file, sizes that match shapes, string metadata."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            f.seek(0, 2)
            data_len = f.tell() - 8 - n
            if data_len < 0:
                raise ValueError("header length is past the end of the file")
            if n > limits.JSON_BYTES.value:
                raise limits.JSON_BYTES.exceeded(f"{path}: safetensors header of {n} bytes")
            f.seek(8)
            raw = f.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})", "check the path and its permissions") from None
    except ValueError as exc:
        raise InputError(f"{path}: not a readable safetensors file ({exc})", "the file is truncated or damaged") from None
    if not raw.startswith(b"{"):
        raise InputError(f"{path}: not a readable safetensors file (the header is not a JSON object)", "the file is damaged")
    header = parse_json(raw, f"{path}: the safetensors header")
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: safetensors header is not a JSON object with string metadata", "the file is damaged")
    for text in (*header, *metadata, *metadata.values()):  # a "\ud800" escape: the library's JSON parser refuses it
        check_text(text, f"{path}: the safetensors header string", "the file is damaged or crafted; the safetensors "
                   "library refuses it too")
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
            raise InputError(
                f"{path}: tensor '{name[:200]}' has a bad entry in the safetensors header",
                "the file is truncated or damaged",
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise InputError(f"{path}: tensor '{name[:200]}' " + ("overlaps another" if begin < position else
                             "starts after a gap") + " in the safetensors data", "the file is damaged")
        position = end
    if position != data_len:
        raise InputError(f"{path}: the safetensors data is {data_len} bytes but its tensors cover {position}",
                         "the file is truncated or damaged")
    return header


def read_safetensors(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors (lazily) and string metadata of one safetensors file."""
    if not Path(path).is_file():  # a FIFO or device would block or never end
        raise InputError(f"{path}: not a regular file", "point at a safetensors file")
    header = read_header(path)
    with open(path, "rb") as f:
        data_start = 8 + struct.unpack("<Q", f.read(8))[0]
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
            location=(str(path), data_start + offsets[0]),
        )
    return refs, dict(header.get("__metadata__") or {})


def read_index(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Tensors of a sharded checkpoint described by `model.safetensors.index.json`.

    Every shard it names must be a file inside the index's own folder.
    """
    index = read_json_file(path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{path}: not a readable safetensors index (no weight_map object)", "the file is damaged")
    shards = {}
    for name, shard in weight_map.items():
        if not (isinstance(shard, str) and shard in shards):  # confined() refuses what is not a name
            shards[shard] = confined(path.parent, shard, f"{path}: weight_map entry '{name[:200]}'")
    refs: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(shards):
        shard_path = shards[shard]
        if not shard_path.is_file():
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
