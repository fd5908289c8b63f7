"""`save()`: stream a reconstruction's x into safetensors (one file, or a sharded folder)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from . import inputs, keras_output, parallel, pipeline, writer
from .conventions import SINGLE_NAME
from .errors import InputError, Opt, OptionConflict, OutputError, SfckptWarning
from .options import Options, resolve, wants_calibration
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
    workers: int = 1,
    options: Options | None = None,
    metadata: Mapping[str, str] | None = None,
    extra_files: Sequence[inputs.InputFile] = (),
    distributed: bool = False,
) -> list[Path]:
    """Write x. A path ending in `.safetensors` gets one file, one ending in `.weights.h5` or `.keras`
    a file Keras loads (from a Keras checkpoint: sfckpt/keras_output.py); a path ending in `/`, an
    existing folder or a name without a suffix is a folder holding `model.safetensors`, or
    shards and `model.safetensors.index.json` when `max_shard_size` is given and x is larger;
    any other name (`model.safetensor`, `out.pt`) is refused.

    Nothing is written if any x is non-finite (unless `allow_nonfinite`), and an
    existing output is kept unless `force`. `options` (an `sfckpt.Options`) may stand for
    the four keywords. What the plan warns about (`Reconstruction.all_warnings()`: BatchNorm statistics
    gathered at y, an assumed mode, ...) is issued as `sfckpt.SfckptWarning`s once x is written. `metadata` is added to the file's own (provenance), and `extra_files`
    (opened through the input gate) are copied into a folder release.

    With `workers` > 1, the shards of a folder output are written by that many processes. With
    `distributed` (what `sfckpt convert` passes), a process a launcher started as one of several
    ranks (torchrun, srun) writes its share of the shards and rank 0 the rest of the release; every
    rank must call it. The bytes are those of one process either way.

    Returns:
        The paths written.
    """
    if recon.undecided is not None:  # a plan made only to be described (inspect): its tensors are not x
        raise recon.undecided
    opts = resolve(options, force=force, allow_nonfinite=allow_nonfinite, max_shard_size=max_shard_size,
                   workers=workers)
    if opts.workers < 1:
        raise OptionConflict(Opt("workers") + f" {opts.workers} is not a number of processes", "give 1 or more",
                             option="workers")
    ranks = parallel.launched() if distributed else None
    try:
        with pipeline.one_thread_per_op():
            paths = _save(recon, out, opts, progress, metadata, extra_files, ranks)
    except BaseException as exc:
        if ranks is not None and ranks.rank == 0:
            ranks.finish(exc)
        raise
    if ranks is not None and ranks.rank == 0:
        ranks.finish(None)
    if ranks is None or ranks.rank == 0:
        for warning in recon.all_warnings():  # the options they name as keyword arguments
            warnings.warn(warning, SfckptWarning, stacklevel=2)
    return paths


def _save(recon: Reconstruction, out: str | Path, opts: Options, progress: Callable[[int], None] | None,
          metadata: Mapping[str, str] | None, extra_files: Sequence[inputs.InputFile],
          ranks: parallel.Ranks | None) -> list[Path]:
    """`save` in one process (or this rank's share of it)."""
    out = _output_path(out, recon.checkpoint.path)
    by_name = {t.name: t for t in recon.tensors}
    specs = [writer.Spec(t.name, t.dtype, t.shape) for t in recon.tensors]

    def produce(spec: writer.Spec):
        item = by_name[spec.name]
        x = item.compute().cpu()  # computed where the tensors live (a model in memory may be on a GPU)
        if not opts.allow_nonfinite:
            bad = count_nonfinite(x)
            if bad:
                source = "y or z" if item.how in ("lerp", "keras") else "the checkpoint"
                raise InputError(
                    f"x of '{spec.name}' has {bad} NaN/Inf values (they come from {source})",
                    "nothing was written; pass " + Opt("allow_nonfinite") + " to write anyway",
                    where=spec.name,
                )
        return x

    metadata = {**recon.metadata(), **(metadata or {})}
    shard_size = writer.parse_size(opts.max_shard_size) if isinstance(opts.max_shard_size, str) else opts.max_shard_size
    if keras_output.is_keras_name(out):
        if shard_size:
            raise OutputError(Opt("max_shard_size") + " splits safetensors; a Keras output is one file", "leave it out",
                              option="max_shard_size")
        if ranks is not None and ranks.rank > 0:  # one file: rank 0 writes it
            parallel.wait_for_rank0(ranks)
            return [out]
        return [keras_output.write(recon, out, produce, opts.force, progress)]
    if out.suffix == ".safetensors":
        if shard_size:
            raise OutputError(Opt("max_shard_size") + " needs a folder as output",
                              f"write to {out.with_suffix('')}/ instead", option="max_shard_size")
        if ranks is not None and ranks.rank > 0:  # one file: rank 0 writes it
            parallel.wait_for_rank0(ranks)
            return [out]
        return [writer.write_file(out, specs, produce, metadata, opts.force, progress)]
    release = recon.checkpoint.release
    if release.note and release.note not in recon.warnings:
        recon.warnings.append(release.note)  # said once, however often the plan is saved
    if shard_size and not release.shardable:
        raise OutputError(f"{release.weights_name} is loaded from one file; " + Opt("max_shard_size") + " does not apply",
                          "leave it out", option="max_shard_size")
    # config.json, tokenizer files, adapter_config.json: what `from_pretrained(out)` reads beside the weights
    copies = list(extra_files)
    if release.side_files:
        copies += inputs.side_files(recon.checkpoint.path, release.side_files, recon.checkpoint.root)
    return writer.write_folder(out, specs, produce, metadata, opts.force, progress, shard_size, copies,
                               single_name=release.weights_name or SINGLE_NAME, workers=opts.workers, ranks=ranks)


def _output_path(out: str | Path, src: Path) -> Path:
    """`out` as a Path; refused when it is an input, or names neither a safetensors file nor a folder."""
    if os.fspath(out) == "-":
        raise OutputError("sfckpt writes x to files, not to standard output",
                          "name the output: x.safetensors for one file, or release/ for a folder")
    folder_named = os.fspath(out).endswith(("/", os.sep))  # Path() drops the trailing slash
    out = Path(out)
    writer.refuse_inputs(out, [src])
    if not (folder_named or keras_output.is_keras_name(out) or out.suffix in ("", ".safetensors") or out.is_dir()):
        raise OutputError(f"{out}: an output name ends in .safetensors (one file) or names a folder",
                          f"write {out.with_suffix('.safetensors')} for one file, or {out}/ for a folder")
    return out


def convert(src: str | Path, out: str | Path, *, options: Options | None = None,
            progress: Callable[[int], None] | None = None, metadata: Mapping[str, str] | None = None,
            extra_files: Sequence[inputs.InputFile] = (), distributed: bool = False, **keywords: Any) -> list[Path]:
    """`sfckpt convert` as a function: load, reconstruct (and re-estimate BatchNorm statistics when
    `bn_calib` and `bn_model` are given), save.

    Args:
        options: an `sfckpt.Options`; or give its fields as keywords (`beta=0.75, force=True`).
        progress: called with the bytes written so far.
        metadata / extra_files: as for `save` (the integrations record provenance with them).
    """
    from .checkpoint import load
    from .reconstruct import reconstruct

    opts = resolve(options, **keywords)
    calibrating = wants_calibration(opts)
    recon = reconstruct(load(src, options=opts), options=opts)
    if calibrating:
        from .batchnorm import calibrate_with

        calibrate_with(recon, opts)
    return save(recon, out, options=opts, progress=progress, metadata=metadata, extra_files=extra_files,
                distributed=distributed)
