"""A head replaced in most of its blocks beside kept samples (issue #20, round three). The block test's bar was
twice the lower quartile of the tensor's own blocks: with more than three quarters of the blocks replaced,
that quartile is itself a replaced block, and the bar (about 2) let every block pass, while the samples
(start and middle of the data, kept) passed the pair test. The bar is now also bounded by the pair's ratio
on those samples (`content_blocks.PartCheck.sampled`). A true pair whose y and z drifted apart evenly has a
high sampled ratio too, and still converts exactly.
"""
from __future__ import annotations

import pytest
import schedulefree
import torch
from torch import nn

from recipes import eval_x, fit
from test_mapping_fit import assert_converts, assert_refused, convert

WIDTH, CLASSES = 128, 1000  # 128,000 elements: the samples read rows 0-15 and 500-515 (2,048 elements each)
SAMPLED = [range(0, 16), range(500, 516)]
IN_PART = "belongs in part to a different tensor"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, CLASSES))


def _trained(model: nn.Module, dtype=torch.float32, **kw):
    model.to(dtype)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), **{"lr": 0.01, **kw})
    fit(model, opt, steps=10, batch=lambda: torch.randn(8, WIDTH, dtype=dtype),
        loss=lambda m, b: (m(b).float() - 1.0).pow(2).mean())
    return opt


def _reinitialise_all_rows_but(weight: torch.Tensor, kept: int) -> None:
    """Every row of a trained head replaced by a fresh nn.Linear's but `kept` rows: the sampled ones, then
    whole blocks (pairs of rows: 256 elements) spread over the rest, so that every block is kept or new."""
    keep = {r for rows in SAMPLED for r in rows}
    pairs = [r for r in range(0, weight.shape[0], 2) if r not in keep]
    more = (kept - len(keep)) // 2
    for r in pairs[::max(1, len(pairs) // more)][:more]:
        keep |= {r, r + 1}
    fresh = nn.Linear(weight.shape[1], weight.shape[0]).weight.to(weight.dtype)
    replaced = torch.tensor([r not in keep for r in range(weight.shape[0])])
    with torch.no_grad():
        weight[replaced] = fresh[replaced]


@pytest.mark.parametrize("replaced", [0.80, 0.95], ids=["80%", "95%"])
def test_head_replaced_in_most_rows_beside_kept_samples_is_refused(replaced, run, tmp_path):
    model = _model()
    opt = _trained(model)
    _reinitialise_all_rows_but(model[2].weight, round(CLASSES * (1 - replaced)))
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'2.weight'", IN_PART)


def test_bfloat16_head_replaced_in_95_percent_of_rows_is_refused(run, tmp_path):
    model = _model()
    opt = _trained(model, torch.bfloat16)
    _reinitialise_all_rows_but(model[2].weight, 50)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'2.weight'", IN_PART)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_zero_initialised_wide_head_that_drifted_evenly_converts(dtype, run, tmp_path):
    """Every block and the samples alike far apart (a zero-initialised head at lr 0.1): no part stands out."""
    model = _model()
    nn.init.zeros_(model[2].weight)
    opt = _trained(model, dtype, lr=0.1)
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)
