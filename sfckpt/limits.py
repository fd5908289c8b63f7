"""Limits on everything an input controls, so that cost follows the input's honest size.

A checkpoint of a few KB can describe gigabytes (a size field, a compressed
record, a view with stride 0) or exponential work (shared references that
turn into text, deep nesting that recursion cannot follow). Every such knob
has a limit here; past it sfckpt refuses with exit 2 and says which
environment variable raises it. docs/guarantees.md lists them all.
"""
from __future__ import annotations

import decimal
import math
import os
import sys
from dataclasses import dataclass

from .errors import InputError, LimitExceeded

MiB = 1 << 20
UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Limit:
    env: str
    default: int
    what: str
    ceiling: int = UNLIMITED  # what sfckpt itself can handle, whatever the environment asks

    @property
    def value(self) -> int:
        text = os.environ.get(self.env)
        if text is None or not text.strip():
            return self.default
        try:  # 1e30 is a whole number too: people write "no limit" that way
            number = decimal.Decimal(text.replace("_", "").strip())
            whole = number.is_finite() and number == number.to_integral_value()
        except (decimal.InvalidOperation, ValueError):
            whole = False
        if not whole:
            raise InputError(f"{self.env}={text[:40]!r} is not a whole number", f"set it to a number ({self.what})")
        if number < 0:
            raise InputError(f"{self.env}={text[:40]!r} is negative", f"set it to a number ({self.what})")
        # Past 2**62 no size, count or width an input can hold is larger: the limit is off
        return int(min(number, self.ceiling))

    def exceeded(self, message: str) -> LimitExceeded:
        """The error for an input past this limit."""
        return LimitExceeded(message, f"if the input is trusted and really this large, raise the limit with {self.env}=N "
                                      f"(now {self.value}; {self.what})", env=self.env)


# Python objects a pickle (torch.save's data.pkl, DCP metadata) may expand to, counting shared
# references each time they are reached: an honest pickle has at most a few per byte, a
# billion-laughs structure has 2**depth.
PICKLE_NODES = Limit("SFCKPT_MAX_PICKLE_NODES", 1_000_000, "objects a pickle may expand to, shared references counted each time")
NESTING_DEPTH = Limit("SFCKPT_MAX_NESTING", 200, "containers nested inside each other in a pickle or JSON file")
# Compressed zip members (torch never compresses, but a crafted file may): inflated size.
INFLATED_BYTES = Limit("SFCKPT_MAX_INFLATED_BYTES", 256 * MiB, "bytes a compressed zip record may inflate to")
# bytearray(n) and friends: a pickle may ask for an allocation by number.
PICKLE_ALLOC_BYTES = Limit("SFCKPT_MAX_PICKLE_ALLOC", 64 * MiB, "bytes one bytearray call in a pickle may allocate")
# Integers wider than this cannot be turned into a float or printed cheaply; wider than the ceiling,
# Python refuses to turn them into text at all (sys.get_int_max_str_digits).
_TEXT_BITS = int(sys.get_int_max_str_digits() / math.log10(2)) if sys.get_int_max_str_digits() else UNLIMITED
INT_BITS = Limit("SFCKPT_MAX_INT_BITS", 1023, f"bits in an integer stored in a pickle; at most {_TEXT_BITS}, "
                 "the widest Python turns into text", ceiling=_TEXT_BITS)
# Module names and patterns an adapter_config.json gives peft: each is matched against every module.
ADAPTER_PATTERNS = Limit("SFCKPT_MAX_PATTERNS", 10_000,
                         "module names or patterns one field of adapter_config.json may list")
# safetensors headers, model.safetensors.index.json, config.json, adapter_config.json, trainer_state.json:
# parsed whole into memory.
JSON_BYTES = Limit("SFCKPT_MAX_JSON_BYTES", 32 * MiB, "bytes of a safetensors header or a JSON file of the checkpoint")
# Views whose strides overlap (stride 0) write more than their storage holds.
EXPANSION_BYTES = Limit("SFCKPT_MAX_EXPANSION", 64 * MiB,
                        "bytes that overlapping views (stride 0) may add beyond their storage, per checkpoint")
# data.pkl of a torch.save file and a DCP .metadata: read whole into memory before unpickling.
PICKLE_BYTES = Limit("SFCKPT_MAX_PICKLE_BYTES", 256 * MiB, "bytes of a pickle read whole (torch.save data.pkl, DCP .metadata)")
# DeepSpeed's `latest`, --param-order: a few names.
TEXT_BYTES = Limit("SFCKPT_MAX_TEXT_BYTES", 16 * MiB,
                   "bytes of a text file (DeepSpeed's latest, a parameter-order file)")
# config.json, tokenizer files, README.md: copied into a release beside the weights.
SIDE_FILE_BYTES = Limit("SFCKPT_MAX_SIDE_FILE_BYTES", 1024 * MiB, "bytes of a file copied into a release (tokenizer, config)")
# --bn-calib data files, loaded whole.
CALIBRATION_BYTES = Limit("SFCKPT_MAX_CALIBRATION_BYTES", 16 * 1024 * MiB,
                          "bytes of one BatchNorm calibration data file")
DCP_CHUNKS = Limit("SFCKPT_MAX_DCP_CHUNKS", 16_384, "chunks one torch.distributed.checkpoint tensor may be split into")
CONFIG_LAYERS = Limit("SFCKPT_MAX_LAYERS", 1_000, "layers or experts config.json may ask the parameter-order model for")
# transformers builds id2label/label2id with one Python entry per label (ImageNet-21k has 21,843).
CONFIG_LABELS = Limit("SFCKPT_MAX_LABELS", 100_000, "labels (num_labels) config.json may ask the parameter-order model for")
# Orbax arrays are stored compressed, and chunks equal to the fill value not at all: their files do
# not bound what an array's metadata may ask to allocate.
ARRAY_BYTES = Limit("SFCKPT_MAX_ARRAY_BYTES", 64 * 1024 * MiB,
                    "bytes one Orbax array may hold once read (its files are compressed, so they do not bound it)")
