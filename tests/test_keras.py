"""Keras 3 checkpoints (.keras, .weights.h5, .weights.json) trained with the real ScheduleFreeAdamW on the torch backend.

Keras has no eval(): the reference x is its own recovery formula, applied with Keras' ops to its own
variables (`keras_x` below), saved by Keras itself so that every tensor is compared under its HDF5 path.
"""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported: no TensorFlow or JAX needed
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from safetensors.numpy import load_file  # noqa: E402

if keras.backend.backend() != "torch":
    pytest.skip("these tests train on Keras' torch backend", allow_module_level=True)


def build(bn=True, dtype=None, frozen=True):
    """Dense(16) [BatchNorm] Dense(4, frozen) Dense(3)."""
    layers = [keras.Input((8,)), keras.layers.Dense(16, name="d1", dtype=dtype)]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn", dtype=dtype))
    layers.append(keras.layers.Dense(4, name="frozen", dtype=dtype, trainable=not frozen))
    layers.append(keras.layers.Dense(3, name="head", dtype=dtype))
    return keras.Sequential(layers)


def train(tmp_path, bn=True, dtype=None, lr=0.01, frozen=True, **opt_kw):
    """A model trained 8 steps with ScheduleFreeAdamW, saved as model.keras and model.weights.h5
    (y with the optimizer), and expected.weights.h5: the same model holding Keras' own x."""
    keras.utils.set_random_seed(0)
    model = build(bn, dtype, frozen)
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=lr, **opt_kw), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((64, 8), dtype=np.float32), rng.random((64, 3), dtype=np.float32),
              epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    xs = [keras_x(model.optimizer, v) for v in model.trainable_variables]
    for v, x in zip(model.trainable_variables, xs):
        v.assign(x)
    model.save_weights(tmp_path / "expected.weights.h5")
    return model


def keras_x(opt, variable):
    """x as ScheduleFreeAdamW.update_step recovers it, with Keras' ops."""
    ops = keras.ops
    momentum = opt._momentums[opt._get_variable_index(variable)]
    beta_1 = ops.cast(opt.beta_1, variable.dtype)
    return ops.divide(ops.subtract(variable, ops.multiply(1 - beta_1, momentum)), beta_1)


def layer_datasets(path):
    """{HDF5 path: raw bytes} of a weights file's layer variables (no optimizer)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, np.asarray(obj).tobytes())
                     if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer/") else None)
    return out


def assert_x(safetensors_path, expected_h5):
    got = {k: v.tobytes() for k, v in load_file(str(safetensors_path)).items()}
    expected = layer_datasets(expected_h5)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs from Keras' own x"


def test_keras_x_is_keras_formula_bit_for_bit(tmp_path, run):
    train(tmp_path)
    result = run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")
    y = layer_datasets(tmp_path / "model.weights.h5")
    x = layer_datasets(tmp_path / "expected.weights.h5")
    assert y["layers/dense/vars/0"] != x["layers/dense/vars/0"]  # trained: x is not y
    assert y["layers/dense_1/vars/0"] == x["layers/dense_1/vars/0"]  # the frozen layer is copied


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_keras_low_precision_x_bit_for_bit(tmp_path, run, dtype):
    # beta_2=0.999 rounds to 1 in bfloat16, and Keras' bias correction then divides by zero
    train(tmp_path, bn=False, dtype=dtype, beta_2=0.95)
    assert run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors").exit_code == 0
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_keras_learning_rate_schedule_layout(tmp_path, run):
    train(tmp_path, lr=keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9), beta_1=0.8)
    assert run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors").exit_code == 0
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_keras_gradient_accumulation_layout(tmp_path, run):
    train(tmp_path, gradient_accumulation_steps=2)
    assert run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors").exit_code == 0
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_nested_model_bit_for_bit(tmp_path, run):
    keras.utils.set_random_seed(0)
    inner = keras.Sequential([keras.layers.Dense(6, name="in1"), keras.layers.BatchNormalization(name="ibn")], name="sub")
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Dense(5, name="mid")(inner(inputs))))
    model.get_layer("mid").trainable = False
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((32, 8), dtype=np.float32), rng.random((32, 3), dtype=np.float32), batch_size=8, verbose=0)
    model.save(tmp_path / "model.keras")
    for v in model.trainable_variables:
        v.assign(keras_x(model.optimizer, v))
    model.save_weights(tmp_path / "expected.weights.h5")
    result = run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_weights_h5_needs_beta(tmp_path, run):
    train(tmp_path, bn=False)
    result = run("convert", tmp_path / "model.weights.h5", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "--beta" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_h5_with_beta_bit_for_bit(tmp_path, run):
    train(tmp_path, bn=False)
    result = run("convert", tmp_path / "model.weights.h5", tmp_path / "x.safetensors", "--beta", "0.9")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_weights_h5_with_batchnorm_after_a_same_shaped_bias_is_refused_not_guessed(tmp_path, run):
    # Without config.json, Dense(16)'s bias could be frozen and BatchNorm's moving_mean trained: two cuts fit
    train(tmp_path)
    result = run("convert", tmp_path / "model.weights.h5", tmp_path / "x.safetensors", "--beta", "0.9")
    assert result.exit_code == 2 and "--param-order" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_sharded_weights_json_bit_for_bit(tmp_path, run):
    model = train(tmp_path, bn=False)
    model_y = build(bn=False)
    model_y.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(), loss="mse")
    model_y.optimizer.build(model_y.trainable_variables)
    model_y.load_weights(tmp_path / "model.weights.h5")
    model_y.save_weights(tmp_path / "sharded.weights.json", max_shard_size=1e-6)
    assert len(list(tmp_path.glob("sharded_*.weights.h5"))) > 1
    del model
    result = run("convert", tmp_path / "sharded.weights.json", tmp_path / "x.safetensors", "--beta", "0.9")
    assert result.exit_code == 0, result.stderr
    assert_x(tmp_path / "x.safetensors", tmp_path / "expected.weights.h5")


def test_output_weights_h5_loads_with_load_weights(tmp_path, run):
    train(tmp_path)
    assert run("convert", tmp_path / "model.keras", tmp_path / "out.weights.h5").exit_code == 0
    with h5py.File(tmp_path / "out.weights.h5", "r") as f:
        assert "optimizer" not in f
    fresh = build()
    fresh.load_weights(tmp_path / "out.weights.h5")
    expected = build()
    expected.load_weights(tmp_path / "expected.weights.h5", skip_mismatch=True)
    for a, b in zip(fresh.weights, expected.weights):
        assert keras.ops.convert_to_numpy(a).tobytes() == keras.ops.convert_to_numpy(b).tobytes(), a.path


def test_output_keras_loads_without_optimizer_state(tmp_path, run):
    train(tmp_path)
    assert run("convert", tmp_path / "model.keras", tmp_path / "out.keras").exit_code == 0
    with zipfile.ZipFile(tmp_path / "out.keras") as zf, zipfile.ZipFile(tmp_path / "model.keras") as src:
        assert zf.read("config.json") == src.read("config.json")
    loaded = keras.models.load_model(tmp_path / "out.keras")
    assert int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 0  # nothing to resume from
    expected = layer_datasets(tmp_path / "expected.weights.h5")
    loaded.save_weights(tmp_path / "reloaded.weights.h5")
    assert layer_datasets(tmp_path / "reloaded.weights.h5") == expected


def test_keras_output_bytes_are_deterministic(tmp_path, run):
    train(tmp_path)
    run("convert", tmp_path / "model.keras", tmp_path / "a.keras")
    run("convert", tmp_path / "model.keras", tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()


def test_keras_output_keeps_existing_file_without_force(tmp_path, run):
    train(tmp_path)
    (tmp_path / "out.weights.h5").write_bytes(b"mine")
    result = run("convert", tmp_path / "model.keras", tmp_path / "out.weights.h5")
    assert result.exit_code == 2 and "--force" in result.stderr
    assert (tmp_path / "out.weights.h5").read_bytes() == b"mine"
    assert run("convert", tmp_path / "model.keras", tmp_path / "out.weights.h5", "--force").exit_code == 0


def test_check_and_diff_read_keras_outputs(tmp_path, run):
    train(tmp_path)
    run("convert", tmp_path / "model.keras", tmp_path / "out.weights.h5")
    assert run("check", tmp_path / "out.weights.h5", "--ckpt", tmp_path / "model.keras").exit_code == 0
    failed = run("check", tmp_path / "model.keras", "--ckpt", tmp_path / "model.keras")
    assert failed.exit_code == 1 and "training weights y" in failed.stdout
    diff = run("diff", tmp_path / "model.keras", "--json")
    assert diff.exit_code == 0 and json.loads(diff.stdout)


def test_batchnorm_statistics_flagged_as_gathered_at_y(tmp_path, run):
    train(tmp_path)
    report = json.loads(run("inspect", tmp_path / "model.keras", "--json").stdout)
    assert any("BatchNorm statistics" in w and "Keras" in w for w in report["warnings"])


def test_optimizer_that_is_not_schedule_free_is_refused(tmp_path, run):
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=keras.optimizers.Adam(), loss="mse")
    model.fit(np.ones((16, 8), np.float32), np.ones((16, 3), np.float32), verbose=0)
    model.save(tmp_path / "adam.keras")
    result = run("convert", tmp_path / "adam.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "'Adam'" in result.stderr and "not ScheduleFreeAdamW" in result.stderr


def test_use_ema_is_refused(tmp_path, run):
    train(tmp_path, use_ema=True)
    result = run("convert", tmp_path / "model.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "use_ema=True" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_loss_scale_optimizer_is_refused_by_name(tmp_path, run):
    keras.utils.set_random_seed(0)
    model = build(bn=False)
    model.compile(optimizer=keras.optimizers.LossScaleOptimizer(keras.optimizers.ScheduleFreeAdamW()), loss="mse")
    model.fit(np.ones((16, 8), np.float32), np.ones((16, 3), np.float32), verbose=0)
    model.save(tmp_path / "scaled.keras")
    result = run("convert", tmp_path / "scaled.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "LossScaleOptimizer" in result.stderr


def test_save_complete_only_for_a_whole_file(tmp_path):
    from sfckpt.readers.keras_file import KerasReader

    train(tmp_path)
    reader = KerasReader()
    assert reader.save_complete(tmp_path / "model.keras")
    assert reader.save_complete(tmp_path / "model.weights.h5")
    data = (tmp_path / "model.keras").read_bytes()
    (tmp_path / "partial.keras").write_bytes(data[: len(data) - 200])
    assert not reader.save_complete(tmp_path / "partial.keras")


def test_keras_file_named_pt_is_read_as_keras(tmp_path, run):
    train(tmp_path)
    (tmp_path / "model.keras").rename(tmp_path / "renamed.pt")
    assert run("convert", tmp_path / "renamed.pt", tmp_path / "x.safetensors").exit_code == 0


@pytest.mark.slow
def test_reading_never_imports_keras(tmp_path):
    train(tmp_path)
    code = (
        "import sys, sfckpt\n"
        f"sfckpt.convert({str(tmp_path / 'model.keras')!r}, {str(tmp_path / 'out.keras')!r})\n"
        "sfckpt.reconstruct(sfckpt.load(sys.argv[1])).state_dict()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow', 'jax'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.keras")], check=True)


def test_missing_h5py_names_the_extra(tmp_path):
    train(tmp_path)
    code = "import sys; sys.modules['h5py'] = None; from sfckpt.cli import main; main(sys.argv[1:])"
    result = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "model.keras")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: reading Keras files needs h5py, which is not installed; "
                                                  "pip install 'sfckpt[keras]'"]


def test_keras_output_refuses_an_archive_with_assets(tmp_path, run):
    train(tmp_path)
    with zipfile.ZipFile(tmp_path / "model.keras") as src, zipfile.ZipFile(tmp_path / "assets.keras", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        dst.writestr("assets/layer/vocab.txt", b"a\nb\n")
    result = run("convert", tmp_path / "assets.keras", tmp_path / "out.keras")
    assert result.exit_code == 2 and "assets/layer/vocab.txt" in result.stderr and ".weights.h5" in result.stderr
    assert not (tmp_path / "out.keras").exists()
    assert run("convert", tmp_path / "assets.keras", tmp_path / "out.weights.h5").exit_code == 0


def test_inner_layers_whose_order_the_file_does_not_keep_are_refused_not_guessed(tmp_path, run):
    # MultiHeadAttention makes query, key and value (equal shapes) in that order; the file keeps no order
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 8))
    hidden = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(hidden)))
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(learning_rate=0.01), loss="mse")
    rng = np.random.default_rng(0)
    model.fit(rng.random((16, 4, 8), dtype=np.float32), rng.random((16, 3), dtype=np.float32), batch_size=8, verbose=0)
    model.save(tmp_path / "mha.keras")
    result = run("convert", tmp_path / "mha.keras", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "--param-order" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
