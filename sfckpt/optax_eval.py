"""x as optax computes it: `optax.contrib.schedule_free_eval_params`, called un-jitted.

optax maps `(y - (1.0 - b1) * z) / b1` over the parameter tree, one XLA operation at a time, with
the `b1` stored in the state (optax keeps it in the lowest parameter dtype: 0.8984375 for
bfloat16, not 0.9; rollfast keeps its annealed `b1` in float32). The operations run in the dtype
JAX promotes y, z and b1 to, and the last bit depends on how XLA's CPU backend lowers the division,
which was measured against optax 0.2.8 and jax 0.10 (tests/test_orbax.py): float32 divides by
multiplying with the reciprocal of b1 rounded to float32, bfloat16 divides (in float32, rounded
once). Under `jax.jit` XLA fuses the expression and may round differently again
(docs/families.md).
"""
from __future__ import annotations

from typing import Any

from .tensors import torch_dtype


def eval_params(y: Any, z: Any, b1: float, b1_dtype: str):
    """x of one leaf: `(y - (1 - b1)·z) / b1` with XLA's rounding, returned in y's dtype.

    Args:
        y, z: the parameter and its z, torch tensors.
        b1: the stored b1's value; b1_dtype: the dtype it is stored in.
    """
    import torch

    stored = torch.tensor(b1, dtype=torch_dtype(b1_dtype))
    dtype = torch.promote_types(torch.promote_types(y.dtype, z.dtype), stored.dtype)  # as JAX promotes floats
    # 1.0 - b1 rounds in b1's own dtype, before it meets the leaf.
    complement, beta = (1.0 - stored).to(dtype), stored.to(dtype)
    t = y.to(dtype) - complement * z.to(dtype)
    x = t / beta if dtype == torch.bfloat16 else t * (1 / beta)
    # A float32 b1 with bfloat16 leaves (rollfast) gives x in float32; the parameter holds it rounded.
    return x.to(y.dtype)
