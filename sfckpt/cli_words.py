"""How the CLI spells the options an error names: the one table from option names to flags.

The library's errors name options by their `sfckpt.Options` field (sfckpt/errors.py); this
is where they become `--twins tied` and `--param-order FILE`.
"""
from __future__ import annotations

from .errors import SfckptError, Opt

# option name -> (flag, placeholder of its argument; None for a flag without one)
FLAGS: dict[str, tuple[str, str | None]] = {
    "model_key": ("--model-key", "KEY"),
    "optimizer_key": ("--optimizer-key", "KEY"),
    "strip_prefix": ("--strip-prefix", "PREFIX"),
    "optimizer": ("--optimizer", "FAMILY"),
    "beta": ("--beta", "B"),
    "params_are": ("--params-are", "y|x"),
    "param_order": ("--param-order", "FILE"),
    "param_order_from": ("--param-order-from", "MODULE:CALLABLE"),
    "model_config": ("--config", "FILE"),
    "twins": ("--twins", "tied|frozen"),
    "dtype": ("--dtype", "DTYPE"),
    "force": ("--force", None),
    "allow_nonfinite": ("--allow-nonfinite", None),
    "max_shard_size": ("--max-shard-size", "SIZE"),
    "workers": ("--workers", "N"),
    "bn_calib": ("--bn-calib", "DATA"),
    "bn_model": ("--model", "SPEC"),
    "bn_batch_size": ("--bn-batch-size", "N"),
    "bn_batches": ("--bn-batches", "N"),
    "bn_device": ("--device", "DEVICE"),
    "bn_mode": ("--bn-mode", "reset|momentum"),
}


def cli_words(opt: Opt) -> str:
    """`Opt("twins", "tied")` -> `--twins tied`; `Opt("param_order", usage=True)` -> `--param-order FILE`."""
    flag, placeholder = FLAGS[opt.name]
    if opt.value is not None and opt.value is not True:
        return f"{flag} {opt.value}"
    if opt.usage and placeholder:
        return f"{flag} {placeholder}"
    return flag


def in_cli_words(exc: SfckptError) -> tuple[str, str | None]:
    """An error's (message, hint) as the command line says them."""
    return exc.in_words(cli_words)
