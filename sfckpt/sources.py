"""Weights from anywhere, as one name -> lazy tensor map.

`diff` and `check` compare weight sets that may be a safetensors file, a
sharded index, a release folder, or a training checkpoint (whose x is used).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

from . import inputs
from .errors import InputError
from .readers import LFS_POINTER, read_weights, sniff
from .conventions import INDEX_NAME, SINGLE_NAME
from .reconstruct import Reconstruction
from .tensors import TensorRef

PathLike = Union[str, os.PathLike]


@dataclass
class WeightSet:
    """Named lazy tensors and where they came from."""

    label: str
    tensors: dict[str, TensorRef]
    recon: Reconstruction | None = None
    metadata: dict[str, str] | None = None


def x_of(recon: Reconstruction) -> dict[str, TensorRef]:
    """The reconstructed x of every tensor, computed when loaded."""
    if recon.undecided is not None:  # a plan made only to be described (inspect): its tensors are not x
        raise recon.undecided
    return {t.name: TensorRef(t.dtype, t.shape, t.compute, t.ref.storage_id, t.ref.view) for t in recon.tensors}


def _weight_files(path: Path) -> Iterator[Path]:
    """The files a weight set is read from: the path itself, a folder's index or single file, an index's shards."""
    index = None
    if path.is_dir():
        if (path / INDEX_NAME).is_file():
            index = path / INDEX_NAME
        elif (path / SINGLE_NAME).is_file():
            yield path / SINGLE_NAME
    elif path.name.endswith(".json"):
        index = path
    else:
        yield path
    if index is None:
        return
    yield index
    try:
        shards = set(inputs.read_json(index, "safetensors index")["weight_map"].values())
    except (InputError, KeyError, TypeError, AttributeError):
        return  # the reader says what is wrong with the index
    for shard in sorted(s for s in shards if isinstance(s, str)):
        yield index.parent / shard


def _refuse_lfs_pointers(path: Path) -> None:
    """A Git LFS pointer anywhere in the set (a shard, a folder's model.safetensors) gets the LFS message,
    not "truncated or damaged": a checkout without `lfs: true` is the common cause."""
    for f in _weight_files(path):
        try:
            with inputs.open_input(f) as handle:
                head = handle.pread(min(len(LFS_POINTER), handle.size), 0)
        except InputError:
            continue  # missing, unreadable, not a regular file, outside: the reader says so
        if head == LFS_POINTER:
            sniff(f)  # raises the LFS message, naming the file


def released_weights(path: PathLike) -> WeightSet:
    """Weights exactly as they are on disk (safetensors, index, a folder's model.safetensors, or a
    `torch.save`d state dict), never reconstructed: what `check` judges."""
    path = Path(path)
    with inputs.scope(path):
        _refuse_lfs_pointers(path)
        _refuse_unfinished_release(path)
        if sniff(path) == "torch":  # torch.save(model.state_dict(), "model.pt"), read without running code
            from .torch_release import read_state_dict

            tensors, metadata = read_state_dict(path)
        else:
            tensors, metadata = read_weights(path)
    return WeightSet(str(path), tensors, metadata=metadata)


def _refuse_unfinished_release(path: Path) -> None:
    """A release folder holding the files a `convert` set aside while moving the new ones into place
    (`.<name>.<hex>.sfckpt-old`) is a mix of two releases until a run puts the old ones back: judging
    it would judge neither."""
    from .writer import OLD_SUFFIX

    try:
        unfinished = path.is_dir() and any(entry.name.endswith(OLD_SUFFIX) for entry in os.scandir(path))
    except OSError:
        return  # the reader says what is wrong with the folder
    if unfinished:
        raise InputError(f"{path}: a conversion into this folder was cut short while moving files into place "
                         "(or is running now), so it holds parts of two releases",
                         "run the same sfckpt convert again (it restores the previous release first), then check")


def is_training_checkpoint(path: PathLike) -> bool:
    """Whether a registered container reader (readers.registry) recognises `path`: then its x is used."""
    from .readers import registry

    path = Path(path)
    with inputs.scope(path):
        return registry.find(path) is not None


def open_weights(path: PathLike, make_reconstruction: Callable[[Path], Reconstruction] | None = None) -> WeightSet:
    """Released weights (safetensors, index, folder) as they are; a training checkpoint as its x.

    `make_reconstruction(path)` turns a training checkpoint into its plan (the
    CLI passes one that applies its options); by default, detection alone.

    Example:
        >>> sfckpt.compare.diff_sets(open_weights("model.safetensors"), open_weights("run/last.pt"))
    """
    path = Path(path)
    with inputs.scope(path):
        return _open_weights(path, make_reconstruction)


def _open_weights(path: Path, make_reconstruction: Callable[[Path], Reconstruction] | None) -> WeightSet:
    if is_training_checkpoint(path):
        if make_reconstruction is None:
            from .checkpoint import load
            from .reconstruct import reconstruct

            recon = reconstruct(load(path))
        else:
            recon = make_reconstruction(path)
        return WeightSet(f"x of {path}", x_of(recon), recon)
    return released_weights(path)
