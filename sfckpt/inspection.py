"""`describe()`: what a checkpoint holds, as one JSON-able report (what `sfckpt inspect` prints)."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

from . import provenance
from .conventions import JSON_VERSION
from .errors import Opt, api_words
from .mapping import OrderDeferred
from .reconstruct import GroupReport, Reconstruction, bn_layer
from .tensors import TensorRef, count_nonfinite


def _plain(value: Any) -> Any:
    """Group values as JSON: tensors (a tensor lr, say) and placeholders become strings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def describe(recon: Reconstruction, scan: bool = False, spell: Callable[[Opt], str] = api_words) -> dict[str, Any]:
    """A report of the checkpoint and of how x will be made from it.

    With `scan`, tensor data is read to count NaN/Inf in y, z and x; otherwise
    nothing but metadata is read. `spell` writes the options a warning names (the CLI's flags).
    """
    ckpt = recon.checkpoint
    fam = recon.family
    bn = recon.batchnorm_buffers
    report: dict[str, Any] = {
        "version": JSON_VERSION,
        "path": str(ckpt.path),
        "container": ckpt.container,
        "keys": {
            "model": ckpt.model_key,
            "optimizer": ckpt.optimizer_key,
            "models": list(ckpt.models),
            "model_candidates": ckpt.model_candidates,
            "optimizer_candidates": ckpt.optimizer_candidates,
            "top_level": ckpt.top_level_keys,
        },
        "optimizer": {
            "family": fam.name,
            "library": fam.library,
            "classes": list(fam.classes),
            "family_source": recon.family_source,
            "x_source": fam.x_source,
            "note": fam.note,
        },
        "optimizers": [
            {"key": o.key, "family": o.family.name, "family_source": o.family_source, "entries": o.n_entries}
            for o in recon.optimizers
        ],
        "params_hold": recon.source_held,
        "groups": [_group_json(g) for g in recon.groups],
        "tensors": _tensor_totals(ckpt.weights.values()),
        "mapping": {
            **recon.mapping.as_json(),
            "optimizer_entries": recon.n_entries,
            "tensors_converted": recon.n_converted,
            "tensors_unchanged": len(recon.tensors) - recon.n_converted,
        },
        "batchnorm": {"buffers": bn, "layers": len({bn_layer(n) for n in bn})},
        "notes": list(ckpt.notes),
        "skipped": ckpt.skipped,
        "unloaded_classes": ckpt.unloaded_classes,
        "nonfinite": scan_nonfinite(recon) if scan else None,
        "warnings": recon.all_warnings(spell) + _mode_doubts(recon) + _undecided(recon, spell),
        "hints": hints(recon),
    }
    return report


def _group_json(g: GroupReport) -> dict[str, Any]:
    """One parameter group of the report."""
    return {
        "index": g.index,
        "beta": g.beta,
        "beta_source": g.beta_source,
        "lr": _plain(g.lr),
        "weight_decay": _plain(g.weight_decay),
        "warmup_steps": _plain(g.warmup_steps),
        "step": _plain(g.step),
        "weight_sum": _plain(g.weight_sum),
        "train_mode": _plain(g.train_mode),
        "params_hold": g.params_hold,
        "params_hold_source": g.params_hold_source,
        "params": g.n_params,
        "params_with_z": g.n_with_z,
        "optimizer": g.optimizer,
    }


def _tensor_totals(refs: Iterable[TensorRef]) -> dict[str, Any]:
    """How many tensors, elements and bytes the weights hold, in all and per dtype."""
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    for ref in refs:
        d = by_dtype[ref.dtype]
        d["tensors"] += 1
        d["elements"] += ref.numel
        d["bytes"] += ref.nbytes
    return {
        "count": sum(d["tensors"] for d in by_dtype.values()),
        "elements": sum(d["elements"] for d in by_dtype.values()),
        "bytes": sum(d["bytes"] for d in by_dtype.values()),
        "by_dtype": dict(sorted(by_dtype.items())),
    }


def _undecided(recon: Reconstruction, spell: Callable[[Opt], str]) -> list[str]:
    """Why x cannot be made from a plan whose mapping was left open (`undecided_ok`), as a warning."""
    if recon.undecided is None or isinstance(recon.undecided, OrderDeferred):  # the mapping's method says it
        return []
    message, hint = recon.undecided.in_words(spell)
    return [f"x cannot be made yet: {message}" + (f"; {hint}" if hint else "")]


def _mode_doubts(recon: Reconstruction) -> list[str]:
    """Warnings that the saved train_mode may not describe the weights (not when --params-are says)."""
    if recon.groups and all(g.params_hold_source == "--params-are" for g in recon.groups):
        return []
    modes: dict[str, list] = defaultdict(list)
    for g in recon.groups:
        modes[g.optimizer].append(g.train_mode)
    ckpt = recon.checkpoint
    return provenance.warnings_for(ckpt.top_level_keys, ckpt.callbacks, modes)


def hints(recon: Reconstruction) -> list[str]:
    """Suggestions that make the output easier to use (nothing is wrong without them)."""
    hints = []
    if any(g.beta is None and g.params_hold == "y" and g.n_with_z for g in recon.groups):
        hints.append(f"{recon.family.classes[0]} does not save β (the wrapper's momentum): pass --beta B to convert")
    names = list(recon.checkpoint.weights)
    first = names[0].split(".", 1)[0] + "." if names and "." in names[0] else None
    # Only a LightningModule puts its attribute's name before every weight; elsewhere a shared first
    # name is the model's own (GPT-2's `transformer.`, PEFT's `base_model.model.`), which loading expects
    if first and all(n.startswith(first) for n in names) and recon.checkpoint.container.startswith("lightning") \
            and not recon.checkpoint.strip_prefix:
        hints.append(f"every tensor name starts with '{first}' (the LightningModule attribute); add --strip-prefix "
                     f"{first} to write the inner model's names")
    return hints


def scan_nonfinite(recon: Reconstruction) -> dict[str, Any]:
    """Count NaN/Inf in y (the weights), z, and the x they give, one tensor at a time."""
    bad = count_nonfinite
    found: dict[str, dict[str, int]] = {}
    for out in recon.tensors:
        counts = {"weights": bad(out.ref.load())}
        if out.z is not None:
            counts["z"] = bad(out.z.load())
        if out.how != "copy":
            counts["x"] = bad(out.compute())
        if any(counts.values()):
            found[out.name] = counts
    return {"tensors_with_nonfinite": len(found), "tensors": found}


def _layer_of(name: str) -> str:
    """The layer a statistics buffer belongs to: `bn.running_mean` -> `bn`; Keras' `layers/bn/vars/2` -> `layers/bn`."""
    return name.rsplit("/vars/", 1)[0] if "/vars/" in name else name.rsplit(".", 1)[0]
