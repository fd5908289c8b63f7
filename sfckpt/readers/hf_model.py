"""The one door from an input to transformers and peft.

Rebuilding a model's parameter order (Hugging Face Trainer folders, PEFT adapters) means handing a
`config.json` to transformers and an `adapter_config.json` to peft. Both libraries can run code that
comes with a model (`auto_map`, asking "Do you wish to run the custom code? [y/N]"), reach the
network, read further files a config names (`configuration_files`) and spend unbounded time on
what a config asks for (200,000 layers, a regex that backtracks). So neither library ever gets a
path from sfckpt: the JSON is read here, bounded, vetted, and the objects are built from the vetted
dicts on the meta device (no weights, no download, no prompt).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from .. import limits
from ..errors import InputError, Words

# Words in a config key whose integer value (or list of integers) says how many layers, blocks or
# experts the model builds: num_hidden_layers, n_layer, num_experts, depths, ...
_COUNT_WORDS = ("layer", "expert", "block", "depth")

# The regexes peft builds from adapter_config.json fields, as peft 0.21 writes them
# (tuners_utils.check_target_module_exists, utils.other.get_pattern_key): the rule below is
# applied to the pattern peft really matches.
_WRAPPED = {
    "target_modules": "{}",  # re.fullmatch when a string
    "exclude_modules": "{}",  # re.fullmatch when a string
    "modules_to_save": r"(^|.*\.){}($|\..*)",
    "layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
    "rank_pattern": r"(.*\.)?({})$",  # the dict's keys
    "alpha_pattern": r"(.*\.)?({})$",
}
# Adapter types peft builds from their config alone. Others read further files or models the
# config names (XLORA loads its adapters by path or hub id; prompt tuning a tokenizer).
# BOFT builds a C++/CUDA extension (a compiler run that prints on stdout) when its layers are made.
PEFT_TYPES = frozenset({"LORA", "LOHA", "LOKR", "ADALORA", "IA3", "OFT", "VERA", "LN_TUNING"})

# Each quantifier may multiply the backtracking work by the length of a module name: with at most
# this many, and module names bounded by SFCKPT_MAX_LAYERS, matching stays within seconds.
MAX_QUANTIFIERS = 4
MAX_PATTERN_CHARS = 1000


def _one_line(exc: Exception) -> str:
    """A library's exception as a short excerpt on one line (their messages span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


def vet_config(raw: Any, where: str, hint: Words) -> dict[str, Any]:
    """`raw` (a parsed config.json) if transformers can build it without code from the input, a
    prompt, other files or unbounded work; otherwise an InputError saying why, with `hint`."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    raw = vet_config_plain(raw, where, hint)
    model_type = raw["model_type"]
    if model_type not in CONFIG_MAPPING or not CONFIG_MAPPING[model_type].__module__.startswith("transformers."):
        raise InputError(f"{where} names model_type {model_type[:80]!r}, which transformers does not ship", hint)
    return raw


def vet_config_plain(raw: Any, where: str, hint: Words) -> dict[str, Any]:
    """The checks of `vet_config` that need no transformers (inspect imports none): all but whether
    transformers ships the model_type, which must be a string here."""
    if not isinstance(raw, dict):
        raise InputError(f"{where} holds a JSON {type(raw).__name__}, not an object", hint)
    model_type = raw.get("model_type")
    if "auto_map" in raw:
        raise InputError(f"{where} names model_type {str(model_type)[:80]!r} with custom code (auto_map), "
                         "which sfckpt never runs", hint)
    if not isinstance(model_type, str):
        raise InputError(f"{where} names model_type {str(model_type)[:80]!r}, which transformers does not ship", hint)
    if "configuration_files" in raw:  # transformers would read another file in place of this one
        raise InputError(f"{where} defers to other files (configuration_files), which sfckpt does not read", hint)
    archs = raw.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise InputError(f"{where} has architectures {str(archs)[:80]}, not a list of class names", hint)
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:  # layer and expert counts, nested configs included (the JSON reader bounded the nesting)
        parent, node = stack.pop()
        if isinstance(node, list) and len(node) > limits.CONFIG_LAYERS.value:
            # one entry per stage or layer (`depths`, `hidden_sizes`, `layer_types`): the list's length is a count too
            raise limits.CONFIG_LAYERS.exceeded(f"{where} gives {parent[:80]} as a list of {len(node)} entries")
        items = node.items() if isinstance(node, dict) else ((parent, v) for v in node)  # a list counts as its key
        for key, value in items:
            if isinstance(value, (dict, list)):
                stack.append((str(key), value))
            elif type(value) is int and value > limits.CONFIG_LAYERS.value \
                    and any(w in str(key).lower() for w in _COUNT_WORDS):
                raise limits.CONFIG_LAYERS.exceeded(f"{where} asks for {str(key)[:80]} = {value}")
            elif type(value) is int and str(key) == "num_labels" and value > limits.CONFIG_LABELS.value:
                # transformers builds id2label and label2id with one entry per label, in Python
                raise limits.CONFIG_LABELS.exceeded(f"{where} asks for num_labels = {value}")
    return raw


def config_from_dict(raw: Any, where: str, hint: Words):
    """A transformers config built from a parsed config.json after `vet_config`; never from a path."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .. import textout

    raw = _without_implementation_choices(vet_config(raw, where, hint))
    try:
        with textout.library_logs():  # transformers logs warnings that quote config values
            return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except Exception as exc:  # transformers validates the values its own way: any failure is the input's
        raise InputError(f"{where} cannot be read by transformers ({_one_line(exc)})", hint) from exc


def _without_implementation_choices(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config without the keys that choose how layers compute (`attn_implementation`,
    `experts_implementation`, in sub-configs too): a value like `org/repo` makes transformers download
    a kernel from the hub and import its code, and none of them changes a parameter's name or shape."""
    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if not (isinstance(k, str) and k.endswith("implementation"))}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return clean(raw)


def read_config(path: Path, where: str, hint: Words, root=None):
    """The transformers config in the file `path`, read through the input gate (confined to the input,
    or to `root` for a second input, and bounded)."""
    from .. import inputs

    return config_from_dict(inputs.read_json(path, "config.json", root=root), where, hint)


def vet_class_name(name: Any, where: str, hint: Words) -> None:
    """Refuse, without transformers, a class name no model class transformers ships can have (they are
    all CamelCase identifiers); `model_class` decides the rest."""
    if not (isinstance(name, str) and name.isidentifier() and name[:1].isupper()):
        raise InputError(f"{where} names architecture {str(name)[:80]}, which is not a model class transformers ships",
                         hint)


def model_class(name: Any, config: Any, where: str, hint: Words) -> type:
    """The transformers model class called `name`, if it is one transformers ships and it is built
    from this kind of config (`architectures: ["pipeline"]` or `["AutoModel"]` are not models)."""
    import transformers

    cls = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
            and cls.__module__.startswith("transformers.")):
        raise InputError(f"{where} names architecture {str(name)[:80]}, which is not a model class transformers ships",
                         hint)
    if not (isinstance(cls.config_class, type) and isinstance(config, cls.config_class)):
        raise InputError(f"{where} names architecture {name}, which is not built from a {type(config).__name__}",
                         hint)
    return cls


def build_on_meta(cls: type, config: Any, where: str, hint: Words):
    """`cls` built from `config` on the meta device: parameters without storage, nothing read."""
    import torch

    from .. import textout

    with torch.device("meta"), warnings.catch_warnings(), textout.library_logs():
        warnings.simplefilter("ignore")  # deprecation notes from building the model say nothing about the checkpoint
        try:
            return cls._from_config(config)
        except Exception as exc:  # a config transformers accepted but cannot build (sizes that do not fit)
            raise InputError(f"{where}: {cls.__name__} cannot be built from it ({_one_line(exc)})", hint) from exc


def _quantifiers(items, inside_loop: bool, where: str, hint: Words) -> int:
    """Quantifiers in a parsed pattern; refuses backreferences and loops that hold quantifiers or choices."""
    from re import _constants as c

    count = 0
    for op, arg in items:
        if op in (c.GROUPREF, c.GROUPREF_EXISTS):
            raise InputError(f"{where} uses a backreference or a conditional group", hint)
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            if inside_loop:
                raise InputError(f"{where} nests a quantifier inside a repeated part", hint)
            count += 1 + _quantifiers(arg[2], inside_loop or arg[1] > 1, where, hint)
        elif op == c.BRANCH:
            if inside_loop:
                raise InputError(f"{where} repeats a choice (|)", hint)
            count += sum(_quantifiers(b, inside_loop, where, hint) for b in arg[1])
        elif op in (c.SUBPATTERN, c.ASSERT, c.ASSERT_NOT, c.ATOMIC_GROUP):
            count += _quantifiers(arg[-1], inside_loop, where, hint)
    return count


def vet_pattern(pattern: Any, field: str, where: str, hint: Words) -> None:
    """Refuse a regex from an adapter config whose matching could take unbounded time (the rule of
    docs/guarantees.md: no backreferences, nothing quantified inside a repeated part, at most
    MAX_QUANTIFIERS quantifiers in the pattern as peft matches it)."""
    from re import _parser

    where = f"{where}: {field} {str(pattern)[:60]!r}"
    if not isinstance(pattern, str):
        raise InputError(f"{where} is not a string", hint)
    if len(pattern) > MAX_PATTERN_CHARS:
        raise InputError(f"{where} is longer than {MAX_PATTERN_CHARS} characters", hint)
    try:
        parsed = _parser.parse(_WRAPPED.get(field, "{}").format(pattern))
    except (re.error, OverflowError, RecursionError) as exc:
        raise InputError(f"{where} is not a regular expression ({exc})", hint) from exc
    if _quantifiers(parsed.data, False, where, hint) > MAX_QUANTIFIERS:
        raise InputError(f"{where} has more than {MAX_QUANTIFIERS} quantifiers as peft matches it", hint)


def vet_adapter_config(raw: Any, where: str, hint: Words) -> dict[str, Any]:
    """A parsed adapter_config.json, if peft can build it with bounded work: a known peft_type, and
    every regex peft would match (target_modules, exclude_modules, modules_to_save, layers_pattern,
    rank_pattern and alpha_pattern keys) within the rule of `vet_pattern`."""
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if isinstance(raw, dict) and (not isinstance(raw.get("peft_type"), str)
                                  or raw["peft_type"] not in PEFT_TYPE_TO_CONFIG_MAPPING):
        raise InputError(f"{where} names peft_type {str(raw.get('peft_type'))[:60]!r}, which peft "
                         f"{peft.__version__} does not have", hint)
    return vet_adapter_config_plain(raw, where, hint)


def vet_adapter_config_plain(raw: Any, where: str, hint: Words) -> dict[str, Any]:
    """The checks of `vet_adapter_config` that need no peft (inspect imports none): all but whether the
    installed peft has the peft_type, which must be one of PEFT_TYPES here."""
    if not isinstance(raw, dict):
        raise InputError(f"{where} holds a JSON {type(raw).__name__}, not an object", hint)
    if raw.get("peft_type") not in PEFT_TYPES:
        raise InputError(f"{where} names peft_type {str(raw.get('peft_type'))[:60]}; sfckpt rebuilds the order only "
                         f"for {', '.join(sorted(PEFT_TYPES))}, whose configs name no other file or model", hint)
    if raw.get("megatron_config") is not None:  # peft would import the module megatron_core names
        raise InputError(f"{where} sets megatron_config, which makes peft import a module the file names", hint)
    patterns: list[tuple[str, Any]] = []
    # Every other field of module names (IA3's feedforward_modules, ...) is a regex to peft when it is
    # one string (re.fullmatch), as target_modules is: vetted the same way, whatever the field's name.
    fields = [*_WRAPPED, *(k for k in raw if isinstance(k, str) and k.endswith("_modules") and k not in _WRAPPED)]
    for field in fields:
        value = raw.get(field)
        if value is None:
            continue
        if field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(value, dict):
                raise InputError(f"{where}: {field} is a {type(value).__name__}, not a map of patterns", hint)
            patterns += [(field, k) for k in value]
        elif isinstance(value, str) and field != "modules_to_save":
            patterns.append((field, value))
        elif not isinstance(value, list):
            raise InputError(f"{where}: {field} is a {type(value).__name__}, not a list of names", hint)
        elif field in ("modules_to_save", "layers_pattern"):
            patterns += [(field, v) for v in value]
        elif len(value) > limits.ADAPTER_PATTERNS.value:
            raise limits.ADAPTER_PATTERNS.exceeded(f"{where} gives {len(value)} {field}")
        elif not all(isinstance(v, str) for v in value):
            raise InputError(f"{where}: {field} is not a list of names", hint)
    if len(patterns) > limits.ADAPTER_PATTERNS.value:
        raise limits.ADAPTER_PATTERNS.exceeded(f"{where} gives {len(patterns)} module patterns")
    for field, pattern in patterns:
        vet_pattern(pattern, field, where, hint)
    for field in ("layers_to_transform", "target_parameters", "trainable_token_indices"):
        value = raw.get(field)
        if isinstance(value, (list, dict)) and len(value) > limits.ADAPTER_PATTERNS.value:
            raise limits.ADAPTER_PATTERNS.exceeded(f"{where} gives {len(value)} {field}")
    replication = raw.get("layer_replication")  # peft copies base layers [start, end) into a deeper model
    if replication is not None:
        if not (isinstance(replication, list) and all(
                isinstance(p, list) and len(p) == 2 and all(type(n) is int and n >= 0 for n in p) for p in replication)):
            raise InputError(f"{where}: layer_replication {str(replication)[:60]} is not a list of [start, end] layers",
                             hint)
        layers = sum(max(end - start, 0) for start, end in replication)
        if layers > limits.CONFIG_LAYERS.value:
            raise limits.CONFIG_LAYERS.exceeded(f"{where} asks peft for {layers} layers (layer_replication)")
    return raw


def peft_model(model: Any, raw: Any, where: str, hint: Words):
    """`model` wrapped by peft as the Trainer trained it, from a parsed adapter_config.json after
    `vet_adapter_config`; peft reads no file and nothing from the network."""
    import peft
    import torch

    from .. import textout

    raw = dict(vet_adapter_config(raw, where, hint))
    raw.pop("runtime_config", None)  # what PeftConfig.from_json_file drops
    if "init_lora_weights" in raw:
        # Only the names and order matter here: no initialisation computed from weights or data
        # (PiSSA, LoftQ, EVA), which could reach for further files or libraries
        raw["init_lora_weights"] = False
        raw.pop("loftq_config", None)
    with torch.device("meta"), warnings.catch_warnings(), textout.library_logs():
        warnings.simplefilter("ignore")
        try:
            config = peft.PeftConfig.from_peft_type(**peft.PeftConfig.check_kwargs(**raw))
            config.inference_mode = False  # saved as True; the trained model had its adapter trainable
            return peft.get_peft_model(model, config)
        except Exception as exc:  # peft validates the values its own way: any failure is the input's
            raise InputError(f"{where} cannot be applied by peft ({_one_line(exc)})", hint) from exc


def saved_names(peft_model_: Any) -> dict[int, str]:
    """id(parameter) -> the name peft saves it under, as peft computes it (nothing looked up online:
    `save_embedding_layers=False`, whose "auto" would ask the hub about the base model)."""
    import peft

    from .. import textout

    with textout.library_logs():
        params = peft_model_.state_dict(keep_vars=True)
        state = peft.get_peft_model_state_dict(peft_model_, state_dict=params, save_embedding_layers=False)
    return {id(p): k for k, p in state.items()}
