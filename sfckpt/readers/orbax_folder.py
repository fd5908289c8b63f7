"""Orbax checkpoints of optax Schedule-Free runs, read with tensorstore alone (no JAX).

`ocp.StandardCheckpointer().save(dir, {'params': ..., 'opt_state': ...})` and a
`CheckpointManager` step (`run/<step>/<item>/`) write the same item folder: `_METADATA` (the tree:
each leaf's real path in `key_metadata`, NamedTuple fields by name, tuple positions as `'0'`,
`'1'`, `None` leaves and optax's masked-out leaves marked `skip_deserialize`), `_sharding`,
`array_metadatas/`, and the arrays as zarr (or zarr3) arrays keyed by the path joined with dots,
inside an OCDBT database (`manifest.ocdbt`, `d/`, `ocdbt.process_N/`), or, in older saves, one
folder per array. Dots inside dict keys make those keys ambiguous, so paths come from `_METADATA`.

optax's `ScheduleFreeState(b1, weight_sum, step_count, max_lr, base_optimizer_state, z)` sits
anywhere in the optimizer state (inside `optax.chain` tuples, `multi_transform`, `masked`,
`inject_hyperparams`): a node with a scalar `b1` and a subtree `z` is one, whatever its type name
or position. z mirrors the trained parameters: the parameter tree is the subtree outside the state
whose leaves have z's paths and shapes (the one nearest the root when several do). Everything
outside the optimizer state is written (statistics such as `batch_stats`, frozen parameters, as
saved); names are the pytree paths joined with `/` (`params/dense1/kernel`).

The result is the uniform view every reader gives: `{'model': {name: TensorRef}, 'optimizer':
{'state': {i: {'z': ...}}, 'param_groups': [{'params', 'param_names', 'b1', 'b1_dtype', ...}]}}`,
one group per Schedule-Free state.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import inputs, limits
from ..errors import InputError
from ..layout import check_text
from ..tensors import TensorRef
from .base import LoadRequest, Opened, Reader

METADATA = "_METADATA"
STEP_METADATA = "_CHECKPOINT_METADATA"
ARRAY_TYPES = ("jax.Array", "np.ndarray")
EXTRA_HINT = "install the extra: pip install 'sfckpt[jax]' (tensorstore and ml_dtypes; JAX is not needed)"
_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint64", "uint32",
           "uint16", "uint8", "bool", "complex64"}

KeyPath = tuple[str, ...]
CHUNK_SLACK = 1 << 20  # elements a chunk may hold beyond its array's (zarr allows chunks larger than tiny arrays)


@dataclass
class Leaf:
    path: KeyPath
    dtype: str
    shape: tuple[int, ...]
    store: Any  # an open tensorstore


def item_folder(path: Path) -> Path | None:
    """The folder holding `_METADATA`: `path` itself, or a step folder's one item; None if not Orbax."""
    if not path.is_dir():
        return None
    if (path / METADATA).is_file():
        return path
    if not (path / STEP_METADATA).is_file():
        steps = sorted((int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / STEP_METADATA).is_file()))
        if steps:
            raise InputError(f"{path}: an Orbax CheckpointManager folder with steps {', '.join(map(str, steps[-5:]))}",
                             f"pass one step folder, such as {path / str(steps[-1])}")
        return None
    items = sorted(p for p in path.iterdir() if p.is_dir() and (p / METADATA).is_file())
    if len(items) > 1:
        raise InputError(f"{path}: an Orbax step with several items ({', '.join(p.name for p in items[:6])})",
                         "pass the item folder that holds the parameters and the optimizer state")
    return items[0] if items else None


def is_orbax_folder(path: Path) -> bool:
    return item_folder(path) is not None


def load_object(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint as `{'model': ..., 'optimizer': ...}`, and notes for inspect."""
    folder = item_folder(path)
    inputs.check_tree(path, "an Orbax checkpoint")
    meta = inputs.read_json(folder / METADATA, "Orbax _METADATA")
    tree = _tree(meta, folder)
    leaves = _open_arrays(folder, meta, tree)
    states = _schedule_free_states(leaves)
    if not states:
        raise InputError(f"{path}: an Orbax checkpoint without an optax Schedule-Free state (no node with 'b1' and 'z')",
                         "x needs the optimizer's z: save the optimizer state with the parameters "
                         "({'params': params, 'opt_state': opt_state})")
    roots, groups, state = [], [], {}
    for where in states:
        params_at, root = _parameter_tree(where, leaves, states)
        roots.append(root)
        groups.append(_group(where, params_at, leaves, state))
    weights = {_name(p): _ref(leaf) for p, leaf in leaves.items() if not any(p[:len(r)] == r for r in roots)}
    notes = [f"optax Schedule-Free state at {'/'.join(w)}" for w in states]
    notes += [f"{n} copied as saved (not trained by the optimizer"
              + ("; statistics gathered at y, re-estimate them at x before trusting accuracy)" if "stats" in n else ")")
              for n in _untrained_subtrees(weights, groups)]
    return {"model": weights, "optimizer": {"state": state, "param_groups": groups}}, notes


def _tree(meta: Any, folder: Path) -> dict[KeyPath, dict]:
    """Leaf path -> value metadata, from `_METADATA`'s tree_metadata."""
    entries = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(entries, dict):
        raise InputError(f"{folder / METADATA} has no tree_metadata", "the checkpoint is damaged, or not an Orbax PyTree save")
    tree = {}
    for key, entry in entries.items():
        keys = entry.get("key_metadata") if isinstance(entry, dict) else None
        value = entry.get("value_metadata") if isinstance(entry, dict) else None
        if not isinstance(keys, list) or not isinstance(value, dict) or \
                not all(isinstance(k, dict) and isinstance(k.get("key"), str) for k in keys):
            raise InputError(f"{folder / METADATA}: entry {inputs.excerpt(key)} has no key_metadata list of keys",
                             "the checkpoint is damaged")
        path = tuple(k["key"] for k in keys)
        for part in path:
            check_text(part, "Orbax tree key")
            if not part or part in (".", "..") or any(c in part for c in "/\\\0"):
                # tensorstore joins keys into file paths: these would name files outside the array's folder
                raise InputError(f"{folder / METADATA}: tree key {inputs.excerpt(part)} is not a plain name",
                                 "refusing to read it; the checkpoint is damaged or crafted")
        tree[path] = value
    return tree


def _open_arrays(folder: Path, meta: dict, tree: dict[KeyPath, dict]) -> dict[KeyPath, Leaf]:
    """Every array leaf, opened (metadata only) and checked against its size limit."""
    ts = _tensorstore()
    ocdbt = meta.get("use_ocdbt", True)
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    context = ts.Context({"cache_pool": {"total_bytes_limit": 0}, "data_copy_concurrency": {"limit": 1},
                          "file_io_concurrency": {"limit": 1}})
    keys: dict[str, KeyPath] = {}
    pending = []
    for path, value in tree.items():
        if value.get("skip_deserialize") or value.get("value_type") not in ARRAY_TYPES:
            continue  # None, optax's MaskedNode, Python scalars: nothing to read
        key = ".".join(path)
        if key in keys:
            raise InputError(f"{folder}: Orbax stores {_name(keys[key])} and {_name(path)} under the same key {key!r}",
                             "rename the dict keys that hold dots and save again")
        keys[key] = path
        kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": str(folder) + "/"}, "path": key + "/"} if ocdbt \
            else {"driver": "file", "path": f"{folder}/{key}/"}
        spec = {"driver": driver, "kvstore": kvstore}
        pending.append((path, ts.open(spec, open=True, read=True, context=context)))
    leaves = {}
    for path, future in pending:
        try:
            store = future.result()
        except Exception as exc:  # tensorstore raises ValueError and its own errors for missing or bad data
            raise InputError(f"{folder}: array {_name(path)} cannot be opened ({str(exc)[:160]})",
                             "the checkpoint is incomplete or damaged; copy the whole step folder") from None
        leaves[path] = _checked(folder, path, store)
    return leaves


def _checked(folder: Path, path: KeyPath, store: Any) -> Leaf:
    dtype, shape = store.dtype.name, tuple(int(n) for n in store.domain.shape)
    if dtype not in _DTYPES:
        raise InputError(f"{folder}: array {_name(path)} has dtype {dtype}, which safetensors cannot hold",
                         "sfckpt cannot write this model")
    nbytes = math.prod(shape) * store.dtype.numpy_dtype.itemsize
    if nbytes > limits.ARRAY_BYTES.value:
        raise limits.ARRAY_BYTES.exceeded(f"{folder}: array {_name(path)} of shape {list(shape)} would take {nbytes} bytes")
    layout = store.chunk_layout
    chunks = [math.prod(int(n) for n in c.shape) for c in (layout.read_chunk, layout.write_chunk) if c.shape is not None]
    if max(chunks, default=0) > max(math.prod(shape), CHUNK_SLACK):
        # tensorstore decodes whole chunks (and a zarr3 shard's whole index): a chunk grid far larger
        # than the array would allocate its size, whatever the array's shape says.
        raise InputError(f"{folder}: array {_name(path)} of shape {list(shape)} claims chunks of {max(chunks)} "
                         "elements, more than the array holds", "refusing to read it; the checkpoint is damaged or crafted")
    return Leaf(path, dtype, shape, store)


def _tensorstore():
    try:
        import tensorstore
    except ImportError:
        raise InputError("reading an Orbax checkpoint needs tensorstore, which is not installed", EXTRA_HINT) from None
    return tensorstore


def _name(path: KeyPath) -> str:
    return "/".join(path)


def _ref(leaf: Leaf) -> TensorRef:
    return TensorRef(leaf.dtype, leaf.shape, lambda: _read(leaf), array=lambda: _array(leaf))


def _array(leaf: Leaf):
    """The array as numpy (bfloat16, which arrives as ml_dtypes' type, as its uint16 bits)."""
    import numpy as np

    try:
        array = np.ascontiguousarray(leaf.store.read().result())
    except Exception as exc:
        raise InputError(f"array {_name(leaf.path)} cannot be read ({str(exc)[:160]})",
                         "the checkpoint is incomplete or damaged; copy the whole step folder") from None
    return array.view(np.uint16) if leaf.dtype == "bfloat16" else array


def _read(leaf: Leaf):
    """The array as a torch tensor."""
    import torch

    array = torch.from_numpy(_array(leaf))
    return array.view(torch.bfloat16) if leaf.dtype == "bfloat16" else array


def _scalar(leaf: Leaf) -> float:
    return float(leaf.store.read().result().astype("float64"))


def _schedule_free_states(leaves: dict[KeyPath, Leaf]) -> list[KeyPath]:
    """Paths of the nodes that hold a scalar `b1` and a subtree `z` of arrays: optax's ScheduleFreeState."""
    found = []
    for path, leaf in leaves.items():
        if path[-1] != "b1" or leaf.shape != () or not leaf.dtype.startswith(("float", "bfloat")):
            continue
        node = path[:-1]
        if any(p[:len(node) + 1] == node + ("z",) for p in leaves):
            found.append(node)
    return found


def _z_leaves(where: KeyPath, leaves: dict[KeyPath, Leaf]) -> dict[KeyPath, Leaf]:
    """z's array leaves by their path relative to z."""
    z = where + ("z",)
    return {p[len(z):]: leaf for p, leaf in leaves.items() if p[:len(z)] == z}


def _parameter_tree(where: KeyPath, leaves: dict[KeyPath, Leaf], states: list[KeyPath]) -> tuple[KeyPath, KeyPath]:
    """(where the parameters z mirrors are, the root of the optimizer state holding `where`)."""
    z = _z_leaves(where, leaves)
    first = next(iter(z))
    candidates = []
    for path, leaf in leaves.items():
        prefix = path[:len(path) - len(first)]
        if path[len(prefix):] != first or any(prefix[:len(s)] == s for s in states) or leaf.shape != z[first].shape:
            continue  # inside a Schedule-Free state (its z, its base state's mu and nu) is never y
        if all(leaves.get(prefix + r) is not None and leaves[prefix + r].shape == zl.shape for r, zl in z.items()):
            candidates.append(prefix)
    if not candidates:
        raise InputError(f"the Schedule-Free state at {_name(where)} has a z whose paths (such as {_name(first)}) "
                         "match no parameters saved beside it",
                         "save the parameters the optimizer trains with its state ({'params': params, 'opt_state': opt_state})")
    best = _params_among(where, candidates)
    return best, where[:len(os.path.commonprefix([best, where])) + 1]


def _params_among(where: KeyPath, candidates: list[KeyPath]) -> KeyPath:
    """The one tree that holds y among the saved trees z mirrors.

    Structure cannot tell y from another mirror: `{'state': {'params', 'opt_state'}, 'ema_params'}`
    and `{'params', 'opt_state': MultiStepsState(acc_grads, inner_opt_state)}` are the same shape
    with the roles swapped. So a single mirror is y; among several, the one named `params` (the
    name optax, Flax and Orbax document), the nearest to the state when several are; else refuse.
    """
    if len(candidates) == 1:
        return candidates[0]
    named = [c for c in candidates if c and c[-1] == "params"]
    depth = {c: len(os.path.commonprefix([c, where])) for c in named}
    nearest = [c for c in named if depth[c] == max(depth.values())]
    if len(nearest) == 1:
        return nearest[0]
    raise InputError(f"z of the Schedule-Free state at {_name(where)} mirrors several saved trees "
                     f"({', '.join(_name(c) or '(root)' for c in (nearest or candidates)[:4])}), so which one holds y "
                     "is not known", "save the trained parameters under the key 'params' beside the optimizer state "
                     "({'params': params, 'opt_state': opt_state}), and other copies (EMA) under other names")


def _group(where: KeyPath, params_at: KeyPath, leaves: dict[KeyPath, Leaf], state: dict) -> dict[str, Any]:
    """One parameter group for the Schedule-Free state at `where`, its z entries added to `state`."""
    b1 = leaves[where + ("b1",)]
    group: dict[str, Any] = {"params": [], "param_names": [], "b1": _scalar(b1), "b1_dtype": b1.dtype,
                             "schedule_free_state": _name(where)}
    for field in ("step_count", "weight_sum", "max_lr"):
        leaf = leaves.get(where + (field,))
        if leaf is not None and leaf.shape == ():
            value = _scalar(leaf)
            group[field] = int(value) if field == "step_count" else value
    for rel, leaf in _z_leaves(where, leaves).items():
        if not leaf.dtype.startswith(("float", "bfloat")):
            raise InputError(f"z leaf {_name(where + ('z',) + rel)} is {leaf.dtype}, not a floating dtype",
                             "the checkpoint is damaged, or this is not a Schedule-Free state")
        index = len(state)
        state[index] = {"z": _ref(leaf)}
        group["params"].append(index)
        group["param_names"].append(_name(params_at + rel))
    return group


def _untrained_subtrees(weights: dict[str, TensorRef], groups: list[dict]) -> list[str]:
    """The top two levels of the saved tree that no z covers (statistics, frozen parameters)."""
    trained = {n for g in groups for n in g["param_names"]}
    out = []
    for name in weights:
        if name in trained:
            continue
        head = "/".join(name.split("/")[:2])
        if head not in out and not any(t.startswith(head + "/") for t in trained):
            out.append(head)
    return out


class OrbaxReader(Reader):
    """An Orbax item folder or `CheckpointManager` step folder holding an optax Schedule-Free state."""

    name = "orbax"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_orbax_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        obj, notes = load_object(path)
        return Opened(obj, [], self.name, notes=notes)

    def save_complete(self, path: Path) -> bool:
        # Orbax writes into `<name>.orbax-checkpoint-tmp-*` and renames the folder when the save is finalised.
        return ".orbax-checkpoint-tmp" not in path.name and is_orbax_folder(path)
