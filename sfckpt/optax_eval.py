"""x as optax computes it: `optax.contrib.schedule_free_eval_params`, called un-jitted.

optax maps `(y - (1.0 - b1) * z) / b1` over the parameter tree, one XLA operation at a time, with
the `b1` stored in the state (in the lowest parameter dtype: 0.8984375 for bfloat16, not 0.9). The
last bit depends on how XLA's CPU backend lowers the division, which was measured against optax
0.2.8 and jax 0.10 (tests/test_orbax.py): float16, float32 and float64 divide by multiplying
with the reciprocal of b1 rounded to the leaf's dtype; bfloat16 divides (in float32, rounded
once). Under `jax.jit` XLA fuses the expression and may round differently again (docs/families.md).
"""
from __future__ import annotations

from typing import Any

from .tensors import torch_dtype


def eval_params(y: Any, z: Any, b1: float, b1_dtype: str):
    """x of one leaf: `(y - (1 - b1)·z) / b1` with optax's rounding, in y's dtype.

    Args:
        y, z: the parameter and its z, torch tensors of one dtype.
        b1: the stored b1's value; b1_dtype: the dtype it is stored in.
    """
    import torch

    stored = torch.tensor(b1, dtype=torch_dtype(b1_dtype))
    # 1.0 - b1 rounds in b1's own dtype, before JAX promotes it to the leaf's.
    complement, beta = (1.0 - stored).to(y.dtype), stored.to(y.dtype)
    t = y - complement * z
    if y.dtype == torch.bfloat16:
        return t / beta
    return t * (1 / beta)
