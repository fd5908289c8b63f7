"""`--param-order-from SPEC`: the optimizer's parameter order taken from the user's model.

A weights file that keeps no parameter order (Accelerate's `model.safetensors`) leaves look-alike
tensors (norm gains, biases) to the order the optimizer was given them, usually
`model.parameters()`. Instead of writing those names into a file for `--param-order`, the user
names what builds the model; its `named_parameters()` order then goes through the same checks.

SPEC is `file.py:callable` or `package.module:callable` returning the model (this runs the
user's code, as `--model` for `--bn-calib` does), or a transformers model class
(`transformers:BertForSequenceClassification`), built on the meta device from a vetted
`config.json` (the checkpoint folder's, or the one `--config` names) through the one door to
transformers (readers/hf_model.py), so no code that comes with a config ever runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import inputs, limits
from .errors import InputError

OPTION = "--param-order-from"
HINT = "or write the names in optimizer order into a file and pass --param-order FILE (docs/mapping.md)"


def names_from(spec: str, ckpt: Path, config: Path | None = None) -> list[str]:
    """The parameter names of the model SPEC builds, in `named_parameters()` order.

    Args:
        spec: `file.py:callable`, `package.module:callable`, or a transformers model class.
        ckpt: the checkpoint; a folder's `config.json` is used for a transformers class.
        config: a `config.json` for a transformers class, instead of the folder's.
    """
    from .batchnorm import build_model, resolve

    target = resolve(spec, OPTION)
    if _transformers_class(target):
        model = _transformers_model(target, spec, ckpt, config)
    else:
        if config is not None:
            raise InputError(f"--config is for a transformers model class, but {OPTION} '{spec}' is your own code",
                             "leave --config out; your callable builds the model itself")
        model = build_model(spec, OPTION, target)
    names = [name for name, _ in model.named_parameters()]
    if not names:
        raise InputError(f"{OPTION} '{spec}' built a model without parameters", "point it at the model you trained")
    return names


def _transformers_class(target: Any) -> bool:
    """Whether `target` is a transformers model class (built from a config, never called bare)."""
    try:
        import transformers
    except ImportError:
        return False
    # A subclass of the user's own is their code: called like any callable
    return isinstance(target, type) and issubclass(target, transformers.PreTrainedModel) \
        and target.__module__.startswith("transformers.")


def _transformers_model(cls: type, spec: str, ckpt: Path, config: Path | None) -> Any:
    """`cls` on the meta device, from the vetted config.json given or found in the checkpoint folder."""
    from .readers import hf_model

    hint = f"give the model's config.json with --config, {HINT}"
    if config is not None:
        raw = inputs.parse_json(inputs.read_bytes(config, limits.JSON_BYTES, "config.json", confined=False), str(config))
        where = str(config)
    elif ckpt.is_dir() and (ckpt / "config.json").is_file():
        where = f"{ckpt}/config.json"
        raw = inputs.read_json(ckpt / "config.json", "config.json", root=inputs.Root.of(ckpt))
    else:
        raise InputError(f"{OPTION} '{spec}' is a transformers class, which is built from a config.json, and {ckpt} "
                         "holds none", hint)
    built = hf_model.config_from_dict(raw, where, hint)
    model_cls = hf_model.model_class(cls.__name__, built, where, hint)
    return hf_model.build_on_meta(model_cls, built, where, hint)


def disagreement(exc: InputError, spec: str) -> InputError:
    """A --param-order refusal, said of the model SPEC built: its order is not the optimizer's."""
    message = f"{OPTION} '{spec}'" + exc.message[len("--param-order"):]
    return InputError(message, "the optimizer was not given the model's parameters in named_parameters() order "
                      "(groups built another way, frozen parameters left out?); " + HINT)
