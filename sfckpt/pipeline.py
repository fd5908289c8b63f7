"""Reading the next slice of y and z while this one is computed.

x is computed a slice at a time into its own memory (bit-identical to one `torch.lerp`). The
slices of y and z are read on a second thread, one slice ahead, into two pairs of buffers used
in turn: the read (a positioned read, which releases the GIL) and the lerp (which releases it
too) then run on two cores, while the writer's thread writes the previous tensor on a third.
Memory grows by two slices, not by a tensor.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any, Iterator

from .tensors import TensorRef, torch_dtype


@contextmanager
def one_thread_per_op() -> Iterator[None]:
    """torch's intra-op threads set to one while x is written, and set back after; torch is
    imported here, before `--workers` fork, so the workers share its pages (each importing it
    took about 140 MiB of its own).

    Reading, the lerp and writing already run on three threads of their own. torch's OpenMP
    threads, once a lerp is split across them, spin-wait for the next one and take the cores the
    reader and the writer need: measured on 2 cores, a 0.8 GB conversion took 12 s of CPU instead
    of 4.5 s, and `--workers 2` (two processes spinning) twice the time of one worker. Threads
    started while this holds (the writer's, the reader's, forked workers') take one thread;
    elementwise lerp gives the same bits on any number of threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_BELOW = 32 << 20  # the largest mmap threshold glibc accepts (64-bit)


def reuse_freed_memory() -> None:
    """Let this process's allocator keep memory it frees (glibc; elsewhere nothing changes).

    Each x and its slice buffers are allocated and freed once per tensor. glibc serves an
    allocation of a few MiB with a fresh mmap, and a fresh page costs a fault and zeroing: for a
    0.8 GB model of 4 MiB tensors, about a second of CPU (sys 2.7 s instead of 1.6 s). Below
    KEEP_BELOW, the memory a tensor frees now serves the next one; the peak stays that of two
    tensors and four slices, since it is memory that was in use already."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library to load by that name, or no mallopt in it
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(M_MMAP_THRESHOLD, KEEP_BELOW)
    mallopt(M_TRIM_THRESHOLD, 2 * KEEP_BELOW)


def slices(y: TensorRef, z: TensorRef, step: int) -> Iterator[tuple[int, int, Any, Any]]:
    """(start, count, y's elements, z's elements) for each run of `step` elements of y and z, in order.

    The buffers are allocated now, before the caller allocates x (see reconstruct._lerp). Each pair
    is handed out once and refilled only after the caller has asked for the next slice, so the
    caller may use it until then."""
    import torch

    dtype, n = torch_dtype(y.dtype), min(step, y.numel)
    buffers = [(torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)) for _ in range(2 if y.numel > step else 1)]
    return _read_ahead(y, z, step, buffers)


def _read_ahead(y: TensorRef, z: TensorRef, step: int, buffers: list) -> Iterator[tuple[int, int, Any, Any]]:
    total = y.numel

    def read(k: int) -> tuple[int, int, Any, Any]:
        start = k * step
        n = min(step, total - start)
        y_part, z_part = buffers[k % len(buffers)]
        return start, n, y.load_flat(start, n, y_part[:n]), z.load_flat(start, n, z_part[:n])

    count = math.ceil(total / step)
    if count <= 1:  # nothing to overlap: no thread
        yield from (read(k) for k in range(count))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, 0)
        try:
            for k in range(count):
                item = pending.result()
                pending = pool.submit(read, k + 1) if k + 1 < count else None
                yield item
        finally:
            if pending is not None:  # stopped early: let the read in flight finish before its buffers go
                wait([pending])
