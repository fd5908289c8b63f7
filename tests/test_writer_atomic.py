"""Outputs are complete or absent: interrupted, killed by a signal, out of disk, unwritable; the inputs
are never modified and the same input gives the same bytes."""
import signal
import subprocess
import sys
import time

import pytest
import torch

import sfckpt
from conftest import assert_one_error_line, parts, write_big_checkpoint


def test_interrupt_mid_write_leaves_nothing(good, tmp_path):
    ckpt, _ = good
    recon = sfckpt.reconstruct(sfckpt.load(ckpt))
    calls = []

    def interrupt_after_first(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    for out in (tmp_path / "x.safetensors", tmp_path / "folder"):
        with pytest.raises(KeyboardInterrupt):
            sfckpt.save(recon, out, progress=interrupt_after_first, max_shard_size=100 if out.suffix == "" else None)
        calls.clear()
        assert not (tmp_path / "x.safetensors").exists()
        assert not list(tmp_path.rglob("*sfckpt-tmp")) and not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_conversion_leaves_nothing(sig, tmp_path):
    write_big_checkpoint(tmp_path / "big.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "x.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "sfckpt", "convert", str(tmp_path / "big.pt"), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out_dir.glob("*sfckpt-tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.slow
def test_disk_full_leaves_nothing(good, tmp_path):
    ckpt, _ = good
    out = tmp_path / "x.safetensors"
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (600, 600)); "
            "from sfckpt.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "convert", str(ckpt), str(out)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "writing" in result.stderr and "failed" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(good, run):
    ckpt, _ = good
    result = run("convert", ckpt, "/proc/x.safetensors")
    assert_one_error_line(result)


def test_inputs_are_never_modified(good, run, tmp_path):
    ckpt, weights = good
    before = ckpt.read_bytes(), weights.read_bytes()
    for args in (["inspect", ckpt, "--scan"], ["convert", ckpt, tmp_path / "x.safetensors"], ["diff", ckpt],
                 ["check", weights, "--ckpt", ckpt]):
        run(*args)
    assert (ckpt.read_bytes(), weights.read_bytes()) == before


def test_sharded_output_is_deterministic(good, run, tmp_path):
    ckpt, _ = good
    for name in ("a", "b"):
        assert run("convert", ckpt, tmp_path / name, "--max-shard-size", "120B").exit_code == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) > 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_failed_folder_output_leaves_no_folder(run, tmp_path):
    sd, osd = parts()
    sd["fc1.bias"][0] = float("nan")
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "release", "--max-shard-size", "200B")
    assert result.exit_code == 2 and "NaN/Inf" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    result = run("convert", tmp_path / "c.pt", tmp_path / "no" / "release", "--allow-nonfinite")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert not (tmp_path / "no").exists()
