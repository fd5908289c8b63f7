"""Human-readable tables (tabulate) for the reports the commands produce as JSON.

Each table is made from the report's terminal view (textout.terminal_view): a name from the input
is one line with its control characters shown as escapes before it reaches a cell.
"""
from __future__ import annotations

from typing import Any

from tabulate import tabulate

from .tensors import format_shape
from .textout import markdown_code, markdown_text, terminal_view


# Names are text even when they look like numbers (nn.Sequential's "0", "2"): left-aligned like the others
NAME_COLUMN = [0]


def counted(n: int, noun: str) -> str:
    """`1 tensor`, `2 tensors`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


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
    r = terminal_view(r)
    keys = r["keys"]
    opt = r["optimizer"]
    head = [
        ["file", r["path"]],
        ["container", r["container"]],
        ["model key", f"{keys['model']!s}  (candidates: {', '.join(keys['model_candidates']) or '-'})"],
        ["optimizer key", f"{keys['optimizer']!s}  (candidates: {', '.join(keys['optimizer_candidates']) or '-'})"],
        ["optimizer family", f"{opt['family']} ({', '.join(opt['classes'])}; {opt['family_source']})"],
        ["parameters hold", r["params_hold"]],
        ["mapping", f"{r['mapping']['entries_with_z']} of {r['mapping']['optimizer_entries']} optimizer entries have z: "
                    f"{r['mapping']['method']} (docs/mapping.md)"],
        ["converted", f"{r['mapping']['tensors_converted']} of {r['tensors']['count']} tensors converted (x from y "
                      "and z; `diff` shows which change)"],
    ]
    untrained = r["mapping"].get("untrained_parameters") or []
    if untrained:
        shown = ", ".join(untrained[:4]) + (f", … ({len(untrained) - 4} more)" if len(untrained) > 4 else "")
        head.append(["not trained", f"{len(untrained)} float parameters no optimizer trains, copied unchanged: {shown}"])
    if len(r.get("optimizers", [])) > 1:
        head.append(["optimizers", ", ".join(f"{o['key']} ({o['family']})" for o in r["optimizers"])])
    if opt["note"]:
        head.append(["note", opt["note"]])
    groups = tabulate(
        [
            [f"{g['optimizer']}/{g['index']}" if g.get("optimizer") else g["index"], ("unknown" if g["beta"] is None else _fmt(g["beta"]))
             + ("" if g["beta_source"] == "saved" else f" ({g['beta_source']})"), _fmt(g["lr"]),
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
    parts.append(f"BatchNorm: {counted(bn['layers'], 'layer')} ({counted(len(bn['buffers']), 'statistics buffer')})"
                 if bn["buffers"] else "BatchNorm: none")
    nf = r["nonfinite"]
    if nf is None:
        parts.append("NaN/Inf: not scanned (add --scan to read the data)")
    elif not nf["tensors"]:
        parts.append("NaN/Inf: none")
    else:
        parts.append(tabulate([[n, c.get("weights", 0), c.get("z", "-"), c.get("x", "-")] for n, c in nf["tensors"].items()],
                              headers=["tensor with NaN/Inf", "weights", "z", "x"], disable_numparse=NAME_COLUMN))
    if r["skipped"]:
        parts.append(tabulate(list(r["skipped"].items()), headers=["skipped entry", "why"], disable_numparse=True))
    parts.extend(f"note: {n}" for n in r.get("notes", []))
    parts.extend(f"hint: {h}" for h in r.get("hints", []))
    return "\n\n".join(parts)


def _g(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


SORT_KEYS = ("rel_l2", "max_abs", "mean_abs", "cosine", "name")


def diff_table(report: dict[str, Any], top: int | None, sort: str) -> str:
    report = terminal_view(report)
    s = report["summary"]
    rows = list(report["tensors"])
    if sort == "name":
        rows.sort(key=lambda r: r["name"])
    elif sort == "cosine":
        rows.sort(key=lambda r: (r["cosine"] is None, r["cosine"] if r["cosine"] is not None else 0))
    else:
        rows.sort(key=lambda r: (r[sort] is None, -(r[sort] or 0), r["name"]))
    shown = rows[:top] if top else rows
    table = tabulate(
        [[r["name"], format_shape(r["shape_a"] if r["shape_a"] is not None else r["shape_b"]), r["dtype_a"] if r["dtype_a"] == r["dtype_b"] else
          f"{r['dtype_a']}/{r['dtype_b']}", _g(r["rel_l2"]), _g(r["max_abs"]), _g(r["mean_abs"]),
          "-" if r["cosine"] is None else f"{r['cosine']:.6f}", r["status"]] for r in shown],
        headers=["tensor", "shape", "dtype", "rel_l2", "max_abs", "mean_abs", "cosine", "status"],
        disable_numparse=NAME_COLUMN,
    )
    lines = [
        f"a: {s['a']}",
        f"b: {s['b']}",
        f"{counted(s['compared'], 'tensor')} compared: {s['differ']} differ, {s['identical']} identical; "
        f"total relative gap ‖a − b‖/‖b‖ = {_g(s['total_rel_l2'])}",
    ]
    same = s.get("converted_but_identical")
    if same:
        lines.append(f"{len(same)} of the {s['converted']} converted tensors {'is' if len(same) == 1 else 'are'} identical: "
                     f"z equals y there (no gradient reached it, e.g. a bias before BatchNorm), so x = y: {', '.join(same[:5])}"
                     + (f" (+{len(same) - 5} more)" if len(same) > 5 else ""))
    for key, text in (("only_in_a", "only in a"), ("only_in_b", "only in b"), ("shape_differs", "shape differs"),
                      ("dtype_differs", "dtype differs")):
        if s[key]:
            lines.append(f"{text}: {', '.join(s[key][:5])}" + (f" (+{len(s[key]) - 5} more)" if len(s[key]) > 5 else ""))
    modules = sorted((m for m in s["modules"] if m["rel_l2"] is not None), key=lambda m: -m["rel_l2"])[: top or None]
    module_table = tabulate([[m["module"], m["tensors"], _g(m["rel_l2"])] for m in modules],
                            headers=["module", "tensors", "rel_l2"], disable_numparse=NAME_COLUMN)
    more = f"\n({len(rows) - len(shown)} more rows; --top 0 shows all)" if len(shown) < len(rows) else ""
    return "\n".join(lines) + "\n\n" + table + more + "\n\n" + module_table


def check_table(report: dict[str, Any], top: int | None = 50) -> str:
    """The verdict, and the first `top` findings (None: all)."""
    report = terminal_view(report)
    head = "PASS" if report["passed"] else "FAIL"
    lines = [f"{head}: {report['weights']}: {report['verdict']}"]
    if report["findings"]:
        shown = report["findings"] if top is None else report["findings"][:top]
        lines.append("")
        lines.append(tabulate([[f["name"], f["kind"], f["detail"], _g(f["max_abs"]), "yes" if f["equals_y"] else ""]
                               for f in shown],
                              headers=["tensor", "finding", "detail", "max_abs", "is y"], disable_numparse=NAME_COLUMN))
        if len(report["findings"]) > len(shown):
            lines.append(f"({len(report['findings']) - len(shown)} more findings: --top 0 shows all, --json lists them)")
    return "\n".join(lines)


def check_markdown(report: dict[str, Any]) -> str:
    """For $GITHUB_STEP_SUMMARY: each text from the report is one line of literal markdown (names as code
    spans, prose escaped), so no name can add a heading, a table row, HTML or a link."""
    icon = "✅" if report["passed"] else "❌"
    lines = [f"### {icon} sfckpt check: {markdown_code(report['weights'])}", "", markdown_text(report["verdict"]), ""]
    if report["findings"]:
        lines += ["| tensor | finding | detail | max abs | is y |", "|---|---|---|---|---|"]
        lines += [f"| {markdown_code(f['name'], in_table=True)} | {markdown_text(f['kind'])} | {markdown_text(f['detail'])} "
                  f"| {_g(f['max_abs'])} | {'yes' if f['equals_y'] else ''} |"
                  for f in report["findings"][:50]]
    return "\n".join(lines) + "\n"


def bn_table(shifts: list[dict[str, Any]]) -> str:
    """How far each BatchNorm layer's statistics moved when re-estimated at x."""
    shifts = terminal_view(shifts)
    return tabulate(
        [[s["layer"], _g(s["mean_max_abs"]), _g(s["mean_rel_l2"]), _g(s["var_max_abs"]), _g(s["var_rel_l2"])] for s in shifts],
        headers=["BatchNorm layer", "running_mean max_abs", "rel_l2", "running_var max_abs", "rel_l2"],
        disable_numparse=NAME_COLUMN,
    )
