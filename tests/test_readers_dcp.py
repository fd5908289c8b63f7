"""torch.distributed.checkpoint folders: saved in one process and by FSDP2 on two ranks, read on one CPU process."""
import json
import subprocess
import sys

import pytest
import torch

import trainers
from conftest import assert_clean, assert_equal_tensors, Evil, free_port, read, SCRIPTS



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


@pytest.mark.slow
def test_dcp_from_fsdp2_two_ranks(run, tmp_path):
    result = subprocess.run([sys.executable, SCRIPTS / "fsdp2_dcp.py", tmp_path / "dcp", free_port()],
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


# ---- torch.distributed.checkpoint: planner_data is checked before it builds the nested state ----------------

def _dcp(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    return tmp_path / "dcp"


def _conflict(paths):
    first, second = sorted(k for k in paths if k.startswith("model."))[:2]
    paths[second] = paths[first] + ("deeper",)


def _same(paths):
    first, second = sorted(k for k in paths if k.startswith("model."))[:2]
    paths[second] = paths[first]


@pytest.mark.parametrize("change,fragment", [
    (_conflict, "planner_data places two entries"), (_same, "planner_data places two entries"),
    (lambda p: p.__setitem__(sorted(p)[0], ("model",) + ("x",) * 100_000), "SFCKPT_MAX_NESTING"),
    (lambda p: p.__setitem__(sorted(p)[0], ("optim", "param_groups", 10**6, "lr")), "param_groups"),
], ids=["prefix-of-another", "same-path", "100000-deep", "list-index-past-the-end"])
def test_dcp_planner_data_is_checked(change, fragment, run, tmp_path):
    import pickle

    folder = _dcp(tmp_path)
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md.planner_data)
    (folder / ".metadata").write_bytes(pickle.dumps(md))
    for command in ("inspect", "convert"):
        args = (command, folder, tmp_path / "x") if command == "convert" else (command, folder)
        result = run(*args)
        assert_clean(result, tmp_path / "x")
        assert fragment in result.stderr
