"""BatchNorm statistics re-estimated at x from a data loader in the training process.

The live model is never touched: a deep copy receives x and the batches. The copy, and drawing
batches from a shuffling DataLoader (its sampler seeds itself from torch's global generator), run
inside `torch.random.fork_rng`, so the training run's random state is what it was.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

from ..batchnorm import LayerShift, calibrate_model, loader_batches
from ..reconstruct import Reconstruction


def recalibrate(recon: Reconstruction, model: Any, loader: Iterable[Any], device: str | None = None) -> list[LayerShift]:
    """Re-estimate `recon`'s BatchNorm statistics on `loader` with a copy of `model` (same architecture)."""
    import torch

    # update_bn runs the copy in train mode: dropout draws from the CUDA generators too, where in use
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        twin = copy.deepcopy(model)
        where = device or next((p.device.type for p in twin.parameters()), "cpu")
        return calibrate_model(recon, twin, loader_batches(loader, "bn_loader"), f"the {type(model).__name__}",
                               "bn_loader", where)
