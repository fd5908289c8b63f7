"""A parameter with no elements (found by the attack on #20: its empty samples made numpy warn, and the warning
reached the user as `warning: RuntimeWarning: Mean of empty slice`)."""
from __future__ import annotations

import copy

import schedulefree
import torch
from torch import nn

from test_mapping_fit import assert_converts, convert


def test_a_zero_element_parameter_converts_without_a_warning(run, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model.empty = nn.Parameter(torch.zeros(0))
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    for _ in range(3):
        opt.zero_grad()
        (model(torch.randn(4, 8)).pow(2).mean() + model.empty.sum()).backward()
        opt.step()
    m2, o2 = copy.deepcopy((model, opt))
    o2.eval()
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, m2.state_dict())
    assert "warning" not in result.stderr.lower(), result.stderr
