"""Reading only what x needs, and writing x in several processes with the bytes of one.

DCP and DeepSpeed tensors are read in place from their shards (never through DCP's own loader
when the shards are torch.save archives), a range at a time; `--workers N` and the ranks of
`torchrun` write a folder output's shards in parallel, byte-identical to one process.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sfckpt
import trainers
from conftest import FIXTURES, assert_equal_tensors, free_port, read
from sfckpt import inputs
from sfckpt.readers import dcp_folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def dcp_checkpoint(path: Path, model: torch.nn.Module) -> dict:
    """`model` trained with AdamWScheduleFree, saved with dcp.save; returns x from the optimizer's eval()."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=path, no_dist=True)
    return trainers.eval_x(model, opt)


def test_dcp_is_read_without_dcps_loader(monkeypatch, tmp_path):
    expected = dcp_checkpoint(tmp_path / "dcp", trainers.MLP())

    def refuse(self, request):
        raise AssertionError(f"DCP's loader was asked for {list(request)}")

    monkeypatch.setattr(dcp_folder.DcpFolder, "_load", refuse)
    assert_equal_tensors(sfckpt.reconstruct(sfckpt.load(tmp_path / "dcp")).state_dict(), expected)


def test_dcp_chunks_sfckpt_cannot_open_go_through_dcps_reader(monkeypatch, tmp_path):
    """A chunk that is not a torch.save archive sfckpt reads is read whole by DCP's reader, once per lerp
    (y of a million elements is four lerp slices), with the same x."""
    expected = dcp_checkpoint(tmp_path / "dcp", torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.Linear(1024, 1024),
                                                                    torch.nn.Linear(1024, 4)))
    asked = []
    original = dcp_folder.DcpFolder._load

    def counting(self, request):
        asked.extend(request)
        return original(self, request)

    monkeypatch.setattr(dcp_folder.DcpFolder, "_chunks", lambda self, key, md: None)
    monkeypatch.setattr(dcp_folder.DcpFolder, "_load", counting)
    ckpt = sfckpt.load(tmp_path / "dcp")
    recon = sfckpt.reconstruct(ckpt)
    asked.clear()
    assert_equal_tensors(recon.state_dict(), expected)
    assert asked.count("model.1.weight") == 1


def test_dcp_mapping_reads_samples_not_tensors(monkeypatch, tmp_path):
    """Planning x (the mapping's content check included) reads a few pages of each y and z."""
    dcp_checkpoint(tmp_path / "dcp", torch.nn.Sequential(torch.nn.Linear(8, 1024), torch.nn.Linear(1024, 1024),
                                                         torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 4)))
    read_bytes = []
    original = inputs.InputFile.readinto

    def counting(self, buf, offset):
        read_bytes.append(memoryview(buf).nbytes)
        return original(self, buf, offset)

    monkeypatch.setattr(inputs.InputFile, "readinto", counting)
    recon = sfckpt.reconstruct(sfckpt.load(tmp_path / "dcp"))
    weights = sum(t.nbytes for t in recon.tensors)
    assert sum(read_bytes) < weights / 20  # y and z are twice the weights


def test_deepspeed_ranges_are_read_from_the_ranks_slices():
    """Any run of a parameter's elements (a lerp slice, a sample), across the ranks' partitions, is the
    same as that run of the whole parameter."""
    for case in ("zero2-fp32", "zero3-fp32", "zero2-bf16"):
        ckpt = sfckpt.load(FIXTURES / "deepspeed" / case)
        for name, ref in ckpt.weights.items():
            if ref.reader is None:
                continue
            whole = ref.load().reshape(-1)
            for start in range(0, ref.numel, 3):
                count = min(7, ref.numel - start)
                assert torch.equal(ref.load_flat(start, count), whole[start:start + count]), (case, name, start)


def sharded_release(run, ckpt: Path, out: Path, *options) -> dict[str, bytes]:
    result = run("convert", ckpt, f"{out}/", "--max-shard-size", "100B", *options)
    assert result.exit_code == 0, result.stderr
    return files_of(out)


def test_workers_write_the_bytes_of_one_process(run, tmp_path):
    ckpt = FIXTURES / "adamw_mlp.pt"
    one = sharded_release(run, ckpt, tmp_path / "one")
    assert len(one) > 3
    for workers in ("2", "3"):
        assert sharded_release(run, ckpt, tmp_path / f"w{workers}", "--workers", workers) == one


def test_a_failing_worker_is_one_error_and_nothing_written(run, trained, tmp_path):
    path, _, _ = trained("adamw")
    obj = torch.load(path, weights_only=True)
    obj["model"]["fc2.weight"][0, 0] = float("nan")
    torch.save(obj, path)
    out = tmp_path / "release"
    result = run("convert", path, f"{out}/", "--max-shard-size", "100B", "--workers", "2")
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 1 and "fc2.weight" in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".release")]


@pytest.mark.slow
def test_torchrun_ranks_write_the_bytes_of_one_process(run, tmp_path):
    ckpt = FIXTURES / "adamw_mlp.pt"
    one = sharded_release(run, ckpt, tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sfckpt.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             free_port(), "-m", "sfckpt", "convert", str(ckpt), f"{tmp_path / 'ranks'}/",
                             "--max-shard-size", "100B"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_of(tmp_path / "ranks") == one


@pytest.mark.parametrize("case", ["zero2-fp32", "zero3-fp32", "zero3-bf16", "bf16-optimizer"])
def test_deepspeed_inspect_does_not_import_torch(case):
    """The mapping's samples of parameters split across ranks are read page by page with numpy."""
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom sfckpt.cli import main\n"
        f"r = CliRunner().invoke(main, ['inspect', {str(FIXTURES / 'deepspeed' / case)!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dcp_inspect_does_not_import_torch(tmp_path):
    """`.metadata` is read into sfckpt's records, and the samples through each chunk's archive with numpy."""
    dcp_checkpoint(tmp_path / "dcp", trainers.MLP())
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom sfckpt.cli import main\n"
        f"r = CliRunner().invoke(main, ['inspect', {str(tmp_path / 'dcp')!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow  # a child process converting a DCP folder
def test_dcp_convert_does_not_import_torch_distributed_checkpoint(tmp_path):
    """torch.distributed.checkpoint costs most of a second on top of `import torch` (which imports
    torch.distributed itself); converting a DCP folder needs none of it."""
    expected = dcp_checkpoint(tmp_path / "dcp", trainers.MLP())
    probe = (
        "import sys\nfrom click.testing import CliRunner\nfrom sfckpt.cli import main\n"
        f"r = CliRunner().invoke(main, ['convert', {str(tmp_path / 'dcp')!r}, {str(tmp_path / 'x.safetensors')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'torch.distributed.checkpoint' not in sys.modules, 'torch.distributed.checkpoint was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)
