"""Output files on disk: temporaries after SIGKILL, several writers at once, long names, names
that safetensors cannot store."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import trainers
from conftest import FIXTURES, assert_clean, assert_equal_tensors, parts, read
from sfckpt import writer
from sfckpt.cli import main
from sfckpt.errors import InputError

ADAMW = FIXTURES / "adamw_mlp.pt"


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """(checkpoint of a few hundred MB, x from the optimizer's own eval()): the write takes long
    enough to catch a process in the middle of it."""
    folder = tmp_path_factory.mktemp("big")
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(40)])
    opt = trainers.OPTIMIZERS["sgd"][0](model.parameters())
    opt.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, folder / "big.pt")
    opt.eval()
    return folder / "big.pt", {k: v.detach().clone() for k, v in model.state_dict().items()}


def _convert(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sfckpt", "convert", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.sfckpt-tmp")) + sorted(folder.rglob("*.sfckpt-old"))


def _written(path: Path) -> int:
    """Bytes written so far into a temporary file, or into the files of a staging folder."""
    try:
        return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    except OSError:
        return 0


def _caught_mid_write(proc: subprocess.Popen, folder: Path) -> Path:
    """Wait until `proc` has written part of its output; the temporary it is writing."""
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        found = [t for t in folder.glob(".*.sfckpt-tmp") if _written(t) > 0]
        if found:
            return found[0]
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    pytest.skip("the conversion finished before it could be caught writing")


def _killed_mid_write(proc: subprocess.Popen, folder: Path) -> Path:
    tmp = _caught_mid_write(proc, folder)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return tmp


@pytest.mark.slow
def test_sigkill_mid_write_then_rerun_leaves_no_temporary(big, run, tmp_path):
    ckpt, x = big
    out = tmp_path / "x.safetensors"
    stale = _killed_mid_write(_convert(ckpt, out), tmp_path)
    assert stale.exists() and not out.exists()  # a killed process removes nothing: the next run does
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    assert _temporaries(tmp_path) == []
    assert_equal_tensors(read(out), x)


@pytest.mark.slow
def test_sigkill_of_a_new_folder_output_leaves_no_release_behind(big, run, tmp_path):
    ckpt, x = big
    release = tmp_path / "release"
    stale = _killed_mid_write(_convert(ckpt, f"{release}/"), tmp_path)
    # What the user sees meanwhile: no release folder, only a hidden staging folder beside it.
    assert stale.is_dir() and stale.name.startswith(".release.") and not release.exists()
    result = run("convert", ckpt, f"{release}/")
    assert result.exit_code == 0, result.stderr
    assert _temporaries(tmp_path) == []
    assert sorted(p.name for p in release.iterdir()) == ["model.safetensors"]
    assert_equal_tensors(read(release / "model.safetensors"), x)


@pytest.mark.slow
def test_sigkill_into_an_existing_release_keeps_it_until_the_rerun(big, trained, run, tmp_path):
    ckpt, x = big
    small, small_x, _ = trained("adamw")
    release = tmp_path / "release"
    assert run("convert", small, f"{release}/").exit_code == 0
    previous = (release / "model.safetensors").read_bytes()
    _killed_mid_write(_convert(ckpt, release, "--force"), release)
    assert (release / "model.safetensors").read_bytes() == previous
    assert_equal_tensors(read(release / "model.safetensors"), small_x)
    result = run("convert", ckpt, release, "--force")
    assert result.exit_code == 0, result.stderr
    assert _temporaries(tmp_path) == []
    assert_equal_tensors(read(release / "model.safetensors"), x)


@pytest.mark.slow
def test_a_live_writers_temporary_survives_another_runs_cleanup(big, trained, run, tmp_path):
    ckpt, x = big
    small, small_x, _ = trained("adamw")
    out = tmp_path / "out"
    out.mkdir()
    first = _convert(ckpt, out / "x.safetensors")
    live = _caught_mid_write(first, out)
    first.send_signal(signal.SIGSTOP)
    try:
        # A folder output into `out` removes every temporary there whose owner died: not this one.
        result = run("convert", small, out)
        assert result.exit_code == 0, result.stderr
        assert live.exists()
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert _temporaries(tmp_path) == []
    assert_equal_tensors(read(out / "x.safetensors"), x)
    assert_equal_tensors(read(out / "model.safetensors"), small_x)


@pytest.mark.slow
def test_a_commit_cut_short_is_rolled_back_by_the_next_run(trained, tmp_path):
    ckpt, old_x, _ = trained("adamw")
    new_ckpt, _, _ = trained("sgd")
    release = tmp_path / "release"
    code = (
        "import os, signal, sys; from pathlib import Path; import sfckpt; from sfckpt import writer\n"
        "sfckpt.convert(sys.argv[1], Path(sys.argv[3]), max_shard_size='300B')\n"
        "commit, done = writer._commit, []\n"
        "def commit_then_die(tmp, dest, force):\n"
        "    if len(done) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    commit(tmp, dest, force); done.append(dest)\n"
        "writer._commit = commit_then_die\n"
        "sfckpt.convert(sys.argv[2], Path(sys.argv[3]), force=True, max_shard_size='600B')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, ckpt, new_ckpt, release], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed in the middle of putting files in place (3 shards and an index replaced by 2 and an
    # index): two new shards are in place, the previous index is set aside, nothing is lost.
    assert not (release / writer.INDEX_NAME).exists() and len(list(release.glob(".*.sfckpt-old"))) == 1
    # Until a run puts the previous release back, check refuses to judge the mix
    result = CliRunner().invoke(main, ["check", str(release), "--ckpt", str(ckpt)])
    assert result.exit_code == 2 and "cut short" in result.stderr and result.stderr.count("\n") == 1
    writer.clean_dead(release)
    assert _temporaries(tmp_path) == []
    index = json.loads((release / writer.INDEX_NAME).read_text())
    assert sorted(p.name for p in release.iterdir()) == sorted({*index["weight_map"].values(), writer.INDEX_NAME})
    got = {}
    for shard in set(index["weight_map"].values()):
        got.update(read(release / shard))
    assert_equal_tensors(got, old_x)


@pytest.mark.parametrize("name", [
    "é" * 120 + ".safetensors",  # 252 bytes in 132 characters
    "x" * 243 + ".safetensors",  # 255 bytes: no room for any suffix beside it
    "é" * 121 + ".safetensors",  # 254 bytes: a cut inside 'é' would not be UTF-8
])
def test_names_up_to_the_file_systems_limit_work(name, trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    out = tmp_path / name
    assert len(os.fsencode(name)) <= writer.name_max(tmp_path)
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), x)
    assert _temporaries(tmp_path) == []


def test_folder_names_up_to_the_file_systems_limit_work(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    release = tmp_path / ("é" * 127 + "x")  # 255 bytes
    result = run("convert", ckpt, f"{release}/")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(release / "model.safetensors"), x)
    assert _temporaries(tmp_path) == []


def test_name_one_byte_too_long_is_refused(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    result = run("convert", ckpt, tmp_path / ("é" * 122 + ".safetensors"))  # 256 bytes
    assert result.exit_code == 2
    assert result.stderr.startswith("error: the output name") and "256 bytes" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["adamw.pt"]


def _renamed(trained, tmp_path, new_name: str) -> Path:
    """A real checkpoint whose 'fc1.bias' is saved under `new_name`."""
    ckpt, _, _ = trained("adamw")
    saved = torch.load(ckpt, weights_only=True)
    saved["model"] = {(new_name if k == "fc1.bias" else k): v for k, v in saved["model"].items()}
    path = tmp_path / "renamed.pt"
    torch.save(saved, path)
    return path


@pytest.mark.parametrize("out", ["x.safetensors", "release/"])
def test_weight_named_metadata_is_refused(out, trained, run, tmp_path):
    ckpt = _renamed(trained, tmp_path, "__metadata__")
    result = run("convert", ckpt, f"{tmp_path}/{out}")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "'__metadata__'" in result.stderr and "rename" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw.pt", "renamed.pt"]


def test_name_that_is_not_utf8_is_refused_before_writing(tmp_path):
    """The readers refuse such names first (tests/test_readers_hostile.py); the writer keeps its own check
    for reconstructions built through the API."""
    specs = [writer.Spec("fc1.\ud800bias", "float32", (1,))]
    with pytest.raises(InputError, match="not UTF-8 text"):
        writer.write_file(tmp_path / "x.safetensors", specs, lambda spec: torch.zeros(1))
    assert list(tmp_path.iterdir()) == []


def _safetensors(path: Path, header: str) -> Path:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    return path


@pytest.mark.parametrize("header, where", [
    ('{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "in tensor '\\ud800'"),
    ('{"__metadata__":{"note":"\\udfff"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "in its metadata"),
    ('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":"\\ud800"}}', "in tensor 'a'"),
])
def test_safetensors_header_with_a_lone_surrogate_is_refused(header, where, run, tmp_path):
    path = _safetensors(tmp_path / "w.safetensors", header)
    with pytest.raises(Exception):
        safe_open(str(path), "pt")  # the library's parser refuses it: so must sfckpt
    result = run("diff", path, path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "lone surrogate" in result.stderr and where in result.stderr


def test_safetensors_header_nested_as_deep_as_the_library_refuses(run, tmp_path):
    deep = "[" * 126 + "]" * 126  # with the header and the tensor's object: 128 levels
    path = _safetensors(tmp_path / "w.safetensors",
                        '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + deep + "}}")
    with pytest.raises(Exception):
        safe_open(str(path), "pt")
    result = run("diff", path, path)
    assert result.exit_code == 2 and "128 levels" in result.stderr
    shallower = _safetensors(tmp_path / "v.safetensors",
                             '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + deep[1:-1] + "}}")
    safe_open(str(shallower), "pt")
    assert run("diff", shallower, shallower).exit_code == 0


def test_header_larger_than_the_library_opens_is_refused_before_writing(tmp_path):
    specs = [writer.Spec("w" * writer.HEADER_MAX, "float32", (1,))]
    with pytest.raises(InputError, match="safetensors library opens at most 100000000"):
        writer.write_file(tmp_path / "x.safetensors", specs, lambda spec: torch.zeros(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("new_name", ["fc$\\q$.bias"])  # module names, drawn as labels
def test_diff_plot_draws_names_from_the_input_literally(new_name, trained, run, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt = _renamed(trained, tmp_path, new_name)
    result = run("diff", ckpt, "--plot", tmp_path / "gap.png")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "gap.png").read_bytes().startswith(b"\x89PNG")


def test_plot_never_overwrites_an_input_or_an_existing_file(run, tmp_path, trained):
    pytest.importorskip("matplotlib")
    ckpt, _, _ = trained("adamw")
    before = ckpt.read_bytes()
    for args in (("diff", ckpt, "--plot", ckpt), ("diff", ckpt, "--plot", ckpt, "--force")):
        result = run(*args)
        assert_clean(result, tmp_path / "none")
        assert "input" in result.stderr
    assert ckpt.read_bytes() == before
    picture = tmp_path / "gap.png"
    picture.write_bytes(b"precious")
    result = run("diff", ckpt, "--plot", picture)
    assert result.exit_code == 2 and "--force" in result.stderr and picture.read_bytes() == b"precious"
    assert run("diff", ckpt, "--plot", picture, "--force").exit_code == 0
    assert picture.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob("*sfckpt-tmp"))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_force_run_leaves_the_previous_release_as_it_was(run, tmp_path):
    sd, osd = parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "good.pt")
    sd["fc2.bias"][0] = float("nan")  # fails on the last shard, after others were written
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "bad.pt")
    release = tmp_path / "release"
    for layout in (("--max-shard-size", "200B"), ()):
        assert run("convert", tmp_path / "good.pt", release, *layout, "--force").exit_code == 0
        before = _snapshot(release)
        for other in (("--max-shard-size", "200B"), ()):
            result = run("convert", tmp_path / "bad.pt", release, *other, "--force")
            assert result.exit_code == 2 and "NaN" in result.stderr
            assert _snapshot(release) == before


def test_successful_force_run_leaves_no_stale_layout(run, tmp_path):
    sd, osd = parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    release = tmp_path / "release"
    release.mkdir()
    (release / "README.md").write_text("mine")
    assert run("convert", tmp_path / "c.pt", release, "--force").exit_code == 0
    assert run("convert", tmp_path / "c.pt", release, "--max-shard-size", "200B", "--force").exit_code == 0
    names = sorted(p.name for p in release.iterdir())
    assert "model.safetensors" not in names and "README.md" in names and "model.safetensors.index.json" in names
    assert run("convert", tmp_path / "c.pt", release, "--force").exit_code == 0
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "model.safetensors"]


def test_output_names_and_places_that_cannot_work_are_exit_2(run, tmp_path):
    sd, osd = parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    ckpt = tmp_path / "c.pt"
    long_ok = tmp_path / ("x" * 228 + ".safetensors")  # 240 characters: fits, even with a temporary suffix
    assert run("convert", ckpt, long_ok).exit_code == 0 and long_ok.exists()
    assert not list(tmp_path.glob("*sfckpt-tmp"))
    for out in (tmp_path / ("y" * 300 + ".safetensors"), tmp_path / ("z" * 300)):
        assert_clean(run("convert", ckpt, out), tmp_path / "none")
    (tmp_path / "d.safetensors").mkdir()
    assert_clean(run("convert", ckpt, tmp_path / "d.safetensors", "--force"), tmp_path / "none")
    assert_clean(run("inspect", tmp_path / ("q" * 300 + ".pt")), tmp_path / "none")
    assert_clean(run("convert", ckpt, Path("/proc/sfckpt-release")), tmp_path / "none")  # no mkdir there
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        for out in (locked / "release", locked / "x.safetensors"):
            assert_clean(run("convert", ckpt, out), out)
    finally:
        locked.chmod(0o700)


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
