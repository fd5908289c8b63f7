"""Converting what a training run saved, in the run's process or in a child process.

In the process, a conversion runs between two training steps and touches no global torch state
that it does not restore (transformers sets the process-wide default dtype while it builds a
model from config.json, and sets it back). That is also why the background form is a child
process, not a thread: a thread would build that model while the training thread creates
tensors under the borrowed default dtype. The child reads the saved folder, never the live
objects, and writes through the same atomic writer: a child that dies leaves no release under
the final name (only a hidden temporary that the next write removes).

At most one child runs at a time; `wait()` is called before the framework saves again (the
Trainer deletes old `checkpoint-*` folders during that save), so a slow disk holds training up
only when one conversion takes longer than the steps between two saves.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import textout
from ..errors import SfckptError

logger = logging.getLogger("sfckpt.integrations")
RELEASE_NAME = re.compile(r"checkpoint-(\d+)")


class ConversionFailed(RuntimeError):
    """A release could not be written (raised only with strict=True; otherwise logged and warned)."""


def convert_folder(src: Path, out: Path, metadata: Mapping[str, str], force: bool = True,
                   recalibrate: Callable[[Any], None] | None = None, strip_prefix: str | None = None) -> None:
    """`sfckpt convert src out` with provenance metadata, and BatchNorm re-estimation when given."""
    from ..checkpoint import load
    from ..reconstruct import reconstruct
    from ..save import save

    recon = reconstruct(load(src, strip_prefix=strip_prefix))
    if recalibrate is not None:
        recalibrate(recon)
    save(recon, out, force=force, metadata=dict(metadata))


@dataclass
class Converter:
    """Runs conversions one at a time and reports failures without stopping training (unless strict)."""

    background: bool = False
    strict: bool = False
    keep_last: int | None = None
    written: list[Path] = field(default_factory=list)
    _child: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _child_job: tuple[Path, Path] | None = field(default=None, init=False, repr=False)
    _child_log: Any = field(default=None, init=False, repr=False)

    def submit(self, src: Path, out: Path, metadata: Mapping[str, str],
               recalibrate: Callable[[Any], None] | None = None, strip_prefix: str | None = None) -> None:
        """Convert `src` into the release folder `out` now, or start a child that does (not with `recalibrate`)."""
        self.wait()
        if not self.background or recalibrate is not None:
            try:
                convert_folder(src, out, metadata, recalibrate=recalibrate, strip_prefix=strip_prefix)
            except SfckptError as exc:
                self._failed(src, str(exc))
                return
            self._done(out)
            return
        spec = json.dumps({"src": str(src), "out": str(out), "metadata": dict(metadata), "strip_prefix": strip_prefix})
        self._child_log = tempfile.TemporaryFile()
        # One thread for the child: converting is disk-bound, and training keeps the cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self._child = subprocess.Popen([sys.executable, "-m", "sfckpt.integrations.jobs", spec], env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._child_log)
        self._child_job = (src, out)

    def submit_live(self, write: Callable[[], Any], out: Path) -> None:
        """Run `write` (a release from live objects) now, reporting a failure like a conversion's."""
        self.wait()
        try:
            write()
        except SfckptError as exc:
            self._failed(out, str(exc))
            return
        self._done(out)

    def wait(self) -> None:
        """Wait for the conversion running in a child, if any, and report how it ended."""
        if self._child is None:
            return
        code = self._child.wait()
        self._child_log.seek(0)
        lines = self._child_log.read().decode("utf-8", "replace").strip().splitlines()
        self._child_log.close()
        (src, out), self._child = self._child_job, None
        if code == 0:
            self._done(out)
        else:
            self._failed(src, lines[-1].removeprefix("error: ") if lines else f"the conversion exited with {code}")

    def _done(self, out: Path) -> None:
        self.written.append(out)
        logger.info("sfckpt: wrote %s", textout.log_text(str(out)))
        if self.keep_last:
            prune(out.parent, self.keep_last)

    def _failed(self, src: Path, why: str) -> None:
        message = textout.log_text(f"sfckpt: no x release for {src.name}: {why}")
        if self.strict:
            raise ConversionFailed(message)
        logger.error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def prune(folder: Path, keep: int) -> None:
    """Remove all but the `keep` latest `checkpoint-N` releases in `folder` (by N)."""
    releases = sorted((int(m.group(1)), p) for p in folder.iterdir()
                      if p.is_dir() and (m := RELEASE_NAME.fullmatch(p.name)))
    for _, path in releases[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def _child_main(argv: list[str]) -> int:
    """The child: convert one folder, say why on one `error:` line if it cannot."""
    spec = json.loads(argv[0])
    try:
        convert_folder(Path(spec["src"]), Path(spec["out"]), spec["metadata"], strip_prefix=spec["strip_prefix"])
    except SfckptError as exc:
        textout.echo(f"error: {textout.terminal(str(exc))}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
