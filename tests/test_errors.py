"""Bad input: exit 2, one `error:` line on stderr, no traceback, nothing written."""
import os
import random

import pytest
import torch

import trainers
from conftest import save_checkpoint


def assert_refused(result, out, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for f in fragments:
        assert f in result.stderr, result.stderr
    assert result.stdout == ""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "sfckpt-tmp" in p.name]


@pytest.fixture
def ckpt_parts():
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    return model.state_dict(), opt.state_dict()


def test_garbage_empty_truncated(run, tmp_path, trained):
    out = tmp_path / "x.safetensors"
    # Seeded: one os.urandom draw in 256 starts with 0x80, a pickle's first byte, and reads as a legacy torch file
    (tmp_path / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    assert_refused(run("convert", tmp_path / "garbage.pt", out), out, "not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_refused(run("convert", tmp_path / "empty.pt", out), out, "empty")
    good, _, _ = trained("adamw")
    data = good.read_bytes()
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        assert_refused(run("convert", tmp_path / "cut.pt", out), out)
        assert_refused(run("inspect", tmp_path / "cut.pt"), out)
    assert_refused(run("convert", tmp_path / "missing.pt", out), out, "no such file")


def test_no_optimizer_state(run, tmp_path, ckpt_parts):
    sd, _ = ckpt_parts
    torch.save({"model": sd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "no optimizer state")
    torch.save(sd, tmp_path / "bare.pt")
    assert_refused(run("convert", tmp_path / "bare.pt", out), out, "no optimizer state")


def test_not_schedule_free(run, tmp_path):
    model = trainers.MLP()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "holds no Schedule-Free z", "not a Schedule-Free checkpoint")


@pytest.mark.parametrize("beta", [0.0, 1.0, float("nan"), -0.5, 1.5, "0.9"])
def test_beta_out_of_range(beta, run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    osd["param_groups"][0]["betas"] = (beta, 0.999)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "param_groups[0] betas[0]")


def test_beta_option_out_of_range(run, tmp_path, trained):
    ckpt, _, _ = trained("wrapper")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", ckpt, out, "--beta", "1"), out, "--beta", "outside (0, 1)")


def test_z_shape_or_dtype_disagrees(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    osd["state"][2]["z"] = torch.zeros(3, 3)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out,
                   "optimizer entry 2 (group 0) has z of shape (3, 3) but the model has no parameter of that shape")
    osd["state"][2]["z"] = torch.zeros(4, 16, dtype=torch.float64)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "entry 2 (group 0) has z of dtype float64")


def test_optimizer_of_another_model(run, tmp_path, ckpt_parts):
    sd, _ = ckpt_parts
    other = trainers.train(trainers.MLP(width=5), "adamw").state_dict()
    torch.save({"model": sd, "optimizer": other}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "optimizer entry 0", "does not belong to this model")


def test_nonfinite_x_refused_unless_allowed(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    sd["fc1.bias"][3] = float("nan")
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "'fc1.bias' has 1 NaN/Inf", "--allow-nonfinite")
    assert run("convert", tmp_path / "c.pt", out, "--allow-nonfinite").exit_code == 0
    assert out.exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_never_runs(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    torch.save({"model": sd, "optimizer": osd, "extra": evil}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "c.pt", out)
    assert result.exit_code == 0, result.stderr
    assert out.exists()
    inspected = run("inspect", tmp_path / "c.pt", "--json")
    assert "posix.system" in inspected.stdout or "nt.system" in inspected.stdout
    assert not marker.exists()


def test_harmless_objects_beside_weights_load(run, tmp_path, ckpt_parts):
    import argparse
    import collections

    sd, osd = ckpt_parts
    extra = {"args": argparse.Namespace(lr=0.1, name="run"), "counts": collections.Counter(a=1),
             "hist": collections.defaultdict(list, loss=[1.0]), "best": torch.tensor(0.5), "tags": {"a", "b"}}
    try:
        import numpy as np

        extra.update(np_scalar=np.float64(0.25), np_array=np.arange(3))
    except ImportError:
        pass
    torch.save({"model": sd, "optimizer": osd, **extra}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr


def test_legacy_and_lfs_pointer(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "legacy.pt", out), out, "legacy")
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert_refused(run("inspect", tmp_path / "lfs.pt"), out, "Git LFS pointer")


def test_debug_env_shows_traceback(run, tmp_path, monkeypatch):
    (tmp_path / "empty.pt").write_bytes(b"")
    monkeypatch.setenv("SFCKPT_DEBUG", "1")
    result = run("inspect", tmp_path / "empty.pt")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_whole_module_pickle_is_refused_naming_the_class(run, tmp_path):
    torch.save(trainers.MLP(), tmp_path / "model.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "model.pt", out), out, "trainers.MLP", "does not load")
