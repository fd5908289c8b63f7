"""Read files written by `torch.save` without running code from them.

A `torch.save` file is a zip archive: `data.pkl` describes the object and
`data/<key>` entries hold raw tensor bytes, stored uncompressed and aligned.
We unpickle `data.pkl` with an unpickler that imports nothing: tensors become
`TensorRef`s that read their bytes when loaded, a short list of harmless
types is rebuilt, and any other class becomes an inert `Opaque` placeholder
that is never imported or called. This is both safer than
`torch.load(weights_only=True)` (no class from the file is ever resolved) and
cheaper (no tensor data is read until asked for, and torch is not imported).
The file is opened once through the gate (sfckpt/inputs.py) and tensor data is
read with positioned reads, only the bytes a view spans: never a memory map,
which a file shrinking under it would turn into SIGBUS.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from . import pickle_guard
from .base import LoadRequest, Opened, Reader
from ..tensors import ITEMSIZES, TensorRef, torch_dtype

# What reading a stored or deflated zip record can raise when the file is damaged; anything else
# (a TypeError, an AttributeError) is a bug of sfckpt and surfaces as an internal error.
_DAMAGED_RECORD = (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error,
                   struct.error)

_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class Opaque:
    """Stand-in for an object of a class sfckpt does not rebuild.

    It records the class name and whatever the pickle passed to it, and
    nothing more: the real class is never imported, so nothing runs.
    """

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        obj.items = []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self.qualname}>"


class _Marker:
    """A torch global (a dtype or storage type) reduced to its name."""

    def __init__(self, kind: str, value: str):
        self.kind, self.value = kind, value


def _opaque_class(module: str, name: str) -> type:
    return type(name, (Opaque,), {"qualname": f"{module}.{name}"})


def _codecs_encode(text, encoding="latin1", errors="strict"):
    # Protocol-2 pickles store bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode other than of text to latin1")
    return text.encode("latin1")


def _defaultdict(*_factory):
    return {}


def _bytearray(*args):
    # bytearray(b"...") (protocol 3+) or bytearray("...", "latin-1") (protocol 2); never
    # bytearray(n), which allocates whatever n the file names.
    if not args:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytearray(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    raise pickle.UnpicklingError("refusing a bytearray call that is not a copy of bytes in the file")


def _scalars(args: tuple) -> None:
    # Calls that turn their argument into text or a number: scalars only, never a structure that a
    # pickle can make exponentially large through shared references.
    if not all(type(a) in (str, bytes, int, float, bool, complex) for a in args):
        raise pickle.UnpicklingError("refusing a conversion of a container")


def _keys_of(args: tuple) -> None:
    # dict(...) and OrderedDict(...) from a mapping or a list of pairs: keys must be cheap to hash.
    if not args:
        return
    if len(args) > 1 or not isinstance(args[0], (list, tuple, dict)):
        raise pickle.UnpicklingError("refusing a dict built from something other than a dict or pairs")
    items = args[0]
    if isinstance(items, dict):
        keys = list(items)
    elif all(type(pair) in (tuple, list) and len(pair) == 2 for pair in items):
        keys = [pair[0] for pair in items]
    else:
        raise pickle.UnpicklingError("refusing a dict built from something other than pairs")
    for key in keys:
        pickle_guard.check_key(key)


def _members_of(args: tuple) -> None:
    # set(...) and frozenset(...): members must be cheap to hash.
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple, set, frozenset))):
        raise pickle.UnpicklingError("refusing a set built from something other than a list")
    for member in args[0] if args else ():
        pickle_guard.check_key(member)


def _device(*args):
    if not all(type(a) in (str, int) for a in args):
        raise pickle.UnpicklingError("refusing a torch.device of something other than text and numbers")
    return ":".join(str(a) for a in args)


def _identity(value):
    return value


_SAFE_BUILTINS = {
    "set": pickle_guard.guarded_call(set, _members_of),
    "frozenset": pickle_guard.guarded_call(frozenset, _members_of),
    "complex": pickle_guard.guarded_call(complex, _scalars),
    "bytearray": _bytearray,
    "slice": slice,
    "list": list,
    "dict": pickle_guard.guarded_call(dict, _keys_of),
    "tuple": tuple,
    "int": pickle_guard.guarded_call(int, _scalars),
    "float": pickle_guard.guarded_call(float, _scalars),
    "str": pickle_guard.guarded_call(str, _scalars),
    "bool": pickle_guard.guarded_call(bool, _scalars),
}
_ORDERED_DICT = pickle_guard.guarded_call(collections.OrderedDict, _keys_of)


class _Unpickler(pickle_guard.GuardedUnpickler):
    """What a torch.save pickle may use: a handful of builtins, OrderedDict, torch's tensor and
    storage rebuilders (here making `TensorRef`s), and placeholders for everything else.

    Every callable it hands out checks its arguments (no allocation by number, no conversion of a
    structure to text); BUILD reaches only placeholders and OrderedDicts made by this load.
    """

    def __init__(self, data: bytes, archive: "TorchArchive"):
        super().__init__(io.BytesIO(data), len(data))
        self.archive = archive
        self.opaque: set[str] = set()

    def build(self, inst: Any, state: Any) -> None:
        if isinstance(inst, Opaque):  # an instance made for this load (classes are not instances)
            inst.state = state
        elif type(inst) is collections.OrderedDict and type(state) is dict and all(type(k) is str for k in state):
            inst.__dict__.update(state)  # a state dict's `_metadata`
        else:
            super().build(inst, state)

    def children(self, obj: Any):
        if isinstance(obj, Opaque):
            return (*obj.args, obj.state, *obj.items)
        return None

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "collections" and name == "OrderedDict":
            return _ORDERED_DICT
        if module == "collections" and name == "defaultdict":
            return _defaultdict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module == "_codecs" and name == "encode":
            return _codecs_encode
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return _Marker("storage", _STORAGE_DTYPES[name])
            if name in ITEMSIZES:
                return _Marker("dtype", name)
            if name == "Size":
                return tuple
            if name == "device":
                return _device
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return _Marker("storage", "uint8")
        if module == "torch._utils":
            if name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3"):
                return self._rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type_v2
        if module == "torch.nn.parameter" and name == "Parameter":
            return _rebuild_parameter
        if module == "torch.serialization" and name == "_get_layout":
            return _identity
        self.opaque.add(f"{module}.{name}")
        return _opaque_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[2]) is str):
            raise pickle.UnpicklingError(f"unexpected persistent id (a {type(pid).__name__})")
        _, storage_type, key, _location, _numel = pid  # the record's size is read from the zip
        if not isinstance(storage_type, _Marker):
            raise pickle.UnpicklingError(f"unknown storage type in persistent id for record {key[:80]!r}")
        return self.archive.storage(key, storage_type.value)

    def _rebuild_tensor(self, storage, offset, size, stride, *rest):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor without storage")
        dtype = storage.dtype
        # _rebuild_tensor_v3 passes the dtype explicitly (for dtypes without a storage class).
        if len(rest) >= 3 and isinstance(rest[2], _Marker):
            dtype = rest[2].value
        if not (type(offset) is int and type(size) is tuple and type(stride) is tuple
                and all(type(s) is int for s in (*size, *stride))):
            raise pickle.UnpicklingError("tensor with a non-integer offset, shape or stride")
        return storage.tensor(dtype, offset, size, stride)


def _rebuild_parameter(data, *_args):
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args)


_INT64_BOUND = 1 << 62


class _Storage:
    """One `data/<key>` record of the archive."""

    def __init__(self, archive: "TorchArchive", key: str, dtype: str):
        self.archive, self.key, self.dtype = archive, key, dtype

    def tensor(self, dtype: str, offset: int, shape: tuple, stride: tuple) -> TensorRef:
        if dtype not in ITEMSIZES:
            raise pickle.UnpicklingError(f"unsupported dtype {dtype}")
        itemsize = ITEMSIZES[dtype]
        if len(shape) != len(stride) or offset < 0 or any(s < 0 for s in (*shape, *stride)):
            raise pickle.UnpicklingError("tensor with a negative or mismatched shape, stride or offset")
        # torch indexes with int64: every size, and the bytes of the non-empty dimensions, must fit.
        if any(s >= _INT64_BOUND for s in (offset, *shape, *stride)) \
                or math.prod(n for n in shape if n) * itemsize >= _INT64_BOUND:
            raise pickle.UnpicklingError("tensor with a shape or stride too large for torch")
        if all(shape):  # a view with elements (scalars included)
            # The highest element the view touches must lie inside the storage.
            last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
            storage_elems = self.archive.storage_nbytes(self.key) // itemsize
            if last >= storage_elems:
                raise DamagedInput(
                    f"{self.archive.path}: tensor data record '{self.key}' is shorter than the tensor it holds",
                    "the file is truncated or damaged; copy it again",
                )
        nbytes = math.prod(shape) * itemsize
        self.archive.describe(nbytes)
        archive, key = self.archive, self.key
        overlapping = nbytes > self.archive.storage_nbytes(self.key)

        def load():
            import torch

            if not all(shape):
                return torch.empty_strided(shape, stride, dtype=torch_dtype(dtype))
            # Only the elements the view spans are read (a parameter of a flat buffer reads its own part).
            span = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            view = torch.as_strided(archive.read_elements(key, dtype, offset, span), shape, stride, 0)
            if not overlapping:
                return view
            # The one place a view asks for more memory than the file holds: what SFCKPT_MAX_EXPANSION
            # allowed may still be more than this machine has.
            try:
                return view.contiguous()
            except (RuntimeError, MemoryError):  # the allocation is all contiguous() can fail on here
                raise InputError(f"{archive.path}: record '{key}' viewed with overlapping strides as {shape} needs "
                                 f"{nbytes} bytes of memory, which cannot be allocated here",
                                 "lower SFCKPT_MAX_EXPANSION to refuse it early, or convert where there is the "
                                 "memory") from None

        contiguous = _is_contiguous(shape, stride)
        return TensorRef(dtype, shape, load, storage_id=(id(archive), key), view=(offset, stride, shape),
                         location=self.archive.location(key, dtype, offset) if contiguous else None,
                         reader=(lambda start, count, out: archive.read_elements(key, dtype, offset + start, count, out))
                         if contiguous else None)


def _is_contiguous(shape: tuple, stride: tuple) -> bool:
    expected = 1
    for n, s in reversed(list(zip(shape, stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class TorchArchive:
    """An open `torch.save` zip file; tensor data is read on demand."""

    def __init__(self, path: Path | str, data: bytes | None = None, opened=None):
        """Open `path` through the gate, or, when `data` is given, an in-memory archive that `path` only names;
        `opened` is an archive inside a file already opened through the gate (a `window.Window`)."""
        self.path = path
        self._input = opened if opened is not None else inputs.open_input(path) if data is None else None
        self._file = self._input.fileobj() if self._input is not None else io.BytesIO(data)
        try:
            self._zip = zipfile.ZipFile(self._file)
            names = self._zip.namelist()
        except Exception as exc:  # zipfile raises many kinds on damaged input; all mean the same here
            self._file.close()
            raise DamagedInput(f"{path}: not a readable torch.save file ({exc})", "the file is truncated or damaged") from exc
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            self._file.close()
            hint = "this looks like a TorchScript archive, not a checkpoint" if any(
                n.endswith("constants.pkl") for n in names
            ) else "the zip archive has no torch data.pkl record"
            raise InputError(f"{path}: not a torch.save checkpoint", hint)
        self.prefix = pkl[0][: -len("data.pkl")]
        self._infos = {i.filename: i for i in self._zip.infolist()}
        self._offsets: dict[str, int] = {}
        self.opaque: set[str] = set()
        self.size = len(data) if data is not None else self._input.size
        self.described = 0  # bytes of all tensors so far; views with stride 0 can exceed the file

    def describe(self, nbytes: int) -> None:
        """Count a tensor's bytes against what the file can honestly hold (see limits.EXPANSION_BYTES)."""
        self.described += nbytes
        # Honest files describe about their own size (more only through tied weights): the limit
        # is looked up only past that.
        if self.described > self.size and self.described > 2 * self.size + limits.EXPANSION_BYTES.value:
            raise limits.EXPANSION_BYTES.exceeded(
                f"{self.path}: its tensors describe more than {2 * self.size + limits.EXPANSION_BYTES.value} bytes "
                f"from a {self.size}-byte file (views with overlapping strides)")

    def read_member(self, info: zipfile.ZipInfo) -> bytes:
        """A zip record's bytes; a compressed one only up to the inflation limit."""
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > limits.INFLATED_BYTES.value:
            raise limits.INFLATED_BYTES.exceeded(
                f"{self.path}: zip record '{info.filename}' inflates to {info.file_size} bytes")
        return self._zip.read(info)

    def load_object(self) -> Any:
        try:
            byteorder = self._infos.get(self.prefix + "byteorder")
            if byteorder is not None and self.read_member(byteorder) != b"little":
                raise InputError(f"{self.path}: big-endian checkpoint", "re-save it on a little-endian machine")
            pkl = self._infos[self.prefix + "data.pkl"]
            if pkl.file_size > limits.PICKLE_BYTES.value:
                raise limits.PICKLE_BYTES.exceeded(f"{self.path}: data.pkl of {pkl.file_size} bytes")
            data = self.read_member(pkl)
            unpickler = _Unpickler(data, self)
            obj = unpickler.load_checked()
        except InputError:
            raise
        except pickle_guard.GuardError as exc:
            if exc.limit is None:
                raise DamagedInput(f"{self.path}: {exc}", "the file is damaged or crafted") from exc
            raise exc.limit.exceeded(f"{self.path}: {exc}") from exc
        except RecursionError:
            raise DamagedInput(f"{self.path}: the object data is nested too deeply", "the file is damaged or crafted") from None
        except Exception as exc:  # any malformed pickle: the message is what matters
            raise DamagedInput(
                f"{self.path}: cannot read the checkpoint's object data ({type(exc).__name__}: {exc})"[:300],
                "the file is truncated, damaged, or not written by torch.save",
            ) from exc
        self.opaque = unpickler.opaque
        return obj

    def storage(self, key: str, dtype: str) -> _Storage:
        if self.prefix + "data/" + key not in self._infos:
            raise DamagedInput(
                f"{self.path}: tensor data record 'data/{key}' is missing",
                "the file is truncated or damaged; copy it again",
            )
        return _Storage(self, key, dtype)

    def location(self, key: str, dtype: str, offset: int) -> tuple[inputs.InputFile, int] | None:
        """(opened file, byte offset) of a contiguous view whose record is stored uncompressed in a real file."""
        info = self._infos.get(self.prefix + "data/" + key)
        if info is None or info.compress_type != zipfile.ZIP_STORED or self._input is None:
            return None
        try:
            return self._input, self._data_offset(info) + offset * ITEMSIZES[dtype]
        except InputError:
            return None

    def storage_nbytes(self, key: str) -> int:
        return self._infos[self.prefix + "data/" + key].file_size

    def read_elements(self, key: str, dtype: str, first: int, count: int, out=None):
        """Elements [first, first + count) of a storage, as a flat tensor (`out`, when given, or a new one)."""
        try:
            return self._read_elements(key, dtype, first, count, out)
        except InputError:
            raise
        except _DAMAGED_RECORD as exc:  # what zipfile, zlib and torch raise on a record that is not what it says
            raise DamagedInput(f"{self.path}: cannot read tensor data record '{key}' ({type(exc).__name__}: {exc})"[:300],
                             "the file is truncated or damaged") from exc

    def _read_elements(self, key: str, dtype: str, first: int, count: int, out):
        import torch

        info = self._infos[self.prefix + "data/" + key]
        size = ITEMSIZES[dtype]
        if (first + count) * size > info.file_size:
            raise DamagedInput(f"{self.path}: tensor data record '{key}' is shorter than the tensor it holds",
                             "the file is truncated or damaged; copy it again")
        if info.compress_type != zipfile.ZIP_STORED or self._input is None:
            buf = bytearray(self.read_member(info)[first * size:(first + count) * size])
            flat = torch.frombuffer(buf, dtype=torch_dtype(dtype), count=count) if count else \
                torch.empty(0, dtype=torch_dtype(dtype))
            return flat if out is None else out.copy_(flat)
        start = self._data_offset(info)
        if start + info.file_size > self.size:
            raise DamagedInput(f"{self.path}: tensor data record '{key}' runs past the end of the file", "the file is truncated")
        return self._input.read_tensor(start + first * size, dtype, (count,), out)

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        if info.filename not in self._offsets:
            header = self._input.pread(30, info.header_offset) if info.header_offset + 30 <= self.size else b""
            if header[:4] != b"PK\x03\x04":
                raise DamagedInput(f"{self.path}: damaged zip entry '{info.filename}'", "the file is truncated or damaged")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            self._offsets[info.filename] = info.header_offset + 30 + name_len + extra_len
        return self._offsets[info.filename]


def save_complete(path: Path) -> bool:
    """Whether a torch.save file is finished: torch writes the zip's central directory last."""
    from .completeness import zip_complete

    return zip_complete(path)


class TorchFileReader(Reader):
    """A `torch.save` zip file: a plain state dict, a training dict, a Lightning `.ckpt`."""

    name = "torch.save"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "torch"

    def open(self, path: Path, request: LoadRequest) -> Opened:
        archive = TorchArchive(path)
        obj = archive.load_object()
        return Opened(obj, sorted(archive.opaque))  # layout.find tells a Lightning .ckpt from a plain file

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)
