"""Re-estimate BatchNorm statistics at x: `convert --bn-calib DATA --model SPEC`.

The statistics in a training checkpoint were gathered at y. We load x into
the user's model and, by default (`--bn-mode reset`), call
`torch.optim.swa_utils.update_bn` (reset, then a cumulative average over the
calibration data in train mode, momenta and mode restored). `--bn-mode
momentum` follows the schedule_free README instead: forward passes in train
mode over up to 50 batches, without a reset, so each layer's momentum moves
the saved statistics. We add only what they lack: dict and multi-input
batches, a batch limit, no autograd graph. Only BatchNorm buffers change;
every other tensor stays bit-identical to x.
"""
from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import inputs, limits
from .conventions import BN_BUFFERS
from .errors import InputError, Opt, OptionConflict, Words
from .options import Options
from .reconstruct import Reconstruction

BN_MODES = ("reset", "momentum")
# The schedule_free README's recipe: "model.train(); optimizer.eval(); with torch.no_grad(): for batch in
# itertools.islice(train_loader, 50): model(batch); model.eval()"
MOMENTUM_BATCHES = 50
DATA_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy")


def resolve(spec: str, what: Opt) -> Any:
    """`path/to/file.py:name` or `package.module:name` -> the object (this runs the user's code).

    `what` is the option that gave `spec`, which errors name."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise OptionConflict(what + f" '{spec}' is not of the form file.py:callable or package.module:callable",
                             "for example " + Opt("bn_model", "models.py:build_model"), option=what.name)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise InputError(what + f" file '{target}' does not exist", "check the path", where=target)
            name = f"_sfckpt_user_{path.stem}"
            # The user's own file, read through the same non-blocking, bounded opener as every input
            source = inputs.read_text(path, limits.TEXT_BYTES, "the code file", confined=False)
            module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None, origin=str(path)))
            module.__file__ = str(path)
            sys.modules[name] = module
            sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
            try:
                exec(compile(source, str(path), "exec"), module.__dict__)
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(target)
    except InputError:
        raise
    except Exception as exc:  # the user's code failed, whatever it raised: theirs to fix, not a bug of sfckpt
        raise InputError(what + f" '{spec}': importing it failed ({type(exc).__name__}: {exc})"[:400],
                         "fix the module") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(what + f" '{spec}': '{target}' has no '{attr}'", "check the name after the colon") from None


def build_model(spec: str, what: Opt = Opt("bn_model"), factory: Any = None):
    """The nn.Module `spec`'s callable (already resolved: `factory`) returns, called with no arguments."""
    import torch

    factory = resolve(spec, what) if factory is None else factory
    try:
        model = factory()
    except Exception as exc:  # the user's code failed, whatever it raised
        raise InputError(what + f" '{spec}' raised {type(exc).__name__}: {exc}"[:400],
                         "it is called with no arguments") from exc
    if not isinstance(model, torch.nn.Module):
        raise InputError(what + f" '{spec}' returned a {type(model).__name__}, not a torch.nn.Module",
                         "point it at a function or class that builds the model")
    return model


def _load_data_file(path: Path) -> Any:
    import torch

    suffix = path.suffix
    try:
        # The user's own file, read through the same non-blocking, bounded opener as every input
        with inputs.open_user_file(path) as file:
            if file.size > limits.CALIBRATION_BYTES.value:
                raise limits.CALIBRATION_BYTES.exceeded(f"calibration data {path} of {file.size} bytes")
            if suffix in (".pt", ".pth"):
                with file.fileobj() as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
            if suffix == ".safetensors":
                from safetensors.torch import load

                data = load(file.read_all(limits.CALIBRATION_BYTES, "calibration data"))
                return next(iter(data.values())) if len(data) == 1 else data
            if suffix == ".npy":
                try:
                    import numpy as np
                except ImportError:
                    raise InputError(".npy calibration data needs numpy", "pip install numpy") from None
                with file.fileobj() as f:
                    return torch.from_numpy(np.load(f, allow_pickle=False))
    except InputError:
        raise
    except Exception as exc:  # torch, safetensors and numpy each raise their own kinds on a file they cannot read
        raise InputError(f"calibration data {path}: cannot be read ({type(exc).__name__}: {exc})"[:400],
                         "give a tensor, or a tuple/dict of tensors, saved with torch.save, safetensors or numpy") from exc
    raise InputError(f"calibration data {path}: unknown file type", f"use one of {', '.join(DATA_SUFFIXES)}")


def _split(data: Any, batch_size: int, where: str) -> Iterator[Any]:
    """Batches along the first dimension of a tensor, or of every tensor of a tuple/dict."""
    import torch

    if isinstance(data, torch.Tensor):
        parts = {"": data}
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
        parts = dict(enumerate(data))
    elif isinstance(data, dict) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
        parts = data
    else:
        raise InputError(f"calibration data {where} holds a {type(data).__name__}",
                         "expected a tensor, or a tuple/dict of tensors (first dimension = samples)")
    sizes = {t.shape[0] if t.dim() else 0 for t in parts.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise InputError(f"calibration data {where}: tensors disagree on the number of samples ({sorted(sizes)})",
                         "every tensor's first dimension is the sample index")
    n = sizes.pop()
    for start in range(0, n, batch_size):
        chunk = {k: t[start : start + batch_size] for k, t in parts.items()}
        if isinstance(data, torch.Tensor):
            yield chunk[""]
        elif isinstance(data, dict):
            yield chunk
        else:
            yield tuple(chunk[i] for i in range(len(parts)))


class _Args:
    """A batch to be passed to the model as *args/**kwargs (so update_bn does not unwrap it)."""

    def __init__(self, args=(), kwargs=None):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})

    def to(self, device):
        return _Args([a.to(device) for a in self.args], {k: v.to(device) for k, v in self.kwargs.items()})


def calibration_batches(data: str, batch_size: int) -> Iterator[_Args]:
    """Batches from a data file, a folder of them, or `module:callable` returning an iterable (a DataLoader).

    Files: a tensor is the input; a tuple/list is the model's positional inputs, a dict its
    keyword inputs. Loaders follow update_bn: a list/tuple batch's first element is the input
    (the usual (inputs, labels) pair); a dict batch is passed as keyword inputs.
    """
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
        if not files:
            raise InputError(f"calibration folder {path} holds no {', '.join(DATA_SUFFIXES)} files", "")
        for f in files:
            yield from (_as_args(b) for b in _split(_load_data_file(f), batch_size, str(f)))
    elif path.exists():  # a FIFO or device too: the opener refuses it, saying what it is
        yield from (_as_args(b) for b in _split(_load_data_file(path), batch_size, str(path)))
    elif ":" in str(data):
        loader = resolve(str(data), Opt("bn_calib"))
        if callable(loader):
            loader = loader()
        yield from loader_batches(loader, Opt("bn_calib") + f" '{data}'")
    else:
        raise InputError(f"calibration data '{data}' does not exist", "give a .pt/.safetensors/.npy file, a folder, or module:callable")


def loader_batches(loader: Any, what: Words) -> Iterator[_Args]:
    """The batches of a DataLoader (or any iterable) as update_bn reads them: a list/tuple batch's first
    element is the input (the usual (inputs, labels) pair); a dict batch is passed as keyword inputs."""
    import torch

    if not isinstance(loader, Iterable):
        raise InputError(what + f" gave a {type(loader).__name__}, not an iterable of batches",
                         "return a DataLoader or another iterable")
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if isinstance(batch, dict):
            yield _Args(kwargs=batch)
        elif isinstance(batch, torch.Tensor):
            yield _Args((batch,))
        else:
            raise InputError(what + f" yielded a {type(batch).__name__}", "batches must be tensors, tuples or dicts")


def _as_args(batch: Any) -> _Args:
    if isinstance(batch, dict):
        return _Args(kwargs=batch)
    if isinstance(batch, tuple):
        return _Args(batch)
    return _Args((batch,))


class _Caller:
    """Wraps the model so that update_bn's `model(input)` becomes `model(*args, **kwargs)`."""

    def __new__(cls, model):
        import torch

        class Caller(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, batch: _Args):
                return self.inner(*batch.args, **batch.kwargs)

        return Caller(model)


def _momentum_update(batches: Iterable[_Args], model) -> None:
    """Forward passes in train mode, no reset: each BatchNorm layer's momentum averages in the batches."""
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            model(*batch.args, **batch.kwargs)
    finally:
        model.train(was_training)


@dataclass
class LayerShift:
    layer: str
    mean_max_abs: float
    mean_rel_l2: float | None
    var_max_abs: float
    var_rel_l2: float | None

    def as_json(self) -> dict:
        return dict(self.__dict__)


def _shift(old, new) -> tuple[float, float | None]:
    d = new.double() - old.double()
    norm = old.double().norm().item()
    return d.abs().max().item() if d.numel() else 0.0, (d.norm().item() / norm if norm > 0 else None)


def calibrate_with(recon: Reconstruction, options: Options,
                   progress: Callable[[int], None] | None = None) -> list[LayerShift]:
    """`calibrate` with the data, model and batches `options` name (`bn_calib`, `bn_model`, ...)."""
    return calibrate(recon, options.bn_model, options.bn_calib, options.bn_batch_size, options.bn_batches,
                     options.bn_device, progress, options.bn_mode)


def calibrate(recon: Reconstruction, model_spec: str, data: str, batch_size: int = 32, max_batches: int | None = None,
              device: str = "cpu", progress: Callable[[int], None] | None = None, mode: str = "reset") -> list[LayerShift]:
    """Re-estimate the BatchNorm statistics of x on `data`; the new buffers replace the old in `recon`.

    `mode` "reset" is `update_bn` (statistics reset, then a plain average over every batch);
    "momentum" is the schedule_free authors' recipe: the model in train mode runs up to 50 batches
    (or `max_batches`), each layer's own momentum moving the saved statistics towards x's.
    """
    import torch

    if mode not in BN_MODES:
        raise OptionConflict(Opt("bn_mode") + f" {mode!r} is not one of {', '.join(BN_MODES)}", "see docs/batchnorm.md",
                             option="bn_mode")
    if mode == "momentum" and max_batches is None:
        max_batches = MOMENTUM_BATCHES
    if batch_size < 1:
        raise OptionConflict(Opt("bn_batch_size") + " must be at least 1", "", option="bn_batch_size")
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionConflict(Opt("bn_device", "cuda") + ": no CUDA device is available", "use " + Opt("bn_device", "cpu"))
    batches = calibration_batches(data, batch_size)
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    return calibrate_model(recon, build_model(model_spec), batches, Opt("bn_model") + f" '{model_spec}'",
                           f"calibration data '{data}'", device, progress, mode)


def calibrate_model(recon: Reconstruction, model, batches: Iterable[_Args], model_name: Words, data_name: str,
                    device: str = "cpu", progress: Callable[[int], None] | None = None,
                    mode: str = "reset") -> list[LayerShift]:
    """Load x into `model` (changed in place: pass a copy), run `batches` through it (update_bn, or train-mode
    passes without a reset: `mode`, see `calibrate`), and put the re-estimated BatchNorm statistics into `recon`."""
    import torch
    from torch.optim.swa_utils import update_bn

    x = recon.state_dict()
    try:
        model.load_state_dict(x, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        raise InputError(model_name + f" does not match the checkpoint: {' '.join(first[1:3]).strip() or first[0]}"[:500],
                         "point " + Opt("bn_model") + " at the architecture the checkpoint was trained with (and "
                         + Opt("strip_prefix") + " if names differ)") from exc
    bn_layers = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    if not bn_layers:
        raise InputError(model_name + " has no BatchNorm layers", Opt("bn_calib") + " is only needed for models with BatchNorm")
    model.to(device)

    def counted() -> Iterator[_Args]:
        seen = 0
        for batch in batches:
            seen += 1
            if progress:
                progress(1)
            yield batch.to(device)
        if not seen:
            raise InputError(f"{data_name} holds no samples", "")

    try:
        with torch.no_grad():
            if mode == "reset":
                update_bn(counted(), _Caller(model))
            else:
                _momentum_update(counted(), model)
    except InputError:
        raise
    except Exception as exc:  # the user's model failed on the user's data, whatever it raised
        raise InputError(f"the model's forward pass failed on the calibration data ({type(exc).__name__}: {exc})"[:500],
                         "check that the data has the shape and dtype the model expects") from exc

    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    shifts = []
    for name in bn_layers:
        prefix = f"{name}." if name else ""
        for buf in BN_BUFFERS:
            key = prefix + buf
            if key in state and state[key] is not None:
                recon.replace(key, state[key].to(x[key].dtype))
        if prefix + "running_mean" in state and state[prefix + "running_mean"] is not None:
            mm, mr = _shift(x[prefix + "running_mean"], state[prefix + "running_mean"])
            vm, vr = _shift(x[prefix + "running_var"], state[prefix + "running_var"])
            shifts.append(LayerShift(name, mm, mr, vm, vr))
    recon.bn_calibrated = True
    return shifts
