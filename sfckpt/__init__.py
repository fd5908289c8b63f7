"""sfckpt: turn Schedule-Free training checkpoints into the weights to ship (x).

Library API (the CLI is a thin layer over it):

    ckpt = sfckpt.load("step_1000.pt")          # lazy, safe: no code from the file runs
    recon = sfckpt.reconstruct(ckpt)             # which tensors hold y, and how to get x
    sfckpt.save(recon, "model.safetensors")      # streamed, atomic
    x = recon.state_dict()                       # or all of x in memory
"""
__version__ = "0.1.0"

from . import checkpoint as _checkpoint, reconstruct as _reconstruct, save as _save
from .checkpoint import Checkpoint
from .errors import InputError, OutputError, SfckptError, speaks_api
from .reconstruct import Reconstruction

# The API's errors say force=True, not --force (the CLI calls the modules directly).
load = speaks_api(_checkpoint.load)
reconstruct = speaks_api(_reconstruct.reconstruct)
save = speaks_api(_save.save)
convert = speaks_api(_save.convert)

__all__ = [
    "Checkpoint",
    "InputError",
    "OutputError",
    "Reconstruction",
    "SfckptError",
    "__version__",
    "convert",
    "load",
    "reconstruct",
    "save",
]
