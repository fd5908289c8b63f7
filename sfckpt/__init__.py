"""sfckpt: turn Schedule-Free training checkpoints into the weights to ship (x).

Library API (the CLI is a thin layer over it):

    ckpt = sfckpt.load("step_1000.pt")          # lazy, safe: no code from the file runs
    recon = sfckpt.reconstruct(ckpt)             # which tensors hold y, and how to get x
    sfckpt.save(recon, "model.safetensors")      # streamed, atomic
    sfckpt.release(model, optimizer, "release/") # x of a model being trained, in memory
    x = recon.state_dict()                       # or all of x in memory

The names are imported on first use, so that `import sfckpt` (and the command's start,
see __main__.py) does no work that Ctrl-C could interrupt half-way.
"""
from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .errors import InputError, OutputError, SfckptError, SfckptWarning
    from .options import Options
    from .reconstruct import Reconstruction

_CLASSES = {"Checkpoint": "checkpoint", "Reconstruction": "reconstruct", "InputError": "errors",
            "OutputError": "errors", "SfckptError": "errors", "SfckptWarning": "errors", "Options": "options"}
_FUNCTIONS = {"load": ("checkpoint", "load"), "reconstruct": ("reconstruct", "reconstruct"),
              "save": ("save", "save"), "convert": ("save", "convert"), "release": ("integrations.live", "release")}


class _Package(types.ModuleType):
    """`sfckpt.save` and `sfckpt.reconstruct` are the functions, as they were when this file imported
    everything: importing the submodules of the same names must not rebind them to the modules."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    import importlib

    if name in _CLASSES:
        value = getattr(importlib.import_module(f".{_CLASSES[name]}", __name__), name)
    elif name in _FUNCTIONS:
        module, attr = _FUNCTIONS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    else:
        raise AttributeError(f"module 'sfckpt' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = [
    "Checkpoint",
    "InputError",
    "Options",
    "OutputError",
    "Reconstruction",
    "SfckptError",
    "SfckptWarning",
    "__version__",
    "convert",
    "load",
    "reconstruct",
    "release",
    "save",
]
