"""Facts that several modules need the same answer to, each said once.

Nothing here imports anything: `__main__` reads it before the rest of sfckpt loads, so
that Ctrl-C during start-up ends with the same message and document as later.
"""
from __future__ import annotations

from typing import Any

# What BatchNorm keeps beside its parameters. The two statistics are gathered at y during training
# (so they are what `--bn-calib` re-estimates and what the warning counts); the step counter is not.
BN_STATISTICS = ("running_mean", "running_var")
BN_BUFFERS = (*BN_STATISTICS, "num_batches_tracked")

# The floating dtypes x can be written in (`--dtype`), in the order the help lists them.
OUTPUT_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Their short names, as transformers and accelerate spell them (torch_dtype="bf16", mixed_precision)
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}

# Hugging Face's names for one weights file and for the index of a sharded one.
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# The `version` of every JSON document sfckpt prints (reports, summaries, errors).
JSON_VERSION = 1

INTERRUPTED = "interrupted; nothing was written"
EXIT_INTERRUPTED = 130


def error_document(message: str, hint: str | None, exit_code: int) -> dict[str, Any]:
    """What --json prints on stdout when a command fails, so that machines get a document either way."""
    return {"version": JSON_VERSION, "error": {"message": message, "hint": hint, "exit_code": exit_code}}
