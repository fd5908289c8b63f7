"""The CLI as a process: exit 2 or 130 with one line and no traceback for odd file names, huge keys,
interrupts while starting and signal storms; a JSON document on stdout when interrupted."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import assert_one_error_line, write_big_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ADAMW = FIXTURES / "adamw_mlp.pt"


def _sfckpt(*args, code=None, timeout=60):
    """`python -m sfckpt ARGS` (or `python -c CODE ARGS`) in a child process; args may be bytes."""
    head = [sys.executable, "-m", "sfckpt"] if code is None else [sys.executable, "-c", code]
    return subprocess.run([*head, *(a if isinstance(a, bytes) else str(a) for a in args)],
                          capture_output=True, timeout=timeout)


def _assert_one_short_error_line(proc, max_len=2000):
    line = assert_one_error_line(proc)
    assert len(line) <= max_len, f"error line is {len(line)} characters"


@pytest.mark.slow
def test_non_utf8_input_file_name_is_not_an_internal_error(tmp_path):
    """Converting a checkpoint whose file name is not valid UTF-8 succeeds, or is a clean exit 2."""
    src = os.fsencode(tmp_path) + b"/run\xff.pt"
    shutil.copyfile(ADAMW, src)
    out = tmp_path / "x.safetensors"
    proc = _sfckpt("convert", src, out)
    err = proc.stderr.decode(errors="replace")
    assert "internal error" not in err and "Traceback" not in err, err
    if proc.returncode == 0:
        assert out.exists()
    else:
        _assert_one_short_error_line(proc)
        assert not out.exists()


def test_error_line_stays_short_for_a_huge_top_level_key(tmp_path):
    """A checkpoint whose only key is a 20 MB string gets an error line of bounded length, in text and JSON."""
    import pickle

    bad = tmp_path / "longkey.pt"
    with zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"k" * 20_000_000: 1}, protocol=2))
        z.writestr("archive/byteorder", "little")
    assert bad.stat().st_size < 100_000
    _assert_one_short_error_line(_sfckpt("inspect", bad))
    proc = _sfckpt("inspect", bad, "--json")
    assert len(proc.stdout) < 10_000, f"--json error document is {len(proc.stdout)} bytes"


_INTERRUPT_DURING_IMPORT = """
import os, runpy, signal, sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "click":  # imported by sfckpt.cli: Ctrl-C while sfckpt starts
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None
sys.meta_path.insert(0, Interrupt())
sys.argv = ["sfckpt", *sys.argv[1:]]
runpy.run_module("sfckpt", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_interrupt_during_startup_exits_130_without_a_traceback(tmp_path):
    """SIGINT arriving while `python -m sfckpt` imports its CLI gives exit 130 and no traceback."""
    out = tmp_path / "x.safetensors"
    proc = _sfckpt("convert", ADAMW, out, code=_INTERRUPT_DURING_IMPORT)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-1500:]
    assert proc.returncode == 130, (proc.returncode, err[-500:])
    assert not out.exists()


_INTERRUPT_AT_TORCH_IMPORT = _INTERRUPT_DURING_IMPORT.replace('name == "click"', 'name == "torch"')


@pytest.mark.slow
def test_json_document_on_stdout_when_interrupted(tmp_path):
    """Ctrl-C during `convert --json` (while it loads torch) still prints a JSON error document on stdout."""
    import json

    out = tmp_path / "x.safetensors"
    proc = _sfckpt("convert", ADAMW, out, "--json", code=_INTERRUPT_AT_TORCH_IMPORT)
    assert proc.returncode == 130, proc.stderr.decode(errors="replace")[-500:]
    assert not out.exists()
    doc = json.loads(proc.stdout)
    assert doc["version"] == 1 and doc["error"]["exit_code"] == 130


@pytest.mark.slow
def test_signal_storm_exits_130_without_a_traceback(tmp_path):
    import signal
    import time


    write_big_checkpoint(tmp_path / "big.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "sfckpt", "convert", str(tmp_path / "big.pt"), str(out_dir / "x.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out_dir.glob("*sfckpt-tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    for i in range(200):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signals arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert list(out_dir.iterdir()) == []
