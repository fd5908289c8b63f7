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
from the base model's config.json (a folder or the local Hugging Face cache, read
through hf_model, never downloaded) when that is at hand; otherwise the optimizer's
entries are matched to tensors by shape and content, or `--param-order` gives
the order (with the names as saved in the adapter file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import inputs
from ..errors import DamagedInput, InputError, Opt
from .base import LoadRequest, Opened, ParameterOrder, Reader, Release
from .safetensors_file import read_safetensors

OPTIMIZER_NAME = "optimizer.pt"
CONFIG_NAME = "adapter_config.json"
SAFE_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# What PeftModel.from_pretrained(base, folder) reads beside the weights.
RELEASE_FILES = (CONFIG_NAME, "README.md")
ORDER_HINT = "pass " + Opt("param_order", usage=True) + " with the adapter's parameter names in optimizer order"


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
            raise DamagedInput(f"{path / BIN_NAME} holds a {type(weights).__name__}, not a state dict", "the folder is damaged")
    optimizer, opt_unloaded = load_torch(path / OPTIMIZER_NAME)
    return {"model": weights, "optimizer": optimizer}, sorted(set(unloaded) | set(opt_unloaded))


def _base_config_file(path: Path, name: str) -> tuple[Path, inputs.Root]:
    """The base model's config.json: in the folder `base_model_name_or_path` names (as given, or relative to
    the run folder the checkpoint sits in) or, for a model id, in the local Hugging Face cache. Nothing is
    downloaded. The base model is a second input: its config.json must lie inside its folder (the root returned,
    which the gate confines the read to)."""
    for folder in (Path(name), path.parent / name, path.parent.parent / name):
        try:
            if (folder / "config.json").is_file():
                return folder / "config.json", inputs.Root.of(folder)
        except (OSError, ValueError):  # a name no file system takes (a NUL byte, too long)
            continue
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a model id either
        cached = None
    if isinstance(cached, str):  # snapshots/<rev>/config.json, a link to the cache's blobs
        return Path(cached), inputs.Root.of(Path(cached).parent)  # the root includes that cache's blobs
    raise InputError(f"{path}/{CONFIG_NAME} names the base model {name[:100]!r}, whose config.json is neither in a "
                     "folder of that name nor in the local Hugging Face cache (sfckpt downloads nothing)",
                     f"download its config.json (huggingface-cli download {name[:100]} config.json), or " + ORDER_HINT)


def _adapter_config(path: Path) -> tuple[dict[str, Any], str]:
    """adapter_config.json as an object, and the base model it names."""
    config = inputs.read_json(path / CONFIG_NAME, CONFIG_NAME)
    if not isinstance(config, dict):
        raise DamagedInput(f"{path}/{CONFIG_NAME} holds a JSON {type(config).__name__}, not an object",
                         "the adapter checkpoint is damaged")
    base_name = config.get("base_model_name_or_path")
    if not (isinstance(base_name, str) and base_name.strip() and "\x00" not in base_name):
        raise InputError(f"{path}/{CONFIG_NAME} has base_model_name_or_path {base_name!r:.60}, not the name of "
                         "a model", ORDER_HINT)
    return config, base_name


def _base_class_name(config: dict[str, Any], architectures: Any) -> Any:
    """The base model's class: the adapter config's `auto_mapping`, else the base config's first architecture."""
    mapping = config.get("auto_mapping")
    class_name = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    return class_name or (architectures or [None])[0]


def check_order_inputs(path: Path) -> None:
    """What `parameter_order` reads, vetted as far as that needs neither transformers nor peft (inspect):
    an InputError here is one the rebuild raises too."""
    from . import hf_model

    config, base_name = _adapter_config(path)
    base_file, base_root = _base_config_file(path, base_name)
    where = f"{base_file} (the base model of {path.name})"
    raw = hf_model.vet_config_plain(inputs.read_json(base_file, "config.json", root=base_root), where, ORDER_HINT)
    hf_model.vet_adapter_config_plain(config, f"{path}/{CONFIG_NAME}", ORDER_HINT)
    hf_model.vet_class_name(_base_class_name(config, raw.get("architectures")), where, ORDER_HINT)


def parameter_order(path: Path) -> tuple[list[str], list[set[str]]]:
    """The adapter's names (as saved) in the PeftModel's `named_parameters()` order, and the names the
    Trainer's two groups (weight decay, no weight decay) may hold.

    Built like the Trainer built it, through the one door to transformers and peft (hf_model): the base
    model from its vetted config.json on the meta device (no weights), wrapped by peft with the vetted
    adapter config. An InputError says why the order cannot be rebuilt here (no peft or transformers,
    the base model's config not at hand or refused); `load` keeps it for when shapes and content do not
    decide, since --param-order, which `load` does not see, may."""
    config, base_name = _adapter_config(path)
    try:
        import peft  # noqa: F401  (hf_model wraps the model with it)
        from transformers import Trainer

        from . import hf_model
    except ImportError:
        raise InputError(f"{path} is a PEFT adapter checkpoint; rebuilding its parameter order needs peft and "
                         "transformers", "pip install 'sfckpt[hf]', or " + ORDER_HINT) from None
    base_file, base_root = _base_config_file(path, base_name)
    where = f"{base_file} (the base model of {path.name})"
    base_config = hf_model.read_config(base_file, where, ORDER_HINT, root=base_root)
    class_name = _base_class_name(config, getattr(base_config, "architectures", None))
    model_cls = hf_model.model_class(class_name, base_config, where, ORDER_HINT)
    model = hf_model.peft_model(hf_model.build_on_meta(model_cls, base_config, where, ORDER_HINT), config,
                                f"{path}/{CONFIG_NAME}", ORDER_HINT)

    # The names PEFT saves each trainable parameter under (adapter name removed, modules_to_save unwrapped), as
    # PEFT itself computes them: its state dict of the parameters themselves, matched back by identity.
    saved = hf_model.saved_names(model)
    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if any(id(p) not in saved for _, p in named):
        raise InputError(f"{path}: the PEFT model rebuilt from {base_file} trains a parameter PEFT does not save, "
                         "so it is not the model trained", ORDER_HINT)
    names = [saved[id(p)] for _, p in named]
    return names, [{saved[id(p)] for n, p in named if n in decay}, {saved[id(p)] for n, p in named if n not in decay}]


# Under FSDP the Trainer saves a PeftModel through Accelerate's save_fsdp_model(adapter_only=True)
# (transformers' get_fsdp_ckpt_kwargs): with SHARDED_STATE_DICT the DCP model folder holds
# get_peft_model_state_dict (PEFT's names), with FULL_STATE_DICT pytorch_model_fsdp.bin holds the
# trainable parameters under the model's names (`...lora_A.default.weight`) and the Trainer also writes
# adapter_model.safetensors + adapter_config.json. The optimizer state is keyed by the model's names.
FSDP_NO_CONFIG_NOTE = (f"no {CONFIG_NAME}: the Trainer saves none with FSDP's SHARDED_STATE_DICT; write your "
                       f"LoraConfig with peft_config.save_pretrained(RELEASE) (or copy {CONFIG_NAME} from a save of "
                       "the same run) into the release folder to load it with PeftModel.from_pretrained")


def without_adapter_name(name: str, adapter: str) -> str:
    """The name PEFT saves a parameter under: the adapter name removed where PEFT puts it (after the
    parameter, before `.weight`, or inside `modules_to_save`); peft/tuners/tuners_utils.py,
    `_remove_adapter_name_from_state_dict_key`, and ModulesToSaveWrapper.adapter_state_dict."""
    inside = f".modules_to_save.{adapter}."
    if inside in name:
        return name.replace(inside, ".", 1)
    if name.endswith(f".{adapter}"):
        return name[: -len(adapter) - 1]
    head, _, last = name.rpartition(".")
    return f"{head[: -len(adapter) - 1]}.{last}" if head.endswith(f".{adapter}") else name


def _adapter_name(names: list[str], target) -> str | None:
    """The one adapter name that turns every optimizer name into a name PEFT saved; None if none or several do."""
    found: set[str] | None = None
    for name in names:
        parts = name.split(".")
        here = set(parts[-2:]) | {parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "modules_to_save"}
        here = {a for a in here if without_adapter_name(name, a) in target}
        found = here if found is None else found & here
    return next(iter(found)) if found and len(found) == 1 else None


def _refuse_unclear_full_save(path: Path, weights: dict, saved_adapter: bool, peft_names: bool) -> None:
    """A Trainer FULL_STATE_DICT save of a PeftModel whose adapter files are not the one trained: the adapter
    files missing, or in subfolders (a non-default adapter name, several adapters). Its pytorch_model_fsdp.bin
    would otherwise pass for a whole model under PEFT's internal names."""
    if not (peft_names and (path / "pytorch_model_fsdp.bin").is_file() and (path / "trainer_state.json").is_file()):
        return
    subfolders = sorted(p.parent.name for p in path.glob(f"*/{CONFIG_NAME}"))
    if subfolders:
        raise InputError(f"{path}: a PEFT model saved under FSDP with adapters in subfolders ({', '.join(subfolders)}): "
                         "an adapter not named 'default', or several adapters, which sfckpt cannot tell apart here",
                         "convert a SHARDED_STATE_DICT save, or train one adapter under the name 'default'")
    if not saved_adapter and any(".lora_" in str(k) or ".modules_to_save." in str(k) for k in weights):
        raise InputError(f"{path}: a PEFT model saved under FSDP (FULL_STATE_DICT) without the {SAFE_NAME} and "
                         f"{CONFIG_NAME} the Trainer writes beside pytorch_model_fsdp.bin",
                         "the folder is incomplete: copy the whole checkpoint folder")


def from_fsdp_save(path: Path, obj: dict[str, Any]) -> list[str] | None:
    """Turn a Trainer FSDP save of a PeftModel into the adapter under PEFT's names, in place: `obj['model']`
    becomes the adapter's tensors as adapter_model.safetensors names them, and the optimizer's parameter names
    are renamed the same way, so every entry is matched by name. Returns the notes for inspect, or None when
    the folder is not an adapter save (the optimizer's names are the model's own).

    Refuses (never guesses) when the folder is an adapter save whose names cannot be matched one to one."""
    weights, optimizer = obj.get("model"), obj.get("optimizer")
    if not (isinstance(weights, dict) and isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)):
        return None
    names = [p for g in optimizer["param_groups"] if isinstance(g, dict) for p in g.get("params") or []]
    if not names or not all(isinstance(n, str) for n in names):
        return None
    saved_adapter = (path / SAFE_NAME).is_file()
    peft_names = bool(weights) and all(str(k).startswith("base_model.model.") for k in weights)  # a PeftModel's
    _refuse_unclear_full_save(path, weights, saved_adapter, peft_names)
    target = read_safetensors(path / SAFE_NAME)[0] if saved_adapter else weights
    if not saved_adapter and not (peft_names and any(n not in weights for n in names)):
        return None  # a model saved whole: the optimizer's names are the weights' names
    unmatched = [n for n in names if n not in target]
    adapter = _adapter_name(unmatched, target) if unmatched else None
    rename = {n: n if n in target else without_adapter_name(n, adapter) for n in names}
    if (unmatched and adapter is None) or len(set(rename.values())) != len(rename):
        raise InputError(
            f"{path}: a PEFT adapter saved under FSDP, but the optimizer's parameter names "
            f"({unmatched[0] if unmatched else names[0]}, ...) do not match the adapter's tensor names one to one",
            "convert a checkpoint saved without FSDP, or report the PEFT method and version you trained with",
        )
    if saved_adapter:
        if adapter not in (None, "default"):
            # save_pretrained writes the top-level files for the adapter 'default' only: they are another adapter's
            raise InputError(f"{path}: the optimizer trains the adapter '{adapter}', but {SAFE_NAME} and {CONFIG_NAME} "
                             "at the top of the folder are the adapter 'default' (PEFT saves others in subfolders)",
                             "convert a SHARDED_STATE_DICT save, or train the adapter under the name 'default'")
        # pytorch_model_fsdp.bin (saved with the optimizer) under PEFT's names; its other tensors are frozen
        # base weights get_model_state_dict kept (a tied lm_head), which an adapter does not hold
        by_peft: dict[str, list] = {}
        for k, v in weights.items():
            by_peft.setdefault(without_adapter_name(k, adapter) if adapter else k, []).append(v)
        trained = set(rename.values())
        bad = [k for k in target if (k in trained and k not in by_peft) or (k in by_peft and (
               len(by_peft[k]) != 1 or tuple(by_peft[k][0].shape) != tuple(target[k].shape)))]
        if bad:
            raise InputError(f"{path}: {SAFE_NAME} holds {bad[0]}, which the FSDP model file does not hold "
                             "once with the same shape", "the folder mixes two saves; use a complete checkpoint folder")
        # a frozen tensor PEFT adds to the adapter (the base_layer of a LoRA-wrapped embedding) is not in the
        # adapter-only FSDP file: its value, untouched by the optimizer, is the Trainer's adapter file's
        obj["model"] = {k: by_peft[k][0] if k in by_peft else target[k] for k in target}
    optimizer["state"] = {rename.get(k, k): v for k, v in (optimizer.get("state") or {}).items()}
    for g in optimizer["param_groups"]:
        if isinstance(g, dict) and g.get("params"):
            g["params"] = [rename[p] for p in g["params"]]
    notes = [f"a PEFT adapter saved under FSDP: written as {SAFE_NAME} under PEFT's names"
             + (f" (adapter name '{adapter}' removed)" if adapter else "")]
    if not saved_adapter:  # the sharded save writes none; one found in the folder is not copied (not its own)
        notes.append(FSDP_NO_CONFIG_NOTE)
    return notes


class PeftAdapterReader(Reader):
    """A Trainer `checkpoint-N/` of a PeftModel: the adapter weights beside optimizer.pt.

    Recognised before the Trainer's reader: both folders hold optimizer.pt."""

    name = "peft-adapter"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_adapter_checkpoint(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        obj, unloaded = load_object(path)
        order = None if request.entries_chosen else ParameterOrder.rebuilt(
            lambda: parameter_order(path), "the PEFT model rebuilt from the base model's config, grouped as the Trainer does",
            lambda: check_order_inputs(path))
        return Opened(obj, unloaded, self.name, order=order, names_are_final=True,
                      release=Release(RELEASE_FILES, SAFE_NAME, shardable=False))

    def save_complete(self, path: Path) -> bool:
        from .hf_trainer import save_complete

        return save_complete(path)  # the Trainer saves an adapter folder as any checkpoint-N/
