"""Human-readable tables (tabulate) for the reports the commands produce as JSON."""
from __future__ import annotations

from typing import Any

from tabulate import tabulate


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def inspect_tables(r: dict[str, Any]) -> str:
    keys = r["keys"]
    opt = r["optimizer"]
    head = [
        ["file", r["path"]],
        ["container", r["container"]],
        ["model key", f"{keys['model']!s}  (candidates: {', '.join(keys['model_candidates']) or '-'})"],
        ["optimizer key", f"{keys['optimizer']!s}  (candidates: {', '.join(keys['optimizer_candidates']) or '-'})"],
        ["optimizer family", f"{opt['family']} ({', '.join(opt['classes'])}; {opt['family_source']})"],
        ["parameters hold", r["params_hold"]],
        ["mapping", f"{r['mapping']['method']}: {r['mapping']['entries_with_z']} of {r['mapping']['optimizer_entries']} "
                    f"optimizer entries have z; {r['mapping']['tensors_converted']} of {r['tensors']['count']} tensors change"],
    ]
    if opt["note"]:
        head.append(["note", opt["note"]])
    groups = tabulate(
        [
            [g["index"], _fmt(g["beta"]) + ("" if g["beta_source"] == "saved" else f" ({g['beta_source']})"), _fmt(g["lr"]),
             _fmt(g["weight_decay"]), _fmt(g["warmup_steps"]), _fmt(g["step"]), _fmt(g["weight_sum"]), _fmt(g["train_mode"]),
             g["params_hold"], f"{g['params_with_z']}/{g['params']}"]
            for g in r["groups"]
        ],
        headers=["group", "β", "lr", "weight decay", "warmup", "step", "weight_sum", "train_mode", "params hold", "with z"],
    )
    dtypes = tabulate(
        [[d, v["tensors"], f"{v['elements']:,}", human_bytes(v["bytes"])] for d, v in r["tensors"]["by_dtype"].items()],
        headers=["dtype", "tensors", "elements", "bytes"],
    )
    parts = [tabulate(head, tablefmt="plain"), groups, dtypes]
    bn = r["batchnorm"]
    parts.append(f"BatchNorm: {bn['layers']} layers ({len(bn['buffers'])} statistics buffers)" if bn["buffers"] else "BatchNorm: none")
    nf = r["nonfinite"]
    if nf is None:
        parts.append("NaN/Inf: not scanned (add --scan to read the data)")
    elif not nf["tensors"]:
        parts.append("NaN/Inf: none")
    else:
        parts.append(tabulate([[n, c.get("weights", 0), c.get("z", "-"), c.get("x", "-")] for n, c in nf["tensors"].items()],
                              headers=["tensor with NaN/Inf", "weights", "z", "x"]))
    if r["skipped"]:
        parts.append(tabulate(list(r["skipped"].items()), headers=["skipped entry", "why"]))
    return "\n\n".join(parts)
