"""Optimizers that are not Schedule-Free, named from their saved keys.

A checkpoint trained with `torch.optim.AdamW` is the most common wrong input: it has no z and no x
to reconstruct, since its parameters already are the trained weights. An optimizer's
`state_dict()` does not record its class, but torch's optimizers each save a distinctive set of
hyper-parameters (`torch/optim/*.py`, the `defaults` of each class) and state keys, so the refusal
and `inspect` can name the class instead of listing keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import NotScheduleFree

# class -> (group keys it always saves, state keys it always saves once stepped); the first that fits wins
_TORCH: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = (
    ("NAdam", frozenset({"betas", "momentum_decay"}), frozenset({"exp_avg", "exp_avg_sq", "mu_product"})),
    ("Adamax", frozenset({"betas", "eps"}), frozenset({"exp_avg", "exp_inf"})),
    ("Adam", frozenset({"betas", "eps", "amsgrad"}), frozenset({"exp_avg", "exp_avg_sq"})),
    ("RAdam", frozenset({"betas", "eps", "weight_decay"}), frozenset({"exp_avg", "exp_avg_sq"})),
    ("SparseAdam", frozenset({"betas", "eps"}), frozenset({"exp_avg", "exp_avg_sq"})),
    ("SGD", frozenset({"momentum", "dampening", "nesterov"}), frozenset()),
    ("RMSprop", frozenset({"alpha", "centered"}), frozenset({"square_avg"})),
    ("Adagrad", frozenset({"lr_decay", "initial_accumulator_value"}), frozenset({"sum"})),
    ("Adadelta", frozenset({"rho", "eps"}), frozenset({"square_avg", "acc_delta"})),
    ("ASGD", frozenset({"lambd", "alpha", "t0"}), frozenset({"eta", "mu", "ax"})),
    ("Rprop", frozenset({"etas", "step_sizes"}), frozenset({"prev", "step_size"})),
    ("Adafactor", frozenset({"beta2_decay", "d"}), frozenset({"row_var", "col_var"})),
    ("LBFGS", frozenset({"history_size", "max_iter"}), frozenset()),
)


class PlainOptimizer(NotScheduleFree):
    """The optimizer state is a known optimizer that is not Schedule-Free: there is no x to make."""

    def __init__(self, optimizer_class: str, message: str, hint: str):
        super().__init__(message, hint)
        self.optimizer_class = optimizer_class


def identify(groups: list[Mapping[str, Any]], state_keys: set[str]) -> str | None:
    """`torch.optim.<Class>` when the saved keys are one of torch's optimizers (without a z), else None."""
    if not groups or "z" in state_keys:
        return None
    group_keys = set().union(*(set(g) for g in groups))
    for name, group_has, state_has in _TORCH:
        if group_has <= group_keys and (not state_keys or state_has <= state_keys):
            if name == "Adam":
                # torch >= 2.6 saves AdamW as Adam with decoupled weight decay
                decoupled = {g.get("decoupled_weight_decay") for g in groups}
                name = "AdamW" if decoupled == {True} else "Adam" if decoupled == {False} else "Adam or AdamW"
            return f"torch.optim.{name}"
    return None


def refuse(groups: list[Mapping[str, Any]], state_keys: set[str]) -> None:
    """Raise PlainOptimizer naming the class when the saved keys are one of torch's optimizers."""
    name = identify(groups, state_keys)
    if name is not None:
        raise PlainOptimizer(
            name,
            f"the optimizer state is {name}'s and holds no Schedule-Free z: this is not a Schedule-Free checkpoint, "
            "so there is no x to reconstruct",
            "its parameters already are the trained weights: release them as saved (sfckpt converts checkpoints "
            "of Schedule-Free optimizers, docs/families.md)",
        )


def describe(ckpt: Any, exc: PlainOptimizer) -> dict[str, Any]:
    """What `inspect` reports for a checkpoint of an optimizer that is not Schedule-Free: what it holds,
    which optimizer, and that there is no x to make (no tensor data is read)."""
    from .inspection import _plain

    groups = list((ckpt.optimizer or {}).get("param_groups", []))
    return {
        "version": 1,
        "path": str(ckpt.path),
        "container": ckpt.container,
        "keys": {"model": ckpt.model_key, "optimizer": ckpt.optimizer_key, "model_candidates": ckpt.model_candidates,
                 "optimizer_candidates": ckpt.optimizer_candidates, "top_level": ckpt.top_level_keys},
        "optimizer": {"class": exc.optimizer_class, "schedule_free": False},
        "groups": [{"index": i, "lr": _plain(g.get("lr")), "weight_decay": _plain(g.get("weight_decay")),
                    "params": len(g.get("params", []))} for i, g in enumerate(groups)],
        "tensors": {"count": len(ckpt.weights), "bytes": sum(r.nbytes for r in ckpt.weights.values())},
        "verdict": f"not Schedule-Free ({exc.optimizer_class}): there is no x to reconstruct; the parameters "
                   "already are the trained weights",
    }


def table(report: dict[str, Any]) -> str:
    """`describe`'s report for people."""
    from tabulate import tabulate

    from .tables import counted, human_bytes
    from .textout import terminal_view

    r = terminal_view(report)
    head = [["file", r["path"]], ["container", r["container"]],
            ["model key", str(r["keys"]["model"])], ["optimizer key", str(r["keys"]["optimizer"])],
            ["optimizer", f"{r['optimizer']['class']} (not Schedule-Free)"],
            ["tensors", f"{counted(r['tensors']['count'], 'tensor')}, {human_bytes(r['tensors']['bytes'])}"]]
    groups = tabulate([[g["index"], g["lr"], g["weight_decay"], g["params"]] for g in r["groups"]],
                      headers=["group", "lr", "weight decay", "params"])
    return "\n\n".join([tabulate(head, tablefmt="plain"), groups, f"note: {r['verdict']}"])
