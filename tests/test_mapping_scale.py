"""The mapping scales with the number of tensors and groups (issue #20, "too slow").

One parameter group per block (layer-wise lr decay, deepest first or shuffled) over hundreds of
LayerNorm + Linear blocks: the LayerNorm tensors look alike, so the order search must place them
by the groups' order. The search used to re-scan every domain on every pass (cubic in the blocks).
"""
from __future__ import annotations

import random
import time

import pytest

import schedulefree
import torch
from torch import nn

from conftest import assert_equal_tensors, read
from recipes import eval_x

from sfckpt import order_search

pytestmark = pytest.mark.slow  # thousands of tensors: minutes on a loaded machine


class Tower(nn.Module):
    """n residual blocks of LayerNorm(16) + Linear(16, 16)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return x


def test_300_shuffled_per_block_groups_convert_exactly_and_quickly(run, tmp_path):
    """300 blocks, one group per block in shuffled order, trained with AdamWScheduleFree: exact x, mapped in seconds."""
    torch.manual_seed(0)
    model = Tower(300)
    order = list(range(300))
    random.Random(0).shuffle(order)
    opt = schedulefree.AdamWScheduleFree(
        [{"params": list(model.blocks[i].parameters()), "lr": 0.01 * 0.99 ** d} for d, i in enumerate(order)], lr=0.01)
    opt.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    expected = eval_x(model, opt)
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "x.safetensors"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    start = time.process_time()
    result = run("convert", ckpt, out)
    elapsed = time.process_time() - start
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), expected)
    assert elapsed < 8.0, f"{elapsed:.1f} s CPU to map and convert 1,200 tensors in 300 groups"


def test_order_search_is_not_cubic_in_the_blocks():
    """1,000 per-block chains, deepest first, each two look-alike norm tensors and one tensor content placed:
    one solution, the model's, found in about a second (the former search took over a minute)."""
    n = 1000
    look_alike = [c for i in range(n) for c in (3 * i, 3 * i + 1)]
    chains, domains = [], {}
    for i in reversed(range(n)):
        chains.append([("gain", i), ("bias", i), ("weight", i)])
        domains[("gain", i)], domains[("bias", i)], domains[("weight", i)] = look_alike, look_alike, [3 * i + 2]
    start = time.process_time()
    solutions, exhausted = order_search.solve(chains, domains, lambda c: c, budget=20_000)
    elapsed = time.process_time() - start
    assert not exhausted and len(solutions) == 1
    assert all(solutions[0][("gain", i)] == 3 * i and solutions[0][("bias", i)] == 3 * i + 1 for i in range(n))
    assert elapsed < 6.0, f"{elapsed:.1f} s CPU for 3,000 entries in 1,000 chains"
