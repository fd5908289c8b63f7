"""`save()`: stream a reconstruction's x into safetensors (one file, or a sharded folder)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from . import inputs, keras_output, writer
from .errors import InputError, OutputError
from .readers.safetensors_file import SINGLE_NAME
from .reconstruct import Reconstruction
from .tensors import count_nonfinite


def save(
    recon: Reconstruction,
    out: str | Path,
    *,
    force: bool = False,
    allow_nonfinite: bool = False,
    max_shard_size: int | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write x. A path ending in `.safetensors` gets one file, one ending in `.weights.h5` or `.keras`
    a file Keras loads (from a Keras checkpoint: sfckpt/keras_output.py); a path ending in `/`, an
    existing folder or a name without a suffix is a folder holding `model.safetensors`, or
    shards and `model.safetensors.index.json` when `max_shard_size` is given and x is larger;
    any other name (`model.safetensor`, `out.pt`) is refused.

    Nothing is written if any x is non-finite (unless `allow_nonfinite`), and an
    existing output is kept unless `force`.

    Returns:
        The paths written.
    """
    if recon.undecided is not None:  # a plan made only to be described (inspect): its tensors are not x
        raise recon.undecided
    if os.fspath(out) == "-":
        raise OutputError("sfckpt writes x to files, not to standard output",
                          "name the output: x.safetensors for one file, or release/ for a folder")
    folder_named = os.fspath(out).endswith(("/", os.sep))  # Path() drops the trailing slash
    out = Path(out)
    src = recon.checkpoint.path
    writer.refuse_inputs(out, [src])
    keras_named = keras_output.is_keras_name(out)
    if not (folder_named or keras_named or out.suffix in ("", ".safetensors") or out.is_dir()):
        raise OutputError(f"{out}: an output name ends in .safetensors (one file) or names a folder",
                          f"write {out.with_suffix('.safetensors')} for one file, or {out}/ for a folder")
    by_name = {t.name: t for t in recon.tensors}
    specs = [writer.Spec(t.name, t.dtype, t.shape) for t in recon.tensors]

    def produce(spec: writer.Spec):
        item = by_name[spec.name]
        x = item.compute()
        if not allow_nonfinite:
            bad = count_nonfinite(x)
            if bad:
                source = "y or z" if item.how in ("lerp", "keras") else "the checkpoint"
                raise InputError(
                    f"x of '{spec.name}' has {bad} NaN/Inf values (they come from {source})",
                    "nothing was written; pass --allow-nonfinite to write anyway",
                )
        return x

    metadata = recon.metadata()
    if isinstance(max_shard_size, str):
        max_shard_size = writer.parse_size(max_shard_size)
    if keras_named:
        if max_shard_size:
            raise OutputError("--max-shard-size splits safetensors; a Keras output is one file", "leave it out")
        return [keras_output.write(recon, out, produce, force, progress)]
    if out.suffix == ".safetensors":
        if max_shard_size:
            raise OutputError("--max-shard-size needs a folder as output", f"write to {out.with_suffix('')}/ instead")
        return [writer.write_file(out, specs, produce, metadata, force, progress)]
    release = recon.checkpoint.release
    if release.note and release.note not in recon.warnings:
        recon.warnings.append(release.note)  # said once, however often the plan is saved
    if max_shard_size and not release.shardable:
        raise OutputError(f"{release.weights_name} is loaded from one file; --max-shard-size does not apply", "leave it out")
    # config.json, tokenizer files, adapter_config.json: what `from_pretrained(out)` reads beside the weights
    copies = inputs.side_files(src, release.side_files, recon.checkpoint.root) if release.side_files else []
    return writer.write_folder(out, specs, produce, metadata, force, progress, max_shard_size, copies,
                               single_name=release.weights_name or SINGLE_NAME)


def convert(src: str | Path, out: str | Path, **options) -> list[Path]:
    """`sfckpt convert` as a function: load, reconstruct, save.

    Options are those of `load`, `reconstruct` and `save`.
    """
    from .checkpoint import load
    from .reconstruct import reconstruct

    load_keys = {"model_key", "optimizer_key", "strip_prefix"}
    save_keys = {"force", "allow_nonfinite", "max_shard_size", "progress"}
    ckpt = load(src, **{k: v for k, v in options.items() if k in load_keys})
    recon = reconstruct(ckpt, **{k: v for k, v in options.items() if k not in load_keys | save_keys})
    return save(recon, out, **{k: v for k, v in options.items() if k in save_keys})
