"""The input gate (sfckpt/inputs.py, issue #19): every file read or copied from an input is a regular
file inside the input, opened once and checked on its descriptor, bounded in size, and read so that a
file shrinking under the reader ends in exit 2 with one line, never a signal."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import trainers
from conftest import assert_one_error_line, FIXTURES
from sfckpt.errors import InputError
from sfckpt.sources import released_weights

ADAMW = FIXTURES / "adamw_mlp.pt"
DS = FIXTURES / "deepspeed"
DEEPSPEED = DS / "zero2-fp32"
SECRET = "sfckpt-secret-3f9a1c"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _child(*args, code="from sfckpt.cli import main; main()", env=None, memory_gb=3, timeout=120):
    """The CLI (or `code`) in a child process with its address space capped and a timeout."""
    prefix = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30)); "
    return subprocess.run([sys.executable, "-c", prefix + code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _secret(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / "secret.txt"
    secret.write_text(json.dumps({"token": SECRET}))
    return secret


def _deepspeed(tmp_path: Path, case: str = "zero2-fp32") -> Path:
    """A copy of a DeepSpeed save (`latest` and the tag folder): the folder convert reads side files from."""
    dst = tmp_path / "ckpt"
    shutil.copytree(DS / case, dst)
    (dst / "expected.pt").unlink()
    return dst


# ---- side files copied into a release -------------------------------------------------------------

@pytest.mark.parametrize("name", SIDE_FILES)
@pytest.mark.parametrize("target", ["secret", "environ"])
def test_side_file_linked_outside_is_not_copied(name, target, run, tmp_path):
    ckpt = _deepspeed(tmp_path)
    (ckpt / name).symlink_to(_secret(tmp_path) if target == "secret" else Path("/proc/self/environ"))
    out = tmp_path / "release"
    result = run("convert", ckpt, f"{out}/")
    assert_one_error_line(result, name)
    assert SECRET not in result.stderr
    assert not out.exists()


def test_side_file_hard_linked_is_not_copied(run, tmp_path):
    """A hard link has no outside path to see: its bytes may be a file elsewhere (a packed checkpoint's
    link to a token file). A release copies only files that have no other name."""
    ckpt = _deepspeed(tmp_path)
    os.link(_secret(tmp_path), ckpt / "tokenizer.json")
    out = tmp_path / "release"
    result = run("convert", ckpt, f"{out}/")
    assert result.exit_code == 2 and "hard link" in result.stderr and SECRET not in result.stderr, result.stderr
    assert not out.exists()


def test_side_file_that_is_a_fifo_is_refused(run, tmp_path):
    ckpt = _deepspeed(tmp_path)
    os.mkfifo(ckpt / "tokenizer.json")
    result = run("convert", ckpt, f"{tmp_path / 'release'}/")
    assert result.exit_code == 2 and "FIFO" in result.stderr, result.stderr
    assert not (tmp_path / "release").exists()


def test_side_files_inside_the_folder_are_copied(run, tmp_path):
    ckpt = _deepspeed(tmp_path)
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "files").mkdir()
    (ckpt / "files" / "vocab.txt").write_text("a\nb\n")
    (ckpt / "vocab.txt").symlink_to("files/vocab.txt")  # a link that stays inside the folder
    out = tmp_path / "release"
    assert run("convert", ckpt, f"{out}/", "-q").exit_code == 0
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "vocab.txt").read_text() == "a\nb\n" and not (out / "vocab.txt").is_symlink()


# ---- files the layout names -----------------------------------------------------------------------

def test_deepspeed_rank_file_linked_outside_is_refused(run, tmp_path):
    ckpt = _deepspeed(tmp_path)
    rank = ckpt / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    moved = tmp_path / "outside" / rank.name
    moved.parent.mkdir()
    shutil.move(rank, moved)
    rank.symlink_to(moved)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "outside" in result.stderr, result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_deepspeed_latest_linked_to_proc_environ_echoes_nothing(tmp_path):
    ckpt = _deepspeed(tmp_path)
    (ckpt / "latest").unlink()
    (ckpt / "latest").symlink_to("/proc/self/environ")
    proc = _child("inspect", ckpt, env={"SFCKPT_TEST_TOKEN": SECRET})
    assert_one_error_line(proc, "latest")
    assert SECRET not in proc.stderr + proc.stdout


def test_deepspeed_latest_content_is_echoed_only_as_a_short_excerpt(run, tmp_path):
    ckpt = _deepspeed(tmp_path)
    (ckpt / "latest").write_text("global_step3" + "A" * 5000)
    result = run("inspect", ckpt)
    assert result.exit_code == 2 and "names tag" in result.stderr, result.stderr
    assert "A" * 61 not in result.stderr


def test_lightning_meta_pt_linked_outside_is_refused(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    folder = tmp_path / "last.ckpt"
    dcp.save({"model": msd, "optimizer_0": osd}, checkpoint_id=folder, no_dist=True)
    outside = _secret(tmp_path).parent / "meta.pt"
    torch.save({"epoch": 0, "global_step": 4}, outside)
    (folder / "meta.pt").symlink_to(outside)
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "outside" in result.stderr and "meta.pt" in result.stderr, result.stderr


def test_weights_file_of_a_folder_linked_outside_is_refused(run, tmp_path):
    """A release folder's model.safetensors that links out: `check` and `diff` read nothing from outside."""
    rel = tmp_path / "rel"
    rel.mkdir()
    outside = _secret(tmp_path).parent / "model.safetensors"
    save_file({"w": torch.ones(3)}, str(outside))
    (rel / "model.safetensors").symlink_to(outside)
    result = run("diff", rel, outside)
    assert result.exit_code == 2 and "outside" in result.stderr, result.stderr


# ---- non-regular files: never a hang ----------------------------------------------------------------

def _no_hang(*args, seconds=60):
    proc = subprocess.Popen([sys.executable, "-m", "sfckpt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"sfckpt {args[0]} blocked for {seconds} s")
    return proc.returncode, err


def test_fifo_as_the_checkpoint_is_refused_not_a_hang(tmp_path):
    os.mkfifo(tmp_path / "ckpt.pt")
    code, err = _no_hang("inspect", tmp_path / "ckpt.pt")
    assert code == 2 and "FIFO" in err, err


def test_fifo_as_a_rank_file_is_refused_not_a_hang(tmp_path):
    ckpt = _deepspeed(tmp_path)
    rank = ckpt / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rank.unlink()
    os.mkfifo(rank)
    code, err = _no_hang("convert", ckpt, tmp_path / "x.safetensors")
    assert code == 2 and "FIFO" in err, err
    assert not (tmp_path / "x.safetensors").exists()


# ---- sizes: every read bounded ----------------------------------------------------------------------

def _sparse(path: Path, head: bytes = b"{") -> None:
    if path.is_symlink() or path.exists():
        path.unlink()
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(3 << 30)


def _bounded(proc, started: float, limit_env: str) -> None:
    assert_one_error_line(proc, limit_env)
    assert time.monotonic() - started < 60


def test_sparse_latest_is_refused_by_its_limit(tmp_path):
    ckpt = _deepspeed(tmp_path)
    _sparse(ckpt / "latest", b"global_step3")
    started = time.monotonic()
    _bounded(_child("inspect", ckpt), started, "SFCKPT_MAX_TEXT_BYTES")


@pytest.mark.slow
def test_sparse_dcp_metadata_is_refused_by_its_limit(tmp_path):
    folder = tmp_path / "dcp"
    folder.mkdir()
    _sparse(folder / ".metadata", b"\x80\x04")
    started = time.monotonic()
    _bounded(_child("inspect", folder), started, "SFCKPT_MAX_PICKLE_BYTES")


def test_sparse_trainer_state_is_refused_by_its_limit(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    model = trainers.MLP()
    torch.save(trainers.train(model, "adamw").state_dict(), folder / "optimizer.pt")
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    _sparse(folder / "trainer_state.json")
    started = time.monotonic()
    _bounded(_child("inspect", folder), started, "SFCKPT_MAX_JSON_BYTES")


@pytest.mark.slow
def test_sparse_adapter_config_is_refused_by_its_limit(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    model = trainers.MLP()
    torch.save(trainers.train(model, "adamw").state_dict(), folder / "optimizer.pt")
    save_file(model.state_dict(), str(folder / "adapter_model.safetensors"))
    _sparse(folder / "adapter_config.json")
    # inspect needs the config only for the parameter order, which content decides here: it reads
    # no more than the limit and goes on
    started = time.monotonic()
    proc = _child("inspect", folder)
    assert proc.returncode == 0 and time.monotonic() - started < 60, proc.stderr
    # convert copies it into the release: refused by its size, nothing written
    started = time.monotonic()
    _bounded(_child("convert", folder, tmp_path / "release"), started, "SFCKPT_MAX_SIDE_FILE_BYTES")
    assert not (tmp_path / "release").exists()


def test_stored_data_pkl_past_the_limit_is_refused(tmp_path):
    import zipfile

    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00." + b"\x00" * (2 << 20))
    started = time.monotonic()
    _bounded(_child("inspect", path, env={"SFCKPT_MAX_PICKLE_BYTES": str(1 << 20)}), started, "SFCKPT_MAX_PICKLE_BYTES")


def test_diff_of_a_terabyte_sparse_safetensors_file_is_exit_2(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 38], "data_offsets": [0, 1 << 40]}}).encode()
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + (1 << 40))
    proc = _child("diff", big, big)
    assert_one_error_line(proc, "memory")


# ---- races and files that change while read ------------------------------------------------------------

def test_shard_swapped_for_a_link_outside_is_never_read(tmp_path):
    """A thread swaps an index's shard between the real file and a link to an outside file while the
    release is read again and again: each read gets the real tensors or is refused, never the outside ones."""
    rel = tmp_path / "rel"
    rel.mkdir()
    shard = rel / "model-00001-of-00001.safetensors"
    save_file({"w": torch.zeros(64)}, str(shard))
    (rel / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard.name}}))
    outside = _secret(tmp_path).parent / "other.safetensors"
    save_file({"w": torch.ones(64)}, str(outside))
    real = tmp_path / "real.safetensors"
    shutil.copyfile(shard, real)
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            link = rel / ".link"
            link.symlink_to(outside)
            os.replace(link, shard)
            copy = rel / ".copy"
            shutil.copyfile(real, copy)
            os.replace(copy, shard)

    swapper = threading.Thread(target=swap)
    swapper.start()
    outcomes = set()
    try:
        for _ in range(200):
            try:
                w = released_weights(rel).tensors["w"].load()
            except InputError as exc:
                assert "outside" in exc.message, exc.message
                outcomes.add("refused")
            else:
                assert torch.equal(w, torch.zeros(64)), "read the file outside the release"
                outcomes.add("read")
    finally:
        stop.set()
        swapper.join()
    assert outcomes == {"read", "refused"}  # the race was really run


TRUNCATE_AFTER_LOAD = textwrap.dedent(
    """
    import os, sys
    import sfckpt.checkpoint, sfckpt.sources
    from sfckpt.cli import main

    victim, shrunk = sys.argv[1], []
    for module, name in ((sfckpt.checkpoint, "load"), (sfckpt.sources, "read_weights")):
        def shrinking(*args, _original=getattr(module, name), **kwargs):
            result = _original(*args, **kwargs)
            if not shrunk:  # the file shrinks once it is open, while sfckpt works on it
                os.truncate(victim, os.path.getsize(victim) // 2)
                shrunk.append(victim)
            return result
        setattr(module, name, shrinking)
    sys.argv = ["sfckpt", *sys.argv[2:]]
    main()
    """
)


def test_torch_file_truncated_while_converting_is_exit_2(trained, tmp_path):
    ckpt, _, _ = trained("adamw", model=trainers.ConvBN())
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(ckpt), "convert", str(ckpt), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc, "changed or is truncated")
    assert not out.exists()


def test_safetensors_file_truncated_while_read_is_exit_2(tmp_path):
    weights = tmp_path / "w.safetensors"
    save_file({f"w{i}": torch.randn(256) for i in range(8)}, str(weights))
    other = tmp_path / "other.safetensors"
    shutil.copyfile(weights, other)
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(weights), "diff", str(weights), str(other)],
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc, "changed or is truncated")


# ---- the Hugging Face cache layout still reads ------------------------------------------------------

def test_hugging_face_cache_snapshot_links_into_blobs_are_read(run, tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    save_file({"a": torch.arange(4.0)}, str(repo / "blobs" / "1111"))
    save_file({"b": torch.arange(3.0)}, str(repo / "blobs" / "2222"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (repo / "blobs" / "3333").write_text(json.dumps(index))
    for name, blob in (("model-00001-of-00002.safetensors", "1111"), ("model-00002-of-00002.safetensors", "2222"),
                       ("model.safetensors.index.json", "3333")):
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    weights = released_weights(snapshot)
    assert sorted(weights.tensors) == ["a", "b"] and torch.equal(weights.tensors["b"].load(), torch.arange(3.0))
    result = run("diff", snapshot, snapshot, "--json")
    assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_checkpoint_in_a_subfolder_of_a_cached_repository_reads_its_blobs(run, tmp_path):
    """snapshot_download of a repository that keeps a checkpoint in a subfolder:
    snapshots/<rev>/last-checkpoint/f -> ../../../blobs/<hash>, as the hub cache lays it out."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    folder = repo / "snapshots" / "0123abcd" / "last-checkpoint"
    folder.mkdir(parents=True)
    save_file({"a": torch.arange(4.0)}, str(repo / "blobs" / "1111"))
    (folder / "model.safetensors").symlink_to(Path("..", "..", "..", "blobs", "1111"))
    assert sorted(released_weights(folder).tensors) == ["a"]
    # the same links from a folder that is not a cached repository's are refused
    other = tmp_path / "plain" / "snapshots" / "0123abcd" / "last-checkpoint"
    other.mkdir(parents=True)
    (tmp_path / "plain" / "blobs").mkdir()
    save_file({"a": torch.arange(4.0)}, str(tmp_path / "plain" / "blobs" / "1111"))
    (other / "model.safetensors").symlink_to(Path("..", "..", "..", "blobs", "1111"))
    with pytest.raises(InputError, match="outside"):
        released_weights(other)


def test_param_order_file_is_the_users_own_and_may_lie_anywhere(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    order = tmp_path / "elsewhere" / "order.txt"
    order.parent.mkdir()
    order.write_text("\n".join(x) + "\n")
    link = tmp_path / "order-link.txt"
    link.symlink_to(order)
    assert run("convert", ckpt, tmp_path / "x.safetensors", "--param-order", link, "-q").exit_code == 0
    os.mkfifo(tmp_path / "fifo.txt")
    result = run("convert", ckpt, tmp_path / "y.safetensors", "--param-order", tmp_path / "fifo.txt")
    assert result.exit_code == 2 and "FIFO" in result.stderr, result.stderr


# ---- real Trainer and PEFT folders ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["README.md", "adapter_config.json"])
@pytest.mark.parametrize("target", ["secret", "environ"])
def test_adapter_side_file_linked_outside_is_not_copied(name, target, lora_checkpoint, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(lora_checkpoint, ckpt)
    (ckpt / name).unlink()
    (ckpt / name).symlink_to(_secret(tmp_path) if target == "secret" else Path("/proc/self/environ"))
    out = tmp_path / "release"
    order = lora_checkpoint.parent.parent / "order.txt"  # the base model is not beside the copy
    proc = _child("convert", ckpt, f"{out}/", "--param-order", order, env={"SFCKPT_TEST_TOKEN": SECRET}, memory_gb=8)
    assert_one_error_line(proc, name)
    assert SECRET not in proc.stderr + proc.stdout
    assert not out.exists()


@pytest.mark.slow
def test_adapter_release_copies_its_own_side_files(lora_checkpoint, run, tmp_path):
    out = tmp_path / "release"
    assert run("convert", lora_checkpoint, f"{out}/", "-q").exit_code == 0
    for name in ("README.md", "adapter_config.json"):
        assert (out / name).read_bytes() == (lora_checkpoint / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_trainer_file_linked_outside_is_refused(name, trainer_checkpoint, run, tmp_path):
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(trainer_checkpoint, ckpt)
    moved = _secret(tmp_path).parent / name
    shutil.move(ckpt / name, moved)
    (ckpt / name).symlink_to(moved)
    out = tmp_path / "release"
    result = run("convert", ckpt, f"{out}/")
    assert result.exit_code == 2 and "outside" in result.stderr and name in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_trainer_release_copies_its_side_files(trainer_checkpoint, run, tmp_path):
    out = tmp_path / "release"
    assert run("convert", trainer_checkpoint, f"{out}/", "-q").exit_code == 0
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (trainer_checkpoint / name).read_bytes()


def test_side_file_past_its_limit_is_refused(run, tmp_path, monkeypatch):
    ckpt = _deepspeed(tmp_path)
    (ckpt / "tokenizer.json").write_text("{}" + " " * 100)
    monkeypatch.setenv("SFCKPT_MAX_SIDE_FILE_BYTES", "64")
    result = run("convert", ckpt, f"{tmp_path / 'release'}/")
    assert result.exit_code == 2 and "SFCKPT_MAX_SIDE_FILE_BYTES" in result.stderr, result.stderr
    assert not (tmp_path / "release").exists()


@pytest.mark.parametrize("kind", ["too large", "fifo"])
def test_calibration_data_is_read_through_the_bounded_opener(kind, run, tmp_path, monkeypatch):
    from test_reconstruct_batchnorm import MODEL_FILE

    model = trainers.ConvBN()
    ckpt = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "optimizer": trainers.train(model, "sgd").state_dict()}, ckpt)
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    calib = tmp_path / "calib.pt"
    if kind == "fifo":
        os.mkfifo(calib)
    else:
        torch.save(torch.randn(40, 3, 5, 5), calib)
        monkeypatch.setenv("SFCKPT_MAX_CALIBRATION_BYTES", "1000")
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--bn-calib", calib,
                 "--model", f"{tmp_path / 'model_def.py'}:build")
    assert result.exit_code == 2, result.stderr
    assert ("FIFO" if kind == "fifo" else "SFCKPT_MAX_CALIBRATION_BYTES") in result.stderr, result.stderr


def test_safetensors_weights_truncated_while_converting_is_exit_2(tmp_path):
    """An Accelerate save_state folder: y in model.safetensors, which shrinks after it was opened."""
    folder = tmp_path / "state"
    folder.mkdir()
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    torch.save(opt.state_dict(), folder / "optimizer.bin")
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(folder / "model.safetensors"), "convert",
                           str(folder), str(out)], capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc, "changed or is truncated")
    assert not out.exists()


@pytest.mark.slow
def test_dcp_shard_truncated_while_converting_is_exit_2(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    folder = tmp_path / "dcp"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder, no_dist=True)
    (shard,) = folder.glob("*.distcp")
    out = tmp_path / "x.safetensors"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(shard), "convert", str(folder), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc, "changed or is truncated")
    assert not out.exists()


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
