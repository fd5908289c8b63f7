"""Review of the fixes for issues #11 and #12: inputs and usage the authors' tests did not try.

Each test is a problem found in review, marked xfail(strict=True) until it is fixed."""
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import assert_one_error_line

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ADAMW = FIXTURES / "adamw_mlp.pt"
DEEPSPEED = FIXTURES / "deepspeed" / "zero2-fp32"


def _sfckpt(*args, code=None, timeout=60):
    """`python -m sfckpt ARGS` (or `python -c CODE ARGS`) in a child process; args may be bytes."""
    head = [sys.executable, "-m", "sfckpt"] if code is None else [sys.executable, "-c", code]
    return subprocess.run([*head, *(a if isinstance(a, bytes) else str(a) for a in args)],
                          capture_output=True, timeout=timeout)


def _assert_one_short_error_line(proc, max_len=2000):
    line = assert_one_error_line(proc)
    assert len(line) <= max_len, f"error line is {len(line)} characters"


def _snapshot(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_deepspeed_latest_tag_symlinked_outside_the_folder_is_refused(run, tmp_path):
    """A DeepSpeed folder whose `latest` tag is a symlink leading outside the input is exit 2, nothing written."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(DEEPSPEED / "global_step3", outside / "global_step3")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copyfile(DEEPSPEED / "latest", ckpt / "latest")
    (ckpt / (DEEPSPEED / "latest").read_text().strip()).symlink_to(outside / "global_step3", target_is_directory=True)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert_one_error_line(result, "outside")
    assert not out.exists()


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


def test_force_failing_mid_commit_keeps_the_previous_release(run, tmp_path):
    """When replacing a sharded release fails while moving files into place, the old release is intact."""
    rel = tmp_path / "rel"
    # float32 with 300B shards and bfloat16 with 150B shards give the same three shard names.
    first = run("convert", ADAMW, f"{rel}/", "--max-shard-size", "300B", "-q")
    assert first.exit_code == 0, first.stderr
    before = _snapshot(rel)
    assert sorted(before) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    last = rel / "model-00003-of-00003.safetensors"
    if subprocess.run(["chattr", "+i", str(last)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root) to make one rename fail")
    try:
        result = run("convert", ADAMW, f"{rel}/", "--max-shard-size", "150B", "--dtype", "bfloat16", "--force")
        assert result.exit_code == 2, result.stderr
        assert sorted(_snapshot(rel)) == sorted(before)
        assert _snapshot(rel) == before, "the previous release was changed by a failed --force run"
    finally:
        subprocess.run(["chattr", "-i", str(last)], capture_output=True)


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


def test_interrupt_during_startup_exits_130_without_a_traceback(tmp_path):
    """SIGINT arriving while `python -m sfckpt` imports its CLI gives exit 130 and no traceback."""
    out = tmp_path / "x.safetensors"
    proc = _sfckpt("convert", ADAMW, out, code=_INTERRUPT_DURING_IMPORT)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err[-1500:]
    assert proc.returncode == 130, (proc.returncode, err[-500:])
    assert not out.exists()


def test_check_does_not_pass_a_folder_whose_model_safetensors_is_stale(run, tmp_path):
    """A release folder with x in index+shards but y in model.safetensors is not PASSed by check."""
    rel = tmp_path / "rel"
    assert run("convert", ADAMW, f"{rel}/", "--max-shard-size", "300B", "-q").exit_code == 0
    y = tmp_path / "y.safetensors"
    assert run("convert", ADAMW, y, "--params-are", "x", "-q").exit_code == 0  # y, copied unchanged
    shutil.move(y, rel / "model.safetensors")  # what transformers' from_pretrained loads first
    assert (rel / "model.safetensors.index.json").is_file()
    result = run("check", f"{rel}/", "--ckpt", ADAMW)
    assert result.exit_code != 0, result.stdout


def test_index_shard_that_is_a_fifo_is_refused_not_a_hang(run, tmp_path):
    """check on a release whose indexed shard is a named pipe is exit 2 within seconds, not a hang."""
    rel = tmp_path / "rel"
    assert run("convert", ADAMW, f"{rel}/", "--max-shard-size", "300B", "-q").exit_code == 0
    shard = rel / "model-00002-of-00003.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    proc = subprocess.Popen([sys.executable, "-m", "sfckpt", "check", f"{rel}/", "--ckpt", str(ADAMW)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=6)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("check blocked on the FIFO for 6 s")
    assert proc.returncode == 2, err.decode(errors="replace")


_INTERRUPT_AT_TORCH_IMPORT = _INTERRUPT_DURING_IMPORT.replace('name == "click"', 'name == "torch"')


def test_json_document_on_stdout_when_interrupted(tmp_path):
    """Ctrl-C during `convert --json` (while it loads torch) still prints a JSON error document on stdout."""
    import json

    out = tmp_path / "x.safetensors"
    proc = _sfckpt("convert", ADAMW, out, "--json", code=_INTERRUPT_AT_TORCH_IMPORT)
    assert proc.returncode == 130, proc.stderr.decode(errors="replace")[-500:]
    assert not out.exists()
    doc = json.loads(proc.stdout)
    assert doc["version"] == 1 and doc["error"]["exit_code"] == 130
