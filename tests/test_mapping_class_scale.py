"""One shape class of thousands of tensors (issue #20, round three: DeepSeek-V3-like experts): content used
to hold several dense entries x candidates float64 matrices per class (30,000 experts: 7 GB each). It now
works a block of entries at a time and keeps only each entry's nearby candidates.
"""
from __future__ import annotations


import pytest
import schedulefree
import torch
from torch import nn

from conftest import assert_equal_tensors, convert_traced, read
from recipes import eval_x

EXPERTS = 3000


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(EXPERTS))

    def forward(self, x):  # every expert at once: one batched product over the stacked weights
        w = torch.stack([e.weight for e in self.experts])
        return torch.tanh(torch.einsum("bi,eoi->beo", x, w)).sum(1) / EXPERTS ** 0.5


@pytest.mark.slow
def test_3000_same_shape_experts_map_in_bounded_memory(run, tmp_path):
    """3,000 experts of one shape, one group, two steps: exact x, and the memory traced while converting
    stays under 128 MiB, whatever the class size (the former code held about eight dense 3,000 x 3,000
    float64 matrices at once: over 500 MiB)."""
    torch.manual_seed(0)
    model = Experts()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    expected = eval_x(model, opt)
    result, out, peak = convert_traced(run, tmp_path, model, opt)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), expected)
    assert peak < 128 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB traced while mapping {EXPERTS:,} same-shape tensors"
