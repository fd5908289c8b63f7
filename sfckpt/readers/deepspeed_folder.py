"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3), read without deepspeed and without running code.

`engine.save_checkpoint(dir)` writes a tag folder `dir/<tag>/` and a `latest` file naming it.
Hugging Face Trainer (`checkpoint-N/global_stepN`), Accelerate (`pytorch_model/`) and Lightning
(`<name>.ckpt/checkpoint/`) all write the same tag folder. Inside:

* ZeRO-1/2: `mp_rank_00_model_states.pt` (`module`: the 16-bit weights, which hold y;
  `param_shapes`: per parameter group, name -> shape in flat order; `frozen_param_shapes`,
  `shared_params`, `buffer_names`) and one `{bf16_}zero_pp_rank_R_mp_rank_00_optim_states.pt` per
  data-parallel rank with `optimizer_state_dict.single_partition_of_fp32_groups[g]` (this rank's
  slice of group g's flat fp32 master, padding at the end of the group stripped) and
  `base_optimizer_state` (the client optimizer's state dict: one flat "parameter" per group,
  so `state[g]['z']` is aligned with the slice). `param_alignment_paddings` pad each parameter.
* bf16 with float32 gradient accumulation (DeepSpeed's BF16_Optimizer): the same files,
  partitions kept with their padding and no `zero_stage` key.
* ZeRO-3: a `zero_pp_rank_R_mp_rank_00_model_states.pt` per rank (placeholder weights;
  `frozen_param_fragments` holds this rank's slice of each frozen parameter) and
  `optimizer_state_dict.fp32_flat_groups[s]` per sub-group, in which every parameter has
  ceil(numel / ranks) elements on every rank; z is `optimizer_state_dict.optimizer_state_dict.state[s]['z']`.

This is DeepSpeed's own `utils/zero_to_fp32.py` layout logic, applied to z as well as to the
master y and done lazily: each parameter's `TensorRef` reads only its slices of the
rank files, read with positioned reads. The result is the uniform view every reader gives:
`{'model': {name: TensorRef}, 'optimizer': {'state': {i: {'z': ...}}, 'param_groups': [...]}}`,
with `param_names` in the groups.
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .. import inputs, limits
from ..errors import DamagedInput, InputError
from ..inputs import confined
from ..tensors import TensorRef, joined_reader, joined_runs, torch_dtype
from .base import LoadRequest, Opened, Reader, Release
from .torch_file import Opaque, TorchArchive

LATEST = "latest"
_OPTIM_FILE = re.compile(r"(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
MODEL_FILE = "mp_rank_00_model_states.pt"
# DeepSpeed bookkeeping objects pickled beside the tensors; none is needed for x (the ZeRO
# stage is read from the enum's pickled value).
_KNOWN_OBJECTS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.utils.tensor_fragment.fragment_address",
    "torch.Tensor",  # the type argument of torch's _rebuild_from_type_v2, which the reader ignores
}
# Group entries that differ between ranks of one run (everything else must agree).
_PER_RANK_KEYS = {"params"}


def _tag_folder(path: Path) -> Path | None:
    """The tag folder inside `path` (itself, via `latest`, or a wrapper's layout), or None if not DeepSpeed."""
    if not path.is_dir():
        return None
    if any(_OPTIM_FILE.fullmatch(p.name) for p in path.iterdir()):
        return path
    latest = path / LATEST
    if latest.is_file():
        tag = inputs.read_text(latest, limits.TEXT_BYTES, "DeepSpeed's latest tag").strip()
        if not tag or "/" in tag or "\0" in tag or tag in (".", ".."):
            raise InputError(f"{latest} names no valid tag ({inputs.excerpt(tag)})", "pass the tag folder itself (global_stepN/)")
        try:
            found = (path / tag).is_dir()
        except OSError:  # a name too long for a file name
            found = False
        if not found:
            raise InputError(f"{latest} names tag {inputs.excerpt(tag)} but no such folder is in {path}",
                             "the checkpoint was not copied whole; copy the tag folder, or pass another tag folder")
        return confined(path, tag, str(latest))
    candidates = [p for p in (path / "checkpoint", path / "pytorch_model") if p.is_dir()]  # Lightning, Accelerate
    candidates += sorted((p for p in path.glob("global_step*") if p.is_dir()), key=lambda p: p.name)
    found = [p for p in candidates if any(_OPTIM_FILE.fullmatch(f.name) for f in p.iterdir())]
    if len(found) > 1:
        raise InputError(f"{path} holds several DeepSpeed tags ({', '.join(p.name for p in found)}) and no 'latest' file",
                         "pass the tag folder to use")
    return confined(path, found[0].name, f"{path}: the DeepSpeed tag") if found else None


def is_deepspeed_folder(path: Path) -> bool:
    """A DeepSpeed checkpoint: a tag folder, its parent with `latest`, or a wrapper's folder holding one."""
    return path.is_dir() and not (path / ".metadata").is_file() and (
        (path / LATEST).is_file() or _tag_folder(path) is not None)


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)) and all(type(n) is int and n >= 0 for n in value):
        return tuple(value)
    raise DamagedInput(f"{where} is not a tensor shape ({value!r:.60})", "the checkpoint is damaged")


def _gather(parts: list[tuple[TensorRef, int, int]], numel: int, shape: tuple[int, ...]):
    """The slices of flat tensors that make one parameter, joined, cut to `numel` and shaped."""
    import torch

    dtype = parts[0][0].dtype
    live = [(ref, start, length) for ref, start, length in parts if length]
    if not live:  # a parameter with no elements
        return torch.empty(shape, dtype=torch_dtype(dtype))
    if len(live) == 1:
        flat = live[0][0].load_flat(live[0][1], live[0][2])
    elif any(ref.dtype != dtype for ref, _, _ in live):
        flat = torch.cat([ref.load_flat(start, length) for ref, start, length in live])
    else:  # each rank's slice read straight into its place: one copy of the parameter in memory
        flat = torch.empty(sum(length for _, _, length in live), dtype=torch_dtype(dtype))
        at = 0
        for ref, start, length in live:
            ref.load_flat(start, length, flat[at:at + length])
            at += length
    return flat.narrow(0, 0, numel).view(shape)


def _joined(dtype: str, shape: tuple[int, ...], parts: list[tuple[TensorRef, int, int]], key: Any) -> TensorRef:
    """A parameter made of slices of flat tensors: whole on `load()`, and any range of it (a lerp
    slice, the mapping's sample) read from just the slices it falls in."""
    numel = math.prod(shape)
    same = all(ref.dtype == dtype for ref, _, _ in parts)
    return TensorRef(dtype, shape, (lambda: _gather(parts, numel, shape)), storage_id=key,
                     runs=joined_runs(parts) if same else None,
                     reader=joined_reader(parts) if same and numel else None)


@dataclass
class _Rank:
    """One data-parallel rank's optimizer file, and the pieces of it we use."""

    path: Path
    sd: Mapping[str, Any]
    flats: list[TensorRef]
    opt: Mapping[str, Any]  # the client optimizer's state dict


class DeepSpeedFolder:
    """A DeepSpeed ZeRO checkpoint: its layout now, each parameter's data on demand."""

    def __init__(self, path: Path):
        self.path = path
        tag = _tag_folder(path)
        if tag is None:
            raise InputError(f"{path}: no DeepSpeed rank files (*_optim_states.pt) here", "pass the tag folder (global_stepN/)")
        self.tag = tag
        self.notes: list[str] = []
        self.opaque: set[str] = set()
        self._open_ranks()
        self._read_model_states()

    # -- files ---------------------------------------------------------------------------------
    def _load(self, file: Path) -> Any:
        archive = TorchArchive(file)
        obj = archive.load_object()
        self.opaque |= archive.opaque
        if not isinstance(obj, Mapping):
            raise DamagedInput(f"{file} holds a {type(obj).__name__}, not DeepSpeed's checkpoint dict", "the checkpoint is damaged")
        return obj

    def _open_ranks(self) -> None:
        files: dict[int, Path] = {}
        prefixes, mp_ranks = set(), set()
        for f in self.tag.iterdir():
            m = _OPTIM_FILE.fullmatch(f.name)
            if m:
                prefixes.add(m.group(1) or "")
                mp_ranks.add(int(m.group(3)))
                if int(m.group(3)) == 0:
                    files[int(m.group(2))] = f
        if mp_ranks - {0}:
            raise InputError(f"{self.tag}: model-parallel rank files (mp_rank_{max(mp_ranks):02d}) found",
                             "tensor- or pipeline-parallel DeepSpeed checkpoints are not supported; only ZeRO data parallelism")
        if len(prefixes) > 1:
            raise InputError(f"{self.tag} mixes rank files of different precisions ({', '.join(sorted(p or 'fp32_' for p in prefixes))})",
                             "the folder holds files of two runs; keep only one run's files")
        if not files:
            raise InputError(f"{self.tag}: no DeepSpeed rank files (*zero_pp_rank_*_mp_rank_00_optim_states.pt)",
                             "the tag folder is incomplete, or not a DeepSpeed checkpoint; copy the whole tag folder")
        n = max(files) + 1
        missing = [r for r in range(n) if r not in files]
        if missing:
            raise InputError(f"{self.tag}: the optimizer file of rank {missing[0]} is missing "
                             f"(found ranks {', '.join(map(str, sorted(files)))})", "copy the whole tag folder")
        inputs.allow_open_files(2 * n + 64)  # every rank file stays open until the tensors are read
        self.ranks = [self._open_rank(files[r]) for r in range(n)]
        first = self.ranks[0]
        self.stage = self._stage(first)
        counts = first.sd.get("partition_count")
        counts = counts if isinstance(counts, (list, tuple)) else [counts]
        if not counts or not all(type(c) is int and c > 0 for c in counts):
            raise DamagedInput(f"{first.path}: partition_count {counts!r:.40} is not a number of ranks", "the checkpoint is damaged")
        self.world = max(counts)
        if self.world != n:
            raise InputError(f"{self.tag}: the run had {self.world} data-parallel ranks but {n} rank files are here",
                             "a rank file is missing or left over from another run; copy the whole tag folder of one save")
        if any(c != self.world for c in counts):
            raise InputError(f"{first.path}: parameter groups partitioned over different numbers of ranks ({counts})",
                             "expert-parallel (MoE) DeepSpeed checkpoints are not supported")
        self.group_count = len(first.opt["param_groups"])
        for other in self.ranks[1:]:
            self._same_run(first, other)

    def _open_rank(self, file: Path) -> _Rank:
        obj = self._load(file)
        sd = obj.get("optimizer_state_dict")
        if not isinstance(sd, Mapping):
            raise DamagedInput(f"{file} has no optimizer_state_dict", "the file is damaged or not a DeepSpeed ZeRO rank file")
        if "fp32_flat_groups" in sd:
            flats, opt = sd["fp32_flat_groups"], sd.get("optimizer_state_dict")
        elif "single_partition_of_fp32_groups" in sd:
            flats, opt = sd["single_partition_of_fp32_groups"], sd.get("base_optimizer_state")
        else:
            raise DamagedInput(f"{file} holds no fp32 master partitions (single_partition_of_fp32_groups or fp32_flat_groups)",
                             "the file is damaged or was written by an unsupported DeepSpeed optimizer")
        if isinstance(opt, (list, tuple)):
            raise InputError(f"{file} is an elastic ZeRO checkpoint, which keeps no optimizer hyper-parameters",
                             "save with zero_optimization.elastic_checkpoint false")
        if not isinstance(opt, Mapping) or not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("state"), Mapping):
            raise DamagedInput(f"{file} holds no client optimizer state (state and param_groups)",
                             "the file is damaged, or was saved without optimizer states")
        for g, group in enumerate(opt["param_groups"]):
            if not isinstance(group, Mapping) or not isinstance(group.get("params"), (list, tuple)):
                raise DamagedInput(f"{file}: optimizer param_groups[{g}] has no 'params' list", "the checkpoint is damaged")
            if not all(type(i) is int for i in group["params"]):
                raise DamagedInput(f"{file}: optimizer param_groups[{g}] params {list(group['params'])!r:.60} are not "
                                 "state indices", "the checkpoint is damaged")
        if not isinstance(flats, (list, tuple)) or not all(isinstance(t, TensorRef) and t.dtype == "float32" for t in flats):
            raise DamagedInput(f"{file}: the fp32 master partitions are not float32 tensors", "the checkpoint is damaged")
        return _Rank(file, sd, list(flats), opt)

    @staticmethod
    def _stage(rank: _Rank) -> int:
        stage = rank.sd.get("zero_stage")
        if stage is None:
            return 1  # BF16_Optimizer (bf16 with fp32 gradient accumulation) partitions like ZeRO-1
        if isinstance(stage, Opaque) and len(stage.args) == 1:
            stage = stage.args[0]  # ZeroStageEnum(n), read from its pickled value
        if stage not in (1, 2, 3):
            raise DamagedInput(f"{rank.path}: unknown ZeRO stage {stage!r:.30}", "the checkpoint is damaged")
        return stage

    def _same_run(self, first: _Rank, other: _Rank) -> None:
        hint = "the folder mixes files of different saves; copy the whole tag folder of one save"
        if self._stage(other) != self.stage:
            raise InputError(f"{other.path} is ZeRO stage {self._stage(other)} but rank 0 is stage {self.stage}", hint)
        if len(other.flats) != len(first.flats) or len(other.opt["param_groups"]) != self.group_count:
            raise InputError(f"{other.path} has {len(other.flats)} flat groups but rank 0 has {len(first.flats)}", hint)
        for g, (a, b) in enumerate(zip(first.opt["param_groups"], other.opt["param_groups"])):
            if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
                raise DamagedInput(f"{other.path}: param_groups[{g}] is not a dict", "the checkpoint is damaged")
            differ = sorted((k for k in set(a) | set(b) if k not in _PER_RANK_KEYS and a.get(k) != b.get(k)), key=str)
            if differ:
                k = differ[0]
                raise InputError(f"{other.path} does not belong with {first.path.name}: param_groups[{g}] {k} is "
                                 f"{b.get(k)!r:.40} there and {a.get(k)!r:.40} on rank 0", hint)

    def _read_model_states(self) -> None:
        if self.stage == 3:
            files = [self.tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.world)]
        else:
            files = [self.tag / MODEL_FILE]
        for f in files:
            if not f.is_file():
                raise InputError(f"{self.tag}: {f.name} is missing", "copy the whole tag folder")
        self.models = [self._load(f) for f in files]
        head = self.models[0]
        for key in ("module", "param_shapes"):
            if key not in head:
                raise DamagedInput(f"{files[0]} has no '{key}'", "the file is damaged or not a DeepSpeed model-states file")
        if not isinstance(head["module"], Mapping) or not isinstance(head["param_shapes"], (list, tuple)):
            raise DamagedInput(f"{files[0]}: module or param_shapes has the wrong type", "the checkpoint is damaged")
        for f, other in zip(files[1:], self.models[1:]):
            if other.get("param_shapes") != head["param_shapes"] or other.get("global_steps") != head.get("global_steps"):
                raise InputError(f"{f} does not belong with {files[0].name} (different parameters or step)",
                                 "the folder mixes files of different saves; copy the whole tag folder of one save")

    # -- the uniform view ----------------------------------------------------------------------
    def _layout(self) -> list[tuple[int, str, tuple[int, ...], list, list]]:
        """(group, name, shape, y parts, z parts) per trainable parameter, in flat order."""
        shapes = self.models[0]["param_shapes"]
        flats = len(self.ranks[0].flats)
        if len(shapes) != flats:
            raise InputError(f"{self.tag}: {len(shapes)} groups of param_shapes but {flats} flat groups in the rank files",
                             "the model-states file and the rank files come from different saves")
        z = [self._z_of(r) for r in self.ranks]
        for k in range(flats):
            have = [r for r in range(self.world) if z[r][k] is not None]
            if have and len(have) != self.world:
                lacking = next(r for r in range(self.world) if z[r][k] is None)
                raise DamagedInput(f"{self.ranks[lacking].path} has no z for flat group {k}, but rank {have[0]} has",
                                 "the folder mixes files of different saves, or a rank file is damaged")
        out = []
        flat_group = self._flat_to_group()
        for k, group_shapes in enumerate(shapes):
            if not isinstance(group_shapes, Mapping):
                raise DamagedInput(f"{self.tag}: param_shapes[{k}] is not a name -> shape map", "the checkpoint is damaged")
            named = [(str(n), _shape(s, f"{self.tag}: param_shapes[{k}]['{n}']")) for n, s in group_shapes.items()]
            if self.stage == 3:
                placed = self._zero3_group(k, named, z)
            else:
                placed = self._zero12_group(k, named, z)
            out += [(flat_group[k], n, s, y, zp) for n, s, y, zp in placed]
        return out

    def _flat_to_group(self) -> list[int]:
        """The parameter group of each flat group (ZeRO-3 may split a group into several sub-groups)."""
        groups = self.ranks[0].opt["param_groups"]
        if self.stage != 3:
            return list(range(len(groups)))
        # DeepSpeed appends sub-group s to group `sub_group_to_group_id[s]` in sub-group order, and
        # sub-groups are made group by group: flattening the groups' params lists gives that order.
        order = [g for g, group in enumerate(groups) for _ in group.get("params", ())]
        if len(order) != len(self.ranks[0].flats):
            raise DamagedInput(f"{self.ranks[0].path}: {len(order)} sub-groups in param_groups but "
                             f"{len(self.ranks[0].flats)} fp32_flat_groups", "the checkpoint is damaged")
        return order

    def _z_of(self, rank: _Rank) -> list[TensorRef | None]:
        """z of each flat group on this rank (None where the optimizer never stepped)."""
        state, groups = rank.opt["state"], rank.opt["param_groups"]
        indices = [i for group in groups for i in group.get("params", ())]
        if len(indices) != len(rank.flats):
            raise DamagedInput(f"{rank.path}: {len(indices)} optimizer entries for {len(rank.flats)} flat groups",
                             "the checkpoint is damaged")
        out = []
        for k, i in enumerate(indices):
            entry = state.get(i, {})
            z = entry.get("z") if isinstance(entry, Mapping) else None
            if z is not None and not (isinstance(z, TensorRef) and z.numel >= rank.flats[k].numel):
                raise DamagedInput(f"{rank.path}: z of flat group {k} does not cover its fp32 partition", "the checkpoint is damaged")
            if z is not None and z.dtype != "float32":  # the client optimizer steps the fp32 partitions: its z is float32
                raise DamagedInput(f"{rank.path}: z of flat group {k} is {z.dtype}, not float32 like the partition it "
                                 "belongs to", "the checkpoint is damaged")
            out.append(z)
        return out

    def _zero12_group(self, k: int, named, z) -> list:
        sizes = [r.flats[k].numel for r in self.ranks]
        starts = [0]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        paddings = self.ranks[0].sd.get("param_alignment_paddings")
        pads = paddings[k] if isinstance(paddings, (list, tuple)) and k < len(paddings) else None
        if pads is not None and (not isinstance(pads, (list, tuple)) or len(pads) != len(named)):
            raise DamagedInput(f"{self.ranks[0].path}: {len(pads) if isinstance(pads, (list, tuple)) else 'no'} alignment "
                             f"paddings for the {len(named)} parameters of group {k}", "the checkpoint is damaged")
        if pads is not None and not all(type(p) is int and p >= 0 for p in pads):
            raise DamagedInput(f"{self.ranks[0].path}: param_alignment_paddings[{k}] {list(pads)!r:.60} are not counts "
                             "of elements", "the checkpoint is damaged")
        placed, offset = [], 0
        for j, (name, shape) in enumerate(named):
            numel = math.prod(shape)
            y_parts, z_parts = [], []
            r = max(bisect.bisect_right(starts, offset) - 1, 0)  # the rank holding the first element
            while r < len(starts) and starts[r] < offset + numel:
                lo, hi = max(offset, starts[r]), min(offset + numel, starts[r] + sizes[r])
                if lo < hi:
                    y_parts.append((self.ranks[r].flats[k], lo - starts[r], hi - lo))
                    z_parts.append((z[r][k], lo - starts[r], hi - lo) if z[r][k] is not None else None)
                r += 1
            placed.append((name, shape, y_parts, z_parts))
            offset += numel + (pads[j] if pads is not None else 0)
        total = sum(sizes)
        # ZeRO-1/2 strip the group's padding before saving; BF16_Optimizer keeps it on the last rank.
        trailing = 0
        if "zero_stage" not in self.ranks[0].sd:
            paddings = self.ranks[-1].sd.get("group_paddings")
            trailing = paddings[k] if isinstance(paddings, (list, tuple)) and k < len(paddings) else 0
            if not (type(trailing) is int and trailing >= 0):
                raise DamagedInput(f"{self.ranks[-1].path}: group_paddings[{k}] {trailing!r:.30} is not a count of elements",
                                 "the checkpoint is damaged")
        if offset + trailing != total:
            raise InputError(f"{self.tag}: group {k}'s parameters take {offset} elements but the ranks hold {total}",
                             "the model-states file and the rank files come from different saves")
        return placed

    def _zero3_group(self, k: int, named, z) -> list:
        placed, offset = [], 0
        for name, shape in named:
            numel = math.prod(shape)
            per_rank = math.ceil(numel / self.world)
            y_parts = [(r.flats[k], offset, per_rank) for r in self.ranks]
            z_parts = [(z[i][k], offset, per_rank) if z[i][k] is not None else None for i in range(self.world)]
            placed.append((name, shape, y_parts, z_parts))
            offset += per_rank
        for r in self.ranks:
            if r.flats[k].numel != offset:
                raise InputError(f"{r.path}: sub-group {k} holds {r.flats[k].numel} elements but its parameters need {offset}",
                                 "the model-states files and the rank files come from different saves")
        return placed

    def _module_dtype(self, names: list[str]) -> str:
        module = self.models[0]["module"]
        dtypes = {module[n].dtype for n in names if isinstance(module.get(n), TensorRef)}
        return dtypes.pop() if len(dtypes) == 1 else "float32"

    def load_object(self) -> dict[str, Any]:
        """`{'model': {name: TensorRef}, 'optimizer': {'state', 'param_groups'}}`, nothing read yet."""
        head = self.models[0]
        module = head["module"]
        layout = self._layout()
        trainable: dict[str, TensorRef] = {}
        groups = [dict((k, v) for k, v in g.items() if k != "params") for g in self.ranks[0].opt["param_groups"]]
        for g in groups:
            g["params"], g["param_names"] = [], []
        state: dict[int, dict[str, TensorRef]] = {}
        for index, (g, name, shape, y_parts, z_parts) in enumerate(layout):
            key = (str(self.tag), name)
            trainable[name] = _joined("float32", shape, y_parts, key)
            groups[g]["params"].append(index)
            groups[g]["param_names"].append(name)
            if z_parts and all(p is not None for p in z_parts):
                state[index] = {"z": _joined("float32", shape, z_parts, key + ("z",))}
        frozen = self._frozen()
        shared = head.get("shared_params") or {}
        # Beside a Hugging Face model (config.json: a Trainer's checkpoint-N/), name the release as
        # save_pretrained does: without tied duplicates, which transformers re-ties on load.
        hf_model = (self.tag.parent / "config.json").is_file()
        buffers = head.get("buffer_names") if isinstance(head.get("buffer_names"), (list, tuple)) else ()
        weights: dict[str, TensorRef] = {}
        names = list(module) + [n for n in list(trainable) + list(frozen) if n not in module]
        dropped = []
        for name in names:
            if name in trainable:
                weights[name] = trainable[name]
            elif name in frozen:
                weights[name] = frozen[name]
            elif isinstance(shared, Mapping) and isinstance(shared.get(name), str) and shared[name] in trainable:
                if hf_model:
                    dropped.append(name)
                else:
                    weights[name] = trainable[shared[name]]  # a tied duplicate: the same data as its twin
            elif isinstance(module.get(name), TensorRef) and (self.stage != 3 or name in buffers):
                weights[name] = module[name]  # buffers (and, at ZeRO-1/2, anything else the module holds as is)
        self.module_dtype = self._module_dtype(list(trainable))
        self._describe(groups, len(trainable), len(frozen))
        if dropped:
            self.notes.append(f"tied duplicates left out as save_pretrained does (transformers re-ties them): {', '.join(dropped)}")
        return {"model": weights, "optimizer": {"state": state, "param_groups": groups}}

    def _frozen(self) -> dict[str, TensorRef]:
        head = self.models[0]
        shapes = head.get("frozen_param_shapes") or {}
        if not isinstance(shapes, Mapping):
            raise DamagedInput(f"{self.tag}: frozen_param_shapes is not a name -> shape map", "the checkpoint is damaged")
        if self.stage != 3:
            module = head["module"]
            return {n: module[n] for n in shapes if isinstance(module.get(n), TensorRef)}
        out = {}
        for name, raw in shapes.items():
            shape = _shape(raw, f"{self.tag}: frozen_param_shapes['{name}']")
            per_rank = math.ceil(math.prod(shape) / self.world)
            parts = []
            for r, model in enumerate(self.models):
                fragments = model.get("frozen_param_fragments")
                frag = fragments.get(name) if isinstance(fragments, Mapping) else None
                if not isinstance(frag, TensorRef) or frag.numel < per_rank:
                    raise DamagedInput(f"{self.tag}: rank {r} holds no slice of frozen parameter '{name}'",
                                     "the checkpoint was saved without frozen parameters, or is damaged")
                parts.append((frag, 0, per_rank))
            out[name] = _joined(parts[0][0].dtype, shape, parts, (str(self.tag), name))
        return out

    def _describe(self, groups: list[dict], n_trainable: int, n_frozen: int) -> None:
        optimizer = "BF16_Optimizer (bf16 with fp32 gradient accumulation)" if "zero_stage" not in self.ranks[0].sd \
            else f"ZeRO stage {self.stage}"
        self.notes.append(f"DeepSpeed {optimizer}, {self.world} data-parallel rank{'s' if self.world != 1 else ''} "
                          f"(tag {self.tag.name}); master weights and z float32, module {self.module_dtype}; "
                          f"{n_trainable} trained and {n_frozen} frozen parameters")
        self.notes.append(f"the saved {self.module_dtype} module holds y even when train_mode is False (DeepSpeed's "
                          "zero_to_fp32.py can only give y); x is made from the fp32 master and z")
        if self.stage == 3 and any(g.get("train_mode") is False for g in groups):
            # At ZeRO-3 the client optimizer's groups are empty outside step(): its eval() flips the flag
            # but cannot reach the partitions, which still hold y.
            for g in groups:
                if g.get("train_mode") is False:
                    g["train_mode"] = True
            self.notes.append("ZeRO-3: train_mode was saved False, but optimizer.eval() cannot reach ZeRO-3 partitions, "
                              "so the master holds y; converted as y")
        unknown = sorted(self.opaque - _KNOWN_OBJECTS)
        self.opaque = set(unknown)


def save_complete(path: Path) -> bool:
    """Whether a DeepSpeed save is finished. `engine.save_checkpoint` writes `latest` after every rank's
    files: a save folder is complete when `latest` names a tag whose files are whole; a tag folder when
    its parent's `latest` names it or was written after the tag's last file (a later save finished)."""
    from .completeness import files_complete

    try:
        if (path / LATEST).is_file():
            tag = _latest_tag(path)
            return bool(tag) and "/" not in tag and (path / tag).is_dir() and files_complete(path / tag)
        latest = path.parent / LATEST
        if not latest.is_file():
            return False
        newest = max((p.stat().st_mtime_ns for p in path.iterdir()), default=0)
        named = _latest_tag(path.parent)
        return (named == path.name or latest.stat().st_mtime_ns >= newest) and files_complete(path)
    except (InputError, OSError, UnicodeDecodeError):
        return False


def _latest_tag(folder: Path) -> str:
    data = inputs.read_bytes(folder / LATEST, limits.TEXT_BYTES, "DeepSpeed's latest tag", root=inputs.Root.of(folder))
    return data.decode("utf-8").strip()


class DeepSpeedReader(Reader):
    """A DeepSpeed ZeRO checkpoint: a tag folder, its parent with `latest`, or a wrapper's folder.

    Recognised before torch.distributed.checkpoint folders, which it declines (they hold `.metadata`)."""

    name = "deepspeed"

    def recognise(self, path: Path, kind: str) -> bool:
        return kind == "folder" and is_deepspeed_folder(path)

    def open(self, path: Path, request: LoadRequest) -> Opened:
        from .hf_trainer import RELEASE_FILES

        folder = DeepSpeedFolder(path)
        obj = folder.load_object()
        return Opened(obj, sorted(folder.opaque), self.name, notes=folder.notes,
                      default_dtype=folder.module_dtype if folder.module_dtype != "float32" else None,
                      release=Release(RELEASE_FILES))

    def save_complete(self, path: Path) -> bool:
        return save_complete(path)
