"""Write safetensors one tensor at a time, atomically.

The header (names, dtypes, shapes, offsets) is known before any x is
computed, so it is written first and each tensor's bytes follow as soon as
they exist; memory holds one tensor at a time. The byte layout is the one
`safetensors.torch.save_file` produces (tests compare the bytes), and outputs
appear under their final name only when complete (temporary file in the
destination folder, fsync, rename).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import threading
import tempfile
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import inputs
from .errors import OutputError
from .tensors import DTYPES, nbytes_of

# safetensors orders tensors by dtype (this rank, highest first), then name: keeps data aligned.
_DTYPE_RANK = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64",
]
INDEX_NAME = "model.safetensors.index.json"


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


NAME_MAX = 255  # bytes in one file name on the file systems sfckpt writes to


def _check_name(dest: Path) -> None:
    size = len(os.fsencode(dest.name))
    if size > NAME_MAX:
        raise OutputError(f"the output name {dest.name[:40]}... is {size} bytes; file systems allow {NAME_MAX}",
                          "choose a shorter name")


def _new_tmp(dest: Path) -> Path:
    """An empty temporary file beside `dest`, with a name that fits whatever fits `dest`."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name[:200]}.", suffix=".sfckpt-tmp", dir=dest.parent)
    except OSError as exc:
        raise OutputError(f"cannot write in {dest.parent} ({exc.strerror})", "choose a folder you can write to") from None
    os.close(fd)
    return Path(tmp_name)


def _commit(tmp: Path, dest: Path, force: bool) -> None:
    """Move a finished `tmp` onto `dest`; without `force`, never over a file that appeared meanwhile."""
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    if force:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputError(f"{dest} appeared while sfckpt was writing", "pass --force to replace it") from None
    except OSError:
        if dest.exists():
            raise OutputError(f"{dest} already exists", "pass --force to replace it") from None
        os.replace(tmp, dest)  # file systems without hard links
    tmp.unlink(missing_ok=True)


def _check_target(dest: Path, force: bool) -> None:
    _check_name(dest)
    if dest.is_dir():
        raise OutputError(f"{dest} is a folder", "give a file name, or a folder name without .safetensors for folder output")
    if dest.exists() and not force:
        raise OutputError(f"{dest} already exists", "pass --force to replace it")


@contextmanager
def atomic_path(dest: Path, force: bool) -> Iterator[Path]:
    """A temporary path beside `dest`, moved onto it only if the block completes.

    Without `force`, an existing `dest` is never replaced, even one created
    while we worked (the final step is a hard link, which refuses to clobber).
    """
    _check_target(dest, force)
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: the output folder does not exist", "create it first")
    tmp: Path | None = None
    try:
        # Signals wait until `tmp` is known, so a Ctrl-C cannot leave a file nobody removes.
        with _signals_deferred():
            tmp = _new_tmp(dest)
        yield tmp
        _commit(tmp, dest, force)
        _fsync_dir(parent)
    finally:
        if tmp is not None:
            with _signals_deferred():
                tmp.unlink(missing_ok=True)


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


def _write_file(path: Path, specs: list[Spec], produce: Callable[[Spec], object], metadata, progress) -> None:
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
        raise OutputError(f"writing {path.parent} failed ({exc.strerror})", "free some disk space or choose another folder") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_file(dest: Path, specs: Iterable[Spec], produce, metadata=None, force=False, progress=None) -> Path:
    """Write one safetensors file, streaming each tensor from `produce(spec)`."""
    specs = ordered(specs)
    with atomic_path(dest, force) as tmp:
        _write_file(tmp, specs, produce, metadata, progress)
    return dest


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000 (Hugging Face's units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise OutputError(f"--max-shard-size {text!r} is not a size", "write it like 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "B").upper()
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


def write_folder(folder: Path, specs: Iterable[Spec], produce, metadata=None, force=False, progress=None,
                 max_shard_size: int | None = None, copies: Sequence[inputs.InputFile] = (),
                 single_name: str = "model.safetensors") -> list[Path]:
    """Write `model.safetensors`, or shards and `model.safetensors.index.json`, into `folder`,
    with `copies` (files such as config.json, opened through the input gate) beside them: all of it, or none of it.

    Everything is written to temporary files first and moved into place only when all of it
    is complete, so a failed run leaves the folder exactly as it was. A run owns the weight
    files (`model.safetensors`, `model-NNNNN-of-NNNNN.safetensors`, the index) and the files it
    copies: with `force`, weight files of an earlier layout are removed once the new ones are in
    place; any other file in the folder is left alone.
    """
    specs = list(specs)
    groups = shard(specs, max_shard_size) if max_shard_size else [specs]
    if len(groups) == 1:
        names = [single_name]  # adapter_model.safetensors for a PEFT adapter folder
    else:
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    _check_name(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder", "choose a folder name for sharded output")
    if not folder.parent.is_dir():
        raise OutputError(f"{folder.parent}: the output folder does not exist", "create it first")
    targets = [folder / n for n in names] + ([folder / INDEX_NAME] if len(groups) > 1 else []) \
        + [folder / c.name for c in copies]
    for t in targets:
        if t.is_dir():
            raise OutputError(f"{t} is a folder", "move it away, or choose another output folder")
        if t.exists() and not force:
            raise OutputError(f"{t} already exists", "pass --force to replace it")
    created = not folder.exists()
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder} ({exc.strerror})", "choose a folder you can write to") from None
    staged: list[tuple[Path, Path]] = []  # (temporary file, final name)
    committed: list[Path] = []
    try:
        def stage(dest: Path) -> Path:
            with _signals_deferred():
                tmp = _new_tmp(dest)
                staged.append((tmp, dest))
            return tmp

        for name, group in zip(names, groups):
            _write_file(stage(folder / name), ordered(group), produce, metadata, progress)
        if len(groups) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in specs), **(metadata or {})},
                "weight_map": {s.name: n for n, g in zip(names, groups) for s in sorted(g, key=lambda s: s.name)},
            }
            stage(folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=False) + "\n")
        for source in copies:
            inputs.copy_side_file(source, stage(folder / source.name))
        with _signals_deferred():  # everything is written: put it in place as one step
            backups: list[tuple[Path, Path]] = []  # (the previous file, moved aside; its name)
            try:
                for tmp, dest in staged:
                    if force and dest.exists():
                        backup = _new_tmp(dest)
                        try:
                            os.replace(dest, backup)  # kept until every new file is in place
                        except BaseException:
                            backup.unlink(missing_ok=True)
                            raise
                        backups.append((backup, dest))
                    _commit(tmp, dest, force)
                    committed.append(dest)
            except BaseException:
                for path in committed:
                    path.unlink(missing_ok=True)
                committed.clear()
                for backup, dest in reversed(backups):
                    os.replace(backup, dest)
                raise
            for backup, _ in backups:
                backup.unlink(missing_ok=True)
            keep = {t.name for t in targets}
            for old in folder.iterdir():
                if owned_by_sfckpt(old.name) and old.name not in keep and old.is_file():
                    old.unlink()
            _fsync_dir(folder)
    except OSError as exc:
        _discard(staged, committed if not force else [], folder if created else None)
        raise OutputError(f"writing {folder} failed ({exc.strerror})", "free some disk space or choose another folder") from None
    except BaseException:
        _discard(staged, committed if not force else [], folder if created else None)
        raise
    return targets


def _discard(staged: list[tuple[Path, Path]], committed: list[Path], created: Path | None) -> None:
    """Undo a failed folder output: temporary files, files that did not exist before, a new folder."""
    with _signals_deferred():
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for path in committed:
            path.unlink(missing_ok=True)
        if created is not None:
            try:
                created.rmdir()
            except OSError:
                pass
