"""Output shards converted in several processes: `--workers N` on one machine, or the ranks of `torchrun`.

The plan (which tensors go in which shard, in which order, at which offsets) is made before any
shard is written and is the same in every process, so each shard's bytes do not depend on who
writes it: the output is byte-identical to a single process, whatever the number of workers.
Shards are dealt out by size (largest first, to the least loaded), the same way in every process.

Local workers are forked after the plan is made: they share the opened input files (positioned
reads need no shared offset) and write their shards into the run's staging folder; the parent
commits the release only when every worker succeeded. Under a launcher that sets
torch.distributed's environment (`torchrun`, or `srun` with `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/
`MASTER_PORT` exported), every rank plans the same conversion, rank 0 makes the staging folder on
the shared file system and tells the others where it is, each rank writes its shards, and rank 0
writes the index and moves the release into place once all ranks report success.
"""
from __future__ import annotations

import json
import os
import selectors
import signal
from pathlib import Path
from typing import Callable, Sequence

from .errors import InputError, Opt, OutputError, SfckptError, Text, Words

Job = tuple[Path, list]  # (file to write, the specs it holds, in order)
WriteOne = Callable[[Path, list, Callable[[int], None] | None], None]


def deal(sizes: Sequence[int], workers: int) -> list[list[int]]:
    """Indices of jobs per worker: largest first, each to the worker with the fewest bytes so far
    (ties to the lowest worker), so every process computes the same split."""
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        w = min(range(workers), key=lambda w: (loads[w], w))
        shares[w].append(i)
        loads[w] += sizes[i]
    return [sorted(s) for s in shares]


def launched() -> "Ranks | None":
    """This process's ranks when a launcher started it as one of several (torch.distributed's
    environment: RANK, WORLD_SIZE > 1, MASTER_ADDR, MASTER_PORT), else None."""
    try:
        rank, world = int(os.environ.get("RANK", "")), int(os.environ.get("WORLD_SIZE", ""))
    except ValueError:
        return None
    if world <= 1 or not 0 <= rank < world or not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        return None
    return Ranks(rank, world)


def write_shards(jobs: list[Job], write_one: WriteOne, workers: int, progress: Callable[[int], None] | None,
                 ranks: "Ranks | None" = None) -> None:
    """Write every job (in this process, or in `workers` forked ones), or, among `ranks`, this rank's share."""
    sizes = [sum(s.nbytes for s in specs) for _, specs in jobs]
    if ranks is None:
        _write(jobs, sizes, write_one, workers, progress)
        return
    mine = deal(sizes, ranks.world)[ranks.rank]
    try:
        _write([jobs[i] for i in mine], [sizes[i] for i in mine], write_one, workers, progress)
        error = None
    except Exception as exc:
        error = failure(exc)
    ranks.gather_errors(error)


def _write(jobs: list[Job], sizes: list[int], write_one: WriteOne, workers: int, progress) -> None:
    if workers <= 1 or len(jobs) <= 1:
        for path, specs in jobs:
            write_one(path, specs, progress)
        return
    _run_forked([[jobs[i] for i in share] for share in deal(sizes, workers) if share], write_one, progress)


def failure(exc: BaseException) -> dict:
    """An error as a JSON-able dict another process can raise again (`_raise`): its words and the options
    they name, not spelled, so that the CLI writes `--allow-nonfinite` where the API writes its argument."""
    if isinstance(exc, SfckptError):
        kind = "OutputError" if isinstance(exc, OutputError) else "InputError"
        return {"kind": kind, "message": _parts(exc.text), "hint": None if exc.fix is None else _parts(exc.fix)}
    return {"kind": "bug", "message": f"{type(exc).__name__}: {exc}"[:500], "hint": None}


def _parts(text: Text) -> list:
    return [p if isinstance(p, str) else {"opt": p.name, "value": p.value, "usage": p.usage} for p in text]


def _text(parts: list | str | None) -> Words | None:
    if parts is None or isinstance(parts, str):
        return parts
    return Text(p if isinstance(p, str) else Opt(p["opt"], p["value"], p["usage"]) for p in parts)


def _run_here(jobs: list[Job], write_one: WriteOne, progress) -> dict | None:
    """Write `jobs`; a failure as a dict (see `failure`), or None."""
    try:
        for path, specs in jobs:
            write_one(path, specs, progress)
    except Exception as exc:
        return failure(exc)
    return None


def _raise(error: dict) -> None:
    kind = {"InputError": InputError, "OutputError": OutputError}.get(error["kind"])
    if kind is None:
        raise RuntimeError(f"a worker failed: {error['message']}")
    raise kind(_text(error["message"]), _text(error["hint"]))


def _run_forked(shares: list[list[Job]], write_one: WriteOne, progress) -> None:
    """One forked process per share; their progress (bytes per tensor) and failures come back through pipes."""
    children: dict[int, int] = {}  # read end -> pid
    try:
        for share in shares:
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: never returns into the caller's cleanup (the parent owns the staging folder)
                os.close(read_end)
                _child(share, write_one, write_end, progress is not None)
            os.close(write_end)
            children[read_end] = pid
        error = _collect(list(children), progress)
        for fd, pid in list(children.items()):
            _, status = os.waitpid(pid, 0)
            os.close(fd)
            del children[fd]
            if status and error is None:
                error = {"kind": "bug", "message": f"a worker process ended with status {status}", "hint": None}
    finally:  # interrupted, or a pipe failed: no worker outlives the run
        for fd, pid in children.items():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(fd)
    if error is not None:
        _raise(error)


def _child(jobs: list[Job], write_one: WriteOne, fd: int, report: bool) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        out = os.fdopen(fd, "w", buffering=1)
        error = _run_here(jobs, write_one, (lambda n: out.write(f"{n}\n")) if report else None)
        if error is not None:
            out.write("E" + json.dumps(error) + "\n")
        out.flush()
        code = 0 if error is None else 1
    finally:
        os._exit(code)


def _collect(fds: list[int], progress) -> dict | None:
    """Read the workers' lines until every pipe closes; the first failure reported, or None."""
    error, pending = None, {fd: b"" for fd in fds}
    with selectors.DefaultSelector() as sel:
        for fd in fds:
            sel.register(fd, selectors.EVENT_READ)
        while pending:
            for key, _ in sel.select():
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    pending.pop(key.fd)
                    continue
                *lines, pending[key.fd] = (pending[key.fd] + chunk).split(b"\n")
                for line in lines:
                    if line.startswith(b"E"):
                        error = error or json.loads(line[1:])
                    elif progress is not None:
                        progress(int(line))
    return error


class Ranks:
    """This process's place among the ranks a launcher started, and the messages they exchange
    (through torch.distributed's gloo backend, set up from the launcher's environment)."""

    def __init__(self, rank: int, world: int):
        import torch.distributed as dist

        self.rank, self.world, self.dist = rank, world, dist
        self.phase = "start"  # -> "staged" (staging folder shared) -> "written" or "failed" (all shards reported)
        if not dist.is_initialized():
            dist.init_process_group("gloo")

    def share(self, value: object) -> object:
        """Rank 0's `value`, on every rank (the others pass None)."""
        box = [value if self.rank == 0 else None]
        self.dist.broadcast_object_list(box, src=0)
        self.phase = "staged" if self.phase == "start" else self.phase
        return box[0]

    def gather_errors(self, error: dict | None) -> None:
        """Wait for every rank's share; raise the first failure on every rank."""
        errors: list = [None] * self.world
        self.dist.all_gather_object(errors, error)
        first = next((e for e in errors if e is not None), None)
        self.phase = "written" if first is None else "failed"
        if first is not None:
            _raise(first)

    def finish(self, exc: BaseException | None) -> None:
        """Rank 0, done: tell the ranks still waiting whether the release is in place (`exc` None) or not."""
        if self.phase in ("start", "written"):
            self.share(status(exc))


def status(exc: BaseException | None) -> dict | None:
    """How rank 0 tells the others that the release was (None) or was not written."""
    if exc is None:
        return None
    if isinstance(exc, SfckptError):
        return failure(exc)
    return {"kind": "OutputError", "message": "rank 0 failed before the release was written",
            "hint": "see rank 0's error"}


def wait_for_rank0(ranks: Ranks) -> None:
    """A rank other than 0 when rank 0 writes the one output file: wait until it is in place."""
    final = ranks.share(None)
    if final is not None:
        _raise(final)


def follow(jobs: Callable[[Path], list[Job]], write_one: WriteOne, ranks: Ranks, progress) -> None:
    """A rank other than 0: write this rank's shards into the staging folder rank 0 made, then wait
    for rank 0 to put the release in place. `jobs(staging)` lists every shard, as rank 0 does."""
    staging = ranks.share(None)
    if isinstance(staging, dict):  # rank 0 failed before it could make the staging folder
        _raise(staging)
    write_shards(jobs(Path(staging)), write_one, 1, progress, ranks)
    wait_for_rank0(ranks)
