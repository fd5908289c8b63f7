"""x from a model and its optimizer in memory, written as a release without changing either.

`release()` describes the live objects the way a reader describes a checkpoint (a `Checkpoint`
of `TensorRef`s over the model's state dict and the optimizer's `state_dict()`), then goes
through the same `reconstruct` and `save` as `sfckpt convert`: the family's own rule decides x
(`torch.lerp(y, z, 1 - 1/β)` where the groups are in train mode, the parameters as they are
where `eval()` already ran), and every pair is checked by content. The optimizer's mode is never
switched: an `eval()`/`train()` round trip rounds the weights, and a framework may capture the
mode flag before or after such a switch.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .. import inputs, layout
from ..checkpoint import Checkpoint
from ..errors import InputError
from ..tensors import TensorRef

LIVE_SOURCE = "<model in memory>"  # what the release's sfckpt_source says: no file was read


@dataclass(frozen=True, eq=False)
class LiveRef(TensorRef):
    """A tensor of a live object. `load()` gives it on its own device (x is computed where `eval()`
    would compute it); what is sampled for the content checks is read on the CPU."""

    def sample(self, n: int):
        return TensorRef(self.dtype, self.shape, lambda: self.loader().cpu()).sample(n)


def _ref(tensor: Any) -> LiveRef:
    t = tensor.detach()
    storage = (t.device.type, t.device.index, t.untyped_storage().data_ptr())
    return LiveRef(str(t.dtype).removeprefix("torch."), tuple(t.shape), lambda: t, storage_id=storage,
                   view=(t.storage_offset(), tuple(t.stride()), tuple(t.shape)))


def _refs(node: Any) -> Any:
    """The optimizer state with each tensor replaced by a reference to it (nothing copied)."""
    import torch

    if isinstance(node, torch.Tensor):
        return _ref(node)
    if isinstance(node, Mapping):
        return {k: _refs(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_refs(v) for v in node)
    return node


def unwrap_model(model: Any) -> Any:
    """The module a DistributedDataParallel/DataParallel wrapper holds (names without `module.`)."""
    import torch

    while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        model = model.module
    return model


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's AcceleratedOptimizer or Lightning's wrappers."""
    import torch

    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not hasattr(optimizer, "param_groups") or not callable(getattr(optimizer, "state_dict", None)):
        raise InputError(f"release() got a {type(optimizer).__name__}, not an optimizer",
                         "pass the Schedule-Free optimizer that trains the model")
    return optimizer


def _refuse_sharded(tensors: Iterable[Any]) -> None:
    import torch

    for t in tensors:
        if type(t).__name__ in ("DTensor", "ShardedTensor") or (isinstance(t, torch.Tensor) and t.is_meta):
            raise InputError("the model's parameters are sharded (FSDP) or not materialised, so this process "
                             "does not hold them whole",
                             "save a checkpoint with the framework and convert it: sfckpt.convert(checkpoint, out)")


def _named_state(optimizer: Any, names: Mapping[int, str], model: Any) -> dict[str, Any]:
    """The optimizer's state_dict over references, each group with the names of its parameters in the model."""
    saved = optimizer.state_dict()
    groups = []
    for g, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        for i, p in enumerate(group["params"]):
            if id(p) not in names:
                raise InputError(f"parameter {i} of optimizer group {g} (shape {tuple(p.shape)}) is not a "
                                 f"parameter of the {type(model).__name__} given",
                                 "pass the model the optimizer trains (release one model per optimizer)")
        groups.append({**saved_group, "param_names": [names[id(p)] for p in group["params"]]})
    return {"state": _refs(saved["state"]), "param_groups": groups}


def live_checkpoint(model: Any, optimizers: Sequence[Any]) -> Checkpoint:
    """A `Checkpoint` over the live objects: the model's state dict, and each optimizer's state with the
    names of its parameters (known here by identity, so the mapping needs no order)."""
    model = unwrap_model(model)
    weights = model.state_dict()
    _refuse_sharded(weights.values())
    names = {id(p): n for n, p in model.named_parameters()}
    obj: dict[str, Any] = {"model": {k: _ref(v) for k, v in weights.items()}}
    for k, optimizer in enumerate(optimizers):
        obj["optimizer" if k == 0 else f"optimizer_{k}"] = _named_state(unwrap_optimizer(optimizer), names, model)
    found = layout.find(obj, "model", "optimizer" if len(optimizers) == 1 else None)
    return Checkpoint(path=Path(LIVE_SOURCE), container="in memory", weights=found.weights,
                      optimizer=found.optimizer, model_key="model", optimizer_key=found.optimizer_key,
                      model_candidates=found.model_candidates, optimizer_candidates=found.optimizer_candidates,
                      top_level_keys=list(obj), optimizers=found.optimizers, models=found.models)


def _config_copy(model: Any, folder: Path) -> list[inputs.InputFile]:
    """A Hugging Face model's config.json, written to `folder` and opened to be copied into the release."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_string", None)):
        return []
    path = folder / "config.json"
    path.write_text(config.to_json_string(use_diff=True))
    return [inputs.open_user_file(path)]


def release(model: Any, optimizer: Any, path: str | Path, *, force: bool = False, beta: float | None = None,
            bn_loader: Iterable[Any] | None = None, max_shard_size: int | str | None = None,
            metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write x of a model being trained with a Schedule-Free optimizer, leaving both unchanged.

    Args:
        model: the module (or its DistributedDataParallel wrapper; call on one rank).
        optimizer: the Schedule-Free optimizer training it (Accelerate's wrapper is fine).
        path: `x.safetensors` for one file, or a folder (`release/`) for `model.safetensors`, plus
            `config.json` for a Hugging Face model, which `from_pretrained` loads.
        force: replace an existing release.
        beta: β for ScheduleFreeWrapper, which does not save it.
        bn_loader: batches (a DataLoader) to re-estimate BatchNorm statistics at x, on a copy of the model.
        max_shard_size: split a folder release into shards of this size ("5GB").
        metadata: more safetensors metadata (strings), such as the step it came from.

    Returns:
        The paths written.

    Example:
        >>> sfckpt.release(model, optimizer, "release/")
    """
    from ..reconstruct import reconstruct
    from ..save import save

    recon = reconstruct(live_checkpoint(model, [optimizer]), beta=beta)
    if bn_loader is not None:
        from . import calibration

        calibration.recalibrate(recon, unwrap_model(model), bn_loader)
    folder_named = str(path).endswith("/") or Path(path).suffix != ".safetensors"
    with tempfile.TemporaryDirectory(prefix="sfckpt-config-") as tmp:
        copies = _config_copy(unwrap_model(model), Path(tmp)) if folder_named else []
        return save(recon, path, force=force, max_shard_size=max_shard_size, metadata=dict(metadata or {}),
                    extra_files=copies)
