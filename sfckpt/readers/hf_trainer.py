"""Hugging Face Trainer `checkpoint-N/` folders.

The Trainer saves the weights (`model.safetensors`, shards + index, or
`pytorch_model.bin`) apart from the optimizer state (`optimizer.pt`), and puts
parameters in two groups (weight decay / none) in `named_parameters()` order
with no names. Weight files list tensors in sorted order, so the optimizer
order must be rebuilt: we build the model from `config.json` on the meta
device (no weights, no download) and apply the Trainer's own grouping rule.
That needs `transformers` (the `hf` extra).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .. import inputs, limits
from ..conventions import INDEX_NAME, SINGLE_NAME
from ..errors import DamagedInput, InputError, NotScheduleFree, Opt
from .base import LoadRequest, Opened, ParameterOrder, Reader, Release

OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "trainer_state.json"
BIN_NAME = "pytorch_model.bin"
ORDER_HINT = "pass " + Opt("param_order", usage=True) + " with the parameter names in optimizer order"
# Files a release folder needs beside the weights (copied as they are).
RELEASE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)


def is_trainer_folder(path: Path) -> bool:
    return path.is_dir() and (path / OPTIMIZER_NAME).is_file()


def model_only_error(path: Path) -> NotScheduleFree | None:
    """Why a Trainer `checkpoint-N/` saved with `save_only_model=True` cannot give x, or None for other folders.

    Such a folder has the weights (y, saved in train mode) and `trainer_state.json` but no
    `optimizer.pt`, so no z: x is gone, and a checkpoint keeps it only when the optimizer is saved too."""
    if not (path.is_dir() and (path / STATE_NAME).is_file() and not (path / OPTIMIZER_NAME).exists()):
        return None
    if not any((path / name).is_file() for name in (SINGLE_NAME, INDEX_NAME, BIN_NAME, "adapter_model.safetensors")):
        return None
    return NotScheduleFree(
        f"{path}: a Hugging Face Trainer checkpoint saved with save_only_model=True: it holds the training weights y "
        "but no optimizer.pt, so x cannot be rebuilt from it (x needs the optimizer's z)",
        "train with TrainingArguments(save_only_model=False), the default, so that every checkpoint-N/ keeps "
        "optimizer.pt, and convert one of those folders",
    )


def read_weights(path: Path):
    """The folder's model weights (lazy) and the classes left unloaded."""
    from . import load_torch, read_weights as read_safetensors_weights

    if (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file():
        return read_safetensors_weights(path)[0], []
    if (path / BIN_NAME).is_file():
        weights, unloaded = load_torch(path / BIN_NAME)
        if not isinstance(weights, dict):
            raise DamagedInput(f"{path / BIN_NAME} holds a {type(weights).__name__}, not a state dict", "the checkpoint folder is damaged")
        return weights, unloaded
    raise InputError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or {BIN_NAME}", "the checkpoint folder is incomplete")


def trainer_state(path: Path) -> dict[str, Any]:
    """trainer_state.json if it is a JSON object (only `global_step` is used); otherwise nothing.

    Read through the gate: a link out of the folder, a FIFO or a file past the JSON limit is refused."""
    if not os.path.lexists(path / STATE_NAME):
        return {}
    data = inputs.read_bytes(path / STATE_NAME, limits.JSON_BYTES, STATE_NAME)
    try:
        state = json.loads(data)
    except (ValueError, RecursionError):
        return {}
    return state if isinstance(state, dict) else {}


def load_config(path: Path):
    """The folder's config.json as a transformers config, through the one door to transformers
    (hf_model): no code that comes with it, no prompt, bounded layer counts."""
    from . import hf_model

    return hf_model.read_config(path / "config.json", f"{path}/config.json", ORDER_HINT)


def parameter_order(path: Path) -> tuple[list[str], list[set[str]]]:
    """The model's parameter names in `named_parameters()` order, and the names the Trainer's two
    groups (weight decay, no weight decay) may hold.

    Which parameters were frozen is not saved, so each group may hold any subset of its names,
    in this order; the mapping confirms the subset by content."""
    try:
        from transformers import Trainer

        from . import hf_model
    except ImportError:
        raise InputError(
            f"{path} is a Hugging Face Trainer checkpoint; matching its optimizer state to the weights needs transformers",
            "pip install 'sfckpt[hf]' (or pass " + Opt("param_order", usage=True) + ")",
        ) from None
    _require_config(path)
    config = load_config(path)
    archs = getattr(config, "architectures", None) or [None]
    model_cls = hf_model.model_class(archs[0], config, f"{path}/config.json", ORDER_HINT)
    model = hf_model.build_on_meta(model_cls, config, f"{path}/config.json", ORDER_HINT)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [n for n, _ in model.named_parameters()]
    return named, [{n for n in named if n in decay}, {n for n in named if n not in decay}]


def _require_config(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has optimizer.pt but no config.json to rebuild the parameter order from",
                         "copy config.json into the folder, or pass " + Opt("param_order", usage=True))


def check_order_inputs(path: Path) -> None:
    """config.json vetted as `parameter_order` vets it, as far as that needs no transformers (inspect):
    an InputError here is one the rebuild raises too."""
    from . import hf_model

    _require_config(path)
    where = f"{path}/config.json"
    raw = hf_model.vet_config_plain(inputs.read_json(path / "config.json", "config.json"), where, ORDER_HINT)
    hf_model.vet_class_name((raw.get("architectures") or [None])[0], where, ORDER_HINT)


def save_complete(path: Path) -> bool:
    """Whether the Trainer has finished saving `checkpoint-N/`: it writes trainer_state.json after the
    weights and the optimizer state (after every rank's part: DeepSpeed and FSDP saves are collective),
    and every file and sub-save in the folder is whole."""
    from .completeness import files_complete
    from .dcp_folder import save_complete as dcp_complete
    from .deepspeed_folder import LATEST, save_complete as deepspeed_complete

    try:
        json.loads(inputs.read_bytes(path / STATE_NAME, limits.JSON_BYTES, STATE_NAME, root=inputs.Root.of(path)))
    except (InputError, OSError, ValueError, RecursionError):
        return False
    if (path / LATEST).is_file() and not deepspeed_complete(path):
        return False
    subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith("global_step")]
    return files_complete(path) and all(dcp_complete(p) for p in subfolders if any(p.glob("*.distcp")))


class TrainerReader(Reader):
    """A Trainer `checkpoint-N/`: weights files beside optimizer.pt and trainer_state.json."""

    name = "huggingface-trainer"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_trainer_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        from . import load_torch

        weights, unloaded = read_weights(path)
        optimizer, opt_unloaded = load_torch(path / OPTIMIZER_NAME)
        obj = {"model": weights, "optimizer": optimizer, "global_step": trainer_state(path).get("global_step")}
        order = None if request.entries_chosen else ParameterOrder.rebuilt(
            lambda: parameter_order(path), "the Hugging Face Trainer's grouping (model rebuilt from config.json)",
            lambda: check_order_inputs(path))
        return Opened(obj, sorted(set(unloaded) | set(opt_unloaded)), self.name, order=order,
                      release=Release(RELEASE_FILES))

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)
