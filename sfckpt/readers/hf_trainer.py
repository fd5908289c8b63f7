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
from ..errors import InputError
from .safetensors_file import INDEX_NAME, SINGLE_NAME

OPTIMIZER_NAME = "optimizer.pt"
STATE_NAME = "trainer_state.json"
BIN_NAME = "pytorch_model.bin"
# Files a release folder needs beside the weights (copied as they are).
RELEASE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "processor_config.json",
)


def is_trainer_folder(path: Path) -> bool:
    return path.is_dir() and (path / OPTIMIZER_NAME).is_file()


def read_weights(path: Path):
    """The folder's model weights (lazy) and the classes left unloaded."""
    from . import load_torch, read_weights as read_safetensors_weights

    if (path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file():
        return read_safetensors_weights(path)[0], []
    if (path / BIN_NAME).is_file():
        weights, unloaded = load_torch(path / BIN_NAME)
        if not isinstance(weights, dict):
            raise InputError(f"{path / BIN_NAME} holds a {type(weights).__name__}, not a state dict", "the checkpoint folder is damaged")
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
    """The folder's config.json as a transformers config, never running code that comes with it.

    Only architectures transformers itself ships are accepted: `trust_remote_code=False`, and
    a config that asks for custom code (`auto_map`) or names an unknown `model_type` is refused
    before transformers could prompt for it. Sizes that would make the meta-device model
    expensive are bounded (limits.CONFIG_LAYERS).
    """
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    hint = "pass --param-order FILE with the parameter names in optimizer order"
    raw = inputs.read_json(path / "config.json", "config.json")
    if not isinstance(raw, dict):
        raise InputError(f"{path}/config.json holds a JSON {type(raw).__name__}, not an object", hint)
    model_type = raw.get("model_type")
    if "auto_map" in raw or not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(f"{path}/config.json names model_type {str(model_type)[:80]!r}"
                         + (" with custom code (auto_map), which sfckpt never runs" if "auto_map" in raw
                            else ", which transformers does not ship"), hint)
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{path}/config.json has architectures {str(archs)[:80]}, not a list of class names", hint)
    stack = [raw]
    while stack:  # layer and expert counts, nested configs included (read_json bounded the nesting)
        node = stack.pop()
        for key, value in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(value, (dict, list)):
                stack.append(value)
            elif type(value) is int and any(w in str(key) for w in ("layer", "expert", "block")) \
                    and value > limits.CONFIG_LAYERS.value:
                raise limits.CONFIG_LAYERS.exceeded(f"{path}/config.json asks for {key} = {value}")
    try:
        # From the JSON already read through the gate: transformers would open config.json again by its path.
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:
        raise InputError(f"{path}/config.json cannot be read by transformers ({type(exc).__name__}: {exc})"[:300],
                         hint) from None


def parameter_order(path: Path) -> tuple[list[str], list[set[str]]]:
    """The model's parameter names in `named_parameters()` order, and the names the Trainer's two
    groups (weight decay, no weight decay) may hold.

    Which parameters were frozen is not saved, so each group may hold any subset of its names,
    in this order; the mapping confirms the subset by content."""
    try:
        import torch
        import transformers
        from transformers import Trainer
    except ImportError:
        raise InputError(
            f"{path} is a Hugging Face Trainer checkpoint; matching its optimizer state to the weights needs transformers",
            "pip install 'sfckpt[hf]' (or pass --param-order FILE)",
        ) from None
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has optimizer.pt but no config.json to rebuild the parameter order from",
                         "copy config.json into the folder, or pass --param-order FILE")
    config = load_config(path)
    archs = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    if model_cls is None:
        raise InputError(f"{path}/config.json names architecture {archs[0] if archs else 'none'}, which transformers does not have",
                         "pass --param-order FILE with the parameter names in optimizer order")
    with torch.device("meta"):
        model = model_cls._from_config(config)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [n for n, _ in model.named_parameters()]
    return named, [{n for n in named if n in decay}, {n for n in named if n not in decay}]
