"""`load()`: a training checkpoint as weights + optimizer state, read lazily and safely."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import layout as layout_mod
from .errors import InputError
from .readers import load_torch, sniff
from .tensors import TensorRef


@dataclass
class Checkpoint:
    """What a training checkpoint holds, with tensors as `TensorRef`s (nothing read yet)."""

    path: Path
    container: str
    weights: dict[str, TensorRef]
    optimizer: Mapping[str, Any] | None
    model_key: str | None = None
    optimizer_key: str | None = None
    model_candidates: list[str] = field(default_factory=list)
    optimizer_candidates: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unloaded_classes: list[str] = field(default_factory=list)
    top_level_keys: list[str] = field(default_factory=list)


def load(
    path: str | Path,
    *,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    strip_prefix: str | None = None,
) -> Checkpoint:
    """Open a training checkpoint without reading tensor data or running code from it.

    Args:
        path: a file written by `torch.save` (plain dict or Lightning `.ckpt`).
        model_key / optimizer_key: which entries hold the weights and the
            optimizer state, when the defaults pick the wrong ones.
        strip_prefix: remove this prefix from weight names (e.g. ``model.``).

    Example:
        >>> ckpt = sfckpt.load("run/step_1000.pt")
        >>> sorted(ckpt.weights)[:2]
    """
    path = Path(path)
    kind = sniff(path)
    if kind != "torch":
        raise InputError(
            f"{path}: a {kind} holds weights only, not the optimizer state that x needs",
            "pass the training checkpoint (the torch.save file with the optimizer state)",
        )
    obj, unloaded = load_torch(path)
    found = layout_mod.find(obj, model_key, optimizer_key)
    weights = layout_mod.strip_prefix(found.weights, strip_prefix) if strip_prefix else found.weights
    return Checkpoint(
        path=path,
        container=found.container,
        weights=weights,
        optimizer=found.optimizer,
        model_key=found.model_key,
        optimizer_key=found.optimizer_key,
        model_candidates=found.model_candidates,
        optimizer_candidates=found.optimizer_candidates,
        skipped=found.skipped,
        unloaded_classes=unloaded,
        top_level_keys=[str(k) for k in obj] if isinstance(obj, Mapping) else [],
    )
