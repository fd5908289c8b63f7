"""`load()`: a training checkpoint as weights + optimizer state, read lazily and safely."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import inputs, layout as layout_mod, provenance
from .errors import InputError
from .options import Options, resolve
from .readers import registry
from .readers.base import LoadRequest, Opened, ParameterOrder, Release
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
    ties_visible: bool = True  # False where tied weights are saved as separate copies (DCP)
    optimizers: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # every optimizer state found
    models: list[str] = field(default_factory=list)  # the entries whose tensors make the output
    # With other model entries in the file: every model's tensors in file order (others as `<key>.<name>`)
    pool_weights: dict[str, TensorRef] = field(default_factory=dict)
    order: ParameterOrder | None = None  # the model's parameter order where the container rebuilds it
    default_dtype: str | None = None  # output dtype when --dtype is not given (DeepSpeed: the module's 16-bit dtype)
    notes: list[str] = field(default_factory=list)  # what inspect should say about the container
    strip_prefix: str | None = None  # removed from weight names, and so from saved parameter names
    release: Release = field(default_factory=Release)  # what a release folder from it holds beside the weights
    names_are_final: bool = False  # names are what the framework loads (PEFT): no --strip-prefix hint
    callbacks: list[str] = field(default_factory=list)  # a Lightning checkpoint's callback state keys (see provenance.py)
    root: inputs.Root | None = None  # where its files may lie, fixed when it was loaded (side files are read from it)
    accumulated: list[str] = field(default_factory=list)  # statistics gathered at y by name (Keras BatchNorm)


def load(
    path: str | Path,
    *,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    strip_prefix: str | None = None,
    options: Options | None = None,
) -> Checkpoint:
    """Open a training checkpoint without reading tensor data or running code from it.

    Args:
        path: a `torch.save` file (plain dict or Lightning `.ckpt`), or a folder: Hugging Face
            Trainer `checkpoint-N/` (also with DeepSpeed, FSDP or a PEFT adapter), Accelerate
            `save_state` (also FSDP), DeepSpeed, Lightning FSDP `NAME.ckpt/`, or any
            torch.distributed.checkpoint folder; or a Keras 3 `.keras`, `.weights.h5` or
            `.weights.json` file (docs/containers.md).
        model_key / optimizer_key: which entries hold the weights and the
            optimizer state, when the defaults pick the wrong ones.
        strip_prefix: remove this prefix from weight names (e.g. ``model.``).
        options: an `sfckpt.Options` instead of the three keywords (its other fields are not used here).

    Example:
        >>> ckpt = sfckpt.load("run/step_1000.pt")
        >>> sorted(ckpt.weights)[:2]
    """
    path = Path(path)
    opts = resolve(options, model_key=model_key, optimizer_key=optimizer_key, strip_prefix=strip_prefix)
    with inputs.scope(path) as root:  # every file the checkpoint names is read from inside what was named
        ckpt = _load(path, opts.model_key, opts.optimizer_key, opts.strip_prefix)
    ckpt.root = root
    return ckpt


def _load(path: Path, model_key: str | None, optimizer_key: str | None, strip_prefix: str | None) -> Checkpoint:
    request = LoadRequest(model_key, optimizer_key, strip_prefix)
    opened = registry.reader_for(path).open(path, request)
    if not request.entries_chosen and opened.model_key is not None:
        model_key, optimizer_key = opened.model_key, opened.optimizer_key
    found = _find(path, opened, model_key, optimizer_key)
    weights = layout_mod.strip_prefix(found.weights, strip_prefix) if strip_prefix else found.weights
    obj = opened.obj
    return Checkpoint(
        path=path,
        container=opened.container or found.container,
        weights=weights,
        optimizer=found.optimizer,
        model_key=found.model_key,
        optimizer_key=found.optimizer_key,
        model_candidates=found.model_candidates,
        optimizer_candidates=found.optimizer_candidates,
        skipped=found.skipped,
        unloaded_classes=opened.unloaded,
        top_level_keys=[str(k) for k in obj] if isinstance(obj, Mapping) else [],
        callbacks=provenance.callback_names(obj),
        ties_visible=opened.ties_visible,
        optimizers=found.optimizers,
        models=found.models,
        pool_weights=found.pool_weights,
        strip_prefix=strip_prefix,
        order=opened.order,
        default_dtype=opened.default_dtype,
        notes=[*found.notes, *opened.notes],  # which entry of the file the weights are (WeightAveraging)
        release=opened.release,
        names_are_final=opened.names_are_final,
        accumulated=opened.accumulated,
    )


def _find(path: Path, opened: Opened, model_key: str | None, optimizer_key: str | None) -> layout_mod.Layout:
    """Which entries of the opened object are the weights and the optimizer state; errors name the path."""
    try:
        return layout_mod.find(opened.obj, model_key, optimizer_key)
    except InputError as exc:
        if exc.message.startswith(str(path)):
            raise
        raise exc.about(str(path))
