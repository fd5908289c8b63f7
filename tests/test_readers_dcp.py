"""torch.distributed.checkpoint folders: saved in one process and by FSDP2 on two ranks, read on one CPU process."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trainers
from conftest import assert_equal_tensors, Evil, free_port, read

HERE = Path(__file__).resolve().parent


def test_dcp_single_process(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    expected = trainers.eval_x(model, opt)
    report = json.loads(run("inspect", tmp_path / "dcp", "--json").stdout)
    assert report["container"] == "torch.distributed.checkpoint" and report["mapping"]["evidence"] == {"names": 3}
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_dcp_tied_copy_is_named_in_a_warning(run, tmp_path):
    """DCP saves a tied weight as a copy: it gets the trained tensor's x, and a warning says so and how to undo it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    result = run("convert", tmp_path / "dcp", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "'head.weight' is byte-identical to 'embed.weight'" in result.stderr and "--twins frozen" in result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


def test_dcp_frozen_copy_of_a_network_needs_twins(run, tmp_path):
    """A target network hard-copied before dcp.save: copies of several trained tensors are not taken for ties."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    class OnlineTarget(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.online, self.target = trainers.MLP(), trainers.MLP()
            self.target.requires_grad_(False)

        def forward(self, x):
            return self.online(x)

    model = OnlineTarget()
    opt = trainers.train(model.online, "adamw", param_groups=model.online.parameters())
    model.target.load_state_dict(model.online.state_dict())
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "dcp", out)
    assert result.exit_code == 2 and "--twins" in result.stderr and not out.exists()
    result = run("convert", tmp_path / "dcp", out, "--twins", "frozen")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), trainers.eval_x(model, opt))


def test_dcp_bare_model_optimizer_pair(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    msd, osd = get_state_dict(model, opt)
    dcp.save({**msd, "optimizer": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0, run("inspect", tmp_path / "dcp").stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


FSDP_TRAIN = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[3])

    def work(rank, world, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        import schedulefree, trainers
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = trainers.MLP(width=16)
        fully_shard(model.fc1); fully_shard(model.fc2); fully_shard(model)
        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.02)
        opt.train()
        for _ in range(3):
            torch.manual_seed(rank)
            opt.zero_grad(); model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)
        opt.eval()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, "..", "expected.pt"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    """
)


def test_dcp_from_fsdp2_two_ranks(run, tmp_path):
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_TRAIN)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "dcp"), free_port(), str(HERE)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "gloo" in result.stderr.lower() and "not available" in result.stderr.lower():
        pytest.skip("gloo backend unavailable")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "dcp").glob("*.distcp"))
    assert len(shards) == 2
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), torch.load(tmp_path / "expected.pt"))


def test_dcp_metadata_with_foreign_class_is_refused(run, tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    result = run("inspect", tmp_path / "dcp")
    assert result.exit_code == 2 and "cannot read DCP metadata" in result.stderr
    assert not marker.exists()
