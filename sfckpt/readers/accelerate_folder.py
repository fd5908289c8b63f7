"""Hugging Face Accelerate `save_state(dir)` folders, written by one process.

`Accelerator.save_state` (accelerate/checkpointing.py, `save_accelerator_state`)
writes, for the i-th object given to `prepare()` of each kind:

* models: `model.safetensors`, `model_1.safetensors`, ... (or `pytorch_model.bin`,
  `pytorch_model_1.bin`, ... with `safe_serialization=False`);
* optimizers: `optimizer.bin`, `optimizer_1.bin`, ... (`torch.save` of
  `optimizer.state_dict()`: positional, no parameter names);
* `scheduler*.bin`, `sampler*.bin`, `scaler.pt`, and `random_states_<rank>.pkl`
  (plain pickle). None of these is needed for x, and none is read.

The folder becomes one object `{'model': weights, 'optimizer': state,
'model_1': ..., 'optimizer_1': ...}`, the same shape a `torch.save` dict of
several models and optimizers has, so `--model-key model_1 --optimizer-key
optimizer_1` picks another pair.

Order: `pytorch_model.bin` keeps the model's `state_dict()` order. safetensors
files list tensors sorted by name and Accelerate saves no other trace of the
order (only `{"format": "pt"}` as metadata), so for `model.safetensors` the
optimizer's positions must be matched to names by shape and content.
Like `load_state`, a `.safetensors` file is preferred to a `.bin` of the same index.
Tied duplicates are absent from `model*.safetensors` (Accelerate drops all
but the first name of each shared storage before saving).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import InputError
from .safetensors_file import read_safetensors

OPTIMIZER_NAME = "optimizer.bin"
_MODEL_FILE = re.compile(r"model(?:_([1-9][0-9]*))?\.safetensors|pytorch_model(?:_([1-9][0-9]*))?\.bin")
_OPTIMIZER_FILE = re.compile(r"optimizer(?:_([1-9][0-9]*))?\.bin")


def is_accelerate_folder(path: Path) -> bool:
    return path.is_dir() and ((path / OPTIMIZER_NAME).is_file() or _fsdp_files(path) != [])


def _fsdp_files(path: Path) -> list[str]:
    """What Accelerate writes for FSDP models: `pytorch_model_fsdp.bin` (full state dict) or
    `pytorch_model_fsdp_0/` and `optimizer_0/` (sharded, torch.distributed.checkpoint)."""
    return sorted(p.name for p in path.glob("pytorch_model_fsdp*"))


def _entries(path: Path) -> dict[str, Path]:
    """Entry key ('model', 'model_1', 'optimizer', ...) -> the file it is read from, in index order."""
    models: dict[int, Path] = {}
    optimizers: dict[int, Path] = {}
    for f in path.iterdir():
        if not f.is_file():
            continue
        m = _MODEL_FILE.fullmatch(f.name)
        if m:
            i = int(m.group(1) or m.group(2) or 0)
            if i not in models or f.suffix == ".safetensors":
                models[i] = f
        o = _OPTIMIZER_FILE.fullmatch(f.name)
        if o:
            optimizers[int(o.group(1) or 0)] = f
    out = {(f"model_{i}" if i else "model"): models[i] for i in sorted(models)}
    out.update({(f"optimizer_{i}" if i else "optimizer"): optimizers[i] for i in sorted(optimizers)})
    return out


def load_object(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The folder as `{'model': {name: TensorRef}, 'optimizer': state_dict, 'model_1': ...}`, and the
    classes left unloaded. Tensor data is not read."""
    from . import load_torch

    fsdp = _fsdp_files(path)
    if fsdp:
        raise InputError(
            f"{path}: an Accelerate checkpoint of an FSDP model ({', '.join(fsdp)}), which sfckpt does not read yet",
            "save the model and optimizer state dicts with torch.distributed.checkpoint (get_state_dict + dcp.save) "
            "and convert that folder, or convert with the optimizer's own eval() in your training code",
        )
    found = _entries(path)
    if not any(k.startswith("model") for k in found):
        raise InputError(
            f"{path}: an Accelerate save_state folder with optimizer.bin but no model.safetensors or pytorch_model.bin",
            "x needs the model's weights too: save_state() writes them when the model was given to prepare()",
        )
    obj: dict[str, Any] = {}
    unloaded: set[str] = set()
    for key, f in found.items():
        if f.suffix == ".safetensors":
            obj[key] = read_safetensors(f)[0]
            continue
        value, classes = load_torch(f)
        unloaded.update(classes)
        if not isinstance(value, dict):
            raise InputError(f"{f} holds a {type(value).__name__}, not a state dict", "the folder is damaged")
        obj[key] = value
    return obj, sorted(unloaded)
