"""Released weights saved with `torch.save(model.state_dict(), "model.pt")`, for `check`.

The schedule_free examples release a `torch.save` state dict (`mnist_cnn.pt`), and so do many
training scripts (`pytorch_model.bin`). It is read with the code-free unpickler every torch file
goes through (readers/torch_file.py): nothing in it runs, tensors stay lazy. Only a flat
name -> tensor dict is a release; a file that also holds an optimizer state is a training
checkpoint, and objects sfckpt does not load are refused by name rather than skipped, since a
release missing them would be judged on part of itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import InputError
from .tensors import TensorRef


def read_state_dict(path: Path) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """(name -> TensorRef, metadata) of a `torch.save`d state dict; torch files carry no metadata."""
    from .layout import is_weights
    from .optimizer_state import is_optimizer_state
    from .readers import load_torch

    obj, unloaded = load_torch(path)
    if isinstance(obj, Mapping) and any(is_optimizer_state(v) for v in obj.values()):
        raise InputError(f"{path} is a training checkpoint (it holds an optimizer state), not released weights",
                         "pass the released weights as WEIGHTS and this file as --ckpt")
    if not is_weights(obj):
        raise InputError(f"{path} holds {_kind(obj)}, not a state dict of named tensors",
                         "release weights with torch.save(model.state_dict(), path) or as safetensors")
    for name, value in obj.items():
        if not isinstance(value, TensorRef):
            what = getattr(value, "qualname", None) or type(value).__name__
            raise InputError(f"{path}: entry '{name}' is a {what}, not a tensor",
                             "a release holds tensors only; save model.state_dict() (or safetensors)")
    return dict(obj), {}


def _kind(obj: Any) -> str:
    if isinstance(obj, Mapping):
        return f"a dict with keys {', '.join(str(k) for k in list(obj)[:8])}"[:200]
    return f"a {getattr(obj, 'qualname', None) or type(obj).__name__}"
