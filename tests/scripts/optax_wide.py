"""A real optax Schedule-Free run with a wide kernel, saved by Orbax: for tests/test_reconstruct_part_formulas.py.

    /path/to/jax-venv/bin/python tests/scripts/optax_wide.py OUT [--replace-rows]

Needs jax (CPU), optax and orbax-checkpoint; not torch, not sfckpt. Dense(64 → 100) and Dense(100 → 4) train 5
steps with `optax.contrib.schedule_free_adamw`; `{params, opt_state}` is saved with `ocp.StandardCheckpointer`
in OUT/ckpt, and optax's own `schedule_free_eval_params` (un-jitted) in OUT/x.npz, as fixtures/make_orbax_fixtures.py
writes it. With --replace-rows, rows 22-31 and 54-63 of the first kernel (64 x 100, whose samples read elements
0-2047 and 3200-5247: rows 0-20 and 32-52) are re-initialised after training, before saving: a layer partly
replaced after the optimizer was built, where the samples do not look.
"""
from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp


def main(out: Path, replace_rows: bool) -> None:
    jax.config.update("jax_platforms", "cpu")
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"dense1": {"kernel": jax.random.normal(k[0], (64, 100)) * 0.1, "bias": jnp.zeros(100)},
              "dense2": {"kernel": jax.random.normal(k[1], (100, 4)) * 0.1, "bias": jnp.zeros(4)}}
    tx = optax.contrib.schedule_free_adamw(learning_rate=0.01, b1=0.9)
    opt_state = tx.init(params)
    key = jax.random.PRNGKey(1)
    for _ in range(5):
        key, k1 = jax.random.split(key)
        batch = jax.random.normal(k1, (16, 64))

        def loss(p):
            h = jnp.tanh(batch @ p["dense1"]["kernel"] + p["dense1"]["bias"])
            return ((h @ p["dense2"]["kernel"] + p["dense2"]["bias"] - 1.0) ** 2).mean()

        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
    x = optax.contrib.schedule_free_eval_params(opt_state, params)
    if replace_rows:
        fresh = jax.random.normal(k[2], (64, 100)) * 0.1
        kernel = params["dense1"]["kernel"].at[22:32].set(fresh[22:32])
        params["dense1"]["kernel"] = kernel.at[54:64].set(fresh[54:64])
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out.resolve() / "ckpt", {"params": params, "opt_state": opt_state})
    checkpointer.wait_until_finished()
    flat, _ = jax.tree_util.tree_flatten_with_path({"params": x})
    arrays = {"/".join(str(p.key) for p in path): np.asarray(leaf) for path, leaf in flat}
    np.savez(out / "x.npz", dtypes=np.array([f"{n}={a.dtype.name}" for n, a in arrays.items()]),
             **{n: a.view(f"uint{a.dtype.itemsize * 8}") for n, a in arrays.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--replace-rows" in sys.argv[2:])
