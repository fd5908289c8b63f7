"""Hugging Face Trainer `checkpoint-N/` folders of a PEFT (LoRA, ...) model.

When the Trainer trains a `PeftModel`, its checkpoint holds the adapter only:
`adapter_model.safetensors` (or `adapter_model.bin`) and `adapter_config.json`
written by `PeftModel.save_pretrained`, beside the Trainer's `optimizer.pt` over
the trainable (adapter) parameters, in `named_parameters()` order, split into
the Trainer's weight-decay and no-decay groups. There is no base model and no
`config.json` in the folder.

PEFT saves names without the adapter name (`...q_proj.lora_A.weight` for the
parameter `...q_proj.lora_A.default.weight`) and lists them sorted, so the
model's parameter order is not in the folder. `parameter_order` rebuilds it
from the base model's config, when that is at hand; otherwise the optimizer's
entries are matched to tensors by shape and content, or `--param-order` gives
the order (with the names as saved in the adapter file).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError
from .safetensors_file import read_safetensors

OPTIMIZER_NAME = "optimizer.pt"
CONFIG_NAME = "adapter_config.json"
SAFE_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# What PeftModel.from_pretrained(base, folder) reads beside the weights.
RELEASE_FILES = (CONFIG_NAME, "README.md")


def is_adapter_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / OPTIMIZER_NAME).is_file() and (
        (path / SAFE_NAME).is_file() or (path / BIN_NAME).is_file())


def load_object(path: Path) -> tuple[dict[str, Any], list[str]]:
    """`{'model': adapter weights, 'optimizer': state_dict}` and the classes left unloaded; no tensor data read."""
    from . import load_torch

    if (path / SAFE_NAME).is_file():
        weights, unloaded = read_safetensors(path / SAFE_NAME)[0], []
    else:
        weights, unloaded = load_torch(path / BIN_NAME)
        if not isinstance(weights, dict):
            raise InputError(f"{path / BIN_NAME} holds a {type(weights).__name__}, not a state dict", "the folder is damaged")
    optimizer, opt_unloaded = load_torch(path / OPTIMIZER_NAME)
    return {"model": weights, "optimizer": optimizer}, sorted(set(unloaded) | set(opt_unloaded))


def _base_config(path: Path, name: str):
    """The base model's config from `base_model_name_or_path`: a folder (as given, or relative to the run
    folder the checkpoint sits in) or a model id already in the local Hugging Face cache; None when it is in
    neither. Nothing is downloaded."""
    import transformers

    local = [w for w in (Path(name), path.parent / name, path.parent.parent / name) if (w / "config.json").is_file()]
    try:  # never trust_remote_code: a config that needs code from the hub gives no order
        return transformers.AutoConfig.from_pretrained(str(local[0]) if local else name, local_files_only=True)
    except Exception:
        return None


def parameter_order(path: Path) -> tuple[list[str], list[set[str]]] | None:
    """The adapter's names (as saved) in the PeftModel's `named_parameters()` order, and the names the
    Trainer's two groups (weight decay, no weight decay) may hold. None when that cannot be rebuilt here
    (no peft or transformers, the base model's config not at hand, a model that does not build): then
    shape and content decide, or --param-order, which `load` does not see and so must not be blocked.

    Built like the Trainer built it: the base model from its config on the meta device (no weights),
    wrapped by PEFT with the saved adapter config."""
    import json

    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}/{CONFIG_NAME} is missing or not JSON", "the adapter checkpoint is incomplete") from None
    base_name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not base_name:
        return None
    try:
        import peft
        import torch
        import transformers
        from transformers import Trainer
    except ImportError:
        return None
    base_config = _base_config(path, base_name)
    if base_config is None:
        return None
    class_name = (config.get("auto_mapping") or {}).get("base_model_class") or (base_config.architectures or [None])[0]
    model_cls = getattr(transformers, class_name, None) if class_name else None
    if model_cls is None:
        return None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes from building the model say nothing about the checkpoint
        try:
            peft_config = peft.PeftConfig.from_pretrained(str(path))
            peft_config.inference_mode = False  # saved as True; the trained model had its adapter trainable
            model = peft.get_peft_model(model_cls._from_config(base_config), peft_config)
        except Exception:
            return None

    # The names PEFT saves each trainable parameter under (adapter name removed, modules_to_save unwrapped), as
    # PEFT itself computes them: its state dict of the parameters themselves, matched back by identity.
    params = model.state_dict(keep_vars=True)
    saved = {id(p): k for k, p in peft.get_peft_model_state_dict(model, state_dict=params).items()}
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(id(p) not in saved for _, p in named):
        return None  # a trainable parameter PEFT does not save: the rebuilt model is not the trained one
    names = [saved[id(p)] for _, p in named]
    return names, [{saved[id(p)] for n, p in named if n in decay}, {saved[id(p)] for n, p in named if n not in decay}]
