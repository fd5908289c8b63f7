"""Lightning's sharded FSDP checkpoints: a `NAME.ckpt/` folder, read on one CPU process.

`FSDPStrategy(state_dict_type="sharded").save_checkpoint` (lightning/pytorch/strategies/fsdp.py)
pops the module's sharded `state_dict` and the `optimizer_states` out of the checkpoint dict and
writes them with `torch.distributed.checkpoint.save` as `{'model': state_dict, 'optimizer_0': ...,
'optimizer_1': ...}` (each optimizer state from `FSDP.optim_state_dict`, keyed by parameter name);
rank 0 then `torch.save`s the rest (`epoch`, `global_step`, `callbacks`, `hyper_parameters`, ...)
as `meta.pt`. A folder holding `.metadata` and `meta.pt` is what Lightning itself takes for a
sharded checkpoint (`_is_sharded_checkpoint`).

The same folder shape comes from Lightning's `ModelParallelStrategy` (FSDP2; the model under
`state_dict`, each optimizer from `get_optimizer_state_dict`) and from Fabric's `FSDPStrategy` and
`ModelParallelStrategy` (`fabric.save(path, {'model': model, 'optimizer': optimizer, ...})`: each
module and optimizer under the user's key, everything else in `meta.pt`). Key detection downstream
finds the model and optimizer under any of these names.

The folder becomes one object, `meta.pt`'s entries beside `model` and `optimizer_N`, the shape of
a Lightning `.ckpt` file: weight names keep the LightningModule's attribute prefix (`model.`),
which `--strip-prefix` removes as it does for `.ckpt` files. The DCP part is read by `DcpFolder`
(restricted unpickler for `.metadata`); `meta.pt` by sfckpt's own code-free torch reader, where
Lightning's `load_checkpoint` would use `torch.load`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import DamagedInput, InputError
from .base import LoadRequest, Opened, Reader
from .dcp_folder import DcpFolder, is_dcp_folder

META_NAME = "meta.pt"


def is_lightning_fsdp_folder(path: Path) -> bool:
    return is_dcp_folder(path) and (path / META_NAME).is_file()


def load_object(path: Path) -> tuple[dict[str, Any], list[str], list[str]]:
    """The folder as `{'model': {name: TensorRef}, 'optimizer_0': state, ..., 'global_step': N, ...}`,
    the classes left unloaded, and notes for `inspect`. Tensor data is not read."""
    from . import load_torch, sniff

    meta_path = path / META_NAME
    if sniff(meta_path) != "torch":
        raise DamagedInput(f"{meta_path}: not a torch.save file", "the folder is damaged or not a Lightning checkpoint")
    meta, meta_unloaded = load_torch(meta_path)
    if not isinstance(meta, Mapping):
        what = getattr(meta, "qualname", None) or type(meta).__name__
        raise DamagedInput(f"{meta_path} holds an object of class {what}, not the dict Lightning saves there "
                         "(epoch, global_step, ...)", "the folder is damaged or crafted")
    averaging = [k for k in ("current_model_state", "averaging_state") if k in meta]
    if averaging:
        # WeightAveraging's on_save_checkpoint runs before FSDPStrategy.save_checkpoint: the DCP part's
        # `model` is then the average and the raw parameters (y) sit in meta.pt as per-rank shards
        raise InputError(f"{meta_path} holds {' and '.join(averaging)}: Lightning's WeightAveraging under FSDP saves "
                         "the averaged weights as the model and the trained parameters (y) outside the DCP data",
                         "x cannot be built from this folder; save without WeightAveraging, or without a sharded strategy")
    folder = DcpFolder(path)
    obj = folder.load_object()
    for key, value in meta.items():
        obj.setdefault(key, value)  # the tensors are the DCP part's; meta.pt never holds them
    shards = {info.relative_path for info in folder.metadata.storage_data.values()}
    progress_keys = [k for k in ("epoch", "global_step") if type(meta.get(k)) is int]
    if not progress_keys:  # Fabric: meta.pt holds the user's own entries (`step`, `iter_num`, ...)
        progress_keys = [k for k, v in meta.items() if type(k) is str and type(v) is int][:4]
    progress = ", ".join(f"{k} {meta[k]}" for k in progress_keys)
    notes = [f"Lightning FSDP sharded checkpoint: {len(shards)} shard file{'s' * (len(shards) != 1)}"
             + (f"; {META_NAME}: {progress}" if progress else "")]
    return obj, sorted(set(folder.opaque) | set(meta_unloaded)), notes


def save_complete(path: Path) -> bool:
    """Whether Lightning's sharded save is finished: rank 0 writes `meta.pt` after the DCP save."""
    from .completeness import zip_complete
    from .dcp_folder import save_complete as dcp_complete

    return dcp_complete(path) and zip_complete(path / META_NAME)


class LightningFsdpReader(Reader):
    """Lightning's sharded `NAME.ckpt/` (DCP data + meta.pt); recognised before plain DCP folders."""

    name = "lightning-fsdp"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_lightning_fsdp_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        obj, unloaded, notes = load_object(path)
        return Opened(obj, unloaded, self.name, notes=notes, ties_visible=False)

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)
