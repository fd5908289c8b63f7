"""The registered container readers, in the order they are asked (see `base.Reader`).

The order matters where one folder shape contains another: a PEFT adapter folder is also a
Trainer folder (both hold optimizer.pt), a Lightning FSDP folder is also a DCP folder (it adds
meta.pt), and DeepSpeed declines folders with `.metadata` so that DCP owns them.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from . import sniff
from .accelerate_folder import AccelerateReader
from .base import Reader
from .dcp_folder import DcpReader
from .deepspeed_folder import DeepSpeedReader
from .deepspeed_universal import DeepSpeedUniversalReader
from .hf_trainer import TrainerReader
from . import hf_trainer, keras_file
from .keras_file import KerasReader
from .lightning_folder import LightningFsdpReader
from .orbax_folder import OrbaxReader
from .peft_adapter import PeftAdapterReader
from .torch_file import TorchFileReader

READERS: tuple[Reader, ...] = (
    PeftAdapterReader(),
    TrainerReader(),
    DeepSpeedReader(),
    DeepSpeedUniversalReader(),
    OrbaxReader(),
    LightningFsdpReader(),
    DcpReader(),
    AccelerateReader(),
    TorchFileReader(),
    KerasReader(),
)


def find(path: Path) -> Reader | None:
    """The reader that owns `path`, or None when no registered container recognises it."""
    kind = sniff(path)
    for reader in READERS:
        if reader.recognise(path, kind):
            return reader
    return None


def reader_for(path: Path) -> Reader:
    """The reader that owns `path`; a clean refusal naming what the path is when none does."""
    reader = find(path)
    if reader is not None:
        return reader
    kind = sniff(path)
    if kind in keras_file.KINDS:
        raise keras_file.weights_only(path)
    model_only = hf_trainer.model_only_error(path) if kind == "folder" else None
    if model_only is not None:  # a Trainer folder saved with save_only_model=True: say why x is gone
        raise model_only
    if kind == "folder":
        raise InputError(
            f"{path}: a folder without optimizer state (no optimizer.pt as Hugging Face Trainer saves it, "
            "no .metadata as torch.distributed.checkpoint saves it)",
            "x needs the optimizer's z: pass the training checkpoint folder or file",
        )
    raise InputError(
        f"{path}: a {'safetensors file' if kind == 'safetensors' else 'safetensors index'} holds weights only, "
        "not the optimizer state that x needs",
        "pass the training checkpoint (a torch.save file, Lightning .ckpt, Hugging Face Trainer checkpoint-N/ "
        "folder or torch.distributed.checkpoint folder)",
    )
