"""`param_order_from` (`--param-order-from SPEC`): the optimizer's parameter order taken from the user's model.

A weights file that keeps no parameter order (Accelerate's `model.safetensors`) leaves look-alike
tensors (norm gains, biases) to the order the optimizer was given them, usually
`model.parameters()`. Instead of writing those names into a file for `param_order`, the user
names what builds the model; its `named_parameters()` order then goes through the same checks.

SPEC is `file.py:callable` or `package.module:callable` returning the model (this runs the
user's code, as `bn_model` does), or a transformers model class
(`transformers:BertForSequenceClassification`), built on the meta device from a vetted
`config.json` (the checkpoint folder's, or the one `model_config` names) through the one door to
transformers (readers/hf_model.py), so no code that comes with a config ever runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

from . import inputs, limits
from .errors import InputError, Opt, OptionConflict, Text
from .options import Options

HINT = "or write the names in optimizer order into a file and pass " + Opt("param_order", usage=True) + " (docs/mapping.md)"


def with_model_order(options: Options, ckpt: Path) -> Options:
    """`options` with `param_order` filled from the model `param_order_from` builds; unchanged without it."""
    if options.param_order_from is None:
        if options.model_config is not None:
            raise OptionConflict(Opt("model_config") + " is read only with " + Opt("param_order_from"),
                                 "add " + Opt("param_order_from", "transformers:CLASS"), option="param_order_from")
        return options
    if options.param_order is not None:
        raise OptionConflict(Opt("param_order") + " and " + Opt("param_order_from") + " both give the order",
                             "give one of them", option="param_order")
    config = None if options.model_config is None else Path(options.model_config)
    return dataclasses.replace(options, param_order=names_from(options.param_order_from, ckpt, config))


def names_from(spec: str, ckpt: Path, config: Path | None = None) -> list[str]:
    """The parameter names of the model SPEC builds, in `named_parameters()` order.

    Args:
        spec: `file.py:callable`, `package.module:callable`, or a transformers model class.
        ckpt: the checkpoint; a folder's `config.json` is used for a transformers class.
        config: a `config.json` for a transformers class, instead of the folder's.
    """
    from .batchnorm import build_model, resolve

    target = resolve(spec, Opt("param_order_from"))
    if _transformers_class(target):
        model = _transformers_model(target, spec, ckpt, config)
    else:
        if config is not None:
            raise OptionConflict(Opt("model_config") + " is for a transformers model class, but "
                                 + Opt("param_order_from") + f" '{spec}' is your own code",
                                 "leave " + Opt("model_config") + " out; your callable builds the model itself",
                                 option="model_config")
        model = build_model(spec, Opt("param_order_from"), target)
    names = [name for name, _ in model.named_parameters()]
    if not names:
        raise InputError(Opt("param_order_from") + f" '{spec}' built a model without parameters",
                         "point it at the model you trained")
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

    hint = "give the model's config.json with " + Opt("model_config") + ", " + HINT
    if config is not None:
        raw = inputs.parse_json(inputs.read_bytes(config, limits.JSON_BYTES, "config.json", confined=False), str(config))
        where = str(config)
    elif ckpt.is_dir() and (ckpt / "config.json").is_file():
        where = f"{ckpt}/config.json"
        raw = inputs.read_json(ckpt / "config.json", "config.json", root=inputs.Root.of(ckpt))
    else:
        raise InputError(Opt("param_order_from") + f" '{spec}' is a transformers class, which is built from a "
                         f"config.json, and {ckpt} holds none", hint)
    built = hf_model.config_from_dict(raw, where, hint)
    model_cls = hf_model.model_class(cls.__name__, built, where, hint)
    return hf_model.build_on_meta(model_cls, built, where, hint)


@contextlib.contextmanager
def said_of_the_model(spec: str | None) -> Iterator[None]:
    """A `param_order` refusal raised inside, said of the model SPEC built: its order is not the optimizer's."""
    try:
        yield
    except OptionConflict as exc:
        if spec is None or not exc.text or exc.text[0] != Opt("param_order"):
            raise
        raise OptionConflict(Opt("param_order_from") + f" '{spec}'" + Text(exc.text[1:]),
                             "the optimizer was not given the model's parameters in named_parameters() order "
                             "(groups built another way, frozen parameters left out?); " + HINT,
                             option="param_order_from", where=exc.where) from exc
