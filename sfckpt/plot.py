"""`diff --plot`: a per-layer bar chart of the relative gap (needs the `plot` extra: matplotlib)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import InputError, OutputError, OutputExists
from .textout import terminal
from .writer import atomic_path, refuse_inputs

MAX_BARS = 60
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}  # chosen by the name, so the bytes match it


def check_target(out: Path, force: bool, inputs: Sequence[Path]) -> None:
    """Refuse a plot path that is an input, or an existing file without `force` (before any work)."""
    refuse_inputs(out, inputs)
    if out.is_dir():
        raise OutputError(f"{out} is a folder", "give a file name such as gap.png")
    if out.suffix.lower() not in FORMATS:
        raise OutputError(f"{out}: a plot is written as PNG, SVG or PDF, chosen by the name's ending",
                          f"name it {out.with_suffix('.png').name} (or .svg, .pdf)")
    if out.exists() and not force:
        raise OutputExists(out)


def plot_gap(report: dict[str, Any], out: Path, force: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """Horizontal bars of rel_l2 per module, in model order, on a log scale.

    Written like every other output: never onto one of `inputs`, an existing file only with
    `force`, atomically.
    """
    out = Path(out)
    check_target(out, force, inputs)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib", "pip install 'sfckpt[plot]'") from None
    modules = [m for m in report["summary"]["modules"] if m["rel_l2"]]
    if len(modules) > MAX_BARS:  # keep it readable: the largest gaps, still in model order
        keep = {id(m) for m in sorted(modules, key=lambda m: -m["rel_l2"])[:MAX_BARS]}
        modules = [m for m in modules if id(m) in keep]
    height = 1.5 + 0.28 * max(1, len(modules))
    fig, ax = plt.subplots(figsize=(8, height))
    names = [terminal(m["module"]) for m in modules]
    values = [m["rel_l2"] for m in modules]
    ax.barh(range(len(values)), values, color="#4c72b0")
    # parse_math=False: a `$` in a name is text, not mathtext (which could fail to parse)
    ax.set_yticks(range(len(values)), names, fontsize=8, parse_math=False)
    ax.invert_yaxis()
    if values and max(values) / max(min(values), 1e-30) > 100:
        ax.set_xscale("log")
    ax.set_xlabel("relative L2 gap  ‖a − b‖ / ‖b‖")
    total = report["summary"]["total_rel_l2"]
    title = f"{terminal(report['summary']['a'])}\nvs {terminal(report['summary']['b'])}"
    if total is not None:
        title += f"   (total {total:.3g})"
    ax.set_title(title, fontsize=9, parse_math=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    with atomic_path(out, force) as tmp:
        fig.savefig(tmp, format=FORMATS[out.suffix.lower()], dpi=110)
    plt.close(fig)
    return out
