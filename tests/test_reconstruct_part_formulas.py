"""Every family's formula checks its pair on all of its data (issue #20, round three). The block test ran only in
the streaming lerp; Keras' recovery formula, optax's schedule_free_eval_params and heavyball's float32 lerp read
y and z whole and computed x unchecked, so a layer replaced in part where the samples do not look came out as
a formula of an unrelated z with exit 0. `OutputTensor._from_pair` now checks the pair before any formula.

Keras trains on its torch backend with the real ScheduleFreeAdamW; optax runs in a Python with jax
(tests/scripts/optax_wide.py, a kernel of 6,400 elements: the committed Orbax fixtures hold no tensor of a
whole block of 256 elements, so nothing there can be replaced in part beside kept samples); heavyball trains
with the real package. Intact checkpoints of the same runs convert bit-exactly.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from test_orbax import _jax_python, assert_bits_equal, reference

os.environ.setdefault("KERAS_BACKEND", "torch")
IN_PART = "belongs in part to a different tensor"
SCRIPTS = Path(__file__).parent / "scripts"


def _refused(result, out: Path, name: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("error:") == 1, result.stderr
    assert IN_PART in result.stderr and f"'{name}'" in result.stderr, result.stderr
    assert not out.exists()


def _keras_model(tmp_path: Path, replace_rows: bool):
    """Dense(64) → Dense(100) → Dense(3) trained 8 steps with ScheduleFreeAdamW, saved as model.keras; with
    `replace_rows`, rows 22-31 and 54-63 of the 64 x 100 kernel (its samples read rows 0-20 and 32-52)
    re-initialised after training. Returns the model and its Keras x for the intact case."""
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("trains on Keras' torch backend")
    from test_keras import keras_x

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, name="d1"),
                              keras.layers.Dense(100, name="wide"), keras.layers.Dense(3, name="head")])
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((64, 16), dtype=np.float32), rng.random((64, 3), dtype=np.float32),
              epochs=2, batch_size=16, verbose=0)
    xs = {v.path: keras.ops.convert_to_numpy(keras_x(model.optimizer, v)) for v in model.trainable_variables}
    if replace_rows:
        kernel = model.get_layer("wide").kernel
        fresh = keras.ops.convert_to_numpy(keras.initializers.GlorotUniform(seed=7)((64, 100)))
        value = keras.ops.convert_to_numpy(kernel).copy()
        value[22:32], value[54:64] = fresh[22:32], fresh[54:64]
        kernel.assign(value)
    model.save(tmp_path / "model.keras")
    return model, xs


def test_keras_kernel_replaced_in_part_is_refused(run, tmp_path):
    _keras_model(tmp_path, replace_rows=True)
    out = tmp_path / "x.safetensors"
    _refused(run("convert", tmp_path / "model.keras", out), out, "layers/dense_1/vars/0")


def test_keras_intact_kernel_converts_bit_for_bit(run, tmp_path):
    model, xs = _keras_model(tmp_path, replace_rows=False)
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "model.keras", out)
    assert result.exit_code == 0, result.stderr
    got = load_file(out)
    kernel = model.get_layer("wide").kernel
    assert got["layers/dense_1/vars/0"].numpy().tobytes() == xs[kernel.path].tobytes()


def _optax_run(tmp_path: Path, *args: str) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([_jax_python(), str(SCRIPTS / "optax_wide.py"), str(tmp_path), *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp_path / "ckpt"


@pytest.mark.slow
@pytest.mark.skipif(_jax_python() is None, reason="needs jax, optax and orbax-checkpoint (or SFCKPT_JAX_PYTHON)")
def test_optax_kernel_replaced_in_part_is_refused(run, tmp_path):
    ckpt = _optax_run(tmp_path, "--replace-rows")
    out = tmp_path / "x.safetensors"
    _refused(run("convert", ckpt, out), out, "params/dense1/kernel")


@pytest.mark.slow
@pytest.mark.skipif(_jax_python() is None, reason="needs jax, optax and orbax-checkpoint (or SFCKPT_JAX_PYTHON)")
def test_optax_intact_wide_kernel_converts_bit_for_bit(run, tmp_path):
    ckpt = _optax_run(tmp_path)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    assert_bits_equal(load_file(out), reference(tmp_path))


@pytest.mark.slow  # importing heavyball alone takes seconds
def test_heavyball_float32_lerp_replaced_in_part_is_refused(run, tmp_path):
    """heavyball's eval() lerps in float32 (a whole-tensor formula, not the streaming lerp)."""
    heavyball = pytest.importorskip("heavyball")
    from torch import nn

    from recipes import fit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 100))
    opt = heavyball.SFAdamW(model.parameters(), lr=0.01)
    fit(model, opt, steps=6, batch=lambda: torch.randn(8, 64), loss=lambda m, b: (m(b) - 1.0).pow(2).mean())
    fresh = nn.Linear(64, 100).weight
    with torch.no_grad():
        model[2].weight[32:50] = fresh[32:50]  # the samples read rows 0-31 and 50-81
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "x.safetensors"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    _refused(run("convert", ckpt, out), out, "2.weight")
