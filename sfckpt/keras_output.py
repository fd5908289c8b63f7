"""Write x as files Keras loads: `out.weights.h5` (`model.load_weights`) and `out.keras` (`keras.models.load_model`).

Both repeat the input's HDF5 tree (groups, their `name` attributes, dataset paths and types; Keras stores
bfloat16 as 2-byte opaque data marked `dtype="bfloat16"`) with x in each variable, and leave out the
`optimizer` group: the momentum and velocity belong to y, so nobody should resume training from x with
them. A `.keras` output also carries the input's `config.json` and `metadata.json` unchanged. Outputs are
written through `writer.atomic_path` (a temporary beside the output, fsync, rename; `--force` to replace),
and the zip is deterministic (fixed member times, members stored as Keras stores them).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from . import inputs, writer
from .errors import Opt, OutputError
from .readers import keras_file, sniff
from .readers.hdf5_tree import need_h5py
from .reconstruct import Reconstruction

SUFFIXES = (".weights.h5", ".keras")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest time: the same input gives the same bytes


def is_keras_name(out: Path) -> bool:
    """True for an output name Keras loads (`*.weights.h5`, `*.keras`)."""
    return out.name.endswith(SUFFIXES)


def write(recon: Reconstruction, out: Path, produce: Callable, force: bool,
          progress: Callable[[int], None] | None = None) -> Path:
    """Write x to `out` (`.weights.h5` or `.keras`), atomically; `produce(spec)` gives each tensor's x."""
    ckpt = recon.checkpoint
    kind = sniff(ckpt.path)
    if kind not in keras_file.KINDS or ckpt.strip_prefix:
        raise OutputError(f"{out}: a Keras output needs a Keras checkpoint (.keras, .weights.h5), read without "
                          + Opt("strip_prefix") + ", whose HDF5 tree it repeats", "write safetensors (x.safetensors) instead")
    with inputs.scope(ckpt.path):
        opened = keras_file.open_checkpoint(ckpt.path, kind)
    if out.name.endswith(".keras") and opened.config is None:
        raise OutputError(f"{out}: {ckpt.path.name} is a save_weights file, without the model config a .keras "
                          "archive needs", f"write {out.name.removesuffix('.keras')}.weights.h5 and load it with "
                          "model.load_weights")
    if out.name.endswith(".keras") and opened.other_members:
        raise OutputError(f"{out}: {ckpt.path.name} also holds {', '.join(opened.other_members[:3])} (a layer's assets), "
                          "which sfckpt does not copy into an archive", f"write {out.name.removesuffix('.keras')}"
                          ".weights.h5 and load it with model.load_weights into the model built from the original")
    by_name = {t.name: t for t in recon.tensors}
    h5py = need_h5py()
    with writer.atomic_path(out, force) as tmp:
        try:
            with open(tmp, "wb") as f:
                if out.name.endswith(".keras"):
                    with tempfile.TemporaryFile(dir=out.parent) as h5tmp:
                        _write_h5(h5py, h5tmp, opened, by_name, produce, progress)
                        h5tmp.seek(0)
                        _write_archive(f, opened, h5tmp)
                else:
                    _write_h5(h5py, f, opened, by_name, produce, progress)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise OutputError(f"writing {out} failed ({exc.strerror})", "free some disk space or choose another folder") from exc
    return out


def _write_h5(h5py, fileobj, opened: keras_file.KerasFile, by_name, produce, progress) -> None:
    """The input's HDF5 tree without the optimizer, each variable holding x."""
    import numpy as np
    import torch

    tree = opened.tree
    with h5py.File(fileobj, "w", track_order=False) as h5:
        for path, attrs in sorted(tree.groups.items()):
            if path == "optimizer" or path.startswith("optimizer/"):
                continue
            group = h5.require_group(path) if path else h5
            for key, value in attrs.items():
                group.attrs[key] = value
        for path, d in tree.datasets.items():
            if path.startswith("optimizer/"):
                continue
            item = by_name[path]
            x = produce(writer.Spec(item.name, item.dtype, item.shape)).contiguous()
            raw = x.view(-1).view(torch.uint8).numpy() if x.numel() else np.empty(0, np.uint8)
            if item.dtype == "bfloat16":
                data = raw.view(d.h5dtype if d.dtype == "bfloat16" else np.dtype("V2")).reshape(item.shape)
                h5.create_dataset(path, data=data).attrs["dtype"] = "bfloat16"
            else:
                h5.create_dataset(path, data=raw.view(np.dtype(str(x.dtype).removeprefix("torch."))).reshape(item.shape))
            if progress:
                progress(item.nbytes)


def _write_archive(f, opened: keras_file.KerasFile, h5tmp) -> None:
    """A `.keras` zip: the input's metadata.json and config.json, then the new weights, stored uncompressed."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in ((keras_file.METADATA_NAME, opened.metadata), (keras_file.CONFIG_NAME, opened.config)):
            if data is not None:
                zf.writestr(zipfile.ZipInfo(name, _EPOCH), data)
        with zf.open(zipfile.ZipInfo(keras_file.WEIGHTS_NAME, _EPOCH), "w", force_zip64=True) as member:
            shutil.copyfileobj(h5tmp, member, 1 << 20)
