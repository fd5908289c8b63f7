"""`Options`: what a user chooses about a conversion, as one object from the CLI to the library.

The CLI builds it from its flags; the public functions (`sfckpt.load`, `reconstruct`, `save`,
`convert`) take it as `options=` or build it from their keyword arguments. Each step reads the
fields it needs, so no step forwards another's keywords.

Example:
    >>> opts = sfckpt.Options(beta=0.75, force=True)
    >>> sfckpt.convert("run/last.pt", "x.safetensors", options=opts)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from .conventions import DTYPE_ALIASES
from .errors import Opt, OptionConflict


@dataclass(frozen=True)
class Options:
    """Every choice a conversion takes; the defaults are what the CLI does without the option.

    Where the weights and the optimizer state are (`load`):
        model_key, optimizer_key: the entries to use when the defaults pick the wrong ones.
        strip_prefix: removed from weight names (Lightning's ``model.``).
    How the checkpoint was trained (`reconstruct`):
        optimizer: a family name (`sfckpt.families.FAMILIES`) instead of detecting it.
        beta: β instead of the saved one (ScheduleFreeWrapper saves none).
        params_are: "y" or "x", overriding the saved mode flag.
        param_order: parameter names in optimizer order, overriding the mapping.
        param_order_from: `file.py:callable` (or `package.module:callable`) returning the model, or a
            transformers class (`transformers:BertForSequenceClassification`): param_order is then its
            named_parameters() order (sfckpt/param_order.py). model_config: the config.json such a
            class is built from (default: the checkpoint folder's).
        twins: "auto", "tied" or "frozen": untrained tensors byte-identical to a trained one.
        dtype: write every floating tensor in this dtype.
        require_beta: False to plan without a β the checkpoint lacks (inspect); computing x then raises.
        undecided_ok: True to plan with the mapping left open where names, content and order cannot
            decide it (inspect): nothing is converted, and computing or saving x raises why. The model
            order a container rebuilds with transformers (Trainer, PEFT) is then not rebuilt: entries
            only it places are counted, not named (`mapping.OrderDeferred`).
    The output (`save`):
        force: replace an existing output. allow_nonfinite: write x holding NaN/Inf.
        max_shard_size: shards of at most this size (an int of bytes, or text such as "5GB").
        workers: processes writing a folder output's shards (the bytes are those of one process).
    BatchNorm statistics re-estimated at x (`convert`, docs/batchnorm.md):
        bn_calib: the data; bn_model: `file.py:callable` building the model; bn_batch_size,
        bn_batches (at most this many), bn_device ("cpu" or "cuda"), bn_mode ("reset": update_bn's
        average; "momentum": the schedule_free recipe, train-mode passes over up to 50 batches).
    """

    model_key: str | None = None
    optimizer_key: str | None = None
    strip_prefix: str | None = None
    optimizer: str | None = None
    beta: float | None = None
    params_are: str | None = None
    param_order: Sequence[str] | None = None
    param_order_from: str | None = None
    model_config: str | Path | None = None
    twins: str = "auto"
    dtype: str | None = None
    require_beta: bool = True
    undecided_ok: bool = False
    force: bool = False
    allow_nonfinite: bool = False
    max_shard_size: int | str | None = None
    workers: int = 1
    bn_calib: str | None = None
    bn_model: str | None = None
    bn_batch_size: int = 32
    bn_batches: int | None = None
    bn_device: str = "cpu"
    bn_mode: str = "reset"

    def __post_init__(self) -> None:
        if self.dtype in DTYPE_ALIASES:  # dtype="bf16", as the CLI's --dtype bf16 and transformers spell it
            object.__setattr__(self, "dtype", DTYPE_ALIASES[self.dtype])
        # A str is a sequence too: param_order="order.txt" (the CLI's habit) would be read as one name per letter
        if isinstance(self.param_order, (str, bytes, Path)):
            raise OptionConflict(Opt("param_order") + f" is a list of names, not the {type(self.param_order).__name__} "
                                 f"{str(self.param_order)[:100]!r}",
                                 "read a file of names with Path(FILE).read_text().split() (one name per line)",
                                 option="param_order")


_DEFAULTS = {f.name: f.default for f in fields(Options)}


def resolve(options: Options | None, **keywords: Any) -> Options:
    """`options`, or an `Options` built from the keyword arguments a public function was given.

    Raises:
        TypeError: both were given (which would win is not obvious), or `options` is not an `Options`.
    """
    if options is None:
        return Options(**keywords)
    if not isinstance(options, Options):
        raise TypeError(f"options must be an sfckpt.Options, not {type(options).__name__}")
    given = sorted(k for k, v in keywords.items() if v != _DEFAULTS[k])
    if given:
        raise TypeError(f"pass either options= or keyword arguments, not both (got options= and {', '.join(given)})")
    return options


def wants_calibration(options: Options) -> bool:
    """True when BatchNorm statistics are to be re-estimated; the data and the model go together."""
    if bool(options.bn_calib) != bool(options.bn_model):
        raise OptionConflict(Opt("bn_calib") + " and " + Opt("bn_model") + " go together",
                             "give both: the data, and the code that builds the model",
                             option="bn_model" if options.bn_calib else "bn_calib")
    return bool(options.bn_calib)
