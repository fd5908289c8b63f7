"""Write safetensors one tensor at a time, atomically.

The header (names, dtypes, shapes, offsets) is known before any x is
computed, so it is written first and each tensor's bytes follow as soon as
they exist; memory holds one tensor at a time. The byte layout is the one
`safetensors.torch.save_file` produces (tests compare the bytes), and outputs
appear under their final name only when complete (temporary file in the
destination folder, fsync, rename).

Temporaries carry their owner: each is created under a recognisable name
(`.<output name>.<8 hex digits>.sfckpt-tmp`) and its run holds an exclusive
`flock` on it for as long as it exists. A run killed outright (SIGKILL, the
out-of-memory killer) cannot remove its temporaries, but its lock dies with it:
the next run writing the same output removes the temporaries whose lock it can
take without waiting, and never touches one a live run holds.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import inputs, parallel
from .conventions import INDEX_NAME, SINGLE_NAME
from .errors import InputError, Opt, OutputError, OutputExists
from .tensors import DTYPES, nbytes_of

# safetensors orders tensors by dtype (this rank, highest first), then name: keeps data aligned.
_DTYPE_RANK = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]


@dataclass(frozen=True)
class Spec:
    """What the header needs to know about a tensor before its data exists."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


def ordered(specs: Iterable[Spec]) -> list[Spec]:
    return sorted(specs, key=lambda s: (-_DTYPE_RANK.index(DTYPES[s.dtype][1]), s.name))


def header_bytes(specs: Sequence[Spec], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length and padded JSON header for `specs`, in safetensors' order."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": DTYPES[s.dtype][1], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


HEADER_MAX = 100_000_000  # the safetensors library's MAX_HEADER_SIZE: it neither writes nor reads a larger header


def check_storable(specs: Sequence[Spec], metadata: dict[str, str] | None) -> None:
    """Refuse what the safetensors library would not write or could not open again, before
    anything is written: the reserved name `__metadata__`, names that are not UTF-8 text (a lone
    surrogate, which Python strings and pickles allow), and a header past the library's limit.
    """
    for s in specs:
        if s.name == "__metadata__":
            raise InputError("tensor '__metadata__' cannot be stored in safetensors: the format keeps its metadata "
                             "under that name, and the library could not open the file", "rename the tensor in the checkpoint")
        try:
            s.name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(f"tensor '{s.name[:200]}' has a name that is not UTF-8 text (a lone surrogate, "
                             f"U+{ord(s.name[exc.start]):04X}); safetensors stores names as UTF-8",
                             "rename the tensor in the checkpoint") from exc
    size = len(header_bytes(specs, metadata)) - 8
    if size > HEADER_MAX:
        raise InputError(f"the safetensors header for these {len(specs)} tensors would be {size} bytes; the "
                         f"safetensors library opens at most {HEADER_MAX}",
                         "shorten the tensor names, or split the output with " + Opt("max_shard_size", usage=True))


def _tensor_bytes(tensor) -> memoryview:
    """A zero-copy view of a contiguous CPU tensor's bytes (no numpy needed)."""
    n = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(tensor.data_ptr())).cast("B")


def refuse_inputs(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that is one of the inputs, or lies inside an input folder."""
    for src in inputs:
        try:
            same = out.exists() and src.exists() and out.samefile(src)
        except OSError:
            same = False
        if same or out.resolve() == src.resolve():
            raise OutputError(f"{out} is the input checkpoint", "write to a new file")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise OutputError(f"{out} is inside the input folder {src}", "write outside the input folder")


NAME_MAX = 255  # bytes in one file name, where the file system does not say


def name_max(folder: Path) -> int:
    """Bytes a file name may have in `folder` (what its file system says)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX


def _check_name(dest: Path) -> None:
    size, limit = len(os.fsencode(dest.name)), name_max(dest.parent)
    if size > limit:
        raise OutputError(f"the output name {dest.name[:40]}... is {size} bytes; the file system allows {limit}",
                          "choose a shorter name")


TMP_SUFFIX = ".sfckpt-tmp"  # a temporary: removed by its run, or by a later run once its owner died
OLD_SUFFIX = ".sfckpt-old"  # files an unfinished commit moved aside: a later run puts them back
_TEMPORARY = re.compile(r"\.(.*)\.[0-9a-f]{8}(" + re.escape(TMP_SUFFIX) + "|" + re.escape(OLD_SUFFIX) + ")", re.DOTALL)


def _stem(name: str, folder: Path) -> str:
    """The part of a temporary's name that says whose it is: `name`, cut by bytes (at a character
    boundary) so that the whole temporary name fits in `folder`. Uniqueness comes from the
    random part, so outputs whose long names share a beginning only share the stem."""
    room = name_max(folder) - len(f"..00000000{TMP_SUFFIX}")
    while len(os.fsencode(name)) > room:
        name = name[:-1]
    return name


@dataclass
class _Owned:
    """A temporary file or folder of this run, and the descriptor whose `flock` marks it as a live run's."""

    path: Path
    fd: int

    def release(self) -> None:
        os.close(self.fd)


def _lock(fd: int) -> bool | None:
    """Take the exclusive lock without waiting: True, or False if another process holds it;
    None where the file system has no locks (its temporaries then count as live, never removed)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        return False if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None


def _same(path: Path, fd: int) -> bool:
    """Whether `path` still names the file open as `fd` (a cleanup may have removed it meanwhile)."""
    try:
        st, ft = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (ft.st_dev, ft.st_ino)


def _claim(owner: str, where: Path, suffix: str = TMP_SUFFIX, folder: bool = False) -> _Owned:
    """A new empty temporary file (or folder) in `where`, named after the output `owner`, locked.

    Creating and locking are two steps; a cleanup by another run can fall between them. It can
    only take a file nobody has locked yet and removes it, so: a lock we cannot take, or a name
    that no longer leads to our file, means try another name.
    """
    stem = _stem(owner, where)
    for _ in range(100):
        path = where / f".{stem}.{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(path, 0o700)
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except (FileExistsError, FileNotFoundError):
            if not where.is_dir():
                break
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {where} ({exc.strerror})", "choose a folder you can write to") from exc
        if _lock(fd) is not False and _same(path, fd):
            return _Owned(path, fd)
        os.close(fd)
    raise OutputError(f"cannot make a temporary file in {where}", "check that the folder exists and is writable")


def _remove(path: Path) -> None:
    """Remove a temporary file or folder, as far as permissions allow (what stays is retried by the next run)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _drop(owned: _Owned) -> None:
    """Remove a temporary of this run, then let its lock go (in that order: no other run may take it)."""
    if _same(owned.path, owned.fd):
        _remove(owned.path)
    owned.release()


def clean_dead(folder: Path, owner: str | None = None) -> None:
    """Remove the temporaries in `folder` left by runs that died (killed before they could).

    `owner` limits it to temporaries of that output name; None takes every sfckpt temporary (inside
    a folder output, all of them belong to runs writing that output). A temporary whose lock is
    held belongs to a live run and is left alone. Files an unfinished commit moved aside are put
    back where they were (`_roll_back`): that run never finished, so its output is the previous one.
    """
    stem = None if owner is None else _stem(owner, folder)
    try:
        names = sorted(e.name for e in os.scandir(folder))
    except OSError:
        return
    for name in names:
        m = _TEMPORARY.fullmatch(name)
        if m is None or (stem is not None and (m.group(1) != stem or m.group(2) != TMP_SUFFIX)):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if _lock(fd) is True and _same(path, fd):
                if m.group(2) == OLD_SUFFIX:
                    _roll_back(folder, path)
                else:
                    _remove(path)
        finally:
            os.close(fd)


def _new_tmp(dest: Path) -> _Owned:
    """An empty, locked temporary file beside `dest`, with a name that fits whatever fits `dest`."""
    return _claim(dest.name, dest.parent)


def _commit(tmp: Path, dest: Path, force: bool) -> None:
    """Move a finished `tmp` onto `dest`; without `force`, never over a file that appeared meanwhile."""
    os.chmod(tmp, 0o666 & ~_umask())  # temporaries are made 0600; outputs get the usual permissions
    if force:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputExists(dest, f"{dest} appeared while sfckpt was writing") from None
    except OSError:
        if dest.exists():
            raise OutputExists(dest) from None
        os.replace(tmp, dest)  # file systems without hard links
    tmp.unlink(missing_ok=True)


def _check_target(dest: Path, force: bool) -> None:
    _check_name(dest)
    if dest.is_dir():
        raise OutputError(f"{dest} is a folder", "give a file name, or a folder name without .safetensors for folder output")
    if dest.exists() and not force:
        raise OutputExists(dest)


@contextmanager
def atomic_path(dest: Path, force: bool) -> Iterator[Path]:
    """A temporary path beside `dest`, moved onto it only if the block completes.

    Without `force`, an existing `dest` is never replaced, even one created
    while we worked (the final step is a hard link, which refuses to clobber).
    Temporaries of `dest` left by runs that died are removed first.
    """
    _check_target(dest, force)
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: the output folder does not exist", "create it first")
    tmp: _Owned | None = None
    try:
        # Signals wait until `tmp` is known, so a Ctrl-C cannot leave a file nobody removes.
        with _signals_deferred():
            clean_dead(parent, dest.name)
            tmp = _new_tmp(dest)
        yield tmp.path
        _commit(tmp.path, dest, force)
        _fsync_dir(parent)
    finally:
        if tmp is not None:
            with _signals_deferred():
                _drop(tmp)


class _Deferral:
    """Whether interrupts are being held, and whether one arrived meanwhile.

    Blocking the signals is not enough on its own: a signal that arrived just before the block
    has already been noted by the interpreter, and its Python handler would run inside it. The
    CLI's handler asks `holding()` and, while it is true, records the interrupt instead of
    raising it; the block raises it on the way out.
    """

    depth = 0
    pending = False


def holding() -> bool:
    """True inside a `_signals_deferred` block (the interrupt is then recorded and raised after it)."""
    if _Deferral.depth:
        _Deferral.pending = True
        return True
    return False


@contextmanager
def _signals_deferred():
    """Hold SIGINT/SIGTERM until the block ends (they are delivered right after)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    _Deferral.depth += 1
    try:
        yield
    finally:
        _Deferral.depth -= 1
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if not _Deferral.depth and _Deferral.pending:
            _Deferral.pending = False
            raise KeyboardInterrupt


def _load_sync_file_range():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None


def _start_writeback(f) -> None:
    """Ask Linux to start writing what we wrote so far (SYNC_FILE_RANGE_WRITE does not wait).

    The final fsync then has little left to do, and the dirty pages of a large
    output never pile up until the kernel throttles us.
    """
    if _SYNC_FILE_RANGE is not None:
        f.flush()
        _SYNC_FILE_RANGE(f.fileno(), 0, 0, 2)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, specs: list[Spec], produce: Callable[[Spec], object], metadata, progress,
                shown: Path | None = None) -> None:
    # The next tensor is computed on a worker thread while this one is written (both release
    # the GIL), so reading, computing and writing overlap; at most two tensors are in memory.
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with open(path, "wb") as f:
            f.write(header_bytes(specs, metadata))
            pending = pool.submit(produce, specs[0]) if specs else None
            for i, spec in enumerate(specs):
                tensor = pending.result()
                pending = pool.submit(produce, specs[i + 1]) if i + 1 < len(specs) else None
                if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
                    raise RuntimeError(f"tensor '{spec.name}' changed shape or dtype while being written")
                if spec.nbytes:
                    f.write(_tensor_bytes(tensor))
                    _start_writeback(f)
                del tensor
                if progress:
                    progress(spec.nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise OutputError(f"writing {shown or path.parent} failed ({exc.strerror})",
                          "free some disk space or choose another folder") from exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def writing(produce: Callable[[Spec], object], metadata, shown: Path):
    """`write_one(path, specs, progress)` for `parallel.write_shards`: one weight file of a folder output."""
    return lambda path, specs, progress: _write_file(path, specs, produce, metadata, progress, shown)


def write_file(dest: Path, specs: Iterable[Spec], produce, metadata=None, force=False, progress=None) -> Path:
    """Write one safetensors file, streaming each tensor from `produce(spec)`."""
    specs = ordered(specs)
    check_storable(specs, metadata)
    with atomic_path(dest, force) as tmp:
        _write_file(tmp, specs, produce, metadata, progress)
    return dest


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (Hugging Face's units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise OutputError(Opt("max_shard_size") + f" {text!r} is not a size", "write it like 5GB, 500MB or 2GiB",
                          option="max_shard_size")
    if m.group(2) is None:  # a bare 100 would mean 100 bytes: forty shards where 100MB was meant
        bare = text.strip()
        raise OutputError(Opt("max_shard_size") + f" {bare!r} has no unit",
                          f"write it with one: {bare}MB, {bare}GB (or {bare}B for bytes)", option="max_shard_size")
    unit = m.group(2).upper()
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def shard(specs: Sequence[Spec], max_bytes: int) -> list[list[Spec]]:
    """Split tensors (in name order) into shards of at most `max_bytes`; a bigger tensor gets its own."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in sorted(specs, key=lambda s: s.name):
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


_OWNED = re.compile(r"model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|" + re.escape(INDEX_NAME))


def owned_by_sfckpt(name: str) -> bool:
    """Files of a folder output that belong to its weights: a run replaces all of them together."""
    return _OWNED.fullmatch(name) is not None


def plan_folder(specs: list[Spec], max_shard_size: int | None, single_name: str) -> tuple[list[str], list[list[Spec]]]:
    """The weight files of a folder output and the specs each holds, in the order they are written."""
    groups = shard(specs, max_shard_size) if max_shard_size else [specs]
    if len(groups) == 1:
        return [single_name], groups  # adapter_model.safetensors for a PEFT adapter folder
    return [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)], groups


def shard_jobs(staging: Path, names: list[str], groups: list[list[Spec]]) -> list[tuple[Path, list[Spec]]]:
    """(file in the staging folder, its specs in safetensors' order) for each weight file."""
    return [(staging / name, ordered(group)) for name, group in zip(names, groups)]


def write_folder(folder: Path, specs: Iterable[Spec], produce, metadata=None, force=False, progress=None,
                 max_shard_size: int | None = None, copies: Sequence[inputs.InputFile] = (),
                 single_name: str = SINGLE_NAME, workers: int = 1, ranks=None) -> list[Path]:
    """Write `model.safetensors`, or shards and `model.safetensors.index.json`, into `folder`,
    with `copies` (files such as config.json, opened through the input gate) beside them: all of it, or none of it.

    Everything is written into a locked staging folder first and moved into place only when all
    of it is complete, so a failed run leaves the folder exactly as it was. A new `folder` is the
    staging folder renamed (a killed run leaves only a hidden `.<name>.<hex>.sfckpt-tmp` beside
    it, never a half-made release); into an existing one the files move as one step that a later
    run can undo (`_commit_into`). A run owns the weight files (`model.safetensors`,
    `model-NNNNN-of-NNNNN.safetensors`, the index) and the files it copies: with `force`, weight
    files of an earlier layout are removed once the new ones are in place; any other file in the
    folder is left alone.
    """
    specs = list(specs)
    names, groups = plan_folder(specs, max_shard_size, single_name)
    if ranks is not None and ranks.rank > 0:  # rank 0 checks, stages and commits; this rank writes its shards
        parallel.follow(lambda staging: shard_jobs(staging, names, groups), writing(produce, metadata, folder), ranks, progress)
        return [folder / n for n in names] + ([folder / INDEX_NAME] if len(groups) > 1 else []) + [folder / c.name for c in copies]
    for group in groups:
        check_storable(group, metadata)
    targets = [folder / n for n in names] + ([folder / INDEX_NAME] if len(groups) > 1 else []) \
        + [folder / c.name for c in copies]
    _prepare_folder(folder, targets, force)
    created = not folder.exists()
    staging: _Owned | None = None
    try:
        with _signals_deferred():
            staging = _claim(folder.name, folder.parent if created else folder, folder=True)

        def stage(dest: Path) -> Path:
            return staging.path / dest.name

        if ranks is not None:
            ranks.share(str(staging.path))
        parallel.write_shards(shard_jobs(staging.path, names, groups), writing(produce, metadata, folder),
                              workers, progress, ranks)
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs), **(metadata or {})},
                "weight_map": {s.name: n for n, g in zip(names, groups) for s in sorted(g, key=lambda s: s.name)},
            }
            stage(folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        for source in copies:
            inputs.copy_side_file(source, stage(folder / source.name))
        with _signals_deferred():  # everything is written: put it in place as one step
            if created:
                _move_into_place(staging, folder)
                _fsync_dir(folder.parent)
            else:
                _commit_into(folder, staging.path, targets, force)
            _fsync_dir(folder)
    except OSError as exc:
        raise OutputError(f"writing {folder} failed ({exc.strerror})", "free some disk space or choose another folder") from exc
    finally:
        if staging is not None:
            with _signals_deferred():
                _drop(staging)
    return targets


def _prepare_folder(folder: Path, targets: Sequence[Path], force: bool) -> None:
    """Refuse a folder output that cannot be written (a file of its name, no parent, a target that exists
    without `force`), after removing what runs that died left in it."""
    _check_name(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder", "choose a folder name for sharded output")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder.parent}: the output folder does not exist", "create it first")
    with _signals_deferred():  # what runs that died left: a staging folder beside, or inside
        clean_dead(folder.parent, folder.name)
        if folder.is_dir():
            clean_dead(folder)
    for t in targets:
        if t.is_dir():
            raise OutputError(f"{t} is a folder", "move it away, or choose another output folder")
        if t.exists() and not force:
            raise OutputExists(t)


def _move_into_place(staging: _Owned, folder: Path) -> None:
    """Rename a finished staging folder to `folder`, which did not exist when the run began."""
    os.chmod(staging.path, 0o777 & ~_umask())  # staging folders are made 0700
    try:
        os.rename(staging.path, folder)  # over at most an empty folder made meanwhile: nothing is lost
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"{folder} appeared while sfckpt was writing", "run again to write into it") from exc
        raise


def _commit_into(folder: Path, staged: Path, targets: Sequence[Path], force: bool) -> None:
    """Move the files in `staged` onto `targets` in the existing `folder`, as one step a later run can undo.

    Before anything moves, a locked `.sfckpt-old` folder is made that receives the files replaced
    (with `force`) and the weight files of an earlier layout, and lists the names that did not
    exist. Once every file is in place it is renamed to a temporary and removed. A run killed
    in between leaves it behind, and the next run writing this folder rolls the folder back.
    """
    keep = {t.name for t in targets}
    stale = [f for f in folder.iterdir() if owned_by_sfckpt(f.name) and f.name not in keep and f.is_file()]
    old = _claim(folder.name, folder, OLD_SUFFIX, folder=True)
    keep = False  # the previous files could not all be put back: leave them for a later run to retry
    try:
        previous = old.path / "previous"
        previous.mkdir()
        (old.path / "created.json").write_text(json.dumps([t.name for t in targets if not t.exists()]))
        committed: list[str] = []
        try:
            for t in targets:
                if force and t.exists():
                    os.replace(t, previous / t.name)  # kept until every new file is in place
                _commit(staged / t.name, t, force)
                committed.append(t.name)
            for f in stale:
                os.replace(f, previous / f.name)
        except BaseException:
            keep = True
            _roll_back(folder, old.path, committed)
            keep = False
            raise
        finished = old.path.with_name(old.path.name.removesuffix(OLD_SUFFIX) + TMP_SUFFIX)
        os.rename(old.path, finished)  # from here on the new files are the release; what was replaced is garbage
        old.path = finished
    finally:
        if keep:
            old.release()
        else:
            _drop(old)


def _roll_back(folder: Path, old: Path, committed: Sequence[str] | None = None) -> None:
    """Undo an unfinished `_commit_into`: remove the files it added to `folder`, put back those it
    moved into `old`, remove `old`. `committed` names the files this run put in place; None (for a
    run that died) trusts the list that run wrote before it moved anything."""
    try:
        created = json.loads((old / "created.json").read_text())
    except (OSError, ValueError):
        created = []  # written before anything moved: without it, nothing did
    for name in created if isinstance(created, list) else []:
        if isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..") \
                and (committed is None or name in committed):
            (folder / name).unlink(missing_ok=True)
    previous = old / "previous"
    for f in sorted(previous.iterdir()) if previous.is_dir() else []:
        os.replace(f, folder / f.name)
    shutil.rmtree(old, ignore_errors=True)
