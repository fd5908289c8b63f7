"""Lazy tensors: what a checkpoint holds, described without reading its data.

Readers return `TensorRef`s so that `inspect` can report names, dtypes and
sizes without touching tensor bytes, and `convert` can read exactly the
tensors that x needs (y and z, never `exp_avg_sq`), one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

# torch dtype name -> (bytes per element, safetensors dtype code)
DTYPES: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"),
    "float32": (4, "F32"),
    "float16": (2, "F16"),
    "bfloat16": (2, "BF16"),
    "float8_e4m3fn": (1, "F8_E4M3"),
    "float8_e5m2": (1, "F8_E5M2"),
    "int64": (8, "I64"),
    "int32": (4, "I32"),
    "int16": (2, "I16"),
    "int8": (1, "I8"),
    "uint64": (8, "U64"),
    "uint32": (4, "U32"),
    "uint16": (2, "U16"),
    "uint8": (1, "U8"),
    "bool": (1, "BOOL"),
    "complex64": (8, "C64"),
}
SAFETENSORS_TO_DTYPE = {code: name for name, (_, code) in DTYPES.items()}
# Bytes per element of every dtype sfckpt reads: those it writes, and complex128, which safetensors
# cannot hold (read so that the refusal can name the tensor).
ITEMSIZES: dict[str, int] = {**{name: size for name, (size, _) in DTYPES.items()}, "complex128": 16}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
COMPLEX_DTYPES = frozenset({"complex64", "complex128"})


# dtypes `TensorRef.sample` reads without torch: numpy code, bytes per element
_NUMPY_READ = {"float64": ("<f8", 8), "float32": ("<f4", 4), "float16": ("<f2", 2), "bfloat16": ("<u2", 2),
               "complex64": ("<f4", 4), "complex128": ("<f8", 8)}  # complex: real and imaginary parts in turn


def itemsize(dtype: str) -> int:
    return DTYPES[dtype][0]


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a contiguous tensor of this dtype and shape takes (0 for dtypes sfckpt cannot write)."""
    return math.prod(shape) * DTYPES[dtype][0] if dtype in DTYPES else 0


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor inside a file: its metadata now, its data on `load()`.

    `storage_id` identifies the underlying storage, so two names that share it
    (tied weights) can be recognised without reading anything.
    """

    dtype: str
    shape: tuple[int, ...]
    loader: Callable[[], Any] = field(repr=False)
    storage_id: Any = None
    view: tuple = ()
    # (opened input file, byte offset) where the data lie contiguous: lets `sample` read a few
    # pages with numpy, without torch (inspect stays fast) and without reading the tensor.
    location: tuple[Any, int] | None = field(default=None, repr=False)
    # reader(start, count, out): elements [start, start + count) of a contiguous tensor, flat, read
    # alone (a parameter's slice of a flat buffer without reading the buffer), into `out` if given.
    reader: Callable[[int, int, Any], Any] | None = field(default=None, repr=False)
    # ((opened file, byte offset, elements), ...): a tensor lying in contiguous runs of several files
    # (a parameter split across ranks), in order; `sample` then reads its pages without torch too.
    # A callable gives them (or None) when asked: where finding them means reading a little.
    runs: tuple[tuple[Any, int, int], ...] | Callable[[], Any] | None = field(default=None, repr=False)
    # a numpy array holding the tensor's bytes (of any numpy dtype: bfloat16 as uint16, raw bytes), where a
    # reader holds them so (Orbax's tensorstore, a small HDF5 dataset): `sample` and `raw_bytes` need no torch.
    array: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def is_complex(self) -> bool:
        return self.dtype in COMPLEX_DTYPES

    @property
    def data_key(self):
        """Equal for two refs to the same bytes (a tied weight); None when unknown."""
        return None if self.storage_id is None else (self.storage_id, self.view, self.dtype)

    def same_data(self, other: "TensorRef") -> bool:
        """True when both refer to the same bytes (a tied weight)."""
        return self.data_key is not None and self.data_key == other.data_key

    def load(self):
        """The tensor, read into memory of its own."""
        return self.loader()

    def load_flat(self, start: int, count: int, out=None):
        """Elements [start, start + count) of the flattened tensor (into `out`, a flat tensor of `count`
        elements, when given); only those are read where the format allows it."""
        if self.reader is not None:
            return self.reader(start, count, out)
        part = self.load().reshape(-1).narrow(0, start, count)
        return part if out is None else out.copy_(part)

    def sample(self, n: int):
        """Up to `n` elements as a float64 numpy array: half from the start of the data, half from the middle.

        A complex tensor is sampled as its real view (real and imaginary parts in turn), so that it gives
        as many numbers as a real tensor of its shape."""
        import numpy as np

        total = self.numel * (2 if self.is_complex else 1)
        spans = [(0, total)] if total <= n else [(0, n // 2), (total // 2, total // 2 + n - n // 2)]
        runs = ((*self.location, total),) if self.location is not None else self.runs() if callable(self.runs) else self.runs
        if self.dtype in _NUMPY_READ and (runs is not None or self.array is not None):
            code, size = _NUMPY_READ[self.dtype]
            if runs is not None:
                raw = np.concatenate([_read_span(runs, lo, hi, size, code) for lo, hi in spans])
            else:
                flat = np.ascontiguousarray(self.array()).reshape(-1).view(code)
                raw = np.concatenate([flat[lo:hi] for lo, hi in spans])
            if self.dtype == "bfloat16":  # the upper half of a float32
                return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            return raw.astype(np.float64)
        import torch

        if self.reader is not None and not self.is_complex:  # only the sampled elements are read
            return torch.cat([self.reader(lo, hi - lo, None) for lo, hi in spans]).to(torch.float64).numpy()
        t = self.load()
        flat = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)
        picked = torch.cat([flat[lo:hi] for lo, hi in spans]) if len(spans) > 1 else flat
        return picked.to(torch.float64).numpy()

    def raw_bytes(self):
        """The tensor's bytes as a numpy uint8 array, read with numpy where the file's runs are known
        (inspect stays without torch); None where only `load()` can read them."""
        import numpy as np

        if self.array is not None:
            return np.ascontiguousarray(self.array()).reshape(-1).view(np.uint8)
        runs = ((*self.location, self.numel),) if self.location is not None \
            else self.runs() if callable(self.runs) else self.runs
        if runs is None or self.dtype not in ITEMSIZES:
            return None
        return _read_span(runs, 0, self.numel, ITEMSIZES[self.dtype], "u1")

    def __str__(self) -> str:
        return f"tensor({self.dtype}, shape {format_shape(self.shape)})"


Part = tuple[TensorRef, int, int]  # elements [start, start + length) of a tensor, flattened


def joined_reader(parts: list[Part]) -> Callable[[int, int, Any], Any]:
    """A `TensorRef.reader` for the concatenation of `parts` (a parameter split across ranks' files):
    elements [start, start + count) are read from the parts they fall in, and nothing else."""
    import bisect

    starts, at = [], 0
    for _, _, length in parts:
        starts.append(at)
        at += length
    dtype = parts[0][0].dtype

    def read(start: int, count: int, out):
        import torch

        if out is None:
            out = torch.empty(count, dtype=torch_dtype(dtype))
        i, done = max(bisect.bisect_right(starts, start) - 1, 0), 0
        while done < count:
            ref, first, length = parts[i]
            skip = start + done - starts[i]
            n = min(length - skip, count - done)
            if n > 0:
                ref.load_flat(first + skip, n, out[done:done + n])
                done += n
            i += 1
        return out

    return read


def joined_runs(parts: list[Part]) -> tuple[tuple[Any, int, int], ...] | None:
    """`TensorRef.runs` of the concatenation of `parts` when each lies contiguous in a file, else None."""
    live = [p for p in parts if p[2]]
    if not live or any(ref.location is None or ref.is_complex for ref, _, _ in live):
        return None
    return tuple((ref.location[0], ref.location[1] + first * itemsize(ref.dtype), length) for ref, first, length in live)


def _read_span(runs: tuple[tuple[Any, int, int], ...], lo: int, hi: int, size: int, code: str):
    """Elements [lo, hi) of a tensor lying in `runs`, as a numpy array of `code`, read from just those runs."""
    import numpy as np

    parts, at = [], 0
    for file, offset, count in runs:
        a, b = max(lo, at), min(hi, at + count)
        if a < b:
            parts.append(np.frombuffer(file.pread((b - a) * size, offset + (a - at) * size), dtype=code))
        at += count
        if at >= hi:
            break
    return np.concatenate(parts) if parts else np.empty(0, dtype=code)


def format_shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def count_nonfinite(t) -> int:
    """NaN/Inf count of a tensor; fast when there are none (one min/max pass, no temporaries)."""
    import torch

    if not t.is_floating_point() or t.numel() == 0:
        return 0
    try:
        lo, hi = torch.aminmax(t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return 0
    except RuntimeError:  # dtypes without aminmax (float8): count directly
        pass
    return int((~torch.isfinite(t)).sum())
