"""DeepSpeed universal checkpoints: with z (PR #8609's layout) they convert to the ZeRO folder's x;
without z (what DeepSpeed 0.19's ds_to_universal.py writes) they are refused in one line.

fixtures/deepspeed-universal/ is made by fixtures/make_deepspeed_universal.py with DeepSpeed's own
converter from the ZeRO-2 fixtures of fixtures/deepspeed/ (whose expected.pt is the truth
schedulefree's eval() gave in that run), and from a real AdamW ZeRO-2 run.
"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

import sfckpt
from conftest import FIXTURES, read
from test_readers_deepspeed import assert_identical, expected_output

UNIVERSAL = FIXTURES / "deepspeed-universal"
FROM_ZERO = {"zero2-fp32-z": "zero2-fp32", "zero2-bf16-z": "zero2-bf16"}
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.mark.parametrize("case", sorted(FROM_ZERO))
def test_universal_with_z_converts_to_the_zero_folders_x(run, tmp_path, case):
    out, zero_out = tmp_path / "x.safetensors", tmp_path / "zero.safetensors"
    result = run("convert", UNIVERSAL / case, out)
    assert result.exit_code == 0, result.stderr
    assert run("convert", FIXTURES / "deepspeed" / FROM_ZERO[case], zero_out).exit_code == 0
    assert_identical(read(out), read(zero_out))
    assert_identical(read(out), expected_output(FIXTURES / "deepspeed" / FROM_ZERO[case], None))


def test_universal_folder_is_named_in_inspect(run):
    result = run("inspect", UNIVERSAL / "zero2-bf16-z")
    assert result.exit_code == 0, result.stderr
    assert "deepspeed-universal" in result.stdout and "adamw" in result.stdout


def test_universal_without_z_is_refused_in_one_line(run, tmp_path):
    out = tmp_path / "x.safetensors"
    result = run("convert", UNIVERSAL / "adamw", out)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "dropped Schedule-Free's z" in result.stderr and "convert the ZeRO checkpoint it was made from" in result.stderr
    assert not out.exists()


def test_universal_missing_one_z_is_refused(run, tmp_path):
    folder = tmp_path / "u"
    shutil.copytree(UNIVERSAL / "zero2-fp32-z", folder)
    (folder / "zero" / "fc1.bias" / "z.pt").unlink()
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "fc1.bias" in result.stderr and "no z.pt" in result.stderr


def test_universal_parameter_name_leading_outside_is_refused(tmp_path):
    folder = tmp_path / "u"
    shutil.copytree(UNIVERSAL / "zero2-fp32-z", folder)
    (folder / "zero" / "fc1.bias").rename(tmp_path / "fc1.bias")
    (folder / "zero" / "fc1.bias").symlink_to(tmp_path / "fc1.bias")
    with pytest.raises(sfckpt.errors.InputError, match="outside the checkpoint folder"):
        sfckpt.reconstruct(sfckpt.load(folder)).state_dict()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_universal_fixtures_regenerate(run, tmp_path):
    done = subprocess.run([sys.executable, str(FIXTURES / "make_deepspeed_universal.py"), str(tmp_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FROM_ZERO, "adamw"])
    for case, zero in FROM_ZERO.items():
        out = tmp_path / f"{case}.safetensors"
        assert run("convert", tmp_path / case, out).exit_code == 0
        assert_identical(read(out), expected_output(FIXTURES / "deepspeed" / zero, None))
    refused = run("convert", tmp_path / "adamw", tmp_path / "adamw.safetensors")
    assert refused.exit_code == 2 and "dropped Schedule-Free's z" in refused.stderr
