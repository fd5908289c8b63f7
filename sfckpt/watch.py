"""`sfckpt watch`: convert every checkpoint a training run writes, once its save is complete.

For trainers one cannot add a callback to. Each poll lists the checkpoints in the run folder (and
one level below, for `run-*/` or `checkpoints/` folders), and converts a checkpoint when

- its container's own rule says the save is finished (`Reader.save_complete` of the registered
  reader: the Trainer's trainer_state.json, DeepSpeed's `latest`, DCP's `.metadata`, a zip's
  central directory; see docs/integrations.md), and
- nothing in it changed since the previous poll (size and modification time of every file),

so a half-written save is never read. Each release is written atomically under the checkpoint's
own name in the output folder; one already there is skipped, which makes the watch restartable,
unless its source was written again since (Lightning overwrites `last.ckpt`). A checkpoint that
fails to convert is reported once, and tried again only if it changes.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import InputError, SfckptError
from .readers import deepspeed_folder, hf_trainer, registry

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".keras", ".h5")
# Files that belong to a checkpoint folder: a folder holding one is a save (maybe in progress), not a folder of runs.
_PART = re.compile(r"optimizer.*\.(pt|bin)|trainer_state\.json|.*\.distcp|\.metadata|latest|mp_rank_\d+.*\.pt|"
                   r"random_states_\d+\.pkl|(pytorch_)?model.*\.(safetensors|bin)|adapter_model\.safetensors|meta\.pt")
_STEP = re.compile(r"(?:checkpoint-|global_step|step=|step_|step-)(\d+)")
Signature = tuple[tuple[str, int, int], ...]


def save_complete(path: Path) -> bool | None:
    """Whether the save at `path` is finished by its container's rule (the registered reader's
    `save_complete`); None when no reader recognises it (yet: a Trainer folder before its optimizer.pt)."""
    try:
        if path.is_file() and path.suffix not in CHECKPOINT_SUFFIXES:
            return None
        reader = registry.find(path)
        if reader is None:
            return None
        if path.is_dir() and (path / hf_trainer.STATE_NAME).exists():
            return hf_trainer.save_complete(path)  # the Trainer writes it last, whatever it saved the model with
        return reader.save_complete(path)
    except (InputError, OSError):
        return False


def _is_part(path: Path) -> bool:
    try:
        return any(_PART.fullmatch(p.name) for p in path.iterdir())
    except OSError:
        return False


def is_save(path: Path) -> bool:
    """A folder that is a save, finished or not (it holds a checkpoint's files), or a checkpoint file."""
    if path.is_file():
        return path.suffix in CHECKPOINT_SUFFIXES
    return path.suffix == ".ckpt" or _is_part(path)


def candidates(folder: Path, skip: Path | None = None, descend: bool = True) -> list[Path]:
    """The saves in `folder`, complete or not, and (with `descend`) in its plain sub-folders: a
    hyper-parameter trial's run folder, Accelerate's `checkpoints/`, a DeepSpeed save folder's tags."""
    found: list[Path] = []
    for path in sorted(folder.iterdir()):
        if skip is not None and path.resolve() == skip:
            continue
        if path.is_dir() and (path / deepspeed_folder.LATEST).is_file() and not (path / hf_trainer.STATE_NAME).exists():
            found += sorted(p for p in path.iterdir() if p.is_dir() and p.name.startswith("global_step"))
        elif is_save(path):
            found.append(path)
        elif path.is_dir() and descend:
            found += candidates(path, skip, descend=False)
    return found


def signature(path: Path) -> Signature:
    """Name, size and modification time of every file of a save: equal across two polls when nothing is writing."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue  # removed meanwhile: the next signature differs
        out.append((str(f.relative_to(path)) if f != path else f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def training_step(path: Path) -> int | None:
    """The training step a save is from: the Trainer's global_step, else the number in its name."""
    if path.is_dir() and (path / hf_trainer.STATE_NAME).is_file():
        try:
            step = hf_trainer.trainer_state(path).get("global_step")
        except InputError:
            step = None
        if isinstance(step, int):
            return step
    match = _STEP.search(path.name)
    return int(match.group(1)) if match else None


@dataclass
class Watcher:
    """Converts the checkpoints of `run_dir` into `out`, each once."""

    run_dir: Path
    out: Path
    convert: Callable[[Path, Path, dict[str, str]], None]
    report: Callable[[str], None]
    seen: dict[Path, Signature] = field(default_factory=dict)
    failed: dict[Path, Signature] = field(default_factory=dict)
    converted: list[Path] = field(default_factory=list)

    def release_of(self, checkpoint: Path) -> Path:
        relative = checkpoint.relative_to(self.run_dir)
        name = relative.name.removesuffix(checkpoint.suffix) if checkpoint.suffix in CHECKPOINT_SUFFIXES else relative.name
        return self.out / relative.parent / name

    def _up_to_date(self, checkpoint: Path, release: Path) -> bool:
        try:
            made = min(p.stat().st_mtime_ns for p in release.iterdir())
            return made >= max((s[2] for s in signature(checkpoint)), default=0)
        except (OSError, ValueError):
            return False

    def poll(self) -> None:
        """Look once: convert each checkpoint that is complete and was unchanged since the last poll."""
        skip = self.out.resolve() if self.out.resolve().is_relative_to(self.run_dir.resolve()) else None
        for checkpoint in candidates(self.run_dir, skip):
            release = self.release_of(checkpoint)
            if release.exists() and self._up_to_date(checkpoint, release):
                continue
            sig = signature(checkpoint)
            stable, self.seen[checkpoint] = self.seen.get(checkpoint) == sig, sig
            if not stable or self.failed.get(checkpoint) == sig or not save_complete(checkpoint):
                continue
            self._convert(checkpoint, release, sig)

    def _convert(self, checkpoint: Path, release: Path, sig: Signature) -> None:
        from .provenance import release_metadata

        release.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.convert(checkpoint, release, release_metadata(checkpoint.name, training_step(checkpoint)))
        except SfckptError as exc:
            self.failed[checkpoint] = sig
            self.report(f"warning: {checkpoint.relative_to(self.run_dir)}: no release: {exc}")
            return
        self.failed.pop(checkpoint, None)
        self.converted.append(release)
        self.report(f"wrote {release} (from {checkpoint.relative_to(self.run_dir)})")

    def run(self, interval: float, once: bool, sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll every `interval` seconds until interrupted; with `once`, two polls `interval` apart (a
        save must be seen unchanged twice) and stop."""
        self.poll()
        while True:
            sleep(interval)
            self.poll()
            if once:
                return


def start(run_dir: Path, out: Path, interval: float, once: bool, strip_prefix: str | None, bn_calib: str | None,
          model_spec: str | None, report: Callable[[str], None]) -> int:
    """`sfckpt watch`: check the folders, watch, and return how many checkpoints failed to convert."""
    from .integrations.jobs import convert_folder

    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such folder", "give the folder the training run saves its checkpoints into")
    deepspeed_saves = (run_dir / deepspeed_folder.LATEST).is_file() and not (run_dir / hf_trainer.STATE_NAME).exists()
    if not deepspeed_saves and (is_save(run_dir) or save_complete(run_dir) is not None):  # its tags are the saves
        raise InputError(f"{run_dir} is itself a checkpoint", f"watch the folder the run saves into ({run_dir.parent}), "
                         f"or convert this one: sfckpt convert {run_dir} OUT")
    if interval <= 0:
        raise InputError(f"--interval {interval} is not a positive number of seconds", "pass, for example, --interval 10")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file", "name a folder for the releases")
    out.mkdir(parents=True, exist_ok=True)

    def recalibrate(recon) -> None:
        from .batchnorm import calibrate

        calibrate(recon, model_spec, bn_calib)

    def convert(src: Path, release: Path, metadata: dict[str, str]) -> None:
        convert_folder(src, release, metadata, recalibrate=recalibrate if bn_calib else None, strip_prefix=strip_prefix)

    watcher = Watcher(run_dir, out, convert, report)
    watcher.run(interval, once)
    return len(watcher.failed)
