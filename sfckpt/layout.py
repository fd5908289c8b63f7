"""Find the model weights and the optimizer state inside a loaded checkpoint object.

People save `{'model': ..., 'optimizer': ...}` under many names; Lightning
saves `{'state_dict': ..., 'optimizer_states': [...]}`. We look for values of
the right *shape* (a name -> tensor mapping; a mapping with `state` and
`param_groups`) and prefer the usual names, so that `inspect` can show every
candidate and the user can pick another with --model-key / --optimizer-key.

Every optimizer state found is kept: the mapping decides which one trains
which tensor. Several model entries without a usual name (`netG`/`netD`) are
all converted, each tensor named `<key>.<name>`.

Lightning's `WeightAveraging` callback (SWA, `EMAWeightAveraging`) saves its
averaged weights under `state_dict` and moves the model's own parameters to
`current_model_state`: there y, the weights the optimizer's z belongs to, is
`current_model_state`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InputError, Opt, OptionConflict
from .optimizer_state import is_optimizer_state
from .tensors import TensorRef

MODEL_KEYS = ("model", "state_dict", "model_state_dict", "model_state", "module", "net", "network", "weights", "params")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim", "opt", "optimizer_states")

# Lightning's WeightAveraging.on_save_checkpoint: the average in `state_dict`, the model's parameters
# (y) in `current_model_state`, the AveragedModel's other state (`n_averaged`) in `averaging_state`.
AVERAGED_KEY, CURRENT_KEY, AVERAGING_STATE_KEY = "state_dict", "current_model_state", "averaging_state"
WEIGHT_AVERAGING_NOTE = (
    "state_dict holds WeightAveraging's averaged weights (an average of y); x is built from current_model_state, "
    "the parameters the optimizer state belongs to"
)


@dataclass
class Layout:
    """Where the weights and the optimizer state were found."""

    container: str
    model_key: str | None
    optimizer_key: str | None
    weights: dict[str, TensorRef]
    optimizer: Mapping[str, Any] | None
    model_candidates: list[str] = field(default_factory=list)
    optimizer_candidates: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not in the output
    optimizers: dict[str, Mapping[str, Any]] = field(default_factory=dict)  # every optimizer state to consider
    models: list[str] = field(default_factory=list)  # the entries whose tensors are the output
    # With other model entries in the file: all of them in file order, the others' names as `<key>.<name>`
    pool_weights: dict[str, TensorRef] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what inspect should say about where the weights came from


def is_weights(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, TensorRef) for v in value.values())
    )


def _lookup(obj: Any, key: str) -> Any:
    """`obj[key]`, where a dotted key walks into nested dicts and lists (`optimizer_states.0`)."""
    if isinstance(obj, Mapping) and key in obj:
        return obj[key]
    current = obj
    for part in key.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, (list, tuple)) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        else:
            raise InputError(f"the checkpoint has no entry '{key}'", "run `sfckpt inspect` to see the keys it has")
    return current


def _ranked(candidates: list[str], preferred: tuple[str, ...]) -> list[str]:
    order = {k: i for i, k in enumerate(preferred)}
    return sorted(candidates, key=lambda k: (order.get(k.split(".")[0], len(order)), candidates.index(k)))


def is_weight_averaging(obj: Mapping[str, Any]) -> bool:
    """True for a checkpoint saved during fit with Lightning's WeightAveraging callback."""
    return AVERAGING_STATE_KEY in obj and is_weights(obj.get(AVERAGED_KEY)) and is_weights(obj.get(CURRENT_KEY))


def _check_weight_averaging(obj: Mapping[str, Any], model_key: str) -> None:
    """Refuse the weights of a WeightAveraging checkpoint that are not the y its optimizer state belongs to."""
    if model_key == AVERAGED_KEY:
        raise InputError(
            "'state_dict' holds the weights Lightning's WeightAveraging callback averaged (an average of y), not the y "
            "the optimizer state belongs to: x made from them and z would be wrong",
            "leave out " + Opt("model_key") + ": x is built from current_model_state. The averaged weights are not "
            "Schedule-Free's x; to release them, save checkpoint['state_dict'] as it is "
            "(docs/containers.md#lightning-weightaveraging)",
        )
    if model_key == CURRENT_KEY and _model_held_the_average(obj):
        raise InputError(
            "current_model_state holds the same weights as state_dict, WeightAveraging's average: the checkpoint was "
            "saved after training ended, when the callback had copied the average into the model, so y, and with it "
            "x, is not in the file",
            "convert a checkpoint saved during fit (ModelCheckpoint's, such as last.ckpt); the averaged weights in "
            "state_dict are not Schedule-Free's x (docs/containers.md#lightning-weightaveraging)",
        )


def _model_held_the_average(obj: Mapping[str, Any]) -> bool:
    """True when `current_model_state` is a copy of the average rather than y.

    WeightAveraging.on_train_end copies the average into the model; a checkpoint saved after fit then
    holds the average twice. The one exception: an average of a single update taken at the saved step
    is that step's y itself.
    """
    import numpy as np
    import torch

    current, averaged = obj[CURRENT_KEY], obj[AVERAGED_KEY]
    pairs = [(ref, averaged.get(name)) for name, ref in current.items() if isinstance(ref, TensorRef) and ref.is_float]
    if not pairs or not all(isinstance(b, TensorRef) and (b.dtype, b.shape) == (a.dtype, a.shape) for a, b in pairs):
        return False
    # A sample first: during fit the first tensor already differs, and nothing more is read.
    if not all(np.array_equal(a.sample(64), b.sample(64)) for a, b in pairs):
        return False
    if not all(torch.equal(a.load(), b.load()) for a, b in pairs):
        return False
    n_averaged = obj[AVERAGING_STATE_KEY].get("n_averaged") if isinstance(obj[AVERAGING_STATE_KEY], Mapping) else None
    callbacks = obj.get("callbacks")
    update_steps = [state.get("latest_update_step") for state in callbacks.values()
                    if isinstance(state, Mapping)] if isinstance(callbacks, Mapping) else []
    # n_averaged is a count (an int64 tensor): of any other dtype (a NaN float) it says nothing
    single_update_now = (isinstance(n_averaged, TensorRef) and n_averaged.numel == 1
                         and n_averaged.dtype.startswith(("int", "uint")) and int(n_averaged.load()) == 1
                         and obj.get("global_step") in update_steps)
    return not single_update_now


def check_text(name: str, what: str, hint: str = "rename it in the training code and save again") -> None:
    """Refuse a name that is not Unicode text (a lone surrogate, which pickle and Python's JSON parser keep):
    safetensors headers, JSON and terminals are UTF-8, so nothing could carry it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{what} '{name[:200]}' is not valid Unicode text (it holds a lone surrogate, which "
                         "UTF-8 cannot encode)", hint) from None


def find(obj: Any, model_key: str | None = None, optimizer_key: str | None = None) -> Layout:
    """Locate weights and optimizer state in the object a `torch.save` file holds."""
    if not isinstance(obj, Mapping):
        what = getattr(obj, "qualname", None)
        what = f"an object of class {what}, which sfckpt does not load (that would run code from the file)" if what \
            else f"a {type(obj).__name__}"
        raise InputError(
            f"the checkpoint holds {what}, not a dict of weights and optimizer state",
            "save a dict such as {'model': model.state_dict(), 'optimizer': optimizer.state_dict()}",
        )
    model_candidates, optimizer_candidates = _candidates(obj)
    averaging = is_weight_averaging(obj)
    notes: list[str] = []
    if averaging:
        # y is the model's own parameters; the average is not another model trained by the optimizer
        # averaging_state holds the AveragedModel's counter (n_averaged), not weights anyone would convert
        model_candidates = [CURRENT_KEY] + [k for k in model_candidates if k not in (CURRENT_KEY, AVERAGING_STATE_KEY)]
        model_key = CURRENT_KEY if model_key is None else model_key
        _check_weight_averaging(obj, model_key)
        if model_key == CURRENT_KEY:
            notes.append(WEIGHT_AVERAGING_NOTE)
    model_key, models, weights = _choose_weights(obj, model_key, model_candidates)
    optimizer, optimizers = _choose_optimizers(obj, optimizer_key, optimizer_candidates)
    clean, skipped = _tensors_only(weights)
    # Every model entry in the file's order, the chosen ones under their output names: what an optimizer
    # that also trains the file's other models is matched against.
    others: dict[str, TensorRef] = {}
    if len(model_candidates) > len(models) and not averaging:
        for key in (k for k in obj if isinstance(k, str)):
            if key in models:
                others.update((n, v) for n, v in weights.items() if isinstance(v, TensorRef))
            elif key in model_candidates:
                others.update((f"{key}.{n}", v) for n, v in obj[key].items() if isinstance(v, TensorRef))
    return Layout(
        container="lightning" if "optimizer_states" in obj and "state_dict" in obj else "torch.save",
        model_key=model_key if model_key is not None else ", ".join(models),
        optimizer_key=optimizer_key if optimizer_key is not None else next(iter(optimizers), None),
        weights=clean,
        optimizer=optimizer,
        model_candidates=model_candidates,
        optimizer_candidates=optimizer_candidates,
        skipped=skipped,
        optimizers=optimizers,
        models=models,
        pool_weights=others,
        notes=notes,
    )


def _candidates(obj: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The top-level entries that look like weights, and those that look like optimizer states, best first."""
    model_candidates, optimizer_candidates = [], []
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if is_optimizer_state(value):
            optimizer_candidates.append(key)
        elif isinstance(value, (list, tuple)) and value and all(is_optimizer_state(v) for v in value):
            optimizer_candidates.extend(f"{key}.{i}" for i in range(len(value)))
        elif is_weights(value):
            model_candidates.append(key)
    return _ranked(model_candidates, MODEL_KEYS), _ranked(optimizer_candidates, OPTIMIZER_KEYS)


def _choose_weights(obj: Mapping[str, Any], model_key: str | None,
                    model_candidates: list[str]) -> tuple[str | None, list[str], Any]:
    """(the model key, the entries whose tensors are the output, their name -> value mapping)."""
    if model_key is None:
        if is_weights(obj) and not model_candidates:
            model_key = ""  # a bare state dict
        elif len(model_candidates) == 1 or (model_candidates and model_candidates[0].split(".")[0] in MODEL_KEYS):
            model_key = model_candidates[0]
        elif not model_candidates:
            raise InputError(
                f"no model weights found (top-level keys: {', '.join(map(str, list(obj)[:12]))})",
                "pass " + Opt("model_key", usage=True) + " to name the entry holding the state dict",
            )
    if model_key is None:
        # Several models and none under a usual name (a GAN's netG/netD, a U-Net and a text encoder):
        # all of them, each tensor named with its model's key.
        weights: Any = {}
        for key in model_candidates:
            for name, value in _lookup(obj, key).items():
                weights[f"{key}.{name}"] = value
        return None, list(model_candidates), weights
    weights = obj if model_key == "" else _lookup(obj, model_key)
    if not is_weights(weights):
        raise InputError(f"entry '{model_key}' is not a name -> tensor mapping",
                         "pass " + Opt("model_key") + " to choose another", where=model_key)
    return model_key, [model_key], weights


def _choose_optimizers(obj: Mapping[str, Any], optimizer_key: str | None,
                       optimizer_candidates: list[str]) -> tuple[Any, dict[str, Mapping[str, Any]]]:
    """(the optimizer state named or found first, every optimizer state to consider)."""
    if optimizer_key is not None:
        optimizer = _lookup(obj, optimizer_key)
        if not is_optimizer_state(optimizer):
            raise InputError(
                f"entry '{optimizer_key}' is not an optimizer state_dict (no 'state' and 'param_groups')",
                "pass " + Opt("optimizer_key") + " to choose another",
            )
        return optimizer, {optimizer_key: optimizer}
    optimizers = {key: _lookup(obj, key) for key in optimizer_candidates}
    return next(iter(optimizers.values()), None), optimizers


def _tensors_only(weights: Mapping[str, Any]) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """The tensors of a weights mapping, and why each other value is left out."""
    clean: dict[str, TensorRef] = {}
    skipped: dict[str, str] = {}
    for name, value in weights.items():
        check_text(name, "tensor name")
        if isinstance(value, TensorRef):
            clean[name] = value
        else:
            kind = getattr(value, "qualname", None)
            skipped[name] = f"not loaded: object of class {kind}" if kind else f"not a tensor ({type(value).__name__})"
    return clean, skipped


def strip_prefix(weights: dict[str, TensorRef], prefix: str) -> dict[str, TensorRef]:
    """Names without `prefix` (Lightning's `model.`); names without it are kept as they are.

    A prefix no name starts with is refused, naming the first names' prefixes: a mistyped prefix
    would otherwise write the names unchanged without a word."""
    if weights and not any(name.startswith(prefix) for name in weights):
        seen = list(dict.fromkeys(name.split(".", 1)[0] + "." for name in weights if "." in name))
        occur = ", ".join(f"'{p}'" for p in seen[:5]) + (f" and {len(seen) - 5} more" if len(seen) > 5 else "")
        raise OptionConflict(Opt("strip_prefix") + f" '{prefix}' matches no tensor name" +
                             (f"; the names start with {occur}" if seen else " (the names have no prefix)"),
                             "give one of those prefixes, or leave " + Opt("strip_prefix") + " out",
                             option="strip_prefix")
    out: dict[str, TensorRef] = {}
    for name, ref in weights.items():
        new = name[len(prefix):] if name.startswith(prefix) else name
        if new in out:
            raise OptionConflict(Opt("strip_prefix") + f" '{prefix}' makes two tensors named '{new}'",
                                 "choose a longer prefix", option="strip_prefix", where=new)
        out[new] = ref
    return out
