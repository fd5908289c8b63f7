"""A run whose true pairs drift far (issue #20, found by the second attack): the run-scaled term of the
unrelated-content test (10 times the median ratio of the confirmed pairs) must never lift the limit above
what independent tensors reach by chance, or nothing could be refused in such a run."""
from __future__ import annotations

import copy

import pytest
import schedulefree
import torch
from torch import nn

from test_mapping_fit import assert_refused, convert


class Emb(nn.Module):
    def __init__(self, vocab: int = 100, width: int = 32, mid: bool = False):
        super().__init__()
        self.e = nn.Embedding(vocab, width)
        self.mid = nn.Linear(width, width) if mid else nn.Identity()
        self.h = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.h(torch.tanh(self.mid(torch.tanh(self.e(idx)))))


def _train(model: nn.Module, opt) -> None:
    gen = torch.Generator().manual_seed(0)
    opt.train()
    for _ in range(40):  # lr 1e-2: the head's y and z drift apart (a median ratio of about 0.12)
        idx = torch.randint(0, 100, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx), idx).backward()
        opt.step()


def test_a_layer_replaced_after_the_optimizer_was_built_is_refused_in_a_far_drifting_run(run, tmp_path):
    torch.manual_seed(20)
    model = Emb(mid=True)
    opt = schedulefree.AdamWScheduleFree(
        [{"params": [model.mid.weight, model.h.weight], "weight_decay": 0.01},
         {"params": [model.e.weight, model.mid.bias, model.h.bias], "weight_decay": 0.0}], lr=1e-2)
    _train(model, opt)
    torch.manual_seed(99)
    model.mid = nn.Linear(32, 32)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'mid.weight'", "unrelated")


@pytest.mark.parametrize("part", ["every-other-block", "whole"])
def test_an_embedding_redrawn_after_training_is_refused_in_a_far_drifting_run(part, run, tmp_path):
    torch.manual_seed(20)
    model = Emb()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2)
    _train(model, opt)
    with torch.no_grad():
        flat = model.e.weight.view(-1)
        if part == "whole":
            flat.normal_()
        else:
            for b in range(0, flat.numel() // 256, 2):
                flat[b * 256:(b + 1) * 256].normal_()
    result, out = convert(run, tmp_path, {"model": copy.deepcopy(model.state_dict()), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'e.weight'", "unrelated")
