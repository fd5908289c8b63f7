"""Keras 3 setups found while attacking the Keras reader: each trains with the real ScheduleFreeAdamW
(torch backend) and compares with Keras' own x, or checks that what cannot be determined is refused."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from test_keras import assert_x, keras_x  # noqa: E402

if keras.backend.backend() != "torch":
    pytest.skip("these tests train on Keras' torch backend", allow_module_level=True)

L = keras.layers


def fit_and_save(tmp_path, model, **opt_kw):
    """Train 4 steps with ScheduleFreeAdamW; save model.keras and model.weights.h5 (y), and
    expected.weights.h5 holding Keras' own x."""
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01, **opt_kw), loss="mse")
    rng = np.random.default_rng(0)
    n_in, n_out = model.inputs[0].shape[-1], model.outputs[0].shape[-1]
    model.fit(rng.random((32, n_in), dtype=np.float32), rng.random((32, n_out), dtype=np.float32),
              batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    for v in model.trainable_variables:
        v.assign(keras_x(model.optimizer, v))
    model.save_weights(tmp_path / "expected.weights.h5")


def test_same_layer_name_in_a_nested_model_bit_for_bit(tmp_path, run):
    # Layer names are unique only within one model: the inner "norm" (BatchNorm) is not the outer "norm"
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([L.Dense(4, name="dense"), L.BatchNormalization(name="norm")], name="inner")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, L.Dense(3, name="out")(inner(L.LayerNormalization(name="norm")(inputs))))
    fit_and_save(tmp_path, model)
    result = run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")
    assert "BatchNorm statistics" in result.stderr  # the inner norm's moving_mean/variance, known as BatchNorm's


def test_weights_file_from_gradient_accumulation_is_refused_pointing_at_the_keras_file(tmp_path, run):
    # save_weights keeps no optimizer config: the accumulators shift the assumed layout
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(8), L.Dense(6), L.Dense(3)])
    fit_and_save(tmp_path, model, gradient_accumulation_steps=3)
    result = run("convert", tmp_path / "model.weights.h5", tmp_path / "x.safetensors", "--beta", "0.9")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gradient_accumulation_steps" in lines[0] and ".keras" in lines[0]
    assert "damaged" not in lines[0]
    assert not (tmp_path / "x.safetensors").exists()


def test_frozen_attention_layer_keeps_its_inner_layers_frozen(tmp_path, run):
    # query/key/value are inner layers, not in config.json: they are frozen with their layer
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    attention = L.MultiHeadAttention(2, 3, name="mha")
    hidden = attention(inputs, inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(hidden)))
    attention.trainable = False
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 4, 8), dtype=np.float32), rng.random((16, 3), dtype=np.float32), batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    for v in model.trainable_variables:
        v.assign(keras_x(model.optimizer, v))
    model.save_weights(tmp_path / "expected.weights.h5")
    result = run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_work_placing_entries_into_layers_is_bounded(tmp_path, run, monkeypatch):
    # The cut search costs layers x entries: a small file of many same-shaped layers must not hang
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,))] + [L.Dense(4) for _ in range(6)])
    fit_and_save(tmp_path, model)
    assert run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors").exit_code == 0
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")
    monkeypatch.setenv("SFCKPT_MAX_KERAS_ORDER_STEPS", "20")
    result = run("convert", tmp_path / "model.keras", tmp_path / "y.safetensors")
    assert result.exit_code == 2 and "SFCKPT_MAX_KERAS_ORDER_STEPS" in result.stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_optimizer_compiled_again_after_training_is_refused_saying_so(tmp_path, run):
    # compile() with a fresh optimizer keeps the trained y but drops the momentum: no x in the file
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), L.Dense(8), L.Dense(3)])
    fit_and_save(tmp_path, model)
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(), loss="mae")
    model.save(tmp_path / "recompiled.keras")
    result = run("convert", tmp_path / "recompiled.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "never built" in lines[0] and "right after fit" in lines[0]
    assert not (tmp_path / "x.safetensors").exists()
