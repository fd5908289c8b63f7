"""A byte range of an opened input file, read as a file of its own.

A DCP shard (`__0_0.distcp`) is many `torch.save` archives end to end, each at the offset and
length `.metadata` records. A `Window` lets sfckpt's own torch-file reader open one of them in
place: every read is a positioned read through the gate's descriptor (`inputs.InputFile`),
shifted by the window's start and refused past its end, so a damaged length can never reach
into the next entry.
"""
from __future__ import annotations

import io

from .. import inputs


class Window:
    """Bytes [start, start + size) of `file`; offsets given to its methods count from `start`."""

    def __init__(self, file: inputs.InputFile, start: int, size: int, path: str):
        self.file, self.start, self.size, self.path = file, start, size, path

    def _check(self, n: int, offset: int) -> None:
        if offset < 0 or offset + n > self.size:
            raise inputs.truncated(self.path)

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly `n` bytes at `offset` of the window."""
        self._check(n, offset)
        return self.file.pread(n, self.start + offset)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset` of the window."""
        self._check(buf.nbytes, offset)
        self.file.readinto(buf, self.start + offset)

    def read_tensor(self, offset: int, dtype: str, shape: tuple[int, ...], out=None):
        """A contiguous tensor at `offset` of the window (see `InputFile.read_tensor`)."""
        import math

        from ..tensors import itemsize

        self._check(math.prod(shape) * itemsize(dtype), offset)
        return self.file.read_tensor(self.start + offset, dtype, shape, out)

    def fileobj(self) -> io.BufferedReader:
        """A seekable file object over the window (for zipfile)."""
        return io.BufferedReader(_WindowIO(self))


class _WindowIO(io.RawIOBase):
    def __init__(self, window: Window):
        self.window, self.pos = window, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.window.size}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        n = max(min(view.nbytes, self.window.size - self.pos), 0)
        if n:
            self.window.readinto(view[:n], self.pos)
            self.pos += n
        return n
