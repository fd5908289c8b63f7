"""A tensor no entry trains that lies along z's path (issue #20, found by the attack on the 2x confirmation).

A tower trained by plain Adam or SGD from the same initialisation as the Schedule-Free one, or a frozen identity
an adapter is pulled towards, can lie 2-2.4x closer to z than the pair's own y, which long training moved off
z's path; it is then the one candidate sharing z's history. The 2x confirmation on large samples must not pair
z with it: without names such a file is refused, with names (or --param-order) the names decide. And a fresh
near-zero head in a zero-initialised head's place is not let through by the run's drift: the drift allowance
needs content's own confirmation of the pair.
"""
from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from torch import nn

from test_mapping_fit import assert_converts, assert_refused, convert


def _eval_state(model, opt) -> dict:
    m2, o2 = copy.deepcopy((model, opt))
    o2.eval()
    return {k: v.clone() for k, v in m2.state_dict().items()}


def _towers(named: bool):
    """Tower a: AdamWScheduleFree (β 0.99); tower b: torch Adam from the same initialisation on the same batches;
    the target changes after 100 steps."""
    torch.manual_seed(1)
    inputs, first, second = torch.randn(256, 64), torch.randn(32, 64) * 0.3, torch.randn(32, 64) * 0.3
    model = nn.ModuleDict({"a": nn.Linear(64, 32, bias=False)})
    model["b"] = copy.deepcopy(model["a"])
    params = [("a.weight", model["a"].weight)] if named else model["a"].parameters()
    sf = schedulefree.AdamWScheduleFree(params, lr=0.01, betas=(0.99, 0.999))
    plain = torch.optim.Adam(model["b"].parameters(), lr=0.01)
    sf.train()
    for step in range(130):
        idx = torch.randint(0, 256, (32,))
        target = inputs[idx] @ (first if step < 100 else second).T
        for module, opt in ((model["a"], sf), (model["b"], plain)):
            opt.zero_grad()
            ((module(inputs[idx]) - target) ** 2).mean().backward()
            opt.step()
    obj = {"state_dict": model.state_dict(), "optimizer_states": [sf.state_dict(), plain.state_dict()],
           "epoch": 0, "global_step": 130, "pytorch-lightning_version": "2.4.0", "lr_schedulers": []}
    return copy.deepcopy(obj), _eval_state(model, sf)


def test_a_plain_adam_tower_along_zs_path_is_not_taken_for_the_pair(run, tmp_path):
    obj, _ = _towers(named=False)
    assert_refused(*convert(run, tmp_path, obj), "'a.weight'", "'b.weight'")


def test_saved_names_decide_beside_a_plain_adam_tower(run, tmp_path):
    obj, x = _towers(named=True)
    assert_converts(*convert(run, tmp_path, obj), x)


def test_param_order_decides_beside_a_plain_adam_tower(run, tmp_path):
    obj, x = _towers(named=False)
    order = tmp_path / "order.txt"
    order.write_text("a.weight\n")
    assert_converts(*convert(run, tmp_path, obj, "--param-order", str(order)), x)


@pytest.mark.parametrize("named", [False, True], ids=["no-names", "param-names"])
def test_a_frozen_identity_the_adapter_is_pulled_towards(named, run, tmp_path):
    """A frozen identity-initialised Linear beside an adapter trained by SGDScheduleFree (lr 1.0), 50 steps towards
    a random map, then 20 towards the identity: exact with names, refused without."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(32, 32, bias=False), "adapt": nn.Linear(32, 32, bias=False)})
    with torch.no_grad():
        model["proj"].weight.copy_(torch.eye(32))
    model["proj"].requires_grad_(False)
    params = [("adapt.weight", model["adapt"].weight)] if named else model["adapt"].parameters()
    opt = schedulefree.SGDScheduleFree(params, lr=1.0, momentum=0.9)
    opt.train()
    gen = torch.Generator().manual_seed(0)
    inputs, mapping = torch.randn(1024, 32, generator=gen), torch.randn(32, 32, generator=gen) / 32 ** 0.5
    for step in range(70):
        batch = inputs[torch.randint(0, 1024, (64,), generator=gen)]
        target = batch @ mapping.T if step < 50 else batch
        opt.zero_grad()
        ((model["adapt"](model["proj"](batch)) - target) ** 2).mean().backward()
        opt.step()
    x = _eval_state(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    if named:
        assert_converts(result, out, x)
    else:
        assert_refused(result, out, "'proj.weight'", "'adapt.weight'")


def test_a_fresh_near_zero_head_in_a_zero_initialised_heads_place_is_refused(run, tmp_path):
    """A zero-initialised 10x16 head trained 30 steps at lr 1e-3, replaced after the optimizer was built by a new
    Linear drawn with std 1e-3: as small as the run's drift, but content does not confirm it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10, bias=False))
    nn.init.zeros_(model[4].weight)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(128, 16, generator=gen), torch.randn(128, 10, generator=gen)
    opt.train()
    for _ in range(30):
        i = torch.randint(0, 128, (16,), generator=gen)
        opt.zero_grad()
        ((model(inputs[i]) - targets[i]) ** 2).mean().backward()
        opt.step()
    model[4] = nn.Linear(16, 10, bias=False)
    nn.init.normal_(model[4].weight, std=1e-3)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'4.weight'")
