"""Weights from anywhere, as one name -> lazy tensor map.

`diff` and `check` compare weight sets that may be a safetensors file, a
sharded index, a release folder, or a training checkpoint (whose x is used).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .readers import read_weights, sniff
from .readers.accelerate_folder import is_accelerate_folder
from .readers.dcp_folder import is_dcp_folder
from .readers.hf_trainer import is_trainer_folder
from .reconstruct import Reconstruction
from .tensors import TensorRef


@dataclass
class WeightSet:
    """Named lazy tensors and where they came from."""

    label: str
    tensors: dict[str, TensorRef]
    recon: Reconstruction | None = None
    metadata: dict[str, str] | None = None


def x_of(recon: Reconstruction) -> dict[str, TensorRef]:
    """The reconstructed x of every tensor, computed when loaded."""
    return {t.name: TensorRef(t.dtype, t.shape, t.compute, t.ref.storage_id, t.ref.view) for t in recon.tensors}


def released_weights(path: Path) -> WeightSet:
    """Weights exactly as they are on disk (safetensors, index, or a folder's model.safetensors),
    never reconstructed: what `check` judges."""
    tensors, metadata = read_weights(path)
    return WeightSet(str(path), tensors, metadata=metadata)


def is_training_checkpoint(path: Path) -> bool:
    """A torch.save file, a Hugging Face Trainer folder or a torch.distributed.checkpoint folder."""
    kind = sniff(path)
    return kind == "torch" or (kind == "folder" and (is_trainer_folder(path) or is_dcp_folder(path)
                                                     or is_accelerate_folder(path)))


def open_weights(path: Path, make_reconstruction: Callable[[Path], Reconstruction] | None = None) -> WeightSet:
    """Released weights (safetensors, index, folder) as they are; a training checkpoint as its x.

    `make_reconstruction(path)` turns a training checkpoint into its plan (the
    CLI passes one that applies its options); by default, detection alone.
    """
    if is_training_checkpoint(path):
        if make_reconstruction is None:
            from .checkpoint import load
            from .reconstruct import reconstruct

            recon = reconstruct(load(path))
        else:
            recon = make_reconstruction(path)
        return WeightSet(f"x of {path}", x_of(recon), recon)
    return released_weights(path)
