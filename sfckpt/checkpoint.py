"""`load()`: a training checkpoint as weights + optimizer state, read lazily and safely."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import inputs, layout as layout_mod
from .errors import InputError
from .readers import hf_trainer, load_torch, sniff
from .readers.accelerate_folder import is_accelerate_folder, load_object as load_accelerate_folder
from .readers.accelerate_folder import is_fsdp as accelerate_fsdp
from .readers.dcp_folder import DcpFolder, is_dcp_folder
from .readers.lightning_folder import is_lightning_fsdp_folder, load_object as load_lightning_folder
from .readers import peft_adapter
from .readers.peft_adapter import is_adapter_checkpoint, load_object as load_adapter_checkpoint
from .readers.peft_adapter import parameter_order as adapter_parameter_order
from .readers.deepspeed_folder import DeepSpeedFolder, is_deepspeed_folder
from .tensors import TensorRef


NO_CONFIG_NOTE = ("no config.json: the Trainer saves none with FSDP's SHARDED_STATE_DICT; copy your model's "
                  "config.json (and tokenizer files) into the release folder to load it with from_pretrained")
NO_CONFIG_FULL_NOTE = ("no config.json in the checkpoint folder; copy your model's config.json (and tokenizer "
                       "files) into the release folder to load it with from_pretrained")


@dataclass
class Checkpoint:
    """What a training checkpoint holds, with tensors as `TensorRef`s (nothing read yet)."""

    path: Path
    container: str
    weights: dict[str, TensorRef]
    optimizer: Mapping[str, Any] | None
    model_key: str | None = None
    optimizer_key: str | None = None
    model_candidates: list[str] = field(default_factory=list)
    optimizer_candidates: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unloaded_classes: list[str] = field(default_factory=list)
    top_level_keys: list[str] = field(default_factory=list)
    ties_visible: bool = True  # False where tied weights are saved as separate copies (DCP)
    optimizers: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # every optimizer state found
    models: list[str] = field(default_factory=list)  # the entries whose tensors make the output
    # With other model entries in the file: every model's tensors in file order (others as `<key>.<name>`)
    pool_weights: dict[str, TensorRef] = field(default_factory=dict)
    # The model's parameter order and the groups' allowed names, where the container's own grouping
    # rule says them and the weights file does not keep the order (Hugging Face Trainer).
    model_order: list[str] | None = None
    group_domains: list[set[str]] | None = None
    order_source: str = ""
    default_dtype: str | None = None  # output dtype when --dtype is not given (DeepSpeed: the module's 16-bit dtype)
    notes: list[str] = field(default_factory=list)  # what inspect should say about the container
    order_error: Exception | None = None  # why the container's parameter order could not be rebuilt
    strip_prefix: str | None = None  # removed from weight names, and so from saved parameter names
    release_note: str | None = None  # what the release folder lacks to load (said again when it is written)
    root: inputs.Root | None = None  # where its files may lie, fixed when it was loaded (side files are read from it)


def load(
    path: str | Path,
    *,
    model_key: str | None = None,
    optimizer_key: str | None = None,
    strip_prefix: str | None = None,
) -> Checkpoint:
    """Open a training checkpoint without reading tensor data or running code from it.

    Args:
        path: a `torch.save` file (plain dict or Lightning `.ckpt`), or a folder: Hugging Face
            Trainer `checkpoint-N/` (also with DeepSpeed, FSDP or a PEFT adapter), Accelerate
            `save_state` (also FSDP), DeepSpeed, Lightning FSDP `NAME.ckpt/`, or any
            torch.distributed.checkpoint folder (docs/containers.md).
        model_key / optimizer_key: which entries hold the weights and the
            optimizer state, when the defaults pick the wrong ones.
        strip_prefix: remove this prefix from weight names (e.g. ``model.``).

    Example:
        >>> ckpt = sfckpt.load("run/step_1000.pt")
        >>> sorted(ckpt.weights)[:2]
    """
    path = Path(path)
    with inputs.scope(path) as root:  # every file the checkpoint names is read from inside what was named
        ckpt = _load(path, model_key, optimizer_key, strip_prefix)
    ckpt.root = root
    return ckpt


def _load(path: Path, model_key: str | None, optimizer_key: str | None, strip_prefix: str | None) -> Checkpoint:
    kind = sniff(path)
    model_order = group_domains = order_error = None
    order_source = ""
    extra: dict[str, Any] = {}
    if kind == "folder" and is_adapter_checkpoint(path):
        obj, unloaded = load_adapter_checkpoint(path)
        container = "peft-adapter"
        if optimizer_key is None and model_key is None:
            try:
                model_order, group_domains = adapter_parameter_order(path)
                order_source = "the PEFT model rebuilt from the base model's config, grouped as the Trainer does"
            except InputError as exc:
                order_error = exc  # raised only if the mapping needs the order (see reconstruct)
    elif kind == "folder" and hf_trainer.is_trainer_folder(path):
        weights, unloaded = hf_trainer.read_weights(path)
        optimizer, opt_unloaded = load_torch(path / hf_trainer.OPTIMIZER_NAME)
        state = hf_trainer.trainer_state(path)
        obj = {"model": weights, "optimizer": optimizer, "global_step": state.get("global_step")}
        unloaded = sorted(set(unloaded) | set(opt_unloaded))
        container = "huggingface-trainer"
        if optimizer_key is None and model_key is None:
            try:
                model_order, group_domains = hf_trainer.parameter_order(path)
                order_source = "the Hugging Face Trainer's grouping (model rebuilt from config.json)"
            except InputError as exc:
                order_error = exc  # raised only if the mapping needs the order (see reconstruct)
    elif kind == "folder" and is_deepspeed_folder(path):
        folder = DeepSpeedFolder(path)
        obj, unloaded, container = folder.load_object(), sorted(folder.opaque), "deepspeed"
        extra = {"notes": folder.notes, "default_dtype": folder.module_dtype if folder.module_dtype != "float32" else None}
    elif kind == "folder" and is_lightning_fsdp_folder(path):
        obj, unloaded, notes = load_lightning_folder(path)
        container, extra = "lightning-fsdp", {"notes": notes}
    elif kind == "folder" and is_dcp_folder(path):
        folder = DcpFolder(path)
        obj, unloaded = folder.load_object(), folder.opaque
        container = "torch.distributed.checkpoint"
    elif kind == "folder" and is_accelerate_folder(path):
        obj, unloaded = load_accelerate_folder(path)
        container = "accelerate"
        pairs = sorted(k for k in obj if k.startswith("optimizer"))
        if model_key is None and optimizer_key is None and len(pairs) > 1 and "model" in obj and "optimizer" in obj:
            # The i-th optimizer given to prepare() is saved as optimizer_i: by default the first pair
            model_key, optimizer_key = "model", "optimizer"
            extra = {"notes": [f"{len(pairs)} optimizers ({', '.join(pairs)}) and models "
                               f"({', '.join(sorted(k for k in obj if k.startswith('model')))}): converting model "
                               "with optimizer; --model-key model_1 --optimizer-key optimizer_1 converts the next pair"]}
        if accelerate_fsdp(path):
            # The Trainer saves FSDP models through Accelerate's functions, beside its trainer_state.json
            trainer = (path / hf_trainer.STATE_NAME).is_file()
            container = "huggingface-trainer-fsdp" if trainer else "accelerate-fsdp"
            if trainer:
                obj["global_step"] = hf_trainer.trainer_state(path).get("global_step")
            adapter_notes = peft_adapter.from_fsdp_save(path, obj)
            if adapter_notes is not None:  # the Trainer's adapter-only save of a PeftModel
                container = "peft-adapter-fsdp"
                extra = {"notes": [*extra.get("notes", []), *adapter_notes]}
                if peft_adapter.FSDP_NO_CONFIG_NOTE in adapter_notes:
                    extra["release_note"] = peft_adapter.FSDP_NO_CONFIG_NOTE
            elif trainer and not (path / "config.json").is_file():
                note = NO_CONFIG_NOTE if (path / "pytorch_model_fsdp_0").is_dir() else NO_CONFIG_FULL_NOTE
                extra = {"notes": [*extra.get("notes", []), note], "release_note": note}
    elif kind == "torch":
        obj, unloaded = load_torch(path)
        container = None
    elif kind == "folder" and hf_trainer.model_only_error(path) is not None:
        raise hf_trainer.model_only_error(path)
    elif kind == "folder":
        raise InputError(
            f"{path}: a folder without optimizer state (no optimizer.pt as Hugging Face Trainer saves it, "
            "no .metadata as torch.distributed.checkpoint saves it)",
            "x needs the optimizer's z: pass the training checkpoint folder or file",
        )
    else:
        raise InputError(
            f"{path}: a {'safetensors file' if kind == 'safetensors' else 'safetensors index'} holds weights only, "
            "not the optimizer state that x needs",
            "pass the training checkpoint (a torch.save file, Lightning .ckpt, Hugging Face Trainer checkpoint-N/ "
            "folder or torch.distributed.checkpoint folder)",
        )
    try:
        found = layout_mod.find(obj, model_key, optimizer_key)
    except InputError as exc:
        if exc.message.startswith(str(path)):
            raise
        raise InputError(f"{path}: {exc.message}", exc.hint) from None
    weights = layout_mod.strip_prefix(found.weights, strip_prefix) if strip_prefix else found.weights
    extra["notes"] = [*found.notes, *extra.get("notes", [])]  # which entry of the file the weights are (WeightAveraging)
    return Checkpoint(
        path=path,
        container=container or found.container,
        weights=weights,
        optimizer=found.optimizer,
        model_key=found.model_key,
        optimizer_key=found.optimizer_key,
        model_candidates=found.model_candidates,
        optimizer_candidates=found.optimizer_candidates,
        skipped=found.skipped,
        unloaded_classes=unloaded,
        top_level_keys=[str(k) for k in obj] if isinstance(obj, Mapping) else [],
        # DCP data and gathered FSDP state dicts hold tied weights as separate copies
        ties_visible=container not in ("torch.distributed.checkpoint", "lightning-fsdp", "accelerate-fsdp",
                                       "huggingface-trainer-fsdp", "peft-adapter-fsdp"),
        optimizers=found.optimizers,
        models=found.models,
        pool_weights=found.pool_weights,
        strip_prefix=strip_prefix,
        model_order=model_order,
        group_domains=group_domains,
        order_source=order_source if model_order else "",
        order_error=order_error,
        **extra,
    )
