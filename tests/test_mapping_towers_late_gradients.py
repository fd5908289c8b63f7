"""Two towers from one initialisation, each trained by its own Schedule-Free optimizer (A: β 0.98, lr 0.01;
B: β 0.5, lr 0.02) on gradients that arrive only in the last 10 of 100 steps (issue #20, found by the second
attack). A's y stays near the initialisation (β 0.98 keeps it by x) while z_A moves; B's y moves half as far as
z_B, which lands it next to z_A, 4x closer than A. With saved names, the names decide: the named pair is related
(not as far apart as independent tensors), so content nearer elsewhere does not set them aside. Without names,
content pairs the towers crosswise: a known failure, kept as a strict xfail."""
from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from torch import nn

from test_mapping_fit import assert_converts, convert


def _late_towers(named: bool):
    torch.manual_seed(0)
    model = nn.Module()
    model.A = nn.Parameter(torch.randn(64, 64) * 0.36)
    model.B = nn.Parameter(model.A.detach().clone())
    opt_a = schedulefree.AdamWScheduleFree([("A", model.A)] if named else [model.A], lr=0.01, betas=(0.98, 0.999))
    opt_b = schedulefree.AdamWScheduleFree([("B", model.B)] if named else [model.B], lr=0.02, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(1)
    direction = torch.randn(64, 64, generator=gen)
    opt_a.train()
    opt_b.train()
    for step in range(100):
        grad = direction + 0.3 * torch.randn(64, 64, generator=gen) if step >= 90 else torch.zeros(64, 64)
        opt_a.zero_grad()
        opt_b.zero_grad()
        ((model.A * grad).sum() + (model.B * grad).sum()).backward()
        opt_a.step()
        opt_b.step()
    m2, a2, b2 = copy.deepcopy((model, opt_a, opt_b))
    a2.eval()
    b2.eval()
    obj = {"model": model.state_dict(), "optimizer": opt_a.state_dict(), "optimizer_b": opt_b.state_dict()}
    return copy.deepcopy(obj), m2.state_dict()


def test_late_gradient_towers_with_saved_names_convert_exactly(run, tmp_path):
    obj, x = _late_towers(named=True)
    assert_converts(*convert(run, tmp_path, obj), x)


@pytest.mark.xfail(strict=True, reason="exit 0 with A and B wrong: without names, content pairs z_A with B "
                   "(4x closer than A, whose y stayed by x); see the module docstring")
def test_late_gradient_towers_without_names_convert_exactly_or_refuse(run, tmp_path):
    obj, x = _late_towers(named=False)
    result, out = convert(run, tmp_path, obj)
    if result.exit_code == 2:
        return  # without names a refusal is right too
    assert_converts(result, out, x)
