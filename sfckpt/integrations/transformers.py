"""A Hugging Face Trainer callback that writes x for every checkpoint the Trainer saves.

The Trainer saves y: it calls `optimizer.train()` in every training step and `eval()` only to
evaluate, never around a save. This callback does not switch modes either. After each save
(`on_save`) it converts the `checkpoint-N/` folder the Trainer just wrote with the readers the
CLI uses, so plain, FSDP and DeepSpeed saves all work without knowing how they are sharded, and
writes `<run dir>/sfckpt-x/checkpoint-N/`: beside the checkpoints, not inside one (a release
may not lie inside its input), under a folder the Trainer's rotation (`checkpoint-*` in the run
dir) neither counts nor deletes. At the end of training it writes `sfckpt-x/final/`.

Every rank calls `on_save`; the Trainer has no barrier before it, so with a process group the
callback waits for every rank there, then the main process converts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import transformers

from .jobs import Converter, logger
from ..provenance import release_metadata
from .live import release

RELEASES = "sfckpt-x"
FINAL = "final"


def _barrier() -> None:
    """Wait until every rank has come here (so every rank's files of the save are written)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def saved_checkpoint(output_dir: str, step: int) -> Path | None:
    """The `checkpoint-<step>` folder the Trainer just wrote: in `output_dir`, or, under a
    hyper-parameter search, in a trial's run folder below it (the one saved last)."""
    name = f"checkpoint-{step}"
    root = Path(output_dir)
    found = [root / name] if (root / name).is_dir() else []
    found += [p / name for p in root.iterdir() if p.is_dir() and p.name != RELEASES and (p / name).is_dir()] \
        if root.is_dir() else []
    if not found:
        return None
    return max(found, key=lambda p: (p / "trainer_state.json").stat().st_mtime_ns
               if (p / "trainer_state.json").is_file() else 0)


class SfckptCallback(transformers.TrainerCallback):
    """Write an x release for every checkpoint the Trainer saves, and at the end of training.

    Args:
        releases_dir: where releases go (default: `sfckpt-x/` in the folder holding the checkpoints).
        keep_last: keep only the latest k `checkpoint-N` releases (the final one is always kept).
        bn_loader: batches to re-estimate BatchNorm statistics at x (on a copy of the model;
            converts in the training process even with `background`).
        background: convert in a child process while training goes on (see `jobs`); training
            waits for it only when the next save comes first, and at the end.
        strict: raise when a release cannot be written, instead of logging and warning.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[SfckptCallback()])
    """

    def __init__(self, releases_dir: str | os.PathLike | None = None, *, keep_last: int | None = None,
                 bn_loader: Iterable[Any] | None = None, background: bool = False, strict: bool = False):
        self.releases_dir = Path(releases_dir) if releases_dir is not None else None
        self.bn_loader = bn_loader
        self.converter = Converter(background=background, strict=strict, keep_last=keep_last)

    def _out(self, checkpoint: Path) -> Path:
        folder = self.releases_dir or checkpoint.parent / RELEASES
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _recalibrate(self, model: Any):
        if self.bn_loader is None:
            return None
        from .calibration import recalibrate

        return lambda recon: recalibrate(recon, model, self.bn_loader)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.converter.wait()  # the save about to start may delete the folder being converted

    def on_epoch_end(self, args, state, control, **kwargs):
        # After the last step, the Trainer may delete checkpoints (save_total_limit=1 with a best one)
        # before on_train_end: the conversion must be done by then
        if control.should_save or control.should_training_stop:
            self.converter.wait()

    def on_evaluate(self, args, state, control, **kwargs):
        if args.save_strategy == "best":  # a save decided by this evaluation comes next, without on_step_end
            self.converter.wait()

    def on_save(self, args, state, control, model=None, **kwargs):
        _barrier()
        if not state.is_world_process_zero:
            return
        checkpoint = saved_checkpoint(args.output_dir, state.global_step)
        if checkpoint is None:
            logger.error("sfckpt: the Trainer reported a save at step %d, but no checkpoint-%d folder is there",
                         state.global_step, state.global_step)
            return
        self.converter.submit(checkpoint, self._out(checkpoint) / checkpoint.name,
                              release_metadata(checkpoint.name, state.global_step), self._recalibrate(model))

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.converter.wait()
        _barrier()
        if not state.is_world_process_zero:
            return
        best = state.best_model_checkpoint if args.load_best_model_at_end else None
        last = saved_checkpoint(args.output_dir, state.global_step)
        sharded = bool(args.fsdp or args.deepspeed)
        if best or sharded:
            # The model holds the best checkpoint's weights (not the optimizer's), or no process holds it whole
            source = Path(best) if best else last
            if source is None:
                logger.error("sfckpt: no final release: the model is sharded and no checkpoint was saved at the "
                             "last step (save at the end, e.g. save_strategy='steps' with save_steps dividing max_steps)")
                return
            self.converter.submit(source, self._out(source) / FINAL,
                                  release_metadata(source.name, _step_of(source)), self._recalibrate(model))
            self.converter.wait()
            return
        out = (self.releases_dir or Path(last.parent if last else args.output_dir) / RELEASES)
        out.mkdir(parents=True, exist_ok=True)
        self.converter.submit_live(lambda: release(model, optimizer, out / FINAL, force=True, bn_loader=self.bn_loader,
                                                   metadata=release_metadata(FINAL, state.global_step)), out / FINAL)


def _step_of(checkpoint: Path) -> int | None:
    name = checkpoint.name.rsplit("-", 1)[-1]
    return int(name) if name.isdigit() else None
