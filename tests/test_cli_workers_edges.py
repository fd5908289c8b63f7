"""`--workers` edges found by the attack on #25: an error raised in a worker process is spelled as the command
line spells it, and a number of workers too large for an index is a usage error, not an internal one."""
from __future__ import annotations

import schedulefree
import torch
from torch import nn

from conftest import assert_one_error_line


def _checkpoint(path, nan_in_last_z: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(6)])
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 32)).pow(2).mean().backward()
        opt.step()
    state = opt.state_dict()
    if nan_in_last_z:
        state["state"][max(state["state"])]["z"].view(-1)[-1] = float("nan")
    torch.save({"model": model.state_dict(), "optimizer": state}, path)
    return path


def test_a_workers_error_names_the_cli_flag(run, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", nan_in_last_z=True)
    result = run("convert", ckpt, tmp_path / "out/", "--max-shard-size", "5KB", "--workers", "2")
    assert_one_error_line(result)
    assert "--allow-nonfinite" in result.stderr and "allow_nonfinite=" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_huge_number_of_workers_is_a_usage_error(run, tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt")
    result = run("convert", ckpt, tmp_path / "out/", "--workers", "99999999999999999999")
    assert_one_error_line(result)
    assert "internal error" not in result.stderr and "--workers" in result.stderr
