"""Bring every library's optimizer `state_dict()` into torch's standard layout.

torch and most libraries save `{'state': {index: {...}}, 'param_groups': [...]}`.
Two Schedule-Free implementations differ, and are rewritten here so that
family detection and the parameter mapping see one shape:

* pytorch_optimizer's `ScheduleFreeWrapper` saves `{'schedulefree_state':
  {(group, position): {'z': ...}}, 'base_optimizer': {...}, 'train_mode': bool}`.
* heavyball's `SAMWrapper` saves `{'wrapped': <inner state>, 'ball': [...]}`;
  the inner optimizer's state is used (SAM restores the parameters after its
  ascent step, so between steps they hold the inner optimizer's y).
* heavyball nests each parameter's state by view (`state[i] = {0: {...}}`)
  and names z `update_by_schedule_free_z_<n>` (MSAMLaProp's swap buffer
  `update_by_msam_z_<n>` becomes `msam_z`, which no family uses).
"""
from __future__ import annotations

from typing import Any, Mapping

from .errors import DamagedInput, InputError

STANDARD = "standard"
PTO_WRAPPER = "pytorch_optimizer-wrapper"
HEAVYBALL = "heavyball"


def is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and (
        ("state" in value and "param_groups" in value)
        or ("schedulefree_state" in value and "base_optimizer" in value)
        or (set(value) == {"wrapped", "ball"} and is_optimizer_state(value["wrapped"]))
        or (set(value) == {"optimizers"} and isinstance(value["optimizers"], list)
            and all(is_optimizer_state(v) for v in value["optimizers"]))
    )


def normalize(optimizer: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(layout name, the state in torch's standard layout)."""
    if set(optimizer) == {"wrapped", "ball"}:
        return normalize(optimizer["wrapped"])  # heavyball SAMWrapper: parameters hold the wrapped optimizer's y between steps
    if set(optimizer) == {"optimizers"}:
        raise InputError(
            "the optimizer state is heavyball SplitOpt's (one state_dict per inner optimizer), which sfckpt does not read yet",
            "convert with the inner optimizers' own eval() in your training code",
        )
    if "schedulefree_state" in optimizer:
        return PTO_WRAPPER, _from_pto_wrapper(optimizer)
    if "heavyball" in optimizer or _nested_by_view(optimizer.get("state")):
        return HEAVYBALL, _from_heavyball(optimizer)
    return STANDARD, dict(optimizer)


def _from_pto_wrapper(sd: Mapping[str, Any]) -> dict[str, Any]:
    base = sd.get("base_optimizer")
    sf_state = sd.get("schedulefree_state")
    if not isinstance(base, Mapping) or not isinstance(sf_state, Mapping) or not isinstance(base.get("param_groups"), list):
        raise DamagedInput("pytorch_optimizer ScheduleFreeWrapper state is incomplete", "the checkpoint is damaged")
    for g, group in enumerate(base["param_groups"]):
        if not isinstance(group, Mapping):
            raise DamagedInput(f"pytorch_optimizer ScheduleFreeWrapper base_optimizer param_groups[{g}] is a "
                             f"{type(group).__name__}, not a dict", "the checkpoint is damaged")
    groups = [dict(g, train_mode=sd.get("train_mode")) for g in base["param_groups"]]
    state: dict[Any, dict] = {}
    for key, value in sf_state.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise DamagedInput(f"pytorch_optimizer ScheduleFreeWrapper state has key {key!r}, not (group, position)",
                             "the checkpoint is damaged")
        g, pos = key
        params = groups[g].get("params") if type(g) is int and 0 <= g < len(groups) else None
        index = params[pos] if isinstance(params, (list, tuple)) and type(pos) is int and 0 <= pos < len(params) else None
        if type(index) not in (int, str) or not isinstance(value, Mapping):
            raise DamagedInput(f"pytorch_optimizer ScheduleFreeWrapper state {key} names no parameter", "the checkpoint is damaged")
        state[index] = dict(value)
    return {"state": state, "param_groups": groups}


def _nested_by_view(state: Any) -> bool:
    return isinstance(state, Mapping) and any(
        isinstance(s, Mapping) and s and all(isinstance(k, int) and isinstance(v, Mapping) for k, v in s.items())
        for s in state.values()
    )


def _from_heavyball(sd: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict] = {}
    saved, groups = sd.get("state") or {}, sd.get("param_groups") or []
    if not isinstance(saved, Mapping) or not isinstance(groups, (list, tuple)):
        raise DamagedInput(f"heavyball optimizer state holds state as a {type(saved).__name__} and param_groups as a "
                         f"{type(groups).__name__}, not a dict and a list", "the checkpoint is damaged")
    for index, views in saved.items():
        if not isinstance(views, Mapping):
            raise DamagedInput(f"heavyball state entry {index} is not a dict", "the checkpoint is damaged")
        if len(views) != 1 or 0 not in views:
            raise InputError(
                f"heavyball state entry {index} is split into {len(views)} views",
                "parameters that heavyball split or merged are not supported yet; convert with heavyball's own eval()",
            )
        if not isinstance(views[0], Mapping):
            raise DamagedInput(f"heavyball state entry {index} holds a {type(views[0]).__name__}, not a dict",
                             "the checkpoint is damaged")
        view = dict(views[0])
        z_keys = [k for k in view if isinstance(k, str) and "schedule_free_z" in k]
        if len(z_keys) == 1:
            view["z"] = view.pop(z_keys[0])
        msam_keys = [k for k in view if isinstance(k, str) and "msam_z" in k]
        if len(msam_keys) == 1:
            view["msam_z"] = view.pop(msam_keys[0])  # MSAMLaProp's; named so that it is refused by name, never used as z
        state[index] = view
    return {"state": state, "param_groups": list(groups)}
