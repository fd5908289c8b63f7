"""`reconstruct()`: decide, per output tensor, how its x is obtained — then compute it lazily.

The plan is made from metadata alone (families, β, modes, the parameter
mapping), so `inspect` reports it without reading tensor data and `convert`
computes one tensor at a time, reading only y and z (or the stored x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from . import content, families, mapping, optax_eval, optimizer_state, pipeline
from .checkpoint import Checkpoint
from .conventions import BN_STATISTICS, OUTPUT_DTYPES
from .errors import (DamagedInput, InputError, MappingUndecided, NotScheduleFree, Opt, OptionConflict, Text, Words,
                     api_words)
from .options import Options, resolve
from .param_order import said_of_the_model, with_model_order
from .readers.base import ParameterOrder
from .tensors import DTYPES, TensorRef, nbytes_of, torch_dtype


def bn_layer(name: str) -> str:
    """The layer a statistics buffer belongs to (`bn.running_mean` -> `bn`; Keras' `layers/bn/vars/2` ->
    `layers/bn`): warnings and `check` count BatchNorm in layers, so that both say the same number."""
    return name.rsplit("/vars/", 1)[0] if "/vars/" in name else name.rsplit(".", 1)[0] if "." in name else ""


LERP_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "complex64", "complex128"})


@dataclass
class GroupReport:
    """One optimizer parameter group, as inspect shows it."""

    index: int
    beta: float | None
    beta_source: str
    train_mode: Any
    params_hold: str
    params_hold_source: str
    lr: Any
    weight_decay: Any
    warmup_steps: Any
    step: Any
    weight_sum: Any
    n_params: int
    n_with_z: int
    optimizer: str = ""


@dataclass
class OptimizerReport:
    """One optimizer state used for x: where it was found and which family wrote it."""

    key: str
    family: families.Family
    family_source: str
    n_entries: int


@dataclass
class OutputTensor:
    """One tensor of the output and how to get its x.

    how: "lerp" (x = torch.lerp(y, z, 1 - 1/β), as the optimizer's eval()),
    "keras" (Keras' recovery formula, `families.keras_x`), "state-x" (x stored in the
    optimizer state), or "copy" (unchanged).
    """

    name: str
    ref: TensorRef
    how: str = "copy"
    z: TensorRef | None = None
    x: TensorRef | None = None
    beta: float | None = None
    group: int | None = None
    out_dtype: str | None = None
    value: Any = None  # a tensor computed elsewhere (re-estimated BatchNorm statistics)
    in_float32: bool = False  # lerp in float32 and cast back, as heavyball's eval() does
    beta_dtype: str | None = None  # set: optax's (y − (1 − β)·z)/β with β stored in this dtype, not a lerp
    check: Any = None  # content_blocks.PartCheck: refuses y and z that are unrelated in part, as x is computed

    @property
    def dtype(self) -> str:
        return self.out_dtype or self.ref.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ref.shape

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def compute(self):
        """x for this tensor, in its own dtype (or --dtype), contiguous."""
        import torch

        if self.how in ("lerp", "keras") and self.beta is None and self.value is None:
            raise InputError(f"β for '{self.name}' is not saved in the checkpoint", "pass " + Opt("beta", usage=True),
                             where=self.name)
        if self.value is not None:
            t = self.value
        elif self.how in ("lerp", "keras"):
            t = self._from_pair()
        elif self.how == "state-x":
            t = self.x.load()
        else:
            t = self.ref.load()
        if self.out_dtype and self.out_dtype != self.ref.dtype:
            t = t.to(getattr(torch, self.out_dtype))
        return t.contiguous()

    def _from_pair(self):
        """x from y and z by the family's formula. Every formula's pair passes `check` (the content test on
        all of its data) before x is returned: the streaming lerp slice by slice, the others here, once, so
        a family with a formula of its own inherits it."""
        import torch

        if self.how == "lerp" and self.beta_dtype is None and not self.in_float32:
            # Exactly what the optimizer's eval() does: p.lerp_(end=z, weight=1 - 1/β).
            return _lerp(self.ref, self.z, 1 - 1 / self.beta, self.check)
        y, z = self.ref.load(), self.z.load()
        if self.check is not None:
            self.check(y, z)
        if self.how == "keras":
            return families.keras_x(y, z, self.beta)
        if self.beta_dtype is not None:
            return optax_eval.eval_params(y, z, self.beta, self.beta_dtype)
        return torch.lerp(y.float(), z.float(), 1 - 1 / self.beta).to(y.dtype)  # heavyball's float32 eval()


# Elements per slice: a multiple of every vector width, so that slices compute the bits one call would.
_SLICE = 1 << 18


def _lerp(y: TensorRef, z: TensorRef, weight: float, check=None):
    """torch.lerp(y, z, weight), reading y and z a slice at a time where their files allow it: only x
    is held whole (tensor data is read into memory, not mapped, so y and z would each be a copy).
    `check` (content_blocks.PartCheck) sees every slice, and refuses a pair unrelated in part before x is returned."""
    import torch

    if y.reader is None or z.reader is None or y.dtype != z.dtype or y.shape != z.shape:
        whole_y, whole_z = y.load(), z.load()
        if check is not None:
            check(whole_y, whole_z)
        return torch.lerp(whole_y, whole_z, weight)
    dtype = torch_dtype(y.dtype)
    # The slice buffers before x: x freed then leaves no hole below them that the allocator keeps
    # (measured: a tensor's size more peak memory the other way round).
    parts = pipeline.slices(y, z, _SLICE)
    try:
        x = torch.empty(y.shape, dtype=dtype)
    except (RuntimeError, MemoryError):
        raise InputError(f"a tensor of shape {y.shape} ({y.nbytes} bytes) does not fit in memory",
                         "the checkpoint is damaged or crafted, or this machine has too little memory for it") from None
    flat = x.view(-1)
    blocks = check.blocks(y.shape) if check is not None else None
    for start, n, y_part, z_part in parts:  # the next slice is read while this one is computed
        if blocks is not None:
            blocks.add(y_part, z_part, start)
        torch.lerp(y_part, z_part, weight, out=flat[start:start + n])
    if blocks is not None:
        blocks.verify()
    return x


@dataclass
class Reconstruction:
    """How x is made from a checkpoint: what `inspect` shows and `convert` writes."""

    checkpoint: Checkpoint
    family: families.Family
    family_source: str
    groups: list[GroupReport]
    tensors: list[OutputTensor]
    mapping_method: str
    n_entries: int
    warnings: list[Words] = field(default_factory=list)  # text and Opt words (errors.Text)
    bn_calibrated: bool = False
    mapping: mapping.ParameterMapping | None = None
    optimizers: list[OptimizerReport] = field(default_factory=list)
    undecided: MappingUndecided | None = None  # why x cannot be made (inspect describes such checkpoints)

    def replace(self, name: str, tensor) -> None:
        """Use `tensor` for `name` (same shape) instead of the checkpoint's value."""
        out = next(t for t in self.tensors if t.name == name)
        if tuple(tensor.shape) != out.shape:
            raise InputError(f"new value for '{name}' has shape {tuple(tensor.shape)}, not {out.shape}", "")
        out.how, out.value = "replaced", tensor

    @property
    def source_held(self) -> str:
        held = {g.params_hold for g in self.groups if g.n_with_z}
        return held.pop() if len(held) == 1 else ("mixed" if held else "x")

    @property
    def batchnorm_warning(self) -> Words | None:
        """Why BatchNorm statistics need re-estimating, or None when they do not."""
        bn = self.batchnorm_buffers
        if not bn or self.source_held == "x" or self.bn_calibrated:
            return None
        how = ("in Keras after loading x (call the model with training=True on a few batches, optimizer untouched)"
               if self.checkpoint.accumulated
               else "(convert with " + Opt("bn_calib", usage=True) + " and " + Opt("bn_model", usage=True) + ")")
        # counted in layers, as `check` counts them: "buffers" meant 2 here and 3 there (num_batches_tracked)
        layers = len({bn_layer(n) for n in bn})
        return (f"the BatchNorm statistics of {layers} layer{'s' if layers != 1 else ''} were gathered at y, not x; "
                "re-estimate them on data " + how + " before trusting accuracy")

    def all_warnings(self, spell: Callable[[Opt], str] = api_words) -> list[str]:
        """Every warning of the plan, with the options it names spelled by `spell` (keyword arguments;
        the CLI passes its flags)."""
        found = self.warnings + ([self.batchnorm_warning] if self.batchnorm_warning else [])
        return list(dict.fromkeys(Text.of(w).spelled(spell) for w in found))

    @property
    def n_converted(self) -> int:
        return sum(t.how in ("lerp", "keras", "state-x") for t in self.tensors)

    @property
    def batchnorm_buffers(self) -> list[str]:
        return [t.name for t in self.tensors
                if t.name.rsplit(".", 1)[-1] in BN_STATISTICS or t.name in self.checkpoint.accumulated]

    def metadata(self) -> dict[str, str]:
        """safetensors metadata: strings only, no timestamps (same input, same bytes)."""
        from . import __version__

        steps = sorted({str(g.step) for g in self.groups if g.step is not None})
        bn = {"sfckpt_batchnorm": "re-estimated at x" if self.bn_calibrated else "as saved (gathered at y)"} \
            if self.batchnorm_buffers and self.source_held != "x" else {}
        return {
            "format": "pt",
            "sfckpt_version": __version__,
            "sfckpt_optimizer_family": ",".join(dict.fromkeys(o.family.name for o in self.optimizers)) or self.family.name,
            "sfckpt_beta": ",".join("none" if g.beta is None else repr(g.beta) for g in self.groups),
            "sfckpt_step": ",".join(steps) if steps else "unknown",
            "sfckpt_source_params": self.source_held,
            # A file name need not be UTF-8; metadata must be.
            "sfckpt_source": self.checkpoint.path.name.encode("utf-8", "backslashreplace").decode("utf-8"),
            **bn,
        }

    def iter_tensors(self) -> Iterator[tuple[str, Any]]:
        """(name, x) pairs, computed one at a time."""
        if self.undecided is not None:
            raise self.undecided
        for t in self.tensors:
            yield t.name, t.compute()

    def state_dict(self) -> dict[str, Any]:
        """All of x in memory: handy for small models and tests."""
        return dict(self.iter_tensors())


@dataclass
class FoundOptimizer:
    """A Schedule-Free optimizer state of the checkpoint: its key, family and entries."""

    key: str
    family: families.Family
    source: str  # how the family was chosen: "detected" or "--optimizer"
    state: Mapping[str, Any]  # in the standard layout (see optimizer_state.normalize)
    entries: list[mapping.Entry]


@dataclass
class _Plan:
    """What the optimizer states say, group by group: the reports, and the tensors whose x they give."""

    groups: list[GroupReport] = field(default_factory=list)
    optimizers: list[OptimizerReport] = field(default_factory=list)
    converted: dict[str, OutputTensor] = field(default_factory=dict)
    warnings: list[Words] = field(default_factory=list)


def _beta_for(family: families.Family, group: Mapping[str, Any], g: int, beta_override: float | None) -> tuple[float, str]:
    """The β a group's x needs and where it came from; refused when there is none."""
    if beta_override is not None:
        return families.check_beta(beta_override, Opt("beta")), "--beta"
    if family.beta_key is None:
        raise InputError(
            f"{family.classes[0]} does not save β: it is the wrapper's momentum= argument, and the groups' own "
            "momentum/betas belong to the base optimizer",
            "pass " + Opt("beta", usage=True) + " with the momentum you gave the wrapper (its default is 0.9)",
        )
    key = f"{family.beta_key}[0]" if family.beta_key == "betas" else family.beta_key
    return families.check_beta(family.beta(group), f"optimizer param_groups[{g}] {key}"), "saved"


def strip_prefix_used(ckpt: Checkpoint) -> bool:
    """True when the weights were renamed (--strip-prefix), so the file's other models cannot be pooled."""
    return any(name not in ckpt.pool_weights for name in ckpt.weights)


def _check_options(ckpt: Checkpoint, opts: Options) -> None:
    """Refuse what no plan can come from: no optimizer state, or an option value outside its choices."""
    if not ckpt.optimizers:
        raise NotScheduleFree(
            f"{ckpt.path}: no optimizer state found (keys: {', '.join(ckpt.top_level_keys[:12])})",
            "x needs the optimizer's z; pass the training checkpoint that includes the optimizer state_dict, "
            "or " + Opt("optimizer_key") + " to name the entry",
            where=str(ckpt.path),
        )
    if opts.params_are not in (None, "x", "y"):
        raise OptionConflict(Opt("params_are") + f" must be 'y' or 'x', not {opts.params_are!r}",
                             "leave it out to use the saved mode flag", option="params_are")
    if opts.dtype is not None and opts.dtype not in OUTPUT_DTYPES:
        raise OptionConflict(Opt("dtype", opts.dtype) + " is not a floating dtype sfckpt writes",
                             f"use {', '.join(OUTPUT_DTYPES[:-1])} or {OUTPUT_DTYPES[-1]}", option="dtype")
    if opts.twins not in ("auto", "tied", "frozen"):
        raise OptionConflict(Opt("twins") + f" must be 'auto', 'tied' or 'frozen', not {opts.twins!r}",
                             "see docs/mapping.md", option="twins")


def _family_of(optimizer: str | None, groups_saved: list, state_keys: set, layout: str) -> tuple[families.Family, str]:
    """The family of one optimizer state: the one `optimizer` names, if it fits the state, or the detected one."""
    if optimizer is None:
        return families.detect(groups_saved, state_keys, layout), "detected"
    family = families.get(optimizer)
    group_keys = set().union(*(set(g) for g in groups_saved)) if groups_saved else set()
    # A forced family must fit the state, but a missing β alone is a β problem (--beta), unless
    # the groups hold another family's β key instead (AdamW's betas under --optimizer sgd).
    beta_keys = {"betas", "momentum"} - {family.beta_key}
    only_beta_missing = (family.group_has - group_keys) <= {family.beta_key} and not (beta_keys & group_keys) \
        and family.matches(group_keys | {family.beta_key}, state_keys)
    if family.layout == layout and not family.matches(group_keys, state_keys) and not only_beta_missing:
        try:
            detected = families.detect(groups_saved, state_keys, layout).name
        except InputError:
            detected = "none of the known families"
        raise OptionConflict(
            Opt("optimizer", optimizer) + f" does not match the optimizer state (detected: {detected}; "
            f"group keys {sorted(group_keys - {'params', 'param_names'}, key=str)[:8]})",
            "leave " + Opt("optimizer") + " out to use the detected family",
            option="optimizer",
        )
    family.check_groups(groups_saved)
    return family, "--optimizer"


def _families(ckpt: Checkpoint, optimizer: str | None) -> tuple[list[FoundOptimizer], list[str]]:
    """Each Schedule-Free optimizer state in the checkpoint, and warnings for those left out.

    With several optimizer states, one that holds no z (not Schedule-Free, or never stepped) is left
    out with a warning: its parameters are copied as saved, which is their x."""
    found, skipped = [], []
    for key, raw in ckpt.optimizers.items():
        layout, opt_state = optimizer_state.normalize(raw)
        entries = mapping.entries_of(opt_state, key if len(ckpt.optimizers) > 1 else "")
        if ckpt.strip_prefix:
            for e in entries:
                if e.saved_name is not None and e.saved_name.startswith(ckpt.strip_prefix):
                    e.saved_name = e.saved_name[len(ckpt.strip_prefix):]
        groups_saved = list(opt_state["param_groups"])
        state_keys = set().union(*(set(e.state) for e in entries)) if entries else set()
        if len(ckpt.optimizers) > 1 and optimizer is None and "z" not in state_keys and layout != optimizer_state.HEAVYBALL:
            skipped.append(f"optimizer state '{key}' holds no Schedule-Free z; its parameters are copied as saved")
            continue
        family, source = _family_of(optimizer, groups_saved, state_keys, layout)
        found.append(FoundOptimizer(key, family, source, opt_state, entries))
    if not found:
        raise NotScheduleFree(f"{ckpt.path}: none of the optimizer states ({', '.join(ckpt.optimizers)}) holds a Schedule-Free z",
                              "this is not a Schedule-Free checkpoint, or no step was taken; there is no x to reconstruct",
                              where=str(ckpt.path))
    return found, skipped


def _decide_mapping(ckpt: Checkpoint, found: list[FoundOptimizer],
                    opts: Options) -> tuple[mapping.ParameterMapping, MappingUndecided | None]:
    """Which tensor each optimizer entry trains, and None; with `opts.undecided_ok`, a mapping that names no
    entry and why, where names, content and order leave it open (inspect describes the rest)."""
    try:
        return _mapping_of(ckpt, found, opts), None
    except mapping.Undecided as exc:
        if not opts.undecided_ok:
            raise
        return _undecided_mapping(found, exc), exc


def _mapping_of(ckpt: Checkpoint, found: list[FoundOptimizer], opts: Options) -> mapping.ParameterMapping:
    """Which tensor each optimizer entry trains (mapping.decide), falling back to the file's other
    models when the optimizer also trains them. An order the container rebuilds with transformers
    (Trainer, PEFT) is rebuilt only where the mapping needs it: seconds of imports otherwise."""
    order = ckpt.order or ParameterOrder()
    sampler = content.Sampler()  # each sample read once, whichever passes run
    if order.rebuild is None or opts.param_order is not None:
        return _mapping_with(ckpt, found, opts, order, sampler)
    if opts.undecided_ok:  # inspect: what the file shows, and the rest left to convert's order
        failed = order.checked()
        if failed is not None:  # the rebuild would fail: decide as convert then does, without the order
            return _mapping_with(ckpt, found, opts, failed, sampler)
        return _mapping_with(ckpt, found, opts, ParameterOrder(), sampler, deferred=order.source)
    try:
        decision = _mapping_with(ckpt, found, opts, ParameterOrder(), sampler, deferred=order.source)
    except InputError:
        decision = None
    # Names and content placed every entry, and nothing listed follows the model's order: the order
    # would change nothing. Otherwise decide again with it, as if it had been there from the start.
    if decision is not None and not (decision.untrained or decision.twins or decision.twin_refusal
                                     or decision.misfits or decision.warnings or decision.ignored_optimizers):
        return decision
    return _mapping_with(ckpt, found, opts, order.resolved(), sampler)


def _mapping_with(ckpt: Checkpoint, found: list[FoundOptimizer], opts: Options, order: ParameterOrder,
                  sampler: content.Sampler, deferred: str = "") -> mapping.ParameterMapping:
    """`_mapping_of` with this container order (or none, and `deferred` saying how it would be rebuilt)."""

    def decide(weights: Mapping[str, TensorRef]) -> mapping.ParameterMapping:
        return mapping.decide(
            # z may differ in dtype where eval() converts it (heavyball's float32 lerp, JAX's promotion)
            [mapping.OptimizerEntries(f.key, f.entries, f.family.z_key,
                                      not (f.family.x_in_float32 or f.family.beta_dtype_key)) for f in found],
            weights,
            param_order=opts.param_order,
            model_order=order.names if opts.param_order is None else None,
            group_domains=order.group_domains if opts.param_order is None else None,
            container_order_name=order.source if order.names else "",
            ties_visible=ckpt.ties_visible,
            twins=opts.twins,
            order_deferred=deferred,
            sampler=sampler,
        )

    try:
        try:
            return decide(ckpt.weights)
        except InputError as exc:
            if order.missing is not None and opts.param_order is None:
                # the order that would have decided is what is missing: said, not described (inspect refuses too)
                raise MappingUndecided(order.missing, order.missing_hint) from exc
            raise
    except mapping.NotInWeights:
        if not ckpt.pool_weights or strip_prefix_used(ckpt):
            raise
    # The optimizer also trains the file's other models (one optimizer over a U-Net and a text
    # encoder, --model-key picking one): match against all of them, write the chosen one.
    decision = decide(ckpt.pool_weights)
    elsewhere = sorted({e.name.split(".", 1)[0] for e in decision.entries
                        if e.name is not None and e.name not in ckpt.weights})
    decision.untrained = [n for n in decision.untrained if n in ckpt.weights]
    decision.warnings.append(f"the optimizer also trains tensors of {', '.join(elsewhere)} in this file, "
                             "which are not written (" + Opt("model_key", elsewhere[0]) + " converts them)")
    return decision


def _params_hold(family: families.Family, group: Mapping[str, Any], stepped: list, opts: Options,
                 warnings: list[Words]) -> tuple[str, str]:
    """What a group's parameters hold ("y", "x" or "unknown") and how that is known."""
    hold, source = family.params_hold(group), "saved mode flag" if family.mode_key else "family"
    if opts.params_are is not None:
        return opts.params_are, "--params-are"
    if hold == "unknown" and stepped:
        if family.x_source != "state-x":
            warnings.append(
                f"{family.classes[0]} does not save whether it was in train or eval mode; assuming the parameters "
                "hold y (saved during training). Pass " + Opt("params_are", "x")
                + " if the checkpoint was saved after optimizer.eval()"
            )
        return "y", "assumed"
    return hold, source


def _group_beta(family: families.Family, group: Mapping[str, Any], g: int, hold: str, stepped: list,
                opts: Options) -> tuple[float | None, str]:
    """A group's β and where it came from; required only where x is a lerp of y."""
    needs_beta = hold == "y" and stepped and family.x_source in ("lerp", "keras")
    if needs_beta and not opts.require_beta and opts.beta is None and family.beta_key is None:
        return None, "unknown: pass --beta"
    if needs_beta:
        return _beta_for(family, group, g, opts.beta)
    group_beta = families.as_float(family.beta(group) if opts.beta is None else opts.beta)
    return group_beta, "--beta" if opts.beta is not None else ("saved" if group_beta is not None else "not saved")


def _group_report(found: FoundOptimizer, g: int, group: Mapping[str, Any], members: list, stepped: list,
                  opts: Options, warnings: list[Words], several: bool) -> GroupReport:
    """One parameter group as inspect shows it: what its parameters hold, its β, its hyper-parameters."""
    family = found.family
    hold, hold_source = _params_hold(family, group, stepped, opts, warnings)
    group_beta, beta_source = _group_beta(family, group, g, hold, stepped, opts)
    return GroupReport(
        index=g,
        beta=group_beta,
        beta_source=beta_source,
        train_mode=group.get(family.mode_key) if family.mode_key else None,
        params_hold=hold,
        params_hold_source=hold_source,
        lr=group.get("lr"),
        weight_decay=group.get("weight_decay"),
        warmup_steps=group.get("warmup_steps"),
        step=group.get(family.step_key),
        weight_sum=group.get("weight_sum"),
        n_params=len(members),
        n_with_z=len(stepped),
        optimizer=found.key if several else "",
    )


def _converted_tensor(ckpt: Checkpoint, family: families.Family, e: mapping.Entry, group: GroupReport,
                      decision: mapping.ParameterMapping) -> OutputTensor | None:
    """How the x of the tensor a stepped entry trains is made (None for another model's tensor)."""
    if e.name not in ckpt.weights:
        return None  # another model's tensor (see _decide_mapping)
    if id(e) in decision.misfits:
        raise decision.misfits[id(e)]
    ref = ckpt.weights[e.name]
    if family.x_source == "lerp" and ref.dtype not in LERP_DTYPES:
        raise InputError(
            f"parameter '{e.name}' is {ref.dtype} and has a z, but torch.lerp (what "
            "optimizer.eval() computes) has no kernel for that dtype",
            "Schedule-Free optimizers train float32/bfloat16/float16/float64/complex parameters; the checkpoint "
            "was altered after training",
            where=e.name,
        )
    out = OutputTensor(e.name, ref, group=group.index)
    if family.x_source == "state-x":
        x = e.state.get("x")
        if not isinstance(x, TensorRef):
            raise DamagedInput(f"{e.label()} ('{e.name}') has z but no stored x", "the checkpoint is damaged",
                               where=e.name)
        out.how, out.x = "state-x", x
    else:
        out.how, out.z, out.beta = family.x_source, e.state[family.z_key], group.beta
        out.in_float32, out.check = family.x_in_float32, decision.part_check(e)
    return out


def _plan_groups(ckpt: Checkpoint, used: list[FoundOptimizer], decision: mapping.ParameterMapping,
                 opts: Options) -> _Plan:
    """Each optimizer's groups in order: a report per group, and the x of every tensor a group converts."""
    plan = _Plan()
    if ckpt.unloaded_classes:
        plan.warnings.append("skipped objects of these classes (never imported or run): " + ", ".join(ckpt.unloaded_classes))
    for found in used:
        plan.optimizers.append(OptimizerReport(found.key, found.family, found.source, len(found.entries)))
        by_group: dict[int, list[mapping.Entry]] = {}
        for e in found.entries:
            by_group.setdefault(e.group, []).append(e)
        for g, group in enumerate(found.state["param_groups"]):
            members = by_group.get(g, [])
            stepped = [e for e in members if isinstance(e.state.get(found.family.z_key), TensorRef)]
            report = _group_report(found, g, group, members, stepped, opts, plan.warnings, len(ckpt.optimizers) > 1)
            plan.groups.append(report)
            if report.params_hold != "y":
                continue
            for e in stepped:
                out = _converted_tensor(ckpt, found.family, e, report, decision)
                if out is not None and found.family.beta_dtype_key:  # optax stores β in the parameters' dtype
                    out.beta_dtype = group.get(found.family.beta_dtype_key)
                if out is not None:
                    plan.converted[e.name] = out
    return plan


def _refuse_overlapping_views(trained: Mapping[str, TensorRef]) -> None:
    """Two trained parameters that are different views of the same bytes (`nn.Parameter(w.t())` beside
    `w`): eval() moves that storage once per parameter, in the optimizer's order, each time from what
    the other left, which converting each tensor on its own does not reproduce. The same view twice
    is a tie (one parameter); views over separate parts of one buffer (fused q/k/v) are independent."""
    spans: dict[Any, list[tuple[int, int, str, tuple]]] = {}
    for name, ref in trained.items():
        if ref.storage_id is None or len(ref.view) != 3 or not all(ref.shape):
            continue
        offset, stride, shape = ref.view
        last = offset + sum((n - 1) * st for n, st in zip(shape, stride))
        spans.setdefault(ref.storage_id, []).append((offset, last, name, ref.view))
    for items in spans.values():
        items.sort()
        reach = None  # the view seen so far that reaches furthest
        for lo2, hi2, name2, view2 in items:
            if reach is not None and lo2 <= reach[0] and view2 != reach[2]:
                name = reach[1]
                raise InputError(f"trained parameters '{name}' and '{name2}' are different views of the same data "
                                 "(one is, for instance, a transpose of the other): eval() updates those bytes once "
                                 "per parameter, in optimizer order, which sfckpt does not reproduce",
                                 "save the model after optimizer.eval() and copy it, or make the tie one parameter")
            if reach is None or hi2 > reach[0]:
                reach = (hi2, name2, view2)


def _output_tensors(ckpt: Checkpoint, decision: mapping.ParameterMapping, converted: dict[str, OutputTensor],
                    dtype: str | None) -> list[OutputTensor]:
    """Every tensor of the output in the checkpoint's order: converted, a twin of a converted one, or copied;
    each in the dtype it is written in."""
    trained = {e.name for e in decision.entries if e.name is not None}
    trained_keys = {ckpt.weights[t].data_key for t in trained if t in ckpt.weights} - {None}
    trained |= set(decision.twins) | {n for n, r in ckpt.weights.items() if r.data_key in trained_keys}
    by_data = {o.ref.data_key: o for o in converted.values() if o.ref.data_key is not None}
    tensors: list[OutputTensor] = []
    for name, ref in ckpt.weights.items():
        if ref.dtype not in DTYPES:
            raise InputError(f"tensor '{name}' has dtype {ref.dtype}, which safetensors cannot hold",
                             "safetensors has no such type (it holds complex64, not complex128), so sfckpt cannot "
                             "write this model", where=name)
        out = converted.get(name)
        if out is None:
            # A tied duplicate gets the same x as the name the optimizer knows it by.
            twin = by_data.get(ref.data_key) if ref.data_key is not None else None
            if twin is None and name in decision.twins:
                twin = converted.get(decision.twins[name])
            out = OutputTensor(name, ref, twin.how, twin.z, twin.x, twin.beta, twin.group, in_float32=twin.in_float32,
                               beta_dtype=twin.beta_dtype, check=twin.check) \
                if twin else OutputTensor(name, ref)
        if dtype and ref.is_float:
            out.out_dtype = dtype
        elif ckpt.default_dtype and ref.is_float and name in trained:
            # The container's own dtype for what it keeps in higher precision (DeepSpeed's fp32 master
            # copy of 16-bit parameters); buffers keep theirs.
            out.out_dtype = ckpt.default_dtype
        tensors.append(out)
    return tensors


def reconstruct(
    ckpt: Checkpoint,
    *,
    optimizer: str | None = None,
    beta: float | None = None,
    params_are: str | None = None,
    param_order: Sequence[str] | None = None,
    dtype: str | None = None,
    twins: str = "auto",
    require_beta: bool = True,
    undecided_ok: bool = False,
    options: Options | None = None,
) -> Reconstruction:
    """Plan how to obtain x for every tensor of the checkpoint's model state.

    Args:
        ckpt: from `sfckpt.load`.
        optimizer: family name (see `sfckpt.families.FAMILIES`) to skip detection.
        beta: β to use instead of the saved one (required for ScheduleFreeWrapper).
        params_are: "y" or "x": what the saved parameters hold, overriding the mode flag.
        param_order: parameter names in optimizer order, overriding the mapping.
        dtype: write every floating tensor in this dtype (default: keep dtypes).
        twins: "auto", "tied" or "frozen": how tensors the optimizer does not train but that are
            byte-identical to one it trains are treated (auto: refused where the file cannot tell).
        require_beta: False to plan without a β the checkpoint does not hold (inspect shows it as
            unknown); computing x then raises.
        undecided_ok: True to describe a checkpoint whose entries names, content and order leave
            open (inspect): no tensor is then converted, and computing x raises why. A model order the
            container rebuilds with transformers (Trainer, PEFT) is not rebuilt then.
        options: an `sfckpt.Options` instead of the keywords above (its other fields are not used here,
            but for param_order_from and model_config, which fill param_order from the user's model).

    Returns:
        A `Reconstruction`; call `.state_dict()` or `sfckpt.save()` to get x.
    """
    opts = resolve(options, optimizer=optimizer, beta=beta, params_are=params_are, param_order=param_order,
                   dtype=dtype, twins=twins, require_beta=require_beta, undecided_ok=undecided_ok)
    _check_options(ckpt, opts)
    opts = with_model_order(opts, ckpt.path)
    found, skipped = _families(ckpt, opts.optimizer)
    with said_of_the_model(opts.param_order_from):
        decision, undecided = _decide_mapping(ckpt, found, opts)
        plan = _plan_groups(ckpt, [f for f in found if f.key not in decision.ignored_optimizers], decision, opts)
    if decision.twin_refusal is not None and decision.twin_sources & set(plan.converted):
        raise decision.twin_refusal
    _refuse_overlapping_views({n: ckpt.weights[n] for n, o in plan.converted.items()
                               if o.how in ("lerp", "keras") and n in ckpt.weights})
    tensors = _output_tensors(ckpt, decision, plan.converted, opts.dtype)
    warnings = list(dict.fromkeys(plan.warnings + skipped + decision.warnings))  # one per kind, not one per group
    first = plan.optimizers[0]
    return Reconstruction(ckpt, first.family, first.family_source, plan.groups, tensors, decision.method,
                          sum(r.n_entries for r in plan.optimizers), warnings, mapping=decision,
                          optimizers=plan.optimizers, undecided=undecided)


def _undecided_mapping(found: list[FoundOptimizer], why: mapping.Undecided) -> mapping.ParameterMapping:
    """A mapping that names no entry, for describing a checkpoint whose mapping is left open; with the
    evidence that decided part of it, where only an order inspect left unbuilt is missing."""
    entries = [e for f in found for e in f.entries]
    with_z = sum(1 for f in found for e in f.entries if e.z(f.family.z_key) is not None)
    if isinstance(why, mapping.OrderDeferred):
        return mapping.ParameterMapping(why.method, entries, why.counts, why.confirmed, with_z, [])
    return mapping.ParameterMapping("undecided (see the warning)", entries, {}, 0, with_z, [])
