"""Schedule-Free optimizer families: where each keeps z, β and its mode flag.

The optimizer's class name is not saved in its `state_dict()`, so a family
is recognised by the keys of its parameter groups and per-parameter state.
Each family is one declarative entry below; adding a library means adding an
entry (and a test that trains with the real optimizer).

How each family's own `eval()` computes x (the reference sfckpt matches bit
for bit):

* ``lerp``: ``p.lerp_(end=z, weight=1 - 1/β)`` when the group is in train
  mode (params hold y); nothing when it is in eval mode (params hold x).
* ``state-x``: ``p.copy_(state['x'])`` (the *Reference* variants keep x).
* optax (JAX) has no eval(): ``optax.contrib.schedule_free_eval_params`` maps
  ``(y - (1 - b1) * z) / b1`` over the tree with the stored ``b1`` (`sfckpt/optax_eval.py`).
* ``keras``: Keras 3's ScheduleFreeAdamW has no eval(); its variables always
  hold y, and x is its own recovery formula (`keras_x`).

Optimizers that keep a z or a train/eval switch without being Schedule-Free
(`LOOKALIKES`) are refused by name, so that nobody gets a confusing "unknown
family" message, or worse, a conversion, for a checkpoint with no x in it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import plain_optimizers
from .errors import InputError, NotScheduleFree, Opt, OptionConflict, Words


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[str, ...]
    library: str = "schedulefree"
    layout: str = "standard"  # see optimizer_state.normalize
    x_source: str = "lerp"  # "lerp" (x = y.lerp(z, 1-1/β)), "state-x" (x kept in state) or "keras" (keras_x)
    x_in_float32: bool = False  # eval() promotes y and z to float32, lerps, and casts back
    beta_key: str | None = "betas"  # "betas" (first entry) or "momentum"; None: β is not saved
    mode_key: str | None = "train_mode"  # group flag: True → params hold y
    mode_default: bool | None = None  # the flag's meaning when the key is absent
    params_without_mode: str = "x"  # what params hold when there is no mode flag: "x", "y" or "unknown"
    z_key: str = "z"
    step_key: str = "k"
    switch_key: str | None = None  # group flag turning Schedule-Free on; a group with it off has no y/x split
    beta_first_key: str | None = None  # a group key that, when set, is β instead of beta_key (heavyball's 'beta')
    refuse_when_set: tuple[tuple[str, str], ...] = ()  # (group key, why): a group with it set is not converted
    # A group key naming the dtype β is stored in. When set, x is optax's (y − (1 − β)·z)/β with β in
    # that dtype (sfckpt/optax_eval.py), not a lerp.
    beta_dtype_key: str | None = None
    group_has: frozenset[str] = field(default_factory=frozenset)
    group_lacks: frozenset[str] = field(default_factory=frozenset)
    state_has: frozenset[str] = field(default_factory=frozenset)
    state_lacks: frozenset[str] = field(default_factory=frozenset)
    note: str = ""

    def matches(self, group_keys: set[str], state_keys: set[str]) -> bool:
        return (
            self.group_has <= group_keys
            and not (self.group_lacks & group_keys)
            and self.state_has <= state_keys
            and not (self.state_lacks & state_keys)
        )

    def beta(self, group: Mapping[str, Any]) -> Any:
        """β as saved in the group, or None when this family does not save it."""
        if self.beta_key is None:
            return None
        if self.beta_first_key is not None and group.get(self.beta_first_key) is not None:
            return group[self.beta_first_key]
        value = group.get(self.beta_key)
        if self.beta_key == "betas" and isinstance(value, (tuple, list)) and value:
            return value[0]
        return value

    def check_groups(self, groups: list[Mapping[str, Any]]) -> None:
        """Refuse settings under which this family's eval() computes x from more than y, z and β."""
        for key, why in self.refuse_when_set:
            for g, group in enumerate(groups):
                if group.get(key):
                    raise InputError(
                        f"{self.library} {self.classes[0]}: param_groups[{g}] has {key}={group[key]!r}; {why}",
                        "sfckpt cannot reproduce its eval() here; call the optimizer's own eval() in your training code",
                    )

    def params_hold(self, group: Mapping[str, Any]) -> str:
        """'y', 'x' or 'unknown': what the model's parameters hold for this group."""
        if self.switch_key is not None and group.get(self.switch_key) is False:
            return "x"  # not Schedule-Free: eval() leaves these parameters alone
        if self.mode_key is None:
            return self.params_without_mode
        flag = group.get(self.mode_key, self.mode_default)
        if flag is None:
            return "unknown"
        return "y" if flag else "x"


_F = frozenset
FAMILIES: tuple[Family, ...] = (
    Family(
        "sgd",
        ("SGDScheduleFree",),
        beta_key="momentum",
        group_has=_F({"k", "momentum", "train_mode", "weight_lr_power"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
    ),
    Family(
        "adamw",
        ("AdamWScheduleFree", "AdamWScheduleFreePaper"),
        group_has=_F({"k", "betas", "train_mode", "weight_lr_power"}),
        group_lacks=_F({"silent_sgd_phase"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
        note="AdamWScheduleFree and AdamWScheduleFreePaper save identical state and evaluate identically",
    ),
    Family(
        "radam",
        ("RAdamScheduleFree",),
        group_has=_F({"k", "betas", "train_mode", "silent_sgd_phase"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
    ),
    Family(
        "sgd-closure",
        ("SGDScheduleFreeClosure",),
        beta_key="momentum",
        mode_key=None,
        group_has=_F({"k", "momentum", "weight_lr_power"}),
        group_lacks=_F({"train_mode"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
        note="between steps the parameters hold x",
    ),
    Family(
        "adamw-closure",
        ("AdamWScheduleFreeClosure",),
        mode_key=None,
        group_has=_F({"k", "betas", "weight_lr_power"}),
        group_lacks=_F({"train_mode", "silent_sgd_phase"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
        note="between steps the parameters hold x",
    ),
    Family(
        "radam-closure",
        ("RAdamScheduleFreeClosure",),
        mode_key=None,
        group_has=_F({"k", "betas", "silent_sgd_phase"}),
        group_lacks=_F({"train_mode"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
        note="between steps the parameters hold x",
    ),
    Family(
        "sgd-reference",
        ("SGDScheduleFreeReference",),
        x_source="state-x",
        beta_key="momentum",
        group_has=_F({"k", "momentum", "train_mode"}),
        state_has=_F({"z", "x", "y"}),
        note="x is stored in the optimizer state",
    ),
    Family(
        "adamw-reference",
        ("AdamWScheduleFreeReference",),
        x_source="state-x",
        group_has=_F({"k", "betas", "train_mode"}),
        state_has=_F({"z", "x", "y"}),
        note="x is stored in the optimizer state",
    ),
    Family(
        "wrapper",
        ("ScheduleFreeWrapper",),
        beta_key=None,
        mode_key=None,
        params_without_mode="unknown",
        group_has=_F({"k", "weight_sum"}),
        group_lacks=_F({"train_mode", "weight_lr_power"}),
        state_has=_F({"z"}),
        state_lacks=_F({"x", "y"}),
        note="β (the wrapper's momentum) and the mode are not saved: pass --beta; "
        "the groups' own momentum/betas belong to the base optimizer and are not β",
    ),
    Family(
        "wrapper-reference",
        ("ScheduleFreeWrapperReference",),
        x_source="state-x",
        beta_key=None,
        mode_key=None,
        params_without_mode="unknown",
        group_lacks=_F({"train_mode", "weight_lr_power"}),
        state_has=_F({"z", "x", "y"}),
        note="x is stored in the optimizer state; β and the mode are not saved",
    ),
    Family(
        "pto-sgd",
        ("ScheduleFreeSGD",),
        library="pytorch_optimizer",
        beta_key="momentum",
        step_key="step",
        group_has=_F({"momentum", "train_mode", "step"}),
        group_lacks=_F({"k"}),
        state_has=_F({"z"}),
    ),
    Family(
        "pto-adamw",
        ("ScheduleFreeAdamW",),
        library="pytorch_optimizer",
        step_key="step",
        group_has=_F({"betas", "train_mode", "step"}),
        group_lacks=_F({"k", "silent_sgd_phase"}),
        state_has=_F({"z"}),
    ),
    Family(
        "pto-radam",
        ("ScheduleFreeRAdam",),
        library="pytorch_optimizer",
        step_key="step",
        group_has=_F({"betas", "train_mode", "step", "silent_sgd_phase"}),
        group_lacks=_F({"k"}),
        state_has=_F({"z"}),
    ),
    Family(
        "pto-wrapper",
        ("ScheduleFreeWrapper",),
        library="pytorch_optimizer",
        layout="pytorch_optimizer-wrapper",
        beta_key=None,
        step_key="step",
        state_has=_F({"z"}),
        note="β (the wrapper's momentum) is not saved: pass --beta; the groups' own momentum/betas belong to the "
        "base optimizer and are not β. The mode is saved",
    ),
    Family(
        "heavyball-sfadamw",
        ("SFAdamW",),
        library="heavyball",
        layout="heavyball",
        x_in_float32=True,
        mode_default=True,
        step_key="step_count",
        beta_first_key="beta",  # heavyball's get_beta1 prefers a group's 'beta' to betas[0]
        refuse_when_set=(("param_ecc", "the parameters are stored in low precision with an error-correction term "
                          "kept in the optimizer state ('param::ecc'), and eval() works on their sum"),),
        group_has=_F({"betas"}),
        state_has=_F({"z"}),
        note="heavyball's eval() rounds bfloat16 parameters stochastically; for them sfckpt's x (rounded to nearest) "
        "matches only up to that rounding. float32 parameters match bit for bit",
    ),
    Family(
        "optax-sf",
        ("schedule_free", "schedule_free_adamw", "schedule_free_sgd", "rollfast schedule_free"),
        library="optax",
        beta_key="b1",
        beta_dtype_key="b1_dtype",
        mode_key=None,
        params_without_mode="y",
        step_key="step_count",
        group_has=_F({"b1", "b1_dtype", "schedule_free_state"}),
        state_has=_F({"z"}),
        note="optax.contrib's (or rollfast's) ScheduleFreeState, read from an Orbax checkpoint: parameters always hold "
        "y, and x is schedule_free_eval_params' (y - (1 - b1)·z)/b1 with the stored b1 (optax casts it to the lowest "
        "parameter dtype; rollfast keeps its annealed b1 in float32)",
    ),
    Family(
        "prodigy-plus-sf",
        ("ProdigyPlusScheduleFree",),
        library="prodigy-plus-schedule-free",
        switch_key="use_schedulefree",
        group_has=_F({"use_schedulefree", "schedulefree_c", "betas", "train_mode", "k", "d0"}),
        state_has=_F({"z"}),
        note="eval() is p.lerp_(z, 1 - 1/betas[0]) in the parameter's dtype (no stochastic rounding there), and "
        "schedulefree_c only changes the training-time averaging; groups with use_schedulefree=False are left as saved",
    ),
    Family(
        "keras-sfadamw",
        ("ScheduleFreeAdamW",),
        library="keras",
        layout="standard",
        x_source="keras",
        beta_key="beta_1",
        mode_key=None,
        params_without_mode="y",  # no eval(): the model's variables hold y whenever Keras saves them
        step_key="iterations",
        group_has=_F({"keras_optimizer"}),
        state_has=_F({"z", "velocity"}),
        note="x = (y - (1 - beta_1) * momentum) / beta_1 with Keras' ops in the variable's dtype, as its update_step "
        "recovers x; bit for bit with the torch backend on CPU",
    ),
)

BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class Lookalike:
    """An optimizer whose saved state resembles a Schedule-Free one but has no x to reconstruct."""

    classes: tuple[str, ...]
    library: str
    why: str
    layout: str = "standard"
    group_has: frozenset[str] = field(default_factory=frozenset)
    state_has: frozenset[str] = field(default_factory=frozenset)

    def matches(self, layout: str, group_keys: set[str], state_keys: set[str]) -> bool:
        return layout == self.layout and self.group_has <= group_keys and self.state_has <= state_keys


LOOKALIKES: tuple[Lookalike, ...] = (
    Lookalike(
        ("DAdaptSGD",),
        "pytorch_optimizer",
        "its z is D-Adaptation's dual average; every step already moves the parameters to the averaged point, "
        "and it has no eval() to call",
        group_has=_F({"momentum", "growth_rate", "d"}),
        state_has=_F({"z", "s", "x0"}),
    ),
    Lookalike(
        ("FTRL",),
        "pytorch_optimizer",
        "its z is FTRL-Proximal's accumulator, and the parameters are the weights",
        group_has=_F({"lambda_1", "lambda_2", "lr_power"}),
        state_has=_F({"z", "n"}),
    ),
    Lookalike(
        ("SPlus",),
        "pytorch_optimizer",
        "its eval() swaps in an exponential moving average (state 'ema', divided by 1 - ema_rate**step), "
        "not Schedule-Free's lerp towards z",
        group_has=_F({"train_mode", "ema_rate"}),
        state_has=_F({"ema"}),
    ),
    Lookalike(
        ("MSAMLaProp",),
        "heavyball",
        "it is Momentum-SAM: its eval() swaps the parameters with the state 'update_by_msam_z', "
        "not Schedule-Free's lerp towards z",
        layout="heavyball",
        state_has=_F({"msam_z"}),
    ),
)


def get(name: str) -> Family:
    try:
        return BY_NAME[name]
    except KeyError:
        raise OptionConflict(f"unknown optimizer family '{name}'", f"choose one of: {', '.join(BY_NAME)}",
                             option="optimizer") from None


def detect(groups: list[Mapping[str, Any]], state_keys: set[str], layout: str = "standard") -> Family:
    """The family whose saved keys these are, or an InputError saying what was found."""
    group_keys = set().union(*(set(g) for g in groups)) if groups else set()
    found = [f for f in FAMILIES if f.layout == layout and f.matches(group_keys, state_keys)]
    if len(found) == 1:
        found[0].check_groups(groups)
        return found[0]
    seen = f"group keys {sorted(group_keys - {'params', 'param_names'}, key=str)}, state keys {sorted(state_keys, key=str)}"
    if not found:
        _refuse_if_not_schedule_free(groups, group_keys, state_keys, layout)
    if not found and "z" not in state_keys:
        plain_optimizers.refuse(groups, state_keys)
        raise NotScheduleFree(
            f"the optimizer state holds no Schedule-Free z ({seen})",
            "this is not a Schedule-Free checkpoint, or no step was taken; there is no x to reconstruct",
        )
    if not found:
        raise InputError(
            f"the optimizer state has a z but matches no known Schedule-Free family ({seen})",
            "pass " + Opt("optimizer", usage=True) + ", " + Opt("beta") + " and " + Opt("params_are", usage=True)
            + " to say how it was trained",
        )
    raise InputError(
        f"the optimizer state matches several families ({', '.join(f.name for f in found)})",
        "pass " + Opt("optimizer", usage=True),
    )


def _refuse_if_not_schedule_free(groups, group_keys: set[str], state_keys: set[str], layout: str) -> None:
    """Name the optimizer when the checkpoint is a known non-Schedule-Free one, instead of a generic refusal."""
    for f in FAMILIES:
        if (f.switch_key and f.layout == layout and groups and f.group_has <= group_keys
                and not any(g.get(f.switch_key) for g in groups)):
            raise NotScheduleFree(
                f"{f.classes[0]} ({f.library}) was run with {f.switch_key}=False: that is not Schedule-Free, "
                "so there is no x to reconstruct",
                "its parameters already are the trained weights: release them as saved",
            )
    for look in LOOKALIKES:
        if look.matches(layout, group_keys, state_keys):
            raise NotScheduleFree(
                f"this looks like {look.library} {', '.join(look.classes)}, which is not Schedule-Free: {look.why}",
                "sfckpt only reconstructs Schedule-Free x; release the weights the way that optimizer's documentation says",
            )


def keras_x(y, z, beta: float):
    """x as Keras 3's ScheduleFreeAdamW.update_step recovers it on the torch backend: β cast to the
    variable's dtype (`ops.cast`), then `divide(subtract(y, multiply(1 - β, z)), β)`, each one torch op on
    a 0-d tensor and the variable, which is not a lerp and differs from one in the last bit. Other
    backends (XLA may turn the division into a multiplication by the reciprocal) can differ there too."""
    import torch

    b = torch.as_tensor(beta, dtype=y.dtype)
    return torch.divide(torch.subtract(y, torch.multiply(1 - b, z)), b)


def as_float(value: Any) -> float | None:
    """A saved hyper-parameter as a float; None for what is not a number, or an integer no float holds
    (SFCKPT_MAX_INT_BITS raised past 1023 lets wider ones load)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def check_beta(beta: Any, where: Words) -> float:
    """β as a float in (0, 1), or an InputError naming where it came from (a saved key, or the option)."""
    at = where if isinstance(where, str) else None
    wrong = "Schedule-Free needs 0 < β < 1; pass " + Opt("beta") + " if the saved value is wrong"
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise InputError(where + f": β is {beta!r}, not a number", "pass " + Opt("beta") + " to give it", where=at)
    if as_float(beta) is None:
        raise InputError(where + f": β is an integer of {beta.bit_length()} bits, outside (0, 1)", wrong, where=at)
    beta = float(beta)
    if not math.isfinite(beta) or not 0.0 < beta < 1.0:
        raise InputError(where + f": β = {beta} is outside (0, 1)", wrong, where=at)
    return beta
