"""The y/x gap (`diff`) and the release gate (`check`), one tensor pair at a time.

Statistics are computed in float64 over chunks of each tensor, so memory
stays bounded by a chunk, not by the model, whatever the tensors' size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from .conventions import BN_BUFFERS, JSON_VERSION
from .errors import InputError, Opt
from .hints import prefix_between, prefix_verdict
from .reconstruct import OutputTensor, Reconstruction, bn_layer
from .sources import WeightSet, x_of
from .tables import counted
from .tensors import FLOAT_DTYPES, TensorRef, count_nonfinite, format_shape

CHUNK = 1 << 22  # elements per float64 chunk (32 MiB)


@dataclass
class Sums:
    """Running float64 sums over the elements finite in both tensors."""

    n: int = 0
    sq_diff: float = 0.0
    abs_diff: float = 0.0
    max_abs: float = 0.0
    sq_a: float = 0.0
    sq_b: float = 0.0
    dot: float = 0.0
    nonfinite_a: int = 0
    nonfinite_b: int = 0


def tensor_sums(a, b) -> Sums:
    """Float64 sums of a, b and a-b; a and b have equal numel."""
    import torch

    s = Sums()
    fa, fb = a.reshape(-1), b.reshape(-1)
    for start in range(0, fa.numel(), CHUNK):
        ca = fa[start : start + CHUNK].to(torch.float64)
        cb = fb[start : start + CHUNK].to(torch.float64)
        ok_a, ok_b = torch.isfinite(ca), torch.isfinite(cb)
        s.nonfinite_a += int((~ok_a).sum())
        s.nonfinite_b += int((~ok_b).sum())
        ok = ok_a & ok_b
        if not bool(ok.all()):
            ca, cb = ca[ok], cb[ok]
        d = ca - cb
        s.n += ca.numel()
        s.sq_diff += float(d.square().sum())
        s.abs_diff += float(d.abs().sum())
        s.max_abs = max(s.max_abs, float(d.abs().max()) if d.numel() else 0.0)
        s.sq_a += float(ca.square().sum())
        s.sq_b += float(cb.square().sum())
        s.dot += float((ca * cb).sum())
    return s


def _rel(sq_diff: float, sq_b: float) -> float | None:
    if sq_b > 0:
        return math.sqrt(sq_diff / sq_b)
    return 0.0 if sq_diff == 0 else None  # None: relative to zero is undefined


@dataclass
class TensorDiff:
    name: str
    status: str  # same | differs | only_in_a | only_in_b | shape_differs
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    max_abs: float | None = None
    mean_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    sums: Sums | None = field(default=None, repr=False)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("sums")
        return d


def diff_pair(name: str, a: TensorRef | None, b: TensorRef | None) -> TensorDiff:
    """Statistics for one name; `a` or `b` is None when the name is only on one side."""
    if a is None or b is None:
        return TensorDiff(
            name,
            "only_in_b" if a is None else "only_in_a",
            shape_a=list(a.shape) if a else None,
            shape_b=list(b.shape) if b else None,
            dtype_a=a.dtype if a else None,
            dtype_b=b.dtype if b else None,
        )
    d = TensorDiff(name, "same", list(a.shape), list(b.shape), a.dtype, b.dtype)
    if a.shape != b.shape:
        d.status = "shape_differs"
        return d
    s = tensor_sums(a.load(), b.load())
    d.sums = s
    d.nonfinite_a, d.nonfinite_b = s.nonfinite_a, s.nonfinite_b
    d.max_abs = s.max_abs
    d.mean_abs = s.abs_diff / s.n if s.n else 0.0
    d.rel_l2 = _rel(s.sq_diff, s.sq_b)
    norm = math.sqrt(s.sq_a * s.sq_b)
    d.cosine = s.dot / norm if norm > 0 else None
    if s.sq_diff > 0 or s.nonfinite_a or s.nonfinite_b:
        d.status = "differs"
    return d


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def diff_sets(a: WeightSet, b: WeightSet, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """The per-tensor gap between two weight sets, matched by name (b is the reference)."""
    names = sorted(set(a.tensors) | set(b.tensors))
    if not set(a.tensors) & set(b.tensors):
        raise InputError(f"nothing to compare: {a.label} and {b.label} have no tensor name in common",
                         "diff two weight sets of the same model (" + Opt("strip_prefix", usage=True)
                         + " may be needed for one side)")
    rows: list[TensorDiff] = []
    for name in names:
        ra, rb = a.tensors.get(name), b.tensors.get(name)
        rows.append(diff_pair(name, ra, rb))
        if progress:
            progress((ra or rb).nbytes)
    compared = [r for r in rows if r.sums is not None]
    # Totals and roll-ups are about weights: integer counters such as num_batches_tracked stay out.
    weights = [r for r in compared if r.dtype_b in FLOAT_DTYPES]
    total_sq_diff = sum(r.sums.sq_diff for r in weights)
    total_sq_b = sum(r.sums.sq_b for r in weights)
    modules: dict[str, list[float]] = {}
    for r in weights:
        m = modules.setdefault(module_of(r.name), [0.0, 0.0, 0])
        m[0] += r.sums.sq_diff
        m[1] += r.sums.sq_b
        m[2] += 1
    worst = sorted((r for r in compared if r.rel_l2), key=lambda r: -r.rel_l2)[:5]
    summary = {
        "a": a.label,
        "b": b.label,
        "tensors": len(rows),
        "compared": len(compared),
        "identical": sum(r.status == "same" for r in rows),
        "differ": sum(r.status == "differs" for r in rows),
        "only_in_a": [r.name for r in rows if r.status == "only_in_a"],
        "only_in_b": [r.name for r in rows if r.status == "only_in_b"],
        "shape_differs": [r.name for r in rows if r.status == "shape_differs"],
        "dtype_differs": [r.name for r in rows if r.dtype_a and r.dtype_b and r.dtype_a != r.dtype_b],
        "total_rel_l2": _rel(total_sq_diff, total_sq_b),
        "worst": [{"name": r.name, "rel_l2": r.rel_l2, "max_abs": r.max_abs} for r in worst],
        "modules": [
            {"module": m, "tensors": v[2], "rel_l2": _rel(v[0], v[1])} for m, v in modules.items()
        ],
    }
    return {"version": JSON_VERSION, "summary": summary, "tensors": [r.as_json() for r in rows]}


def diff_checkpoint(recon: Reconstruction, progress=None) -> dict[str, Any]:
    """The gap between a training checkpoint's saved weights (a) and its x (b)."""
    path = recon.checkpoint.path
    a = WeightSet(f"weights in {path} ({recon.source_held})", dict(recon.checkpoint.weights))
    b = WeightSet(f"x of {path}", x_of(recon), recon)
    report = diff_sets(a, b, progress)
    # inspect counts the tensors whose x is computed from y and z; one whose z equals y (a bias
    # before BatchNorm gets no gradient, so z never moves from y) is converted but comes out unchanged.
    converted = {t.name for t in recon.tensors if t.how in ("lerp", "keras", "state-x")}
    report["summary"]["converted"] = len(converted)
    report["summary"]["converted_but_identical"] = [r["name"] for r in report["tensors"]
                                                    if r["status"] == "same" and r["name"] in converted]
    return report


# ---- check -------------------------------------------------------------------------------

Y_VERDICT = "these are the training weights y (identical to the checkpoint's parameters); release x with `sfckpt convert`"


@dataclass
class Finding:
    kind: str  # differs | missing | extra | shape | nonfinite
    name: str
    detail: str
    max_abs: float | None = None
    equals_y: bool = False


BN_REESTIMATED = "re-estimated at x"  # the value `convert --bn-calib` writes under sfckpt_batchnorm


def reestimated_batchnorm(released: WeightSet, recon: Reconstruction) -> set[str]:
    """BatchNorm buffers that the release says `convert --bn-calib` re-estimated at x (so they are
    expected to differ from the checkpoint's); empty unless its metadata says so."""
    if (released.metadata or {}).get("sfckpt_batchnorm") != BN_REESTIMATED:
        return set()
    layers = {n.rsplit(".", 1)[0] if "." in n else "" for n in recon.batchnorm_buffers}
    buffers = {f"{layer}.{b}" if layer else b for layer in layers
               for b in BN_BUFFERS}
    return buffers & {t.name for t in recon.tensors}


def check_release(released: WeightSet, recon: Reconstruction, rtol: float = 0.0, atol: float = 0.0,
                  progress=None) -> dict[str, Any]:
    """Whether `released` is the checkpoint's x: exact (after casting x to the released dtype) or within rtol/atol.

    BatchNorm statistics that the release's metadata says were re-estimated at x
    (`convert --bn-calib`) cannot be reproduced from the checkpoint: they are
    checked for shape and NaN/Inf only, and the verdict says so.
    """
    findings: list[Finding] = []
    cast: set[str] = set()
    checked = 0
    x_names = {t.name for t in recon.tensors}
    bn_calibrated = reestimated_batchnorm(released, recon)
    # Storage of every x that the release does hold: a tied duplicate of one may be dropped.
    released_data = {t.ref.data_key for t in recon.tensors if t.name in released.tensors and t.ref.data_key}
    for t in recon.tensors:
        rel = released.tensors.get(t.name)
        if progress:
            progress(t.nbytes)
        if rel is None:
            if t.ref.data_key not in released_data:  # a tied duplicate may be dropped, as Hugging Face does
                findings.append(Finding("missing", t.name, "in x but not in the released weights"))
            continue
        if rel.shape != t.shape:
            findings.append(Finding("shape", t.name, f"released {format_shape(rel.shape)}, x {format_shape(t.shape)}"))
            continue
        checked += 1
        finding = _compare_with_x(t, rel, t.name in bn_calibrated, rtol, atol, cast)
        if finding is not None:
            findings.append(finding)
    for name in sorted(set(released.tensors) - x_names):
        findings.append(Finding("extra", name, "in the released weights but not in the checkpoint"))
    return {
        "version": JSON_VERSION,
        "passed": not findings,
        "verdict": _verdict(findings, cast, bn_calibrated, recon.checkpoint.strip_prefix),
        "weights": released.label,
        "checkpoint": str(recon.checkpoint.path),
        "tensors_checked": checked,
        "cast_to_released_dtype": sorted(cast),
        "batchnorm_reestimated": sorted(bn_calibrated),
        "tolerance": {"rtol": rtol, "atol": atol},
        "findings": [asdict(f) for f in findings],
    }


def _compare_with_x(t: OutputTensor, rel: TensorRef, reestimated: bool, rtol: float, atol: float, cast: set[str]) -> Finding | None:
    """What is wrong with one released tensor of x's shape, or None; adds its name to `cast` when x is cast
    to the released dtype. A re-estimated BatchNorm statistic is checked for NaN/Inf only."""
    import torch

    r = rel.load()
    bad = count_nonfinite(r)
    if bad:
        return Finding("nonfinite", t.name, f"{bad} NaN/Inf values")
    if reestimated:
        return None
    x = t.compute()
    if x.dtype != r.dtype:
        cast.add(t.name)
        x = x.to(r.dtype)
    if torch.equal(r, x):
        return None
    diff = (r.to(torch.float64) - x.to(torch.float64)).abs()
    if (rtol or atol) and bool((diff <= atol + rtol * x.to(torch.float64).abs()).all()):
        return None
    y = t.ref.load()
    equals_y = t.how != "copy" and torch.equal(r, y.to(r.dtype))
    return Finding("differs", t.name, "differs from x", float(diff.max()), equals_y)


def _verdict(findings: list[Finding], cast: set[str], bn_calibrated: set[str], strip_prefix: str | None) -> str:
    """One line: "these are x" (with how they were compared), or what is wrong, worst first; names that
    differ by one prefix are said as that (`strip_prefix`: the option the check was run with)."""
    if not findings:
        notes = []
        if cast:
            notes.append("compared after casting x to the released dtype")
        if bn_calibrated:
            notes.append(f"the BatchNorm statistics of {_layers(bn_calibrated)} re-estimated at x by "
                         "`convert --bn-calib`, as the release's metadata says: checked for shape and NaN/Inf only; "
                         "every other tensor compared with x")
        return "these are x" + (f" ({'; '.join(notes)})" if notes else "")
    differs = [f for f in findings if f.kind == "differs"]
    messages: list[str] = []
    renamed = prefix_between([f.name for f in findings if f.kind == "missing"],
                             [f.name for f in findings if f.kind == "extra"])
    if renamed and not differs and all(f.kind in ("missing", "extra") for f in findings):
        messages.append(prefix_verdict(*renamed, strip_prefix))
    elif differs and len(differs) == len(findings) and all(f.equals_y for f in differs):
        messages.append(Y_VERDICT)
    else:
        if differs:
            worst = max(differs, key=lambda f: f.max_abs or 0)
            n_y = sum(f.equals_y for f in differs)
            messages.append(f"{counted(len(differs), 'tensor')} {'differs' if len(differs) == 1 else 'differ'} from x "
                            f"(worst: {worst.name}, max abs {worst.max_abs:.3g})"
                            + (f"; {n_y} of them {'is' if n_y == 1 else 'are'} still y" if n_y else ""))
        for kind, text in (("missing", "missing from the release"), ("extra", "not in the checkpoint"),
                           ("shape", "of another shape"), ("nonfinite", "holding NaN/Inf")):
            group = [f for f in findings if f.kind == kind]
            if group:
                messages.append(f"{counted(len(group), 'tensor')} {text} (first: {group[0].name})")
    return "; ".join(messages + ([f"the BatchNorm statistics of {_layers(bn_calibrated)} re-estimated at x "
                                  "(release metadata) not compared"] if bn_calibrated else []))


def _layers(bn_buffers: set[str]) -> str:
    """"3 layers": BatchNorm counted in layers, as convert's warning counts them."""
    return counted(len({bn_layer(n) for n in bn_buffers}), "layer")


def union(sets: Iterable[WeightSet]) -> WeightSet:
    """Several files (say, shards passed one by one) as one weight set."""
    sets = list(sets)
    if len(sets) == 1:
        return sets[0]
    tensors: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    for s in sets:
        metadata.update(s.metadata or {})
        for name, ref in s.tensors.items():
            if name in tensors:
                raise InputError(f"tensor '{name}' is in more than one of the given files (also in {s.label})",
                                 "pass each model's weights once")
            tensors[name] = ref
    return WeightSet(", ".join(s.label for s in sets), tensors, metadata=metadata)
