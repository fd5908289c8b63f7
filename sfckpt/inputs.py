"""The gate: every file sfckpt reads or copies from an input is opened here, once.

A checkpoint is its folder. A file that the folder's layout or a file inside it
names is opened without following it blindly: `open_input` opens it
non-blocking (a FIFO or a device never hangs the tool), then checks the opened
descriptor itself, so that nothing can be swapped between the check and the
read: a regular file, not on /proc or /sys, lying inside the input's root (the
real path of what the user named, fixed once per load; the one link allowed
out is the Hugging Face cache's own `snapshots/<rev>/f -> ../../blobs/<hash>`),
and not larger than the limit of what it is read as. Reads are positioned
(`pread`) from that descriptor; a read that comes back short means the file
shrank while sfckpt read it, which is refused with exit 2, never a signal (a
memory map would turn it into SIGBUS). No library opens an input file by its
path: DCP's reader gets file objects over checked descriptors, and transformers
and peft get configs built from the JSON read here. The one exception is tensorstore,
which reads an Orbax folder's arrays itself: `check_tree` refuses the whole folder first
if anything inside it is a link or not a regular file, and sfckpt writes every spec it gets.

Files the user names as options (`--param-order`, `--bn-calib` data, `--model`
files) are the user's own and are not confined, but are opened the same way.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from . import limits
from .errors import DamagedInput, InputError, OutputError

# Non-blocking: opening a FIFO with no writer, or a terminal, returns at once instead of waiting.
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
EXCERPT = 60  # characters of an input file's content an error line may show
_CHUNK = 1 << 20


def excerpt(text: object) -> str:
    """At most EXCERPT characters of `text` as a quoted literal: what an error may show of a file's content."""
    text = str(text)
    return repr(text[:EXCERPT]) + ("…" if len(text) > EXCERPT else "")


def truncated(path: object) -> InputError:
    """The error for a file that ends before what it promised, or shrank while being read."""
    return DamagedInput(f"{path}: the file changed or is truncated while being read",
                      "copy the checkpoint again, and do not convert it while it is being written")


@dataclass(frozen=True)
class Root:
    """Where an input's files may lie: the real path of the folder the user named (or of a named
    file's folder, and the named file itself), and the blobs of a Hugging Face cache repository."""

    folder: str
    named: str
    blobs: str | None

    @classmethod
    def of(cls, path: str | os.PathLike) -> "Root":
        named = os.path.realpath(path)
        folder = named if os.path.isdir(named) else os.path.realpath(os.path.dirname(os.path.abspath(path)))
        return cls(folder, named, _cache_blobs(folder))

    def holds(self, real: str) -> bool:
        """Whether the real path `real` lies inside this root."""
        return real == self.named or _inside(real, self.folder) or (self.blobs is not None and _inside(real, self.blobs))


def _cache_blobs(folder: str) -> str | None:
    """The `blobs` folder of the Hugging Face cache repository `folder` lies in: for
    `…/models--org--name/snapshots/<rev>` or any folder below it (a checkpoint in a subfolder of a
    repository), `…/models--org--name/blobs`; None elsewhere."""
    parts = folder.rstrip("/").split("/")
    for i in range(len(parts) - 2, 1, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--", "spaces--")):
            return "/".join(parts[:i] + ["blobs"])
    return None


def _inside(real: str, folder: str) -> bool:
    return real == folder or real.startswith(folder.rstrip("/") + "/")


_ROOT: contextvars.ContextVar[Root | None] = contextvars.ContextVar("sfckpt_input_root", default=None)


@contextlib.contextmanager
def scope(path: str | os.PathLike) -> Iterator[Root]:
    """Make `path` (what the user named) the root of every file opened inside this block, unless
    an enclosing block already fixed one: a load fixes its root once, its readers inherit it."""
    current = _ROOT.get()
    if current is not None:
        yield current
        return
    root = Root.of(path)
    token = _ROOT.set(root)
    try:
        yield root
    finally:
        _ROOT.reset(token)


def current_root(path: str | os.PathLike) -> Root:
    """The root fixed by the enclosing `scope`, or, outside any, `path` itself (a direct call names it)."""
    return _ROOT.get() or Root.of(path)


def _pseudo_devices() -> set[int]:
    """st_dev of /proc and /sys where they are mounted: their files claim to be regular but are not data."""
    out = set()
    try:
        root = os.stat("/").st_dev
        for name in ("/proc", "/sys"):
            dev = os.stat(name).st_dev
            if dev != root:  # a plain folder (no procfs mounted) is not a pseudo file system
                out.add(dev)
    except OSError:
        pass
    return out


_PSEUDO = _pseudo_devices()


def _where(fd: int, path: str | os.PathLike) -> str:
    """The real path of the file open as `fd`: /proc's link, or the path's real path if it is the same inode."""
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.startswith("/"):
            return where
    except OSError:
        pass
    real = os.path.realpath(path)
    opened, named = os.fstat(fd), os.stat(real)
    if (opened.st_dev, opened.st_ino) != (named.st_dev, named.st_ino):
        raise InputError(f"{path}: the file changed while it was opened", "run the command again when it is not being written")
    return real


class InputFile:
    """One input file, opened once and checked: a regular file, where it may be, of bounded size.

    Read it only through this object (`pread`, `readinto`, `read_tensor`, `read_all`, `fileobj`):
    every read comes from the descriptor that was checked.
    """

    def __init__(self, path: str | os.PathLike, fd: int, size: int):
        self.path, self.fd, self.size = path, fd, size
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "InputFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly `n` bytes at `offset`; a shorter file is refused (it shrank, or lied about its size)."""
        buf = bytearray(n)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def readinto(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` from `offset`; refused when the file ends first."""
        view, done = buf.cast("B"), 0
        while done < len(view):
            try:
                got = os.preadv(self.fd, [view[done:done + (1 << 30)]], offset + done)
            except OSError as exc:
                raise InputError(f"{self.path}: cannot be read ({exc.strerror})", "check the file and its permissions") from exc
            if got == 0:
                raise truncated(self.path)
            done += got

    def read_tensor(self, offset: int, dtype: str, shape: tuple[int, ...], out=None):
        """A contiguous tensor read from `offset` (into `out`, a flat tensor of its size, when given):
        positioned reads into memory of its own, never a memory map (which turns a file shrinking
        under it into SIGBUS)."""
        import math

        import torch

        from .tensors import itemsize, torch_dtype

        nbytes = math.prod(shape) * itemsize(dtype)
        if out is None:
            try:
                out = torch.empty(math.prod(shape), dtype=torch_dtype(dtype))
            except (RuntimeError, MemoryError):
                raise DamagedInput(f"{self.path}: a tensor of {nbytes} bytes does not fit in memory",
                                 "the file is damaged or crafted, or this machine has too little memory for it") from None
        if nbytes:
            self.readinto(memoryview(out.view(torch.uint8).numpy()), offset)
        return out.view(shape)

    def read_all(self, limit: limits.Limit, what: str) -> bytes:
        """The whole file, refused past `limit` (by its size, and by what a read returns: /proc-like files grow)."""
        bound = limit.value
        if self.size > bound:
            raise limit.exceeded(f"{self.path}: {what} of {self.size} bytes")
        parts, total = [], 0
        while True:
            try:
                part = os.pread(self.fd, min(_CHUNK, bound + 1 - total), total)
            except OSError as exc:
                raise InputError(f"{self.path}: cannot be read ({exc.strerror})", "check the file and its permissions") from exc
            if not part:
                break
            parts.append(part)
            total += len(part)
            if total > bound:
                raise limit.exceeded(f"{self.path}: {what} of more than {bound} bytes")
        data = b"".join(parts)
        if len(data) < self.size:
            raise truncated(self.path)
        return data

    def fileobj(self):
        """A file object over its own duplicate of the descriptor (for zipfile, torch.load, numpy)."""
        return os.fdopen(os.dup(self.fd), "rb")


def open_input(path: str | os.PathLike, *, root: Root | None = None, confined: bool = True) -> InputFile:
    """Open an input file through the gate (see the module docstring).

    Args:
        path: the file, as the layout or another file names it.
        root: where it may lie; by default the enclosing `scope`'s root, or `path` itself.
        confined: False for files the user names as options: not confined, otherwise the same checks.

    Raises:
        InputError: missing, unreadable, not a regular file, or outside the input.
    """
    try:
        fd = os.open(path, OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise InputError(f"{path}: no such file", "check the path; copy the whole checkpoint") from exc
        raise InputError(f"{path}: cannot be read ({exc.strerror})", "check the path and its permissions") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode) else \
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket"
            raise InputError(f"{path}: {kind}, not a regular file", "refusing to read it; point at the checkpoint's files")
        if st.st_dev in _PSEUDO:
            raise InputError(f"{path}: a file of /proc or /sys, not data", "refusing to read it; point at the checkpoint's files")
        if confined:
            where = _where(fd, path)
            allowed = root or current_root(path)
            if not allowed.holds(where):
                raise InputError(f"{path} is a link to {str(where)[:200]}, outside the checkpoint folder {allowed.folder}",
                                 "refusing to read it; only files inside the input are read (copy the file in instead of linking it)")
    except BaseException:
        os.close(fd)
        raise
    return InputFile(path, fd, st.st_size)


def open_user_file(path: str | os.PathLike) -> InputFile:
    """A file the user names as an option: theirs, so not confined; opened and checked the same way otherwise."""
    return open_input(path, confined=False)


def read_bytes(path: str | os.PathLike, limit: limits.Limit, what: str, *, confined: bool = True,
               root: Root | None = None) -> bytes:
    """An input file's bytes, refused past `limit`."""
    with open_input(path, confined=confined, root=root) as f:
        return f.read_all(limit, what)


def read_text(path: str | os.PathLike, limit: limits.Limit, what: str, *, confined: bool = True) -> str:
    """An input file as UTF-8 text, refused past `limit`."""
    data = read_bytes(path, limit, what, confined=confined)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise DamagedInput(f"{path}: {what} is not UTF-8 text", "the file is damaged or not what its name says") from None


def parse_json(data: bytes, what: str) -> Any:
    """JSON from bytes that must be UTF-8, as the safetensors library and transformers require."""
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError:
        raise DamagedInput(f"{what} is nested too deeply for a JSON parser", "the file is damaged or crafted") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DamagedInput(f"{what} is not valid JSON ({str(exc)[:120]})", "the file is truncated or damaged") from exc


def read_json(path: str | os.PathLike, what: str, limit: limits.Limit = limits.JSON_BYTES, *,
              root: Root | None = None) -> Any:
    """An input JSON file, parsed, refused past `limit`; `root` for a second input (a PEFT adapter's base model)."""
    return parse_json(read_bytes(path, limit, what, root=root), str(path))


def confined(folder: Path, name: object, named_by: str) -> Path:
    """`folder / name` for a file name that a checkpoint gives, refusing names that lead outside by
    their spelling (absolute, `..`, backslashes). Where the file really lies is checked when it is
    opened (`open_input`), on the opened descriptor."""
    if not isinstance(name, str) or not name:
        raise DamagedInput(f"{named_by} names a file by {type(name).__name__} {str(name)[:60]!r}, not by a file name",
                         "the file is damaged or crafted")
    lexical = PurePosixPath(name)
    if lexical.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in lexical.parts or "\\" in name \
            or "\0" in name:
        raise InputError(f"{named_by} names {excerpt(name)}, which is outside the checkpoint folder {folder}",
                         "refusing to read it; only files inside the folder are read")
    return folder / name


def side_files(folder: Path, names: tuple[str, ...] | list[str], root: Root | None = None) -> list[InputFile]:
    """The files of `names` present in `folder`, opened through the gate (copying is reading): what a
    release copies beside its weights. A name that is not a regular file inside `root` (by default
    the folder) is refused, not skipped."""
    root = root or current_root(folder)
    return [open_input(folder / name, root=root) for name in names if os.path.lexists(folder / name)]


def copy_side_file(source: InputFile, dest: Path) -> None:
    """Copy an opened input file into `dest` (a temporary file of the output), through the gate, bounded."""
    limit = limits.SIDE_FILE_BYTES
    names = os.fstat(source.fd).st_nlink
    if names > 1:
        # Another name for the same bytes exists, maybe outside the input (a hard link made when the
        # checkpoint was packed): what a release ships must be the folder's own file.
        raise InputError(f"{source.path} is a hard link (the file has {names} names), so its "
                         "bytes may belong to a file outside the checkpoint", "refusing to copy it into the release; "
                         "replace the link by a copy of the file (cp --remove-destination SOURCE DEST)")
    if source.size > limit.value:
        raise limit.exceeded(f"{source.path}: a file to copy into the release of {source.size} bytes")
    try:
        with open(dest, "wb") as out:
            offset = 0
            while offset < source.size:
                chunk = os.pread(source.fd, min(_CHUNK, source.size - offset), offset)
                if not chunk:
                    raise truncated(source.path)
                out.write(chunk)
                offset += len(chunk)
    except OSError as exc:
        raise OutputError(f"copying {source.path} to {dest} failed ({exc.strerror})",
                          "free some disk space or choose another folder") from exc


def allow_open_files(needed: int) -> None:
    """Raise the soft limit on open files when an input has many files (the hard limit permitting)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else min(needed, hard), hard))
    except (ImportError, ValueError, OSError):
        pass  # not POSIX, or not allowed: opening a file will say so


def check_tree(folder: Path, what: str) -> int:
    """Refuse a folder whose files another library will open by path (tensorstore reads an Orbax
    checkpoint itself): every entry below it must be a real folder or a regular file, no link of any
    kind, nothing on /proc or /sys, since the library follows what it finds. Returns the bytes the
    files hold."""
    total = 0
    for parent, folders, files in os.walk(folder, onerror=_walk_error):
        for name in folders + files:
            entry = os.path.join(parent, name)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                raise InputError(f"{entry} is a symbolic link inside {what}, which another library reads by "
                                 "following links", "refusing to read it; replace the link by a copy of its target")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or st.st_dev in _PSEUDO:
                raise InputError(f"{entry} is not a regular file or folder", "refusing to read it; only files inside "
                                 "the input are read (remove it from the checkpoint folder)")
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _walk_error(exc: OSError) -> None:
    raise InputError(f"{exc.filename}: cannot be read ({exc.strerror})", "check the folder and its permissions")
