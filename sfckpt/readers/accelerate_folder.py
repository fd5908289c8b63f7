"""Hugging Face Accelerate `save_state(dir)` folders, written by one process.

`Accelerator.save_state` (accelerate/checkpointing.py, `save_accelerator_state`)
writes, for the i-th object given to `prepare()` of each kind:

* models: `model.safetensors`, `model_1.safetensors`, ... (or `pytorch_model.bin`,
  `pytorch_model_1.bin`, ... with `safe_serialization=False`);
* optimizers: `optimizer.bin`, `optimizer_1.bin`, ... (`torch.save` of
  `optimizer.state_dict()`: positional, no parameter names);
* `scheduler*.bin`, `sampler*.bin`, `scaler.pt`, and `random_states_<rank>.pkl`
  (plain pickle). None of these is needed for x, and none is read.

The folder becomes one object `{'model': weights, 'optimizer': state,
'model_1': ..., 'optimizer_1': ...}`, the same shape a `torch.save` dict of
several models and optimizers has, so `--model-key model_1 --optimizer-key
optimizer_1` picks another pair.

Order: `pytorch_model.bin` keeps the model's `state_dict()` order. safetensors
files list tensors sorted by name and Accelerate saves no other trace of the
order (only `{"format": "pt"}` as metadata), so for `model.safetensors` the
optimizer's positions must be matched to names by shape and content.
Like `load_state`, a `.safetensors` file is preferred to a `.bin` of the same index.
Tied duplicates are absent from `model*.safetensors` (Accelerate drops all
but the first name of each shared storage before saving).

FSDP models (accelerate/utils/fsdp_utils.py, `save_fsdp_model` and
`save_fsdp_optimizer`, called by `save_state` and by the Hugging Face Trainer's
`_save_checkpoint`) are saved by parameter name, so their order never matters:

* FULL_STATE_DICT: `pytorch_model_fsdp.bin` (`pytorch_model_fsdp_1.bin`, ...),
  the gathered state dict, and `optimizer.bin` (`optimizer_1.bin`, ...), the
  gathered `FSDP.optim_state_dict` / `get_optimizer_state_dict`, keyed by names;
* SHARDED_STATE_DICT: `pytorch_model_fsdp_0/` (`_1/`, ...) and `optimizer_0/`
  (`_1/`, ...), torch.distributed.checkpoint folders of `{"model": ...}` and
  `{"optimizer": ...}`, read with sfckpt's DCP reader;
* per-rank files (`*_rank<N>.bin`, written with `use_dcp=False` or
  LOCAL_STATE_DICT) hold each rank's shard as DTensor/ShardedTensor objects,
  which cannot be unpickled without running their classes: refused.

A Trainer checkpoint with FULL_STATE_DICT also holds `model.safetensors`, the
same weights as `pytorch_model_fsdp.bin`; the FSDP file, saved with the
optimizer state, is the one used.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DamagedInput, InputError
from .base import LoadRequest, Opened, Reader, Release
from .safetensors_file import read_safetensors

OPTIMIZER_NAME = "optimizer.bin"
_MODEL_FILE = re.compile(r"model(?:_([1-9][0-9]*))?\.safetensors|pytorch_model(?:_([1-9][0-9]*))?\.bin")
_OPTIMIZER_FILE = re.compile(r"optimizer(?:_([1-9][0-9]*))?\.bin")


def is_accelerate_folder(path: Path) -> bool:
    return path.is_dir() and ((path / OPTIMIZER_NAME).is_file() or _fsdp_entries(path) != {}
                               or _per_rank_files(path) != [])


_FSDP_MODEL = re.compile(r"pytorch_model_fsdp(?:_([1-9][0-9]*))?\.bin|pytorch_model_fsdp_(0|[1-9][0-9]*)")
_FSDP_OPTIMIZER = re.compile(r"optimizer_(0|[1-9][0-9]*)")
_PER_RANK = re.compile(r"(?:pytorch_model_fsdp|optimizer)(?:_[0-9]+)?_rank[0-9]+\.bin")


def _fsdp_entries(path: Path) -> dict[str, Path]:
    """Entry key -> file or DCP folder, for what save_fsdp_model / save_fsdp_optimizer write."""
    out: dict[str, Path] = {}
    for f in sorted(path.iterdir()):
        key = None
        m = _FSDP_MODEL.fullmatch(f.name)
        if m and (f.is_file() if f.suffix == ".bin" else f.is_dir()):
            i = int(m.group(1) or m.group(2) or 0)
            key = f"model_{i}" if i else "model"
        o = _FSDP_OPTIMIZER.fullmatch(f.name)
        if o and f.is_dir():
            i = int(o.group(1))
            key = f"optimizer_{i}" if i else "optimizer"
            if (path / (f"optimizer_{i}.bin" if i else OPTIMIZER_NAME)).is_file():
                _two_saves(path, f, f"optimizer_{i}.bin" if i else OPTIMIZER_NAME)
        if key is not None:
            if key in out:  # a full save's .bin and a sharded save's folder of the same index
                _two_saves(path, f, out[key].name)
            out[key] = f
    return out if any(k.startswith("model") for k in out) else {}


def _per_rank_files(path: Path) -> list[str]:
    return sorted(f.name for f in path.iterdir() if _PER_RANK.fullmatch(f.name))


def is_fsdp(path: Path) -> bool:
    """Whether the folder holds an FSDP model as Accelerate saves it."""
    return _fsdp_entries(path) != {}


def _entries(path: Path) -> dict[str, Path]:
    """Entry key ('model', 'model_1', 'optimizer', ...) -> the file it is read from, in index order."""
    models: dict[int, Path] = {}
    optimizers: dict[int, Path] = {}
    for f in path.iterdir():
        if not f.is_file():
            continue
        m = _MODEL_FILE.fullmatch(f.name)
        if m:
            i = int(m.group(1) or m.group(2) or 0)
            if i not in models or f.suffix == ".safetensors":
                models[i] = f
        o = _OPTIMIZER_FILE.fullmatch(f.name)
        if o:
            optimizers[int(o.group(1) or 0)] = f
    out = {(f"model_{i}" if i else "model"): models[i] for i in sorted(models)}
    out.update({(f"optimizer_{i}" if i else "optimizer"): optimizers[i] for i in sorted(optimizers)})
    return out


def load_object(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The folder as `{'model': {name: TensorRef}, 'optimizer': state_dict, 'model_1': ...}`, and the
    classes left unloaded. Tensor data is not read."""
    from . import load_torch

    per_rank = _per_rank_files(path)
    if per_rank:
        raise InputError(
            f"{path}: per-rank FSDP files ({', '.join(per_rank[:3])}), written with use_dcp=False or LOCAL_STATE_DICT; "
            "each holds one rank's shard as objects sfckpt does not unpickle",
            "save with SHARDED_STATE_DICT and use_dcp=True (the default) or FULL_STATE_DICT, and convert that folder",
        )
    found = _entries(path)
    fsdp = _fsdp_entries(path)
    if fsdp:
        # model.safetensors beside an FSDP model is the Trainer's copy of the same weights
        found = {**{k: v for k, v in found.items() if k.startswith("optimizer")}, **fsdp}
    if not any(k.startswith("model") for k in found):
        raise InputError(
            f"{path}: an Accelerate save_state folder with optimizer.bin but no model.safetensors or pytorch_model.bin",
            "x needs the model's weights too: save_state() writes them when the model was given to prepare()",
        )
    obj: dict[str, Any] = {}
    unloaded: set[str] = set()
    for key, f in found.items():
        if f.is_dir():  # a DCP folder of {"model": state dict} or {"optimizer": state}
            obj[key], classes = _dcp_entry(f, "model" if key.startswith("model") else "optimizer")
            unloaded.update(classes)
            continue
        if f.suffix == ".safetensors":
            obj[key] = read_safetensors(f)[0]
            continue
        value, classes = load_torch(f)
        unloaded.update(classes)
        if not isinstance(value, dict):
            raise DamagedInput(f"{f} holds a {type(value).__name__}, not a state dict", "the folder is damaged")
        obj[key] = value
    return obj, sorted(unloaded)


def _dcp_entry(folder: Path, inner: str) -> tuple[Any, list[str]]:
    """The `inner` entry of a DCP folder written by save_fsdp_model / save_fsdp_optimizer."""
    from .dcp_folder import DcpFolder, is_dcp_folder

    if not is_dcp_folder(folder):
        raise InputError(f"{folder}: no .metadata, so not a complete torch.distributed.checkpoint folder",
                         "the save did not complete; copy the whole folder or use an earlier checkpoint")
    dcp = DcpFolder(folder)
    value = dcp.load_object()
    if not (isinstance(value, dict) and isinstance(value.get(inner), dict)):
        keys = ", ".join(str(k) for k in value)[:200] if isinstance(value, dict) else type(value).__name__
        raise InputError(f"{folder}: expected one '{inner}' entry as Accelerate saves it, found {keys}",
                         "convert the folder itself (sfckpt convert FOLDER) if it was saved another way")
    return value[inner], list(dcp.opaque)


def _two_saves(path: Path, one: Path, other: str) -> None:
    """Two save_state calls with different state dict types left both forms of one model or optimizer."""
    raise InputError(f"{path}: holds both {one.name} and {other}, from two saves of different kinds (sharded and "
                     "full state dict) into one folder; which one is newer cannot be told",
                     "move the older files out of the folder, or save each checkpoint into a folder of its own")


def save_complete(path: Path) -> bool:
    """Whether `Accelerator.save_state` is finished: it writes each process's `random_states_N.pkl`
    after the models and optimizers (main process: `random_states_0.pkl`), and every file and
    sharded (DCP) sub-folder is whole."""
    from .completeness import files_complete
    from .dcp_folder import save_complete as dcp_complete

    if not (path / "random_states_0.pkl").is_file() or not files_complete(path):
        return False
    return all(dcp_complete(p) for p in path.iterdir() if p.is_dir() and any(p.glob("*.distcp")))


NO_CONFIG_NOTE = ("no config.json: the Trainer saves none with FSDP's SHARDED_STATE_DICT; copy your model's "
                  "config.json (and tokenizer files) into the release folder to load it with from_pretrained")
NO_CONFIG_FULL_NOTE = ("no config.json in the checkpoint folder; copy your model's config.json (and tokenizer "
                       "files) into the release folder to load it with from_pretrained")


class AccelerateReader(Reader):
    """An Accelerate `save_state` folder, also under FSDP, and so the Trainer's FSDP checkpoints
    (saved through Accelerate's functions beside trainer_state.json), with or without a PeftModel.

    Recognised after the Trainer's reader (a Trainer folder without FSDP holds optimizer.pt) and
    after DCP's (a folder with `.metadata` is one DCP checkpoint, not a save_state folder)."""

    name = "accelerate"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_accelerate_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        obj, unloaded = load_object(path)
        opened = Opened(obj, unloaded, self.name)
        pairs = sorted(k for k in obj if k.startswith("optimizer"))
        if not request.entries_chosen and len(pairs) > 1 and "model" in obj and "optimizer" in obj:
            # The i-th optimizer given to prepare() is saved as optimizer_i: by default the first pair
            opened.model_key, opened.optimizer_key = "model", "optimizer"
            opened.notes.append(f"{len(pairs)} optimizers ({', '.join(pairs)}) and models "
                                f"({', '.join(sorted(k for k in obj if k.startswith('model')))}): converting model "
                                "with optimizer; --model-key model_1 --optimizer-key optimizer_1 converts the next pair")
        if is_fsdp(path):
            _fsdp_traits(path, opened)
        return opened

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)


def _fsdp_traits(path: Path, opened: Opened) -> None:
    """What an FSDP save changes: tied weights are gathered as copies; the Trainer's and PEFT's saves."""
    from . import hf_trainer, peft_adapter

    opened.ties_visible = False
    trainer = (path / hf_trainer.STATE_NAME).is_file()
    opened.container = "huggingface-trainer-fsdp" if trainer else "accelerate-fsdp"
    if trainer:
        opened.obj["global_step"] = hf_trainer.trainer_state(path).get("global_step")
        opened.release = Release(hf_trainer.RELEASE_FILES)
    adapter_notes = peft_adapter.from_fsdp_save(path, opened.obj)
    if adapter_notes is not None:  # the Trainer's adapter-only save of a PeftModel
        opened.container = "peft-adapter-fsdp"
        opened.names_are_final = True
        opened.notes.extend(adapter_notes)
        # a sharded save has no adapter config of its own: one found there may be another run's
        own_config = (path / peft_adapter.SAFE_NAME).is_file()
        note = peft_adapter.FSDP_NO_CONFIG_NOTE if peft_adapter.FSDP_NO_CONFIG_NOTE in adapter_notes else None
        opened.release = Release(peft_adapter.RELEASE_FILES if own_config else (), peft_adapter.SAFE_NAME,
                                 shardable=False, note=note)
    elif trainer and not (path / "config.json").is_file():
        note = NO_CONFIG_NOTE if (path / "pytorch_model_fsdp_0").is_dir() else NO_CONFIG_FULL_NOTE
        opened.notes.append(note)
        opened.release = Release(hf_trainer.RELEASE_FILES, note=note)
