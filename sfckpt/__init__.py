"""sfckpt: turn Schedule-Free training checkpoints into the weights to ship (x).

Library API (the CLI is a thin layer over it):

    ckpt = sfckpt.load("step_1000.pt")          # lazy, safe: no code from the file runs
    recon = sfckpt.reconstruct(ckpt)             # which tensors hold y, and how to get x
    sfckpt.save(recon, "model.safetensors")      # streamed, atomic
    x = recon.state_dict()                       # or all of x in memory
"""
__version__ = "0.1.0"

from .checkpoint import Checkpoint, load
from .errors import InputError, OutputError, SfckptError
from .reconstruct import Reconstruction, reconstruct
from .save import convert, save

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
