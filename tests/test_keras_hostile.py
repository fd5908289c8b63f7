"""Hostile Keras files: whatever points outside the input, or costs more than its size, is refused (exit 2), nothing written."""
import os
import zipfile

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
h5py = pytest.importorskip("h5py")

from test_keras import train  # noqa: E402

if keras.backend.backend() != "torch":
    pytest.skip("these tests train on Keras' torch backend", allow_module_level=True)


@pytest.fixture
def saved(tmp_path):
    """A real model.keras and model.weights.h5 (Dense/BatchNorm/frozen Dense/Dense, ScheduleFreeAdamW)."""
    train(tmp_path)
    return tmp_path


def repack(src, dst, replace=None, extra=(), compress=()):
    """Copy a .keras zip, replacing members' bytes, adding members, deflating the ones named."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = (replace or {}).get(info.filename, zin.read(info.filename))
            zout.writestr(info.filename, data, zipfile.ZIP_DEFLATED if info.filename in compress else zipfile.ZIP_STORED)
        for name, data in extra:
            zout.writestr(zipfile.ZipInfo(name), data)
    return dst


def refused(run, path, tmp_path, words, *extra):
    out = tmp_path / "x.safetensors"
    result = run("convert", path, out, *extra)
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def outside_h5(tmp_path):
    other = tmp_path.parent / f"{tmp_path.name}-outside"
    other.mkdir(exist_ok=True)
    with h5py.File(other / "outside.h5", "w") as f:
        f["data"] = np.arange(16, dtype=np.float32)
    return other / "outside.h5"


def test_external_link_is_refused(saved, tmp_path, run):
    target = outside_h5(tmp_path)
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/dense/vars/9"] = h5py.ExternalLink(str(target), "/data")
    refused(run, saved / "model.weights.h5", tmp_path, ["external link", "outside"], "--beta", "0.9")


def test_external_link_inside_a_keras_archive_is_refused(saved, tmp_path, run):
    target = outside_h5(tmp_path)
    with zipfile.ZipFile(saved / "model.keras") as zf:
        (tmp_path / "inner.h5").write_bytes(zf.read("model.weights.h5"))
    with h5py.File(tmp_path / "inner.h5", "a") as f:
        f["layers/evil"] = h5py.ExternalLink(str(target), "/")
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", {"model.weights.h5": (tmp_path / "inner.h5").read_bytes()})
    refused(run, bad, tmp_path, ["external link"])


def test_soft_link_is_refused(saved, tmp_path, run):
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/alias"] = h5py.SoftLink("/layers/dense")
    refused(run, saved / "model.weights.h5", tmp_path, ["SoftLink"], "--beta", "0.9")


def test_hard_link_cycle_is_refused(saved, tmp_path, run):
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/dense/loop"] = f["layers"]
    refused(run, saved / "model.weights.h5", tmp_path, ["links back"], "--beta", "0.9")


def test_virtual_dataset_is_refused(saved, tmp_path, run):
    target = outside_h5(tmp_path)
    layout = h5py.VirtualLayout(shape=(16,), dtype="float32")
    layout[:] = h5py.VirtualSource(str(target), "data", shape=(16,))
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/dense"].create_virtual_dataset("vars/9", layout)
    refused(run, saved / "model.weights.h5", tmp_path, ["virtual"], "--beta", "0.9")


def test_external_raw_storage_is_refused(saved, tmp_path, run):
    target = outside_h5(tmp_path)
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/dense"].create_dataset("vars/9", shape=(16,), dtype="float32", external=[(str(target), 0, 64)])
    refused(run, saved / "model.weights.h5", tmp_path, ["external file"], "--beta", "0.9")


def test_compressed_dataset_is_refused(saved, tmp_path, run):
    with h5py.File(saved / "model.weights.h5", "a") as f:
        f["layers/dense"].create_dataset("vars/9", data=np.zeros(1000, np.float32), compression="gzip")
    refused(run, saved / "model.weights.h5", tmp_path, ["chunked or compressed"], "--beta", "0.9")


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt"])
def test_member_named_outside_the_archive_is_refused(saved, tmp_path, run, name):
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", extra=[(name, b"x")])
    refused(run, bad, tmp_path, ["outside"])


def test_compressed_weights_member_is_refused(saved, tmp_path, run):
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", compress=["model.weights.h5"])
    refused(run, bad, tmp_path, ["compressed", "zip -0"])


def test_config_zip_bomb_is_refused(saved, tmp_path, run):
    bomb = b"{" + b" " * (40 << 20) + b"}"  # 40 MiB that deflate to a few KB
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", {"config.json": bomb}, compress=["config.json"])
    assert bad.stat().st_size < 1 << 20
    refused(run, bad, tmp_path, ["SFCKPT_MAX_JSON_BYTES"])


def test_truncated_weights_file_is_refused(saved, tmp_path, run):
    data = (saved / "model.weights.h5").read_bytes()
    (tmp_path / "cut.weights.h5").write_bytes(data[: len(data) // 2])
    refused(run, tmp_path / "cut.weights.h5", tmp_path, ["cut.weights.h5"], "--beta", "0.9")


def test_zip_member_count_is_bounded(saved, tmp_path, run, monkeypatch):
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", extra=[("assets/a", b"x")])
    monkeypatch.setenv("SFCKPT_MAX_ZIP_MEMBERS", "3")
    refused(run, bad, tmp_path, ["SFCKPT_MAX_ZIP_MEMBERS"])


def test_hdf5_object_count_is_bounded(saved, tmp_path, run, monkeypatch):
    monkeypatch.setenv("SFCKPT_MAX_H5_OBJECTS", "5")
    refused(run, saved / "model.keras", tmp_path, ["SFCKPT_MAX_H5_OBJECTS"])


def test_optimizer_variables_that_do_not_fit_the_config_are_refused(saved, tmp_path, run):
    with zipfile.ZipFile(saved / "model.keras") as zf:
        (tmp_path / "inner.h5").write_bytes(zf.read("model.weights.h5"))
    with h5py.File(tmp_path / "inner.h5", "a") as f:
        del f["optimizer/vars/1"]
        f["optimizer/vars/1"] = np.zeros(3, np.float32)
    bad = repack(saved / "model.keras", tmp_path / "bad.keras", {"model.weights.h5": (tmp_path / "inner.h5").read_bytes()})
    refused(run, bad, tmp_path, ["optimizer/vars/1", "learning rate"])
