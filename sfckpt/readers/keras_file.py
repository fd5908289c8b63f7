"""Keras 3 checkpoints: `.keras` archives, `save_weights` files (`.weights.h5`) and sharded ones (`.weights.json`).

Read with zipfile and h5py only: Keras, TensorFlow and JAX are never imported. A `.keras` file is a zip of
`metadata.json`, `config.json` (the model, and in `compile_config.optimizer` the optimizer's class and
hyper-parameters) and `model.weights.h5`, which Keras stores uncompressed: it is read in place with
positioned reads, never extracted. In the HDF5 tree each layer's variables sit at `layers/<layer>/vars/<i>`
(nested models repeat the pattern) and the optimizer's at `optimizer/vars/<i>`, by position only:
`0` iterations, `1` the learning rate unless it is a schedule, then per trainable variable (in
`model.trainable_variables` order) `momentum` (ScheduleFreeAdamW's z) and `velocity`.

The checkpoint is presented as a torch-style object, `{"model": {path: ref}, "optimizer": {"state": {i: {"z",
"velocity"}}, "param_groups": [...]}}`, so that the mapping decides which variable each momentum belongs to
by content and order, as for torch. Weight names are the HDF5 dataset paths (`layers/dense/vars/0`), which
name each variable exactly where `model.load_weights` looks for it.
"""
from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from ..inputs import excerpt
from ..tensors import TensorRef
from .base import LoadRequest, Opened, ParameterOrder, Reader
from .hdf5_tree import HDF5_MAGIC, Dataset, Tree, read_tree

CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME = "config.json", "metadata.json", "model.weights.h5"
KINDS = ("keras", "keras-weights", "keras-sharded")
SF_CLASS = "ScheduleFreeAdamW"
KERAS_ORDER_STEPS = limits.Limit("SFCKPT_MAX_KERAS_ORDER_STEPS", 4_000_000,
                                 "steps spent cutting a Keras file's optimizer entries into its layers' variables")
ZIP_MEMBERS = limits.Limit("SFCKPT_MAX_ZIP_MEMBERS", 100_000, "members a .keras archive may list")
# BatchNormalization keeps its trainable variables (gamma if scale, beta if center) first, then these two,
# which it accumulates from batches seen at y.
BN_STATS = ("moving_mean", "moving_variance")
WEIGHTS_ONLY_NOTE = ("a save_weights file keeps no optimizer config: assumed ScheduleFreeAdamW without use_ema or "
                     "gradient accumulation, β from --beta; every pair is still verified by content")


@dataclass
class KerasFile:
    """What a Keras file holds, in the shape `layout.find` reads, and what inspect should say about it."""

    obj: dict[str, Any]
    container: str
    model_order: list[str]
    accumulated: list[str]  # BatchNorm statistics: gathered at y
    notes: list[str] = field(default_factory=list)
    config: bytes | None = None  # config.json and metadata.json as saved (a .keras output copies them)
    metadata: bytes | None = None
    tree: Tree | None = None
    order_is_rule: bool = False  # model_order is the one cut Keras' saving rule allows: the mapping's domain
    other_members: list[str] = field(default_factory=list)  # what else the archive holds (assets/)


def sniff_zip(file: inputs.InputFile) -> str | None:
    """'keras' for a zip holding Keras' members and no torch `data.pkl`; None for any other zip."""
    try:
        # ZipFile leaves a file object it was given open: close the duplicated descriptor here
        with file.fileobj() as raw, zipfile.ZipFile(raw) as zf:
            names = zf.namelist()
    except Exception:  # whatever zipfile trips on is the torch reader's to explain, unless the name says Keras
        return "keras" if str(file.path).endswith(".keras") else None
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return None
    return "keras" if CONFIG_NAME in names and (WEIGHTS_NAME in names or "model.weights.npz" in names) else None


def sniff_file(path: Path, head: bytes) -> str | None:
    """'keras-weights' for an HDF5 file, 'keras-sharded' for a `.weights.json` shard map, else None."""
    if head.startswith(HDF5_MAGIC):
        return "keras-weights"
    if path.name.endswith(".weights.json") and head.lstrip().startswith(b"{"):
        return "keras-sharded"
    return None


def open_checkpoint(path: Path, kind: str) -> KerasFile:
    """A Keras checkpoint as weights + optimizer state (nothing of its tensors read but the step count)."""
    config = metadata = None
    others: list[str] = []
    if kind == "keras":
        tree, config, metadata, others = _open_archive(path)
    elif kind == "keras-sharded":
        tree = _open_sharded(path)
    else:
        tree = _open_h5(path)
    model_cfg, opt_cfg = _configs(path, config)
    optimizer, notes = _optimizer_state(path, tree, opt_cfg)
    trained = [s["z"].shape for s in optimizer["state"].values()]
    weights, order, accumulated, only_way = _layer_variables(tree, model_cfg, trained)
    if not weights:
        raise InputError(f"{path}: no layer variables found (no layers/<name>/vars/<i> in the HDF5 tree)",
                         "pass a Keras model saved with model.save() or model.save_weights()")
    return KerasFile({"model": weights, "optimizer": optimizer}, "keras" if kind == "keras" else "keras-weights",
                  order, accumulated, notes, config, metadata, tree, only_way, others)


class KerasReader(Reader):
    """Keras 3 `.keras`, `.weights.h5` and `.weights.json` files (`readers.sniff` tells them by their bytes)."""

    name = "keras"

    def recognise(self, path: Path, kind: str) -> bool:
        """A Keras file that holds optimizer variables; one without them is released weights."""
        return kind in KINDS and has_optimizer(path, kind)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        from . import sniff

        keras = open_checkpoint(path, sniff(path))
        order = ParameterOrder(tuple(keras.model_order),
                               (frozenset(keras.model_order),) if keras.order_is_rule else None,
                               "Keras' layer order (trainable variables first in each layer)")
        return Opened(keras.obj, container=keras.container, notes=keras.notes, order=order,
                      accumulated=keras.accumulated)

    def save_complete(self, path: Path) -> bool:
        """Whether Keras has finished saving `path` (for `sfckpt watch`): the zip's directory, every
        shard and the HDF5 superblock read back whole (Keras writes a `.keras` zip's directory last)."""
        from . import sniff

        try:
            with inputs.scope(path):
                kind = sniff(path)
                if kind not in KINDS:
                    return False
                read_weights(path, kind)
        except InputError:
            return False
        return True


def has_optimizer(path: Path, kind: str) -> bool:
    """Whether a Keras file holds optimizer variables (a training save) rather than weights only."""
    if kind == "keras-sharded":
        index = inputs.read_json(path, "Keras shard map")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        return isinstance(weight_map, dict) and any(str(k).startswith("/optimizer/") for k in weight_map)
    tree = _open_archive(path)[0] if kind == "keras" else _open_h5(path)
    return any(p.startswith("optimizer/vars/") for p in tree.datasets)


def weights_only(path: Path) -> InputError:
    """The refusal for a Keras file without optimizer variables given where a training checkpoint is needed."""
    return InputError(f"{path}: a Keras file without optimizer variables (no optimizer/vars) holds weights only, "
                      "not the momentum that x needs", "pass the file Keras saved during training with "
                      "ScheduleFreeAdamW compiled (model.save or save_weights after fit)")


def _open_h5(path: Path) -> Tree:
    file = inputs.open_input(path)
    return read_tree(file, 0, file.size, str(path))


def read_weights(path: Path, kind: str) -> dict[str, TensorRef]:
    """The layer variables of a Keras file (a `.keras` or `.weights.h5` release, say), without the optimizer's."""
    if kind == "keras":
        tree = _open_archive(path)[0]
    elif kind == "keras-sharded":
        tree = _open_sharded(path)
    else:
        tree = _open_h5(path)
    return {p: d.ref for p, d in tree.datasets.items() if not p.startswith("optimizer/")}


def _open_archive(path: Path) -> tuple[Tree, bytes, bytes | None, list[str]]:
    """The HDF5 tree of a `.keras` zip's weights member (read in place), its config and metadata bytes,
    and the names of its other members."""
    file = inputs.open_input(path)
    try:
        zf = zipfile.ZipFile(file.fileobj())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DamagedInput(f"{path}: not a readable zip archive ({str(exc)[:120]})", "the file is truncated or damaged") from exc
    with zf:
        infos = zf.infolist()
        if len(infos) > ZIP_MEMBERS.value:
            raise ZIP_MEMBERS.exceeded(f"{path}: a .keras archive of {len(infos)} members")
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            inputs.confined(path.parent, info.filename, f"{path}: zip member")  # absolute or `..` names are refused
            if info.filename in members:
                raise InputError(f"{path}: the archive lists '{info.filename[:200]}' twice", "the file is damaged or crafted")
            members[info.filename] = info
        if WEIGHTS_NAME not in members:
            why = "its weights are in model.weights.npz (weights_format='npz'), which sfckpt does not read" \
                if "model.weights.npz" in members else f"it holds no {WEIGHTS_NAME}"
            raise InputError(f"{path}: {why}", "save the model with model.save('model.keras') (HDF5 weights, the default)")
        config = _member_bytes(zf, members, CONFIG_NAME, path)
        metadata = _member_bytes(zf, members, METADATA_NAME, path) if METADATA_NAME in members else None
        start, size = _stored_member(file, members[WEIGHTS_NAME], path)
    others = sorted(set(members) - {CONFIG_NAME, METADATA_NAME, WEIGHTS_NAME})
    return read_tree(file, start, size, f"{path}:{WEIGHTS_NAME}"), config, metadata, others


def _member_bytes(zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], name: str, path: Path) -> bytes:
    """A small member (a JSON file), read bounded whatever size its header declares."""
    if name not in members:
        raise InputError(f"{path}: the archive has no {name}", "the file is not a complete .keras archive")
    bound = limits.JSON_BYTES.value
    if members[name].file_size > bound:
        raise limits.JSON_BYTES.exceeded(f"{path}: {name} of {members[name].file_size} bytes")
    try:
        with zf.open(members[name]) as f:
            data = f.read(bound + 1)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise DamagedInput(f"{path}: {name} cannot be read from the archive ({str(exc)[:120]})", "the file is damaged") from exc
    if len(data) > bound:
        raise limits.JSON_BYTES.exceeded(f"{path}: {name} inflating past {bound} bytes")
    return data


def _stored_member(file: inputs.InputFile, info: zipfile.ZipInfo, path: Path) -> tuple[int, int]:
    """Where an uncompressed member's bytes lie in the archive, from its local header, checked."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise InputError(f"{path}: {info.filename} is compressed or encrypted in the archive; Keras stores it "
                         "uncompressed, and sfckpt reads it in place only then",
                         "save the model again with model.save(), or re-pack it uncompressed (zip -0)")
    if info.compress_size != info.file_size:
        raise InputError(f"{path}: {info.filename} is stored with {info.compress_size} bytes for {info.file_size}",
                         "the file is damaged or crafted")
    header = file.pread(30, info.header_offset) if info.header_offset + 30 <= file.size else b""
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: the local header of {info.filename} is missing", "the file is truncated or damaged")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if file.pread(name_len, info.header_offset + 30) != info.filename.encode("utf-8"):
        raise InputError(f"{path}: the local header of {info.filename} names another member", "the file is damaged or crafted")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file.size:
        raise InputError(f"{path}: {info.filename} runs past the end of the archive", "the file is truncated")
    return start, info.file_size


def _open_sharded(path: Path) -> Tree:
    """One tree from a `.weights.json` shard map and the `.weights.h5` shards it names (beside it)."""
    index = inputs.read_json(path, "Keras shard map")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise InputError(f"{path}: not a Keras shard map (no weight_map object)", "the file is damaged")
    shards: list[str] = []
    for group, names in weight_map.items():
        for name in names if isinstance(names, list) else [names]:
            inputs.confined(path.parent, name, f"{path}: weight_map entry '{str(group)[:200]}'")
            if name not in shards:
                shards.append(name)
    merged = Tree({}, {}, [])
    for name in shards:
        file = inputs.open_input(path.parent / name)
        tree = read_tree(file, 0, file.size, str(path.parent / name))
        for key, value in tree.datasets.items():
            if key in merged.datasets:
                raise InputError(f"{path}: '{key[:200]}' is in two shards", "the shards do not belong together")
            merged.datasets[key] = value
        for key, attrs in tree.groups.items():
            merged.groups.setdefault(key, {}).update(attrs)
            # shards are written in order: a later shard's groups come after every group of an earlier one
            merged.written.setdefault(key, len(merged.handle) << 48 | tree.written.get(key, 0))
        merged.handle.append(tree.handle)
    return merged


def _configs(path: Path, config: bytes | None) -> tuple[Mapping | None, Mapping | None]:
    """The model config and the optimizer config of a `.keras` archive (None, None for a weights file)."""
    if config is None:
        return None, None
    cfg = inputs.parse_json(config, f"{path}: {CONFIG_NAME}")
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: {CONFIG_NAME} is not a JSON object", "the file is damaged")
    compiled = cfg.get("compile_config")
    opt = compiled.get("optimizer") if isinstance(compiled, dict) else None
    if not isinstance(opt, dict):
        raise InputError(f"{path}: the model was saved without a compiled optimizer (no compile_config.optimizer), "
                         "so it holds no optimizer state", "x needs ScheduleFreeAdamW's momentum: save the model "
                         "after model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(...)) and fit")
    return cfg, opt


def _layer_configs(cfg: Any, trainable: bool, out: dict[tuple[str, ...], tuple[bool, str]],
                   key: tuple[str, ...] = ()) -> None:
    """(names from the outermost model in) -> (trainable, class name), for every layer in a model config,
    nested models included. Names are unique only within one model, so a layer is known by its chain of names."""
    inner = cfg.get("config") if isinstance(cfg, dict) else None
    if not isinstance(inner, dict):
        return
    trainable = trainable and inner.get("trainable", True) is not False
    out.setdefault(key, (trainable, str(cfg.get("class_name"))))  # () is the model itself
    for layer in inner.get("layers") or []:
        sub = layer.get("config") if isinstance(layer, dict) else None
        name = sub.get("name", layer.get("name")) if isinstance(sub, dict) else None
        if isinstance(name, str):
            _layer_configs(layer, trainable, out, key + (name,))


def _layer_variables(tree: Tree, model_cfg: Mapping | None,
                     trained: list[tuple[int, ...]]) -> tuple[dict[str, TensorRef], list[str], list[str], bool]:
    """The layer variables in model order, the order of those the optimizer trains, the BatchNorm
    statistics, and whether that order is the only one Keras' saving rule allows (see `_prefix_order`)."""
    layers: dict[tuple[str, ...], tuple[bool, str]] = {}
    if model_cfg is not None:
        _layer_configs(model_cfg, True, layers)
    rank = {name: i for i, name in enumerate(layers)}  # the config's layer order is model.trainable_variables' order
    by_group: dict[str, list[Dataset]] = {}
    for p, d in tree.datasets.items():
        if not p.startswith("optimizer/") and "/vars/" in f"/{p}":
            by_group.setdefault(p.rsplit("/vars/", 1)[0] if "/vars/" in p else "", []).append(d)

    owner_of = _qualified_names(tree)

    def anchor_of(group: str) -> str:
        # A layer's inner layers (attention projections, RNN cells) are not in the config: they belong
        # to the nearest enclosing layer that is
        while group and owner_of(group) not in rank:
            group = group.rsplit("/", 1)[0] if "/" in group else ""
        return group

    weights: dict[str, TensorRef] = {}
    accumulated: list[str] = []
    spans: list[tuple[list[Dataset], int]] = []  # per layer: its variables, and how many of them may be trained
    def place(group: str) -> tuple:
        # inner layers follow their layer, in the order Keras wrote them
        return rank.get(owner_of(anchor_of(group)), len(rank)), tree.written.get(group, 0), _natural(group)

    for group in sorted(by_group, key=place):
        trainable, cls = layers.get(owner_of(group)) or (layers.get(owner_of(anchor_of(group)), (True, ""))[0], "")
        items = sorted(by_group[group], key=lambda d: _natural(d.path))
        stats = len(BN_STATS) if cls == "BatchNormalization" else 0
        accumulated += [d.path for d in items[len(items) - stats:]] if stats else []
        weights.update((d.path, d.ref) for d in items)
        spans.append((items, len(items) - stats if trainable else 0))
    order = _prefix_order(spans, trained)
    if order is not None:
        return weights, order, accumulated, True
    fallback = [d.path for items, most in spans for d in items[:most] if d.ref.is_float]
    return weights, fallback, accumulated, False


def _qualified_names(tree: Tree) -> Callable[[str], tuple[str, ...] | None]:
    """For a group, the names of the layer whose variables it holds and of the layers enclosing it,
    outermost first, as the config nests them; None for a group that is no layer's. Keras names groups
    by class (`layers/dense_1`) and keeps each layer's own name in its `vars` group."""
    chains: dict[str, tuple[str, ...]] = {"": ()}

    def chain(group: str) -> tuple[str, ...]:
        if group not in chains:  # each prefix once: the cost follows the number of groups
            own = tree.groups.get(f"{group}/vars", {}).get("name")
            parent = chain(group.rsplit("/", 1)[0] if "/" in group else "")
            chains[group] = parent + (own,) if isinstance(own, str) else parent
        return chains[group]

    def qualified(group: str) -> tuple[str, ...] | None:
        own = tree.groups.get(f"{group}/vars" if group else "vars", {}).get("name")
        return chain(group) if isinstance(own, str) else None

    return qualified


def _prefix_order(spans: list[tuple[list[Dataset], int]], trained: list[tuple[int, ...]]) -> list[str] | None:
    """The variables the optimizer's entries belong to, when Keras' rule leaves one way only, else None.

    A layer saves its trainable variables first (`Layer.save_own_variables`: trainable, then
    non-trainable), and `model.trainable_variables` lists layer after layer: so the entries are a
    prefix of each layer's variables in turn. Each way of cutting the entries' shapes into such
    prefixes is counted (up to two, over the entry positions reachable at each layer); only a single
    one is used, and content then checks every pair. The work grows with layers times entries, so
    it is bounded (`KERAS_ORDER_STEPS`), and positions the layers left cannot use up are dropped."""
    steps = [0]

    def cuts(layer: int, entry: int) -> list[int]:
        items, most = spans[layer]
        k, out = 0, [0]
        while k < most and entry + k < len(trained) and items[k].ref.is_float and items[k].shape == trained[entry + k]:
            k += 1
            out.append(k)
        steps[0] += len(out)
        if steps[0] > KERAS_ORDER_STEPS.value:
            raise KERAS_ORDER_STEPS.exceeded(f"{len(trained)} optimizer entries over {len(spans)} layers "
                                             f"need more than {KERAS_ORDER_STEPS.value} steps to place")
        return out

    room = [0] * (len(spans) + 1)  # how many entries the layers from here on can take at most
    for layer in reversed(range(len(spans))):
        room[layer] = room[layer + 1] + spans[layer][1]
    reach = [{0}]
    for layer in range(len(spans)):
        reach.append({entry + k for entry in reach[-1] for k in cuts(layer, entry)
                      if len(trained) - entry - k <= room[layer + 1]})
    ways = [dict.fromkeys(r, 0) for r in reach]
    ways[-1] = {entry: int(entry == len(trained)) for entry in reach[-1]}
    for layer in reversed(range(len(spans))):
        for entry in reach[layer]:
            ways[layer][entry] = min(2, sum(ways[layer + 1].get(entry + k, 0) for k in cuts(layer, entry)))
    if ways[0][0] != 1:
        return None
    order, entry = [], 0
    for layer, (items, _) in enumerate(spans):
        k = next(k for k in cuts(layer, entry) if ways[layer + 1].get(entry + k) == 1)  # the one cut leaving a way on
        order += [d.path for d in items[:k]]
        entry += k
    return order


def _natural(text: str) -> list:
    """Numbers in paths compared as numbers (vars/10 after vars/9)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _scalar(ref: TensorRef):
    """A 0-d variable's value, read with numpy where its bytes can be (inspect stays without torch)."""
    import numpy as np

    raw = ref.raw_bytes() if ref.dtype in ("int32", "int64", "float16", "float32", "float64") else None
    if raw is None:  # bfloat16 and float8 learning rates: numpy has no such dtype
        return ref.load().item()
    return np.frombuffer(raw.tobytes(), dtype=np.dtype(ref.dtype).newbyteorder("<"))[0].item()


def _optimizer_state(path: Path, tree: Tree, opt_cfg: Mapping | None) -> tuple[dict, list[str]]:
    """The optimizer's variables as a torch-style state dict: {"state": {i: {"z", "velocity"}}, "param_groups"}."""
    variables = sorted((d for p, d in tree.datasets.items() if p.startswith("optimizer/vars/")),
                       key=lambda d: _natural(d.path))
    if not variables:
        raise InputError(f"{path}: no optimizer variables (no optimizer/vars in the HDF5 tree)",
                         "x needs ScheduleFreeAdamW's momentum: save after training, with the optimizer built")
    if [d.path for d in variables] != [f"optimizer/vars/{i}" for i in range(len(variables))]:
        raise InputError(f"{path}: optimizer variables are not numbered 0..{len(variables) - 1}", "the file is damaged")
    notes: list[str] = []
    group: dict[str, Any] = {"keras_optimizer": SF_CLASS}
    if opt_cfg is None:
        has_lr, per_var = (len(variables) - 1) % 2 == 1, 0
        notes.append(WEIGHTS_ONLY_NOTE)
    else:
        has_lr, per_var = _check_optimizer_config(path, opt_cfg, group)
    fixed = 1 + int(has_lr)
    width = 2 + per_var
    count = len(variables) - fixed
    if count < 0 or count % width:
        raise InputError(f"{path}: {len(variables)} optimizer variables do not fit ScheduleFreeAdamW's layout "
                         f"(iterations{', learning rate' if has_lr else ''}, then {width} per trainable variable)",
                         _misfit_hint(opt_cfg))
    if count == 0:  # a compiled optimizer makes these two at once, the rest when it is built
        raise InputError(f"{path}: the optimizer holds {'iterations and the learning rate' if has_lr else 'iterations'} "
                         "only, no momentum: it was never built (compiled again after training, or saved before fit)",
                         "save the model right after fit with the optimizer that trained it")
    iterations = variables[0]
    if iterations.dtype not in ("int32", "int64") or iterations.shape != ():
        raise InputError(f"{path}: optimizer/vars/0 is not the iteration counter", "the file is damaged")
    group["iterations"] = int(_scalar(iterations.ref))
    if has_lr:
        if variables[1].shape != () or not variables[1].ref.is_float:
            raise InputError(f"{path}: optimizer/vars/1 is not the learning rate the optimizer config says it is",
                             "the optimizer config does not match its variables; the file is damaged")
        group["lr"] = float(_scalar(variables[1].ref))
    state: dict[int, dict[str, TensorRef]] = {}
    for k in range(count // width):
        # gradient accumulators (one per variable) come before the momentum/velocity pairs
        z, velocity = variables[fixed + count // width * per_var + 2 * k:][:2]
        if z.shape != velocity.shape or not z.ref.is_float:
            raise InputError(f"{path}: optimizer variables {z.path} and {velocity.path} are not a momentum/velocity pair",
                             _misfit_hint(opt_cfg))
        state[k] = {"z": z.ref, "velocity": velocity.ref}
    group["params"] = list(state)
    return {"state": state, "param_groups": [group]}, notes


def _misfit_hint(opt_cfg: Mapping | None) -> str:
    """What to do when the optimizer variables do not fit the layout they were read with."""
    if opt_cfg is None:  # the layout was assumed, not read: options that add variables are the likely cause
        return ("a save_weights file keeps no optimizer config, so sfckpt assumes ScheduleFreeAdamW without "
                "gradient_accumulation_steps or use_ema; convert the .keras file model.save() wrote, whose config says")
    return "the optimizer config does not match its variables; the file is damaged"


def _check_optimizer_config(path: Path, opt_cfg: Mapping, group: dict[str, Any]) -> tuple[bool, int]:
    """Refuse optimizers that are not ScheduleFreeAdamW or whose variables do not hold y; fill the group."""
    cls = opt_cfg.get("class_name")
    inner = opt_cfg.get("config", {}).get("inner_optimizer") if isinstance(opt_cfg.get("config"), dict) else None
    if cls == "LossScaleOptimizer" and isinstance(inner, dict) and inner.get("class_name") == SF_CLASS:
        raise InputError(f"{path}: {SF_CLASS} is wrapped in a LossScaleOptimizer (mixed_float16), whose variables "
                         "sfckpt does not read yet", "train with mixed_bfloat16 (no loss scaling) to convert with sfckpt")
    if cls != SF_CLASS:
        raise InputError(f"{path}: the model was compiled with the Keras optimizer {excerpt(cls)}, not {SF_CLASS}, "
                         "so there is no Schedule-Free x to reconstruct", "its variables already are the trained weights")
    cfg = opt_cfg.get("config")
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: compile_config.optimizer has no config object", "the file is damaged")
    if cfg.get("use_ema"):
        raise InputError(f"{path}: {SF_CLASS} ran with use_ema=True, which overwrites the model's variables with an "
                         "average of y, so y and with it x are not in the file",
                         "train without use_ema, or release the averaged weights as they are")
    for key in ("beta_1", "beta_2", "weight_decay", "warmup_steps", "epsilon"):
        group[key] = cfg.get(key)
    lr = cfg.get("learning_rate")
    if isinstance(lr, dict):
        group["lr_schedule"] = str(lr.get("class_name"))[:100]
    accumulate = cfg.get("gradient_accumulation_steps")
    return not isinstance(lr, dict), 1 if accumulate else 0
