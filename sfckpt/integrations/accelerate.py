"""Accelerate: `accelerator.save_state(folder)`, then x of what it saved, written by the main process.

Accelerate gives a pre-save hook neither the optimizer nor, under FSDP or DeepSpeed, whole weights,
so x is made from the folder once it is saved, with the readers the CLI uses (`sfckpt.convert`).
`model.safetensors` does not keep the parameters' order; without sharding this process knows it
(the optimizer holds the very parameter objects), so it is passed on, and the mapping needs no
guess; under FSDP the optimizer state is keyed by names anyway.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..provenance import release_metadata
from .live import unwrap_model, unwrap_optimizer

SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def _parameter_order(accelerator: Any, pair: int) -> list[str] | None:
    """The names of optimizer `pair`'s parameters in its order, known by identity (None when sharded)."""
    if accelerator.distributed_type.name in SHARDED:
        return None
    model = unwrap_model(accelerator._models[pair])
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = unwrap_optimizer(accelerator._optimizers[pair])
    order = [names.get(id(p)) for group in optimizer.param_groups for p in group["params"]]
    return None if None in order else order


def save_and_release(accelerator: Any, folder: str | os.PathLike, out: str | os.PathLike, *, pair: int = 0,
                     step: int | None = None, force: bool = False) -> list[Path]:
    """`accelerator.save_state(folder)`, then x of model/optimizer `pair` into `out` (main process only).

    Args:
        accelerator: the `Accelerator` that prepared the model and the Schedule-Free optimizer.
        folder: where `save_state` writes the training state.
        out: the release: `x.safetensors`, or a folder (not inside `folder`); its parent is created.
        pair: which prepared model and optimizer (the i-th given to `prepare()`).
        step: the training step, recorded in the release's metadata.
        force: replace an existing release.

    Returns:
        The paths written (empty on the other processes).

    Example:
        >>> save_and_release(accelerator, "ckpt/step_1000", "releases/step_1000/", step=1000)
    """
    from ..save import convert

    accelerator.save_state(os.fspath(folder))
    accelerator.wait_for_everyone()  # every process's part of the save is written
    written: list[Path] = []
    if accelerator.is_main_process:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        keys = {"model_key": "model" if pair == 0 else f"model_{pair}",
                "optimizer_key": "optimizer" if pair == 0 else f"optimizer_{pair}"}
        written = convert(folder, out, param_order=_parameter_order(accelerator, pair), force=force,
                          metadata=release_metadata(Path(folder).name, step), **keys)
    accelerator.wait_for_everyone()
    return written
