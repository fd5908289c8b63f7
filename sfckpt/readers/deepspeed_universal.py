"""DeepSpeed universal checkpoints (`ds_to_universal.py`), read without deepspeed.

`python -m deepspeed.checkpoint.ds_to_universal --input_folder global_stepN --output_folder U`
merges a ZeRO checkpoint's partitions into one folder per parameter: `U/zero/<name>/fp32.pt`
(the float32 master, which holds y), one file per optimizer state, `U/zero/optimizer_state.pt`
(the client optimizer's `param_groups` and DeepSpeed's bookkeeping) and a copy of
`mp_rank_00_model_states.pt` (the 16-bit module, `param_shapes` naming each group's parameters,
`frozen_param_shapes`, `shared_params`). Each state file is a `torch.save` of
`{'param': tensor, 'cat_dim': ...}`.

DeepSpeed 0.19 writes only `exp_avg` and `exp_avg_sq` beside `fp32`, and reads `exp_avg`
unconditionally, so it cannot convert a Schedule-Free run at all; a folder it made has no z and is
refused. DeepSpeed PR #8609 takes the state names from the optimizer's own state: a Schedule-Free
run then has `z.pt` (and `exp_avg_sq.pt`) beside `fp32.pt`, which is read here. x is built from
the master `fp32` and z, written in the module's dtype, as from the ZeRO folder itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .. import inputs
from ..errors import InputError
from ..inputs import confined
from ..tensors import TensorRef
from . import load_torch
from .base import LoadRequest, Opened, Reader
from .deepspeed_folder import MODEL_FILE, _KNOWN_OBJECTS, _shape

ZERO = "zero"
OPTIMIZER_FILE = "optimizer_state.pt"
NO_Z = ("the conversion kept only fp32, exp_avg and exp_avg_sq per parameter and dropped Schedule-Free's z "
        "(or the run was not Schedule-Free), so x cannot be rebuilt from this folder")
NO_Z_HINT = "convert the ZeRO checkpoint it was made from (the tag folder global_stepN/ with its zero_pp_rank_* files)"


def is_universal_folder(path: Path) -> bool:
    return path.is_dir() and (path / ZERO / OPTIMIZER_FILE).is_file()


def load_object(path: Path) -> tuple[dict[str, Any], list[str], list[str], str]:
    """(`{'model', 'optimizer'}`, classes left as placeholders, notes, the module's dtype)."""
    model, unloaded = load_torch(_file(path, MODEL_FILE))
    optimizer, opt_unloaded = load_torch(path / ZERO / OPTIMIZER_FILE)
    groups_saved, shapes = _groups_and_shapes(path, model, optimizer)
    module = model.get("module") if isinstance(model.get("module"), Mapping) else {}
    inputs.allow_open_files(2 * sum(len(s) for s in shapes) + 64)
    groups, state, trained = [], {}, {}
    for g, (group, named) in enumerate(zip(groups_saved, shapes)):
        out = {k: v for k, v in group.items() if k != "params"}
        out["params"], out["param_names"] = [], []
        for name, raw in named.items():
            shape = _shape(raw, f"{path / MODEL_FILE}: param_shapes[{g}]['{name}']")
            folder = confined(path / ZERO, name, f"{path / MODEL_FILE} param_shapes")
            trained[name] = _state_tensor(folder, "fp32", shape)
            index = len(state)
            out["params"].append(index)
            out["param_names"].append(name)
            state[index] = {"z": _state_tensor(folder, "z", shape)} if (folder / "z.pt").is_file() else {}
        groups.append(out)
    if trained and not any(state.values()):
        raise InputError(f"{path}: a DeepSpeed universal checkpoint (ds_to_universal.py) without z: {NO_Z}", NO_Z_HINT)
    missing = [n for g in groups for i, n in zip(g["params"], g["param_names"]) if not state[i]]
    if missing:
        # ZeRO keeps one flat state per group, so every trained parameter gets a z.pt: a missing one
        # was lost in copying, and converting it as untrained would ship its y.
        raise InputError(f"{path / ZERO / missing[0]} has fp32.pt but no z.pt, while other parameters have theirs",
                         "the folder is incomplete: copy it again, or convert the ZeRO checkpoint it was made from")
    weights = _weights(model, module, trained)
    dtypes = {module[n].dtype for n in trained if isinstance(module.get(n), TensorRef)}
    module_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    notes = [f"DeepSpeed universal checkpoint: {len(trained)} trained parameters from zero/<name>/fp32.pt (the "
             f"float32 master) with z.pt; module {module_dtype}"]
    placeholders = sorted((set(unloaded) | set(opt_unloaded)) - _KNOWN_OBJECTS)
    return {"model": weights, "optimizer": {"state": state, "param_groups": groups}}, placeholders, notes, module_dtype


def _file(path: Path, name: str) -> Path:
    if not (path / name).is_file():
        raise InputError(f"{path}: a DeepSpeed universal checkpoint without {name}",
                         "copy the whole folder ds_to_universal.py wrote")
    return path / name


def _groups_and_shapes(path: Path, model: Any, optimizer: Any) -> tuple[list[Mapping], list[Mapping]]:
    groups = optimizer.get("param_groups") if isinstance(optimizer, Mapping) else None
    shapes = model.get("param_shapes") if isinstance(model, Mapping) else None
    if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
        raise InputError(f"{path / ZERO / OPTIMIZER_FILE} holds no param_groups list", "the checkpoint is damaged")
    if not isinstance(shapes, list) or len(shapes) != len(groups) or not all(isinstance(s, Mapping) for s in shapes):
        raise InputError(f"{path / MODEL_FILE}: param_shapes does not list the parameters of each of the "
                         f"{len(groups)} parameter groups", "the checkpoint is damaged")
    return groups, shapes


def _state_tensor(folder: Path, state: str, shape: tuple[int, ...]) -> TensorRef:
    """The tensor of `zero/<name>/<state>.pt`, checked against the parameter's shape."""
    saved, _ = load_torch(_file(folder, f"{state}.pt"))
    ref = saved.get("param") if isinstance(saved, Mapping) else None
    if not isinstance(ref, TensorRef):
        raise InputError(f"{folder / state}.pt holds no 'param' tensor", "the checkpoint is damaged")
    if ref.shape != shape:
        raise InputError(f"{folder / state}.pt holds a tensor of shape {list(ref.shape)}, but the parameter is "
                         f"{list(shape)}", "the checkpoint is damaged, or was converted with tensor parallelism, "
                         "which sfckpt does not merge")
    return ref


def _weights(model: Mapping, module: Mapping, trained: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """Trained parameters from their masters; frozen ones, buffers and tied duplicates from the module."""
    shared = model.get("shared_params") if isinstance(model.get("shared_params"), Mapping) else {}
    weights = {}
    for name in list(module) + [n for n in trained if n not in module]:
        if name in trained:
            weights[name] = trained[name]
        elif isinstance(shared.get(name), str) and shared[name] in trained:
            weights[name] = trained[shared[name]]  # a tied duplicate: the same data as its twin
        elif isinstance(module.get(name), TensorRef):
            weights[name] = module[name]
    return weights


class DeepSpeedUniversalReader(Reader):
    """A folder written by DeepSpeed's `ds_to_universal.py`."""

    name = "deepspeed-universal"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_universal_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        obj, unloaded, notes, dtype = load_object(path)
        return Opened(obj, unloaded, self.name, notes=notes, default_dtype=dtype if dtype != "float32" else None)

    def save_complete(self, path: Path) -> bool:
        # The converter copies the model states file last, after every zero/<name>/ folder.
        return is_universal_folder(path) and (path / MODEL_FILE).is_file()
