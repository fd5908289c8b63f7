"""Which model tensor each optimizer entry belongs to, and how we know.

An optimizer `state_dict()` keys its state by position: entry i is the i-th
parameter handed to the optimizer, group after group, usually without names.
The order in which training code hands parameters over is often not the
model's (weight-decay groups interleave, heads come first, groups are built
per block), and real models are full of tensors with the same shape, so a
wrong order fits the shapes just as well. This module decides the mapping
from three kinds of evidence, in this order, and keeps the evidence:

1. Names: `--param-order`, or `param_names` saved by torch >= 2.6 named
   optimizers (and the names DCP and DeepSpeed store), or the order a
   container's own grouping rule rebuilds (Hugging Face Trainer).
2. Content (`content.py`): a parameter's own z lies next to its y. A pair told
   apart from every alternative with a margin is *confirmed*.
3. Order: tensors content cannot tell apart follow an order that every
   confirmed pair agrees with: the model's order within each group (how
   grouping code builds groups), the reverse of it, or name order. They are
   placed only where the shapes leave exactly one way to do so.

Names that content contradicts are not used, and every pair finally used,
however it was found, must fit by content (`_verify_content`): a z unrelated
to its tensor, or content that finds two tensors sharing z's history, is
refused. Byte-identical copies of trained tensors are ties or frozen copies
only as `--twins` says, except where ties are saved as copies (DCP). Where
the evidence leaves more than one possibility, or none, the answer is an
error that names the first tensors concerned and what to pass; never a
plausible guess.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from collections.abc import Set as AbstractSet
from typing import Any, Callable, Mapping, NoReturn, Sequence

from . import content, content_blocks, order_search
from .conventions import BN_BUFFERS
from .errors import InputError, MappingUndecided, Opt, OptionConflict, Words
from .layout import check_text
from .tensors import TensorRef, format_shape

SEARCH_BUDGET = 20_000  # search nodes when the order leaves choices open
ORDER_HINT = ("pass " + Opt("param_order", usage=True) + " with the parameter names in optimizer order, or "
              + Opt("param_order_from", usage=True) + " to take them from your model (docs/mapping.md)")


class NotInWeights(MappingUndecided):
    """Some optimizer entries belong to no tensor of these weights (they may be another model's)."""


class Undecided(MappingUndecided):
    """Names, content and order leave some entries' tensors open: x cannot be made, but the rest of
    the checkpoint (container, optimizer, β, step) can still be described."""


class OrderDeferred(Undecided):
    """Names and content leave look-alike entries that only the container's model order places, and
    that order was not rebuilt (inspect never imports transformers): what decided the rest is kept."""

    def __init__(self, message: Words, method: str, counts: dict[str, int], confirmed: int):
        super().__init__(message, "plan without undecided_ok (as convert does) to rebuild it, or pass "
                         + Opt("param_order", usage=True) + " to give it without transformers")
        self.method, self.counts, self.confirmed = method, counts, confirmed


class OrderFitsNothing(NotInWeights, Undecided):
    """No order that content agrees with places the entries content leaves open."""


@dataclass
class Entry:
    """One optimizer entry: where it sits in the optimizer, its state, and the tensor it belongs to."""

    optimizer: str
    index: Any
    group: int
    position: int
    state: Mapping[str, Any]
    saved_name: str | None = None
    name: str | None = None
    evidence: str = ""  # "names", "content", "order", "--param-order"

    def z(self, key: str) -> TensorRef | None:
        ref = self.state.get(key)
        return ref if isinstance(ref, TensorRef) else None

    def label(self) -> str:
        where = f"optimizer '{self.optimizer}' " if self.optimizer else "optimizer "
        return f"{where}entry {self.index} (group {self.group})"


def entries_of(optimizer: Mapping[str, Any], key: str = "") -> list[Entry]:
    """The optimizer's entries in saved order, checked for consistency."""
    groups = optimizer.get("param_groups")
    state = optimizer.get("state")
    if not isinstance(groups, (list, tuple)) or not isinstance(state, Mapping):
        raise InputError("the optimizer state_dict has no valid 'param_groups' list or 'state' dict", "the checkpoint is damaged")
    entries: list[Entry] = []
    seen: set[Any] = set()
    for g, group in enumerate(groups):
        params = group.get("params") if isinstance(group, Mapping) else None
        if not isinstance(params, (list, tuple)):
            raise InputError(f"optimizer param_groups[{g}] has no 'params' list", "the checkpoint is damaged")
        names = group.get("param_names")
        if names is None and params and all(isinstance(p, str) for p in params):
            names = params  # torch.distributed.checkpoint keys parameters by name
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params)
                                  or not all(isinstance(n, str) for n in names)):
            raise InputError(f"optimizer param_groups[{g}] has {len(names) if isinstance(names, (list, tuple)) else 'no'} "
                             f"param_names for {len(params)} params", "the checkpoint is damaged")
        for name in names or ():
            check_text(name, f"optimizer param_groups[{g}] parameter name")
        for pos, index in enumerate(params):
            try:
                duplicate = index in seen
            except TypeError:
                raise InputError(f"optimizer param_groups[{g}] lists a parameter id of type {type(index).__name__}",
                                 "the checkpoint is damaged") from None
            if duplicate:
                raise InputError(f"optimizer entry {index} is listed twice in param_groups", "the checkpoint is damaged")
            seen.add(index)
            entry_state = state.get(index, {})
            if not isinstance(entry_state, Mapping):
                raise InputError(f"optimizer state entry {index} is not a dict", "the checkpoint is damaged")
            entries.append(Entry(key, index, g, pos, entry_state, names[pos] if names is not None else None))
    orphans = [k for k in state if k not in seen]
    if orphans:
        raise InputError(f"optimizer state entry {orphans[0]} belongs to no parameter group", "the checkpoint is damaged")
    return entries


def candidate_parameters(weights: Mapping[str, TensorRef]) -> tuple[list[str], list[str]]:
    """Names that can be parameters (in order), and the names left out as buffers or tied duplicates."""
    candidates: list[str] = []
    left_out: list[str] = []
    seen: set = set()
    for name, ref in weights.items():
        tied = ref.data_key is not None and ref.data_key in seen
        if tied or not (ref.is_float or ref.is_complex) or name.rsplit(".", 1)[-1] in BN_BUFFERS:
            left_out.append(name)
        else:
            candidates.append(name)
            seen.add(ref.data_key)
    return candidates, left_out


@dataclass
class OptimizerEntries:
    """One optimizer's entries, and what its family says about them."""

    key: str
    entries: list[Entry]
    z_key: str = "z"
    same_dtype: bool = True

    def stateful(self) -> list[Entry]:
        return [e for e in self.entries if e.z(self.z_key) is not None]


@dataclass
class ParameterMapping:
    """The decision, and the evidence for it: what inspect, convert --json and errors print."""

    method: str
    entries: list[Entry]  # of the optimizers used
    evidence: dict[str, int]  # kind of evidence -> entries with z decided by it
    confirmed_by_content: int
    with_z: int
    untrained: list[str]  # float parameters no optimizer trains: copied unchanged
    twins: dict[str, str] = field(default_factory=dict)  # untracked copy -> tensor whose x it gets
    ignored_optimizers: dict[str, str] = field(default_factory=dict)
    warnings: list[Words] = field(default_factory=list)
    # id(entry) -> why content refuses its pair: raised when the pair is used to compute x (not where
    # the saved parameters already hold x and are copied, whatever z they are paired with)
    misfits: dict[int, InputError] = field(default_factory=dict)
    # why byte-identical copies of these trained tensors need --twins: raised when one of them is
    # converted (where they already hold x, tied and frozen copies are the same bytes)
    twin_refusal: InputError | None = None
    twin_sources: set[str] = field(default_factory=set)
    # id(entry) -> how closely the confirmed pairs of its group (else of the file) track: the reference
    # of the content test, applied again to every block of the pair's data as x is computed
    references: dict[int, content.RunScale] = field(default_factory=dict)
    # id(entry) -> its pair's ratio on the samples (see _sampled_ratios): how closely the pair tracks where
    # the pair test looked, which a part replaced in most of the tensor cannot lower
    sampled: dict[int, float] = field(default_factory=dict)

    def part_check(self, e: Entry) -> content_blocks.PartCheck:
        """The content test for every block and column group of e's pair, for the loop that computes x."""
        return content_blocks.PartCheck(e.name, e.label(), self.references.get(id(e), content.RunScale()),
                                        self.sampled.get(id(e)))

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "entries_with_z": self.with_z,
            "confirmed_by_content": self.confirmed_by_content,
            "evidence": dict(self.evidence),
            "untrained_parameters": list(self.untrained),
            "tied_copies": dict(self.twins),
            "ignored_optimizers": dict(self.ignored_optimizers),
        }


# ---------------------------------------------------------------------------------------------
# The decision


@dataclass
class _ContentEvidence:
    """What content says before names or an order are used."""

    anchors: dict[int, str]  # id(entry) -> the one tensor its z ties to with a margin
    possible: dict[int, AbstractSet[str]]  # id(entry) -> the tensors content does not rule out
    # shape -> (evidence, id(entry) -> row, name -> column): for checking the pairs finally used
    classes: dict[tuple, tuple[content.ClassEvidence, dict[int, int], dict[str, int]]]


@dataclass
class _Decision:
    """The decision as the steps build it: the optimizers used, their entries with a z, and per entry
    (by id) the tensor it belongs to and the kind of evidence for it."""

    used: list[OptimizerEntries]
    ignored: dict[str, str]  # optimizer key -> why its state belongs to other weights
    stateful: list[tuple[OptimizerEntries, Entry]] = field(init=False)
    decided: dict[int, str] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why saved names were not used
    order_name: str = ""  # how the entries names and content left open were placed

    def __post_init__(self) -> None:
        self.stateful = [(o, e) for o in self.used for e in o.stateful()]


def decide(
    optimizers: Sequence[OptimizerEntries],
    weights: Mapping[str, TensorRef],
    *,
    param_order: Sequence[str] | None = None,
    model_order: Sequence[str] | None = None,
    group_domains: Sequence[set[str]] | None = None,
    container_order_name: str = "",
    ties_visible: bool = True,
    twins: str = "auto",
    order_deferred: str = "",
    sampler: content.Sampler | None = None,
) -> ParameterMapping:
    """Name every optimizer entry that has a z; return the mapping and its evidence.

    Args:
        optimizers: the candidate optimizers' entries (several when a checkpoint holds several).
        weights: the model tensors (the output).
        param_order: names from the user, in optimizer order (one optimizer only).
        model_order: the model's parameter order when the weights file does not keep it.
        group_domains: per group, the names a container's grouping rule allows there.
        container_order_name: how that order was obtained, for the report.
        ties_visible: False where tied weights are saved as separate copies (DCP).
        twins: "auto", "tied" or "frozen": how untracked byte-identical copies are treated (auto:
            a copy of one tensor is its tie where ties are saved as copies; refused otherwise).
        order_deferred: how the container rebuilds the model's order where it was not rebuilt (inspect):
            entries names and content leave open then raise OrderDeferred instead of being placed.
        sampler: the samples read so far, where an earlier decision read them.
    """
    candidates = _ordered_candidates(weights, model_order)
    sampler = sampler or content.Sampler()
    every = [(o, e) for o in optimizers for e in o.stateful()]
    if len(optimizers) == 1:
        _require_shapes(every, weights, candidates)
    ev = _content_anchors(every, weights, candidates, sampler)
    d = _drop_foreign_optimizers(optimizers, ev.possible)
    _place_by_names(d, param_order, weights, candidates, ev)
    for o, e in d.stateful:
        if id(e) not in d.decided and id(e) in ev.anchors:
            d.decided[id(e)], d.kinds[id(e)] = ev.anchors[id(e)], "content"
    if any(id(e) not in d.decided for o, e in d.stateful):
        if order_deferred:
            _defer_order(d, ev, order_deferred)
        _place_rest_by_order(d, ev, weights, candidates, group_domains, container_order_name)
    used_names = _name_and_check_pairs(d, weights)
    misfits, references = _verify_content(d.stateful, ev.classes, d.order_name)
    sampled = _sampled_ratios(d.stateful, ev.classes)
    _name_untrained_entries(d.used, weights)

    trained = set(used_names)
    z_of = {e.name: e.z(o.z_key) for o, e in d.stateful}
    twin_map, twin_warnings, twin_refusal = _find_twins(weights, candidates, trained, ties_visible, twins, sampler, z_of)
    twin_sources = set(twin_map.values()) if twin_refusal else set()
    if twin_refusal:
        twin_map = {}
    untrained = [c for c in candidates if c not in trained and c not in twin_map]
    counts: dict[str, int] = {}
    for o, e in d.stateful:
        counts[e.evidence] = counts.get(e.evidence, 0) + 1
    confirmed = sum(1 for o, e in d.stateful if id(e) in ev.anchors and ev.anchors[id(e)] == e.name)
    method = _describe(counts, confirmed, len(d.stateful), d.order_name)
    warnings = d.notes + twin_warnings + [f"optimizer state '{k}' not used: {why}" for k, why in d.ignored.items()]
    entries = [e for o in d.used for e in o.entries]
    return ParameterMapping(method, entries, counts, confirmed, len(d.stateful), untrained, twin_map,
                            ignored_optimizers=d.ignored, warnings=warnings, misfits=misfits,
                            twin_refusal=twin_refusal, twin_sources=twin_sources, references=references,
                            sampled=sampled)


def _name_untrained_entries(used: list[OptimizerEntries], weights: Mapping[str, TensorRef]) -> None:
    """Entries without z keep the names saved with them, where the weights hold such a tensor."""
    for o in used:
        for e in o.entries:
            if e.z(o.z_key) is None and e.name is None and e.saved_name in weights:
                e.name = e.saved_name


def _ordered_candidates(weights: Mapping[str, TensorRef], model_order: Sequence[str] | None) -> list[str]:
    """The names that can be parameters, in the model's order where it is known apart from the file's."""
    candidates, _ = candidate_parameters(weights)
    if model_order is None:
        return candidates
    rank = {n: i for i, n in enumerate(model_order)}
    position = {n: i for i, n in enumerate(candidates)}
    return sorted(candidates, key=lambda n: (rank.get(n, len(rank)), position[n]))


def _require_shapes(stateful: list[tuple[OptimizerEntries, Entry]], weights: Mapping[str, TensorRef],
                    candidates: list[str]) -> None:
    """Refuse the one optimizer of a checkpoint if one of its z has a shape no parameter has."""
    for o, e in stateful:
        z = e.z(o.z_key)
        if not any(weights[c].shape == z.shape for c in candidates):
            raise NotInWeights(
                f"{e.label()} has z of shape {format_shape(z.shape)} but the model has no parameter of that shape",
                "the optimizer state does not belong to this model (choose other entries with " + Opt("model_key")
                + " / " + Opt("optimizer_key") + ")",
            )


def _drop_foreign_optimizers(optimizers: Sequence[OptimizerEntries],
                             possible: dict[int, AbstractSet[str]]) -> _Decision:
    """The decision's start: of several optimizers, those with an entry content allows on these weights
    (the others may belong to other weights, and are reported as ignored)."""
    if len(optimizers) <= 1:
        return _Decision(list(optimizers), {})
    used: list[OptimizerEntries] = []
    ignored: dict[str, str] = {}
    for o in optimizers:
        n_z = len(o.stateful())
        if n_z and not any(possible.get(id(e)) for e in o.stateful()):
            ignored[o.key] = f"none of its {n_z} entries can belong to these weights (shapes or content rule them out)"
        else:
            used.append(o)
    if not used:
        raise NotInWeights(
            f"none of the optimizer states ({', '.join(o.key for o in optimizers)}) belongs to these weights: "
            "no z lies near any of the model's tensors",
            "choose the matching pair with " + Opt("model_key") + " and " + Opt("optimizer_key")
            + " (see `sfckpt inspect`)",
        )
    return _Decision(used, ignored)


def _named_optimizers(used: list[OptimizerEntries], param_order: Sequence[str] | None,
                      weights: Mapping[str, TensorRef]) -> list[tuple[OptimizerEntries, str]]:
    """The optimizers whose entries have names, each with where the names come from ("--param-order",
    which names its entries here, or "names" saved in the checkpoint)."""
    if param_order is None:
        return [(o, "names") for o in used if o.entries and all(e.saved_name is not None for e in o.entries)]
    if len(used) != 1:
        raise OptionConflict(Opt("param_order") + " gives one optimizer's order, but the checkpoint holds several "
                             "optimizers", "choose one with " + Opt("optimizer_key"))
    _apply_param_order(used[0], param_order, weights)
    return [(used[0], "--param-order")]


def _place_by_names(d: _Decision, param_order: Sequence[str] | None, weights: Mapping[str, TensorRef],
                    candidates: list[str], ev: _ContentEvidence) -> None:
    """Step 1: place the entries of each named optimizer whose names nothing contradicts. Saved names
    that something contradicts are noted and not used; a contradicted --param-order is refused."""
    for o, kind in _named_optimizers(d.used, param_order, weights):
        source = kind if kind == "--param-order" else "param_names"
        names = {id(e): (e.name if kind == "--param-order" else e.saved_name) for e in o.stateful()}
        conflict = _name_conflict(o, names, weights, ev.anchors, candidates, ev.classes)
        if conflict is None:
            for e in o.stateful():
                d.decided[id(e)], d.kinds[id(e)] = names[id(e)], kind
        elif kind == "--param-order":
            raise OptionConflict(Opt("param_order") + f" disagrees with the checkpoint: {conflict}",
                                 "check the order of the names in the file (docs/mapping.md)", option="param_order")
        else:
            d.notes.append(f"saved {source} of optimizer '{o.key}' not used: {conflict}" if o.key
                           else f"saved {source} not used: {conflict}")


def _place_rest_by_order(d: _Decision, ev: _ContentEvidence, weights: Mapping[str, TensorRef], candidates: list[str],
                         group_domains: Sequence[set[str]] | None, container_order_name: str) -> None:
    """Step 2: place by order the entries names and content left open."""
    problem = OrderProblem(used=d.used, stateful=d.stateful, decided=d.decided, kinds=d.kinds, weights=weights,
                           candidates=candidates, cand_index={n: i for i, n in enumerate(candidates)},
                           group_domains=group_domains, container_order_name=container_order_name, notes=d.notes)
    try:
        d.order_name = _place_with_relaxing(problem, ev)
    except MappingUndecided as under_rule:
        if group_domains is None:
            raise
        # The container's grouping rule (the Trainer's decay / no-decay groups) is not the optimizer's when
        # the user built it (Trainer(optimizers=(opt, None))): place as in any file, in the rebuilt model's
        # order, with every check an order gets there.
        plain = replace(problem, group_domains=None, container_order_name="")
        try:
            d.order_name = _place_with_relaxing(plain, ev)
        except MappingUndecided:
            raise under_rule from None


def _place_with_relaxing(problem: OrderProblem, ev: _ContentEvidence) -> str:
    """_place_by_order with content's rules, then (where they leave no placement) without the ones chance
    and rounding can break."""
    try:
        return _place_by_order(problem, ev.possible)
    except NotInWeights:
        # Among many look-alikes of few elements, "another tensor lies 4x closer" can rule out a
        # true pair by chance, and rounding can pin a float32 y at its constant initial value while
        # z moved by an ulp. Where these rules leave no placement at all, place without them: wider
        # candidate sets only add solutions, so one placement found then is still the only one.
        relaxed = _relaxed(ev.possible, ev.classes)
        if relaxed is None:
            raise
        return _place_by_order(problem, relaxed)


def _defer_order(d: _Decision, ev: _ContentEvidence, source: str) -> NoReturn:
    """Raise OrderDeferred: what names and content decided, and that the rest waits for `source`'s order.

    The open entries are not placed by shapes alone either: the order convert rebuilds also limits
    each group to its own names, so a placement found without it need not be the one convert uses."""
    counts: dict[str, int] = {}
    for o, e in d.stateful:
        kind = d.kinds.get(id(e), "order")
        counts[kind] = counts.get(kind, 0) + 1
    confirmed = sum(1 for o, e in d.stateful if id(e) in d.decided and ev.anchors.get(id(e)) == d.decided[id(e)])
    order_name = (f"the model's order, which convert rebuilds ({source}) and inspect does not (that imports "
                  "transformers; --param-order FILE gives it without)")
    message = (f"{counts['order']} of {len(d.stateful)} entries are look-alikes that only {source} places, "
               "not rebuilt for a plan made with undecided_ok (inspect)")
    raise OrderDeferred(message, _describe(counts, confirmed, len(d.stateful), order_name), counts, confirmed)


def _name_and_check_pairs(d: _Decision, weights: Mapping[str, TensorRef]) -> dict[str, Entry]:
    """Step 3: name every entry as decided, refusing two entries on one tensor and pairs whose shapes or
    dtypes differ; return the entries by tensor name."""
    used_names: dict[str, Entry] = {}
    for o, e in d.stateful:
        e.name, e.evidence = d.decided[id(e)], d.kinds[id(e)]
        if e.name in used_names:
            raise MappingUndecided(f"{used_names[e.name].label()} and {e.label()} are both mapped to '{e.name}'",
                                   "the optimizer states overlap; choose one with " + Opt("optimizer_key"), where=e.name)
        used_names[e.name] = e
        _verify_pair(e, o, weights, d.kinds[id(e)])
    return used_names


def _content_anchors(stateful, weights, candidates, sampler) -> _ContentEvidence:
    """Entries whose z content ties to one tensor with a margin, for every entry the tensors content
    does not rule out, and the evidence of each shape class."""
    import numpy as np

    by_shape: dict[tuple, list[str]] = {}
    for c in candidates:
        by_shape.setdefault(weights[c].shape, []).append(c)
    rows: dict[tuple, list[tuple[Any, Entry]]] = {}
    for o, e in stateful:
        rows.setdefault(e.z(o.z_key).shape, []).append((o, e))
    index = {c: i for i, c in enumerate(candidates)}
    anchors: dict[int, str] = {}
    possible: dict[int, AbstractSet[str]] = {}
    classes: dict[tuple, tuple[content.ClassEvidence, dict[int, int], dict[str, int]]] = {}
    for shape, items in rows.items():
        cols = by_shape.get(shape, [])
        if not cols:
            continue
        ev = content.evidence([e.z(o.z_key) for o, e in items], [weights[c] for c in cols], sampler)
        allowed = ev.possible_rows()
        column = {c: j for j, c in enumerate(cols)}
        positions = np.array([index[c] for c in cols], dtype=np.int64)
        for i, ((o, e), m) in enumerate(zip(items, ev.matches)):
            if m.confirmed:
                anchors[id(e)] = cols[m.candidate]
            possible[id(e)] = content.PossibleRow(allowed[i], cols, column, positions)
        classes[shape] = (ev, {id(e): i for i, (o, e) in enumerate(items)}, column)
    return _ContentEvidence(anchors, possible, classes)


def _relaxed(possible, classes) -> dict[int, AbstractSet[str]] | None:
    """`possible` from each class's relaxed rows (content.ClassEvidence.possible_rows), or None
    where relaxing allows nothing more."""
    relaxed = dict(possible)
    changed = False
    for ev, rows, _ in classes.values():
        if not ev.relaxing_adds():
            continue
        changed = True
        allowed = ev.possible_rows(relaxed=True)
        for ident, i in rows.items():
            row = possible[ident]
            relaxed[ident] = content.PossibleRow(allowed[i], row.names, row.column, row.positions)
    return relaxed if changed else None


def _apply_param_order(o: OptimizerEntries, order: Sequence[str], weights) -> None:
    if len(order) != len(o.entries):
        raise OptionConflict(
            Opt("param_order") + f" lists {len(order)} names but the optimizer has {len(o.entries)} entries",
            "list one name per optimizer parameter, in the order they were given to the optimizer",
            option="param_order",
        )
    for e, name in zip(o.entries, order):
        if name not in weights and e.z(o.z_key) is not None:
            raise OptionConflict(Opt("param_order") + f" names '{name}' for {e.label()}, but the model has no such tensor",
                                 "use the names of the model's state_dict", option="param_order", where=name)
        e.name = name


def _name_conflict(o, names, weights, anchors, candidates, classes) -> str | None:
    """Why these names cannot be right (a missing tensor, a wrong shape, content pointing elsewhere), or None."""
    claimed = {name: ident for ident, name in anchors.items()}
    seen: set[str] = set()
    for e in o.stateful():
        name = names[id(e)]
        z = e.z(o.z_key)
        if name not in weights:
            return f"{e.label()} is named '{name}' but the model has no such tensor"
        if name in seen:
            return f"two entries are named '{name}'"
        seen.add(name)
        if weights[name].shape != z.shape:
            return (f"{e.label()} is named '{name}' of shape {format_shape(weights[name].shape)} but its z is "
                    f"{format_shape(z.shape)}")
        # Content nearer elsewhere contradicts a name only where the named pair is itself unrelated: a true
        # pair's y can lie farther from z than a tensor from the same initialisation does (towers whose
        # gradients came late), while a stale name (modules moved) pairs z with an independent tensor
        related = _named_pair_related(e, name, o.z_key, classes)
        if id(e) in anchors and anchors[id(e)] != name and not related:
            return f"{e.label()} is named '{name}' but its z lies next to '{anchors[id(e)]}'"
        if name in claimed and claimed[name] != id(e) and not related:
            return f"{e.label()} is named '{name}' but another entry's z lies next to '{name}'"
    return _swapped_by_content(o, names, classes)


def _pair_in_samples(e, name: str, z_key, classes):
    """(the shape class's evidence, e's row, the column of tensor `name`), or None where either is not
    in the samples or the samples are too small to tell (under VERIFY_MIN_ELEMENTS)."""
    known = classes.get(e.z(z_key).shape)
    if known is None:
        return None
    ev, rows, column = known
    i, j = rows.get(id(e)), column.get(name)
    if i is None or j is None or ev.size < content.VERIFY_MIN_ELEMENTS:
        return None
    return ev, i, j


def _named_pair_related(e, name: str, z_key, classes) -> bool:
    """Do e's z and the tensor `name` look related on their samples (not as far apart as independent
    tensors, with enough elements to tell)?"""
    found = _pair_in_samples(e, name, z_key, classes)
    return found is not None and found[0].ratio(found[1], found[2]) <= content.unrelated_limit(found[0].size)


SWAP_FACTOR = 2.0  # how much closer each z must lie to the other's tensor for two names to be swapped


def _swapped_by_content(o, names, classes) -> str | None:
    """Two entries whose names are each other's by content: each z lies SWAP_FACTOR times closer to
    the tensor named for the other entry than to its own (look-alikes too close to confirm with
    MARGIN are still told apart this way; a true pair's y is a lerp between its z and x, so its own
    tensor is the nearer one). Needs samples of VERIFY_MIN_ELEMENTS."""
    by_name = {names[id(e)]: e for e in o.stateful()}
    column_names: dict[tuple, dict[int, str]] = {}  # per shape class, column -> tensor name (built once)
    for e in o.stateful():
        known = classes.get(e.z(o.z_key).shape)
        if known is None:
            continue
        ev, rows, column = known
        i, a = rows.get(id(e)), column.get(names[id(e)])
        if i is None or a is None or ev.size < content.VERIFY_MIN_ELEMENTS:
            continue
        b = ev.matches[i].candidate  # the tensor nearest this z
        if b == a or not ev.distance(i, b) * SWAP_FACTOR < ev.distance(i, a):
            continue
        shape = e.z(o.z_key).shape
        if shape not in column_names:
            column_names[shape] = {j: n for n, j in column.items()}
        other_name = column_names[shape].get(b)
        other = by_name.get(other_name)
        k = rows.get(id(other)) if other is not None else None
        if k is not None and ev.distance(k, a) * SWAP_FACTOR < ev.distance(k, b):
            return (f"{e.label()} is named '{names[id(e)]}' and {other.label()} '{other_name}', but by content each "
                    f"z lies at least {SWAP_FACTOR:g}x closer to the other's tensor (the two names are swapped)")
    return None


def _order_keys(candidates: list[str]) -> list[tuple[str, Callable[[int], Any]]]:
    by_name = {n: i for i, n in enumerate(sorted(candidates))}
    return [
        ("the model's order", lambda i: i),
        ("name order", lambda i: by_name[candidates[i]]),
        ("the reverse of the model's order", lambda i: -i),
    ]


@dataclass
class OrderProblem:
    """What placing entries by order works from; `decided` and `kinds` (id(entry) -> tensor name, and the
    evidence for it) are filled in place."""

    used: list[OptimizerEntries]
    stateful: list[tuple[OptimizerEntries, Entry]]
    decided: dict[int, str]
    kinds: dict[int, str]
    weights: Mapping[str, TensorRef]
    candidates: list[str]
    cand_index: dict[str, int]
    group_domains: Sequence[set[str]] | None  # per group, the names a container's grouping rule allows there
    container_order_name: str  # the container's own order, when it gave one
    notes: list[str]  # why saved names were not used, for the errors


@dataclass
class _OrderDomains:
    """What the order search works on: per entry (by id) the candidate indices it may take, and the
    entries' chains (one per group, in the group's order)."""

    fixed: dict[int, int]  # id(entry) -> candidate index, for the entries names or content placed
    taken: set[int]  # the candidate indices those hold
    by_shape: dict[tuple, list[int]]  # shape -> candidate indices of that shape, in order
    chains: list[list[int]] = field(default_factory=list)
    entry_of: dict[int, tuple[OptimizerEntries, Entry]] = field(default_factory=dict)
    domains: dict[int, list[int]] = field(default_factory=dict)

    def open_ids(self) -> list[int]:
        return [ident for ident in self.domains if ident not in self.fixed]


@dataclass
class _OrderSearch:
    """The placements the order hypotheses found (each with the order's label), and whether the search
    gave up before it could tell one placement from several."""

    distinct: list[tuple[str, dict[int, int]]]
    exhausted: bool


def _place_by_order(p: OrderProblem, possible) -> str:
    """Place the entries names and content left open (`possible`: what content allows each); return the
    order that placed them."""
    dom = _order_domains(p, possible)
    # Shapes, content and the names already placed may leave one way on their own: no order needed.
    failed, alone = order_search.propagate([], dom.domains, lambda i: i)
    if failed is None and all(v is not None for v in alone.values()):
        for ident in dom.open_ids():
            p.decided[ident], p.kinds[ident] = p.candidates[alone[ident]], "order"
        return "shape (the only way to fit)"
    hypotheses = _order_keys(p.candidates)
    if p.group_domains is not None:
        hypotheses = hypotheses[:1]
    found = _search_orders(dom, hypotheses)
    if not found.distinct and not found.exhausted and p.group_domains is None:
        per_group = _per_group_order(dom, hypotheses)
        if per_group is not None:
            found = _search_orders(dom, [per_group])
    open_ids = dom.open_ids()
    n_content = sum(1 for o, e in p.stateful if p.kinds.get(id(e)) == "content")
    context = f"content confirms {n_content} of {len(p.stateful)} entries" + (f"; {p.notes[0]}" if p.notes else "")
    if len(found.distinct) == 1 and not found.exhausted:
        label, solution = found.distinct[0]
        if not p.container_order_name:
            _check_order_witnessed(dom.chains, solution, dom.fixed, possible, p.candidates, dom.entry_of, context)
        for ident in open_ids:
            p.decided[ident], p.kinds[ident] = p.candidates[solution[ident]], "order"
        return p.container_order_name or label
    if found.exhausted:
        raise Undecided(f"too many ways to match the optimizer's entries to the model's tensors ({context})",
                        ORDER_HINT)
    if not found.distinct:
        _refuse_unplaced(p, dom, possible, hypotheses[0][1], context)
    a, b = found.distinct[0][1], found.distinct[1][1]
    ident = next(i for i in open_ids if a[i] != b[i])
    o, e = dom.entry_of[ident]
    raise Undecided(
        f"cannot tell which tensor {e.label()} belongs to: '{p.candidates[a[ident]]}' and '{p.candidates[b[ident]]}' "
        f"both fit, and content cannot tell them apart ({context})",
        ORDER_HINT,
    )


def _order_domains(p: OrderProblem, possible) -> _OrderDomains:
    """Each entry's domain: its fixed tensor, else the tensors of its shape that content allows, its
    group's container rule admits and no fixed entry holds; and one chain per group."""
    fixed = {}
    for o, e in p.stateful:
        if id(e) in p.decided and p.decided[id(e)] in p.cand_index:
            fixed[id(e)] = p.cand_index[p.decided[id(e)]]
    by_shape: dict[tuple, list[int]] = {}
    for i, c in enumerate(p.candidates):
        by_shape.setdefault(p.weights[c].shape, []).append(i)
    dom = _OrderDomains(fixed, set(fixed.values()), by_shape)
    taken_mask = _taken_mask(dom.taken, len(p.candidates))
    # Entries whose content rows are one shared mask (look-alikes) get one shared domain list: a class of
    # thousands of look-alikes would otherwise hold entries x candidates Python integers
    same: dict[tuple, list[int]] = {}
    for o in p.used:
        groups: dict[int, list[Entry]] = {}
        for e in o.stateful():
            groups.setdefault(e.group, []).append(e)
        for g, members in groups.items():
            for e in members:
                dom.entry_of[id(e)] = (o, e)
                if id(e) in fixed:
                    dom.domains[id(e)] = [fixed[id(e)]]
                    continue
                row = possible.get(id(e), set())
                shape = e.z(o.z_key).shape
                key = (id(row.allowed), shape, g) if isinstance(row, content.PossibleRow) and row.allowed.dtype == bool \
                    else None
                if key is None or key not in same:
                    allowed = _open_domain(row, by_shape.get(shape, []), dom.taken, taken_mask, p.candidates)
                    if p.group_domains is not None and g < len(p.group_domains):
                        allowed = [i for i in allowed if p.candidates[i] in p.group_domains[g]]
                    if key is not None:
                        same[key] = allowed
                dom.domains[id(e)] = same[key] if key is not None else allowed
            dom.chains.append([id(e) for e in members])
    return dom


def _search_orders(dom: _OrderDomains, hypotheses: list[tuple[str, Callable[[int], Any]]]) -> _OrderSearch:
    """Search the hypotheses in turn, stopping at the first that finds a placement or gives up."""
    # The model's order comes first: grouping code walks named_parameters(). Another order is used only
    # where the confirmed pairs rule the model's order out.
    results = []
    for label, key in hypotheses:
        results.append((label, *order_search.solve(dom.chains, dom.domains, key, SEARCH_BUDGET)))
        if results[-1][1] or results[-1][2]:
            break
    return _OrderSearch([(label, s) for label, solutions, _ in results for s in solutions],
                        any(ex for _, _, ex in results))


def _per_group_order(dom: _OrderDomains, hypotheses: list[tuple[str, Callable[[int], Any]]]
                     ) -> tuple[str, Callable[[int], Any]] | None:
    """One order per group where no single order fits them all (LoRA+'s A group sorted by name, its B group
    in the model's): each group follows the first hypothesis its own fixed entries (two or more) agree
    with. A group of two or more entries that shows no order of its own would have to follow the others,
    which disagree: None; so too where groups under different orders hold entries of one shape (decided
    per shape: linear in the entries, not in their domains)."""
    of_shape: dict[tuple, int] = {}  # shape -> hypothesis, from the groups holding entries of that shape
    for chain in dom.chains:
        fixed = [dom.fixed[i] for i in chain if i in dom.fixed]
        fits = [h for h, (_, key) in enumerate(hypotheses) if len(fixed) >= 2
                and all(key(a) < key(b) for a, b in zip(fixed, fixed[1:]))]
        if not fits:
            if len(chain) >= 2:
                return None
            continue  # one entry: no order to follow
        for i in chain:
            o, e = dom.entry_of[i]
            if of_shape.setdefault(e.z(o.z_key).shape, fits[0]) != fits[0]:
                return None
    if len(set(of_shape.values())) < 2:
        return None  # one order for every group: the search has tried it
    chosen = {c: h for shape, h in of_shape.items() for c in dom.by_shape.get(shape, [])}

    def key(c: int) -> Any:
        return hypotheses[chosen.get(c, 0)][1](c)

    labels = sorted({hypotheses[h][0] for h in of_shape.values()})
    return "each group's own order (" + " and ".join(labels) + ")", key


def _refuse_unplaced(p: OrderProblem, dom: _OrderDomains, possible, key: Callable[[int], Any],
                     context: str) -> NoReturn:
    """Raise OrderFitsNothing, naming the look-alikes a sorted weights file cannot order, else the first
    entry the model's order cannot place."""
    open_ids = dom.open_ids()
    failed, _ = order_search.propagate(dom.chains, dom.domains, key)
    o, e = dom.entry_of[failed if failed is not None else open_ids[0]]
    shape = e.z(o.z_key).shape
    ruled_out = _ruled_out(e, shape, dom.by_shape, dom.taken, possible, p.candidates)
    alike = _look_alikes(open_ids, dom.domains, p.candidates, p.weights)
    if alike and not ruled_out and not p.container_order_name and p.candidates == sorted(p.candidates):
        raise OrderFitsNothing(
            f"cannot place {len([i for i in open_ids if len(dom.domains[i]) > 1])} optimizer entries: the weights "
            f"file lists its tensors sorted by name, so it keeps no parameter order, and content cannot tell "
            f"these tensors apart: {alike} ({context})", ORDER_HINT)
    raise OrderFitsNothing(
        f"{e.label()}, z of shape {format_shape(shape)}, fits no tensor of these weights in an order "
        f"that the tensors told apart by content agree with ({context}{ruled_out}): "
        "the optimizer trains tensors that are not in these weights, or lists them in an order sfckpt cannot follow",
        ORDER_HINT,
    )


def _look_alikes(open_ids: list[int], domains: dict[int, list[int]], candidates: list[str], weights) -> str:
    """The tensors that several open entries could each be, per shape class, for the error; or "".

    These are what the file's order would have to tell apart: naming them (not the first entry the
    search failed on) says which tensors the user's order must cover."""
    classes: list[set[int]] = []
    for ident in open_ids:
        dom = set(domains[ident])
        if len(dom) < 2:
            continue
        for c in classes:
            if c & dom:
                c |= dom
                break
        else:
            classes.append(dom)
    parts = []
    for c in sorted(classes, key=len, reverse=True)[:2]:
        names = [candidates[i] for i in sorted(c)]
        shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        parts.append(f"{len(names)} tensors of shape {format_shape(weights[names[0]].shape)} look alike ({shown})")
    more = len(classes) - len(parts)
    return "; ".join(parts) + (f"; {more} more such classes" if more > 0 else "")


def _ruled_out(e: Entry, shape, by_shape, taken: set[int], possible, candidates) -> str:
    """Why the tensors of the entry's shape that no entry fixed by names or content holds are not its
    own (content rules them out: a head replaced after the optimizer was built), for the error; or ""."""
    free = [candidates[i] for i in by_shape.get(shape, []) if i not in taken]
    out = [c for c in free if c not in possible.get(id(e), ())]
    if not free or len(out) != len(free) or len(free) > 3:
        return ""
    names = " and ".join(f"'{c}'" for c in free)
    return (f"; content rules out {names}, the only tensor{'s' if len(free) > 1 else ''} of that shape left for it "
            "— replaced or re-initialised after the optimizer was built?")


def _taken_mask(taken: set[int], n: int):
    """Per candidate index: held by an entry that names or content fixed."""
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    mask[list(taken)] = True
    return mask


def _open_domain(allowed: AbstractSet[str], same_shape: list[int], taken: set[int], taken_mask, candidates) -> list[int]:
    """The candidates (indices, in order) of an entry's shape that content allows and no fixed entry holds."""
    if isinstance(allowed, content.PossibleRow) and len(allowed.positions) == len(same_shape):
        # The row's columns are this shape's candidates in order (both built from one candidate list):
        # one numpy pass over the row instead of a set lookup per (entry, tensor).
        at = allowed.positions[allowed.allowed]
        return at[~taken_mask[at]].tolist()
    return [i for i in same_shape if i not in taken and candidates[i] in allowed]


def _check_order_witnessed(chains, solution, fixed, possible, candidates, entry_of, context) -> None:
    """Refuse where only an unwitnessed order premise tells two placed tensors apart.

    Two entries of one group placed by order whose tensors content cannot tell apart (each could
    be the other's) are decided by the group's order alone. That order is trusted when the group
    shows it — two or more entries fixed by content or names, or three or more shapes (a group in
    another order would not match the model's sequence of shapes) — or when another group of the
    same optimizer shows it (grouping code builds all groups in one pass over the model). A group
    of look-alike tensors (norm gains, zero-initialised gates) with none of that could have been
    built in any order."""
    optimizer_of = {id(c): entry_of[c[0]][0].key for c in chains if c}
    shown = {}
    for c in chains:
        if c:
            shown[optimizer_of[id(c)]] = shown.get(optimizer_of[id(c)], 0) + (sum(1 for i in c if i in fixed) >= 2)
    for chain in chains:
        if not chain:
            continue
        placed = [i for i in chain if i not in fixed]
        witnesses = sum(1 for i in chain if i in fixed)
        shapes = {entry_of[i][1].z(entry_of[i][0].z_key).shape for i in chain}
        if witnesses >= 2 or len(shapes) >= 3:
            continue
        if shown.get(optimizer_of[id(chain)], 0):
            continue  # another group of this optimizer shows the model's order
        for a_pos, a in enumerate(placed):
            for b in placed[a_pos + 1:]:
                ca, cb = candidates[solution[a]], candidates[solution[b]]
                if ca in possible.get(b, ()) and cb in possible.get(a, ()):
                    o, e = entry_of[a]
                    raise MappingUndecided(
                        f"cannot tell which tensor {e.label()} belongs to: '{ca}' or '{cb}' — content cannot tell "
                        f"them apart, and nothing shows in which order its group lists its parameters ({context})",
                        ORDER_HINT,
                    )


def _verify_pair(e: Entry, o: OptimizerEntries, weights, method: str) -> None:
    hint = "the optimizer state does not belong to this model" + (
        " (check the names in " + Opt("param_order") + ")" if method == "--param-order" else "")
    param = weights[e.name]
    for key in (o.z_key, "x", "y"):
        ref = e.state.get(key)
        if not isinstance(ref, TensorRef):
            continue
        if ref.shape != param.shape:
            raise InputError(
                f"{e.label()} has {key} of shape {format_shape(ref.shape)} but parameter '{e.name}' is "
                f"{format_shape(param.shape)}", hint)
        if o.same_dtype and ref.dtype != param.dtype:
            raise InputError(
                f"{e.label()} has {key} of dtype {ref.dtype} but parameter '{e.name}' is {param.dtype}",
                "optimizer.eval() could not combine them either; the checkpoint is inconsistent",
            )


def _sampled_ratios(stateful, classes) -> dict[int, float]:
    """Per entry, its pair's ratio d² / (‖y‖² + ‖z‖²) on the samples (of VERIFY_MIN_ELEMENTS or more,
    not all zero: zeros say nothing of how closely the pair tracks)."""
    out: dict[int, float] = {}
    for o, e in stateful:
        found = _pair_in_samples(e, e.name, o.z_key, classes)
        if found is not None and (found[0].z[found[1]].any() or found[0].y[found[2]].any()):
            out[id(e)] = found[0].ratio(found[1], found[2])
    return out


def _run_scales(stateful, classes) -> dict[int, content.RunScale]:
    """How closely y and z track in this run, per entry: the confirmed pairs of the entry's own group (one
    lr, weight decay, β and step count: a new head at a hundred times the backbone's lr drifts far more),
    else of the whole file."""
    import numpy as np

    of_entry = {ident: (ev.ratio(i, ev.matches[i].candidate), ev.drift(i, ev.matches[i].candidate))
                for ev, rows, _ in classes.values() for ident, i in rows.items()
                if ev.matches[i].confirmed and ev.size >= content.VERIFY_MIN_ELEMENTS}
    in_group: dict[tuple, list[tuple[float, float]]] = {}
    for o, e in stateful:
        if id(e) in of_entry:
            in_group.setdefault((o.key, e.group), []).append(of_entry[id(e)])

    def median(pairs) -> content.RunScale:
        return content.RunScale(*(float(v) for v in np.median(np.array(pairs), axis=0))) if pairs else content.RunScale()

    by_group = {g: median(r) for g, r in in_group.items()}
    overall = median(list(of_entry.values()))
    return {id(e): by_group.get((o.key, e.group), overall) for o, e in stateful}


def _verify_content(stateful, classes, order_name: str) -> tuple[dict[int, InputError], dict[int, content.RunScale]]:
    """Check every pair used against its samples, however it was found; return the refusals by entry,
    and each entry's run scale (for the same test on all of its data, as x is computed).

    A pair whose z and tensor are as far apart as independent tensors, while the file's confirmed
    pairs track closely, is refused: names, an order or the only way to fit cannot make a fresh tensor
    (a head replaced after the optimizer was built, a re-initialised embedding) the owner of another
    tensor's z. Where content alone decided a pair, a second tensor that also shares z's history
    (a copy, a network trained along the same path) makes the decision ambiguous."""
    names_of = {shape: list(cols) for shape, (_, _, cols) in classes.items()}
    how = {"names": "its saved name", "--param-order": Opt("param_order"), "content": "content",
           "order": order_name or "order"}
    misfits: dict[int, InputError] = {}
    references = _run_scales(stateful, classes)
    for o, e in stateful:
        found = classes.get(e.z(o.z_key).shape)
        if found is None:
            continue
        ev, rows, cols = found
        i, j = rows.get(id(e)), cols.get(e.name)
        if i is None or j is None:
            continue  # a tensor that is not a candidate (a tied duplicate's name): checked by _verify_pair
        reference = references[id(e)]
        if ev.looks_unrelated(i, j, reference):
            misfits[id(e)] = MappingUndecided(
                f"{e.label()} is paired with '{e.name}' by " + how.get(e.evidence, e.evidence)
                + ", but its z is unrelated "
                f"to that tensor (d²/(‖y‖²+‖z‖²) = {ev.ratio(i, j):.2f}, as for independent tensors, where the "
                f"checkpoint's confirmed pairs give {reference.ratio:.2g}{_drift_words(ev.drift(i, j), reference)}): the optimizer state belongs to a different "
                f"tensor — '{e.name}' was replaced or re-initialised after the optimizer was built, or the names "
                "or order are wrong",
                "save the model together with the optimizer that trains it (build the optimizer after replacing "
                "layers); if the pairing came from " + Opt("param_order") + ", check the names",
                where=e.name,
            )
        if e.evidence == "content":
            column_names = names_of[e.z(o.z_key).shape]
            others = [column_names[jj] for jj in ev.sharing_history(i) if column_names[jj] != e.name]
            if others and id(e) not in misfits:
                misfits[id(e)] = MappingUndecided(
                    f"cannot tell which tensor {e.label()} belongs to: '{e.name}' lies nearest its z, but "
                    f"'{others[0]}' also shares its history (a copy, or a tensor trained along the same path), "
                    "so content cannot decide",
                    ORDER_HINT,
                )
    return misfits, references


def _drift_words(drift: float, run: content.RunScale) -> str:
    """How much farther apart a refused pair lies than the run's confirmed pairs (nothing if unknown)."""
    if run.drift <= 0:
        return ""
    return f", with y and z {drift / run.drift:.2g} times as far apart as theirs"


def _find_twins(weights, candidates, trained, ties_visible, policy, sampler,
                z_of) -> tuple[dict[str, str], list[Words], InputError | None]:
    """Untracked tensors that are byte-identical copies of trained ones (copy -> trained tensor), warnings,
    and why `--twins` is needed if it is. They are tied weights saved apart or deliberate frozen copies;
    the bytes cannot tell which, so outside DCP (where every tie is saved as copies) any such copy needs
    `--twins`; copies of a tensor whose x is its y need nothing."""
    if policy == "frozen":
        return {}, [], None
    untracked = [c for c in candidates if c not in trained]
    kinds = {(weights[c].shape, weights[c].dtype) for c in untracked}

    def key(ref):
        return ref.shape, ref.dtype, sampler.sample(ref, content.SAMPLE_ELEMENTS).tobytes()

    by_sample: dict[tuple, list[str]] = {}
    for name in trained:
        if (weights[name].shape, weights[name].dtype) in kinds:
            by_sample.setdefault(key(weights[name]), []).append(name)
    found: dict[str, str] = {}
    for name in untracked:
        ref = weights[name]
        for other in by_sample.get(key(ref), []):
            if content.identical(ref, weights[other], sampler):
                found[name] = other
                break
    # Where the optimizer never moved the tensor (z equal to y), tied and frozen give the same bytes.
    found = {a: b for a, b in found.items() if z_of.get(b) is None or not content.identical(z_of[b], weights[b], sampler)}
    if not found or policy == "tied":
        return found, [], None
    sources = sorted(set(found.values()))
    pairs = ", ".join(f"'{a}' = '{b}'" for a, b in list(found.items())[:3])
    hint = ("pass " + Opt("twins", "tied") + " (they get the trained tensor's x) or " + Opt("twins", "frozen")
            + " (copied as saved; a target or EMA network copied before saving)")
    if ties_visible:
        return found, [], MappingUndecided(
            f"{len(found)} tensor{'s' if len(found) > 1 else ''} the optimizer does not train "
            f"{'are' if len(found) > 1 else 'is'} byte-identical to {'tensors' if len(sources) > 1 else 'a tensor'} "
            f"it trains but saved apart ({pairs}): tied weights copied before saving ({{k: v.clone()}}, .cpu() per "
            "tensor), or a deliberate frozen copy? The file cannot tell",
            hint,
        )
    if len(sources) > 1:
        return found, [], MappingUndecided(
            f"{len(found)} tensors the optimizer does not train are byte-identical to {len(sources)} different "
            f"tensors it trains ({pairs}): tied weights, or a frozen copy of the network (a target or EMA network "
            "copied before saving)? The file cannot tell",
            hint,
        )
    warnings = [f"'{a}' is byte-identical to '{b}', which the optimizer trains, and is treated as a tied weight "
                "(it gets the same x); pass " + Opt("twins", "frozen") + " if it is a separate frozen copy"
                for a, b in found.items()]
    return found, warnings, None


def _describe(counts, confirmed, total, order_name) -> str:
    """One line: how many entries each kind of evidence decided, and how many content confirms."""
    if total == 0:
        return "no entry has z"
    parts = []
    for kind, label in (("--param-order", "--param-order"), ("names", "saved names"), ("content", "content")):
        if counts.get(kind):
            parts.append(f"{counts[kind]} by {label}")
    if counts.get("order"):
        parts.append(f"{counts['order']} by {order_name}")
    return f"{', '.join(parts)}; content confirms {confirmed} of {total}"
