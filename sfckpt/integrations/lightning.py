"""Lightning: an x release beside every checkpoint `ModelCheckpoint` saves, and validation on x.

`SfckptModelCheckpoint` is a `ModelCheckpoint` that, once a checkpoint file is saved, writes
`<name>.x.safetensors` beside it (and removes it with the checkpoint when top-k rotation does),
and `final.x.safetensors` when fitting ends. Without a sharded strategy x comes from the module
and optimizers in memory, right after the save, so from the very state the file holds; under
FSDP, ModelParallel or DeepSpeed no process holds it whole, and the saved file or folder is
converted instead, on global rank 0 after a barrier (every rank's part is written).

`ValidateOnX` runs validation on x (what `on_validation_model_eval` would give, which Lightning's
Callbacks cannot hook, Lightning issue #20441): it copies x into the parameters when validation
starts and copies y back, bit for bit, when it ends, before any `ModelCheckpoint` saves (Lightning
runs checkpoint callbacks last). Neither ever calls `optimizer.eval()` or `train()`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from .jobs import Converter, logger
from ..provenance import release_metadata
from .live import live_checkpoint

SUFFIX = ".x.safetensors"
SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def release_path(checkpoint: str | os.PathLike) -> Path:
    """Where the release of a checkpoint file (or sharded folder) goes: beside it, `<name>.x.safetensors`."""
    path = Path(checkpoint)
    return path.with_name(path.name.removesuffix(".ckpt") + SUFFIX)


def _sharded(trainer: pl.Trainer) -> bool:
    return any(c.__name__ in SHARDED_STRATEGIES for c in type(trainer.strategy).__mro__)


class SfckptModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also writes x beside each checkpoint it saves, and at the end of fitting.

    Args:
        strip_prefix: remove this from the module's parameter names in the release (`model.` for a
            LightningModule that keeps its network as `self.model`).
        bn_loader: batches to re-estimate BatchNorm statistics at x (on a copy of the module; not sharded).
        strict: raise when a release cannot be written, instead of logging and warning.
        Everything else is `ModelCheckpoint`'s.

    Example:
        >>> trainer = Trainer(callbacks=[SfckptModelCheckpoint(monitor="val_loss", save_last=True)])
    """

    def __init__(self, *args: Any, strip_prefix: str | None = None, bn_loader: Iterable[Any] | None = None,
                 strict: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.strip_prefix = strip_prefix
        self.bn_loader = bn_loader
        self.converter = Converter(strict=strict)
        self.last_saved: tuple[str, int] | None = None

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.last_saved = (filepath, trainer.global_step)
        self._release(trainer, filepath, release_path(filepath), trainer.global_step)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            release_path(filepath).unlink(missing_ok=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = Path(self.dirpath or trainer.default_root_dir) / f"final{SUFFIX}"
        if not _sharded(trainer):
            self._release(trainer, None, final, trainer.global_step)
        elif self.last_saved is not None and self.last_saved[1] == trainer.global_step:
            self._release(trainer, self.last_saved[0], final, trainer.global_step)
        elif trainer.is_global_zero:
            logger.error("sfckpt: no final release: the strategy shards the model and no checkpoint was saved at "
                         "the last step (save one at the end, e.g. ModelCheckpoint(save_last=True))")

    def _release(self, trainer: pl.Trainer, saved: str | None, out: Path, step: int) -> None:
        """x into `out`: from the module in memory, or, when sharded, from the file just `saved`."""
        trainer.strategy.barrier("sfckpt")
        if trainer.is_global_zero:
            out.parent.mkdir(parents=True, exist_ok=True)
            name = Path(saved).name if saved is not None else out.name
            metadata = release_metadata(name, step)
            if _sharded(trainer):
                self.converter.submit(Path(saved), out, metadata, strip_prefix=self.strip_prefix)
            else:
                self.converter.submit_live(lambda: self._write_live(trainer, out, metadata), out)
        trainer.strategy.barrier("sfckpt")

    def _write_live(self, trainer: pl.Trainer, out: Path, metadata: dict[str, str]) -> None:
        from ..reconstruct import reconstruct
        from ..save import save
        from ..layout import strip_prefix

        ckpt = live_checkpoint(trainer.lightning_module, trainer.optimizers)
        if self.strip_prefix:
            ckpt.weights, ckpt.strip_prefix = strip_prefix(ckpt.weights, self.strip_prefix), self.strip_prefix
        recon = reconstruct(ckpt)
        if self.bn_loader is not None:
            from .calibration import recalibrate

            recalibrate(recon, trainer.lightning_module, self.bn_loader)
        save(recon, out, force=True, metadata=metadata)


class ValidateOnX(Callback):
    """Validate on x: x into the parameters when validation starts, y back (bit for bit) when it ends.

    The optimizer is not touched; a save during validation (a callback's own) gets y back first."""

    def __init__(self) -> None:
        self._y: dict[str, torch.Tensor] | None = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if _sharded(trainer) or not any(o.state for o in trainer.optimizers):
            return  # before the first step (the sanity check) there is no z yet, and y is x
        from ..reconstruct import reconstruct

        x = reconstruct(live_checkpoint(pl_module, trainer.optimizers)).state_dict()
        params = dict(pl_module.named_parameters())
        with torch.no_grad():
            self._y = {n: p.detach().clone() for n, p in params.items()}
            for name, p in params.items():
                p.copy_(x[name])

    def _restore(self, pl_module: pl.LightningModule) -> None:
        if self._y is None:
            return
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                p.copy_(self._y[name])
        self._y = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._restore(pl_module)  # the dict refers to the parameters' storage: it is written with y
