"""Which model parameter each optimizer state entry belongs to.

An optimizer `state_dict()` keys its state by position: entry i is the i-th
parameter handed to the optimizer, group by group. Names are saved only by
torch >= 2.6 named optimizers (`param_names`). Otherwise we align the entries
with the model's parameters in order, leaving out what the optimizer never
sees (BatchNorm statistics and other buffers, tied duplicates), and accept the
alignment only if it is the one way the shapes fit. We never guess.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import InputError
from .tensors import TensorRef, format_shape

BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MAX_ALIGNMENT_CELLS = 20_000_000  # entries x candidates the shape alignment may tabulate


@dataclass
class Entry:
    """One optimizer entry: its position, its group, its state, and the parameter it belongs to."""

    index: int
    group: int
    state: Mapping[str, Any]
    name: str | None = None

    def shape_from(self, key: str) -> tuple[int, ...] | None:
        ref = self.state.get(key)
        return ref.shape if isinstance(ref, TensorRef) else None


def entries_of(optimizer: Mapping[str, Any]) -> list[Entry]:
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
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params)):
            raise InputError(f"optimizer param_groups[{g}] has {len(names) if isinstance(names, (list, tuple)) else 'no'} "
                             f"param_names for {len(params)} params", "the checkpoint is damaged")
        for pos, index in enumerate(params):
            if index in seen:
                raise InputError(f"optimizer entry {index} is listed twice in param_groups", "the checkpoint is damaged")
            seen.add(index)
            entry_state = state.get(index, {})
            if not isinstance(entry_state, Mapping):
                raise InputError(f"optimizer state entry {index} is not a dict", "the checkpoint is damaged")
            entries.append(Entry(index, g, entry_state, names[pos] if names is not None else None))
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
        if tied or not ref.is_float or name.rsplit(".", 1)[-1] in BUFFER_SUFFIXES:
            left_out.append(name)
        else:
            candidates.append(name)
            seen.add(ref.data_key)
    return candidates, left_out


def _count_embeddings(shapes: Sequence[tuple | None], cand_shapes: Sequence[tuple]) -> list[list[int]]:
    """ways[i][j]: ways (capped at 2) to place entries i.. onto candidates j.., keeping order."""
    n, m = len(shapes), len(cand_shapes)
    ways = [[0] * (m + 1) for _ in range(n + 1)]
    ways[n] = [1] * (m + 1)
    for i in range(n - 1, -1, -1):
        row, nxt = ways[i], ways[i + 1]
        for j in range(m - 1, -1, -1):
            fits = shapes[i] is None or shapes[i] == cand_shapes[j]
            row[j] = min(2, row[j + 1] + (nxt[j + 1] if fits else 0))
    return ways


def assign_names(
    entries: list[Entry],
    weights: Mapping[str, TensorRef],
    shape_key: str,
    param_order: Sequence[str] | None = None,
    same_dtype: bool = True,
) -> str:
    """Fill in `entry.name` for every entry; return how the names were found."""
    shapes = [e.shape_from(shape_key) for e in entries]
    if param_order is not None:
        if len(param_order) != len(entries):
            raise InputError(
                f"--param-order lists {len(param_order)} names but the optimizer has {len(entries)} entries",
                "list one name per optimizer parameter, in the order they were given to the optimizer",
            )
        for entry, name in zip(entries, param_order):
            entry.name = name
        method = "--param-order"
    elif entries and all(e.name is not None for e in entries):
        method = "param_names"
    else:
        candidates, _ = candidate_parameters(weights)
        cand_shapes = [weights[c].shape for c in candidates]
        if len(candidates) < len(entries):
            raise InputError(
                f"the optimizer has {len(entries)} entries but the model has only {len(candidates)} parameters",
                "the optimizer state does not belong to these weights (or pass --param-order FILE)",
            )
        if len(candidates) == len(entries):
            for entry, name in zip(entries, candidates):
                entry.name = name
            method = "position"
        else:
            if len(entries) * len(candidates) > MAX_ALIGNMENT_CELLS:
                raise InputError(
                    f"the model has {len(candidates) - len(entries)} more parameter tensors than the optimizer has "
                    f"entries, and {len(entries)} entries are too many to align by shape",
                    "pass --param-order FILE with the parameter names in optimizer order",
                )
            ways = _count_embeddings(shapes, cand_shapes)
            if ways[0][0] != 1:
                why = "in more than one way" if ways[0][0] > 1 else "in no way"
                raise InputError(
                    f"cannot tell which of the model's {len(candidates)} parameter tensors the optimizer's "
                    f"{len(entries)} entries belong to: shapes fit {why}",
                    "pass --param-order FILE with the parameter names in optimizer order",
                )
            j = 0
            for i, entry in enumerate(entries):
                while not ((shapes[i] is None or shapes[i] == cand_shapes[j]) and ways[i + 1][j + 1] == 1):
                    j += 1
                entry.name = candidates[j]
                j += 1
            method = "position (skipping parameters the optimizer does not hold)"
    _verify(entries, weights, shape_key, method, same_dtype)
    return method


def _verify(entries: list[Entry], weights: Mapping[str, TensorRef], shape_key: str, method: str, same_dtype: bool) -> None:
    hint = "the optimizer state does not belong to this model (use --param-order to give the order explicitly)"
    names_seen: set[str] = set()
    for entry in entries:
        if entry.name not in weights:
            raise InputError(f"optimizer entry {entry.index} is named '{entry.name}' ({method}) but the model has no such tensor", hint)
        if entry.name in names_seen:
            raise InputError(f"two optimizer entries are named '{entry.name}'", hint)
        names_seen.add(entry.name)
        param = weights[entry.name]
        for key in (shape_key, "x", "y"):
            ref = entry.state.get(key)
            if not isinstance(ref, TensorRef):
                continue
            if ref.shape != param.shape:
                raise InputError(
                    f"optimizer entry {entry.index} has {key} of shape {format_shape(ref.shape)} but parameter "
                    f"'{entry.name}' is {format_shape(param.shape)}",
                    hint,
                )
            if same_dtype and ref.dtype != param.dtype:
                raise InputError(
                    f"optimizer entry {entry.index} has {key} of dtype {ref.dtype} but parameter '{entry.name}' is {param.dtype}",
                    "optimizer.eval() could not combine them either; the checkpoint is inconsistent",
                )
