"""A tensor replaced only in part (issue #20, round three): the mapping's content check reads samples from
the start and the middle of each tensor, so a head re-initialised except the rows those samples read passed
it, and lerp(y, unrelated z) was written for the rest with exit 0. x is now computed only after every block
of PART_BLOCK elements of y and z passed the same test (`content_blocks.PartCheck`, in the loop that computes x).

Each checkpoint is trained with the real optimizer. Refusals: exit 2, one `error:` line naming the tensor,
nothing written (and `diff`/`check`, which compute x too, refuse the same way). Legitimate setups with
tensors of many blocks — early and late, β 0.99, weight decay 0.5, zero-initialised heads at a high lr,
bfloat16, LoRA B = 0, embedding rows no batch touched — convert bit-exactly.
"""
from __future__ import annotations

import pytest
import schedulefree
import torch
from torch import nn

from recipes import eval_x, fit
from test_mapping_fit import assert_converts, assert_refused, convert

WIDTH, CLASSES = 64, 100  # a head of 6,400 elements: the samples read rows 0-31 and 50-81, not all of it
IN_PART = "belongs in part to a different tensor"


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x):
        return self.head(self.body(x))


def _batch():
    return torch.randn(8, WIDTH)


def _target_loss(model, batch):
    return (model(batch) - 1.0).pow(2).mean()  # a target: a zero-initialised head gets a gradient


def _trained(dtype=torch.float32, steps: int = 6, zero_head: bool = False, **kw):
    torch.manual_seed(0)
    model = Wide()
    if zero_head:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    model.to(dtype)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), **{"lr": 0.01, **kw})
    fit(model, opt, steps=steps, batch=_batch, loss=lambda m, b: _target_loss(m, b.to(dtype)).float())
    return model, opt


def _reinitialise_rows(weight: torch.Tensor, rows) -> None:
    """Rows of a trained weight replaced by a fresh nn.Linear's, in place (the rest kept)."""
    fresh = nn.Linear(weight.shape[1], weight.shape[0]).weight.to(weight.dtype)
    with torch.no_grad():
        for lo, hi in rows:
            weight[lo:hi] = fresh[lo:hi]


OUTSIDE_SAMPLES = [(32, 50), (82, 100)]  # of 100 rows of 64 elements; the samples read rows 0-31 and 50-81


def _partly_replaced_head(dtype=torch.float32):
    model, opt = _trained(dtype)
    _reinitialise_rows(model.head.weight, OUTSIDE_SAMPLES)
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_head_reinitialised_except_the_sampled_rows_is_refused(dtype, run, tmp_path):
    """64 of 100 class rows kept (those the samples read), 36 re-initialised after the optimizer was built."""
    result, out = convert(run, tmp_path, _partly_replaced_head(dtype))
    assert_refused(result, out, "'head.weight'", IN_PART, "elements 2,048 to 2,303")


def test_scattered_class_rows_reinitialised_are_refused(run, tmp_path):
    """40 of 100 class rows re-initialised in runs of ten across the head (classes of a new label set among
    kept ones): the samples read kept and new rows alike (a mixture passes the pair test), the blocks do not."""
    model, opt = _trained()
    _reinitialise_rows(model.head.weight, [(10, 20), (30, 40), (60, 70), (80, 90)])
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'head.weight'", IN_PART)


def test_embedding_rows_reinitialised_at_the_end_are_refused(run, tmp_path):
    """The last 16 token rows re-initialised for new tokens after the optimizer was built (a 64 x 128 table:
    the samples read rows 0-15 and 32-47)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 128), nn.Linear(128, 8))
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=5,
              batch=lambda: torch.randint(0, 64, (16,)), loss=lambda m, b: m(b).pow(2).mean())
    with torch.no_grad():
        model[0].weight[48:] = torch.randn(16, 128)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'0.weight'", IN_PART)


def test_diff_refuses_a_partly_replaced_head(run, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(_partly_replaced_head(), ckpt)
    result = run("diff", ckpt)
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: ") and IN_PART in result.stderr and "'head.weight'" in result.stderr


def test_check_cannot_decide_with_a_partly_replaced_head(run, tmp_path):
    """`check` computes x to compare: exit 2 (cannot decide), not a PASS or FAIL on a wrong x."""
    obj = _partly_replaced_head()
    ckpt = tmp_path / "ckpt.pt"
    torch.save(obj, ckpt)
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in obj["model"].items()}, str(weights))
    result = run("check", weights, "--ckpt", ckpt)
    assert result.exit_code == 2, result.stderr
    assert IN_PART in result.stderr and "'head.weight'" in result.stderr


# ---- legitimate setups with tensors of many blocks: x exact ---------------------------------------

LEGITIMATE = {
    "two-steps": dict(steps=2),
    "late-300-steps": dict(steps=300, lr=0.003),
    "beta-0.99": dict(steps=60, betas=(0.99, 0.999)),
    "big-weight-decay": dict(steps=100, betas=(0.95, 0.999), weight_decay=0.5),
    "zero-head-lr-1": dict(steps=20, zero_head=True, lr=1.0),
    "zero-head-beta-0.99": dict(steps=40, zero_head=True, betas=(0.99, 0.999), lr=0.1),
    # every block of the head at 0.91, over the 0.81 a block alone may show: even drift, not a replaced part
    "zero-head-beta-0.99-300-steps": dict(steps=300, zero_head=True, betas=(0.99, 0.999), lr=0.1),
    "bfloat16": dict(steps=20, dtype=torch.bfloat16),
    "bfloat16-zero-head": dict(steps=20, dtype=torch.bfloat16, zero_head=True, lr=0.1),  # 0.80 in every block
}


@pytest.mark.parametrize("case", LEGITIMATE)
def test_multi_block_tensors_of_a_true_pair_convert(case, run, tmp_path):
    model, opt = _trained(**LEGITIMATE[case])
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


class LoRA(nn.Module):
    """A frozen base with LoRA pairs of many blocks each (A: 8 x 256, B: 256 x 8, B zero-initialised)."""

    def __init__(self, n: int = 3, width: int = 256, r: int = 8):
        super().__init__()
        self.base = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.base.requires_grad_(False)
        self.A = nn.ParameterList(nn.Parameter(torch.randn(r, width) / width ** 0.5) for _ in range(n))
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(width, r)) for _ in range(n))

    def forward(self, x):
        for base, a, b in zip(self.base, self.A, self.B):
            x = torch.tanh(base(x) + x @ a.t() @ b.t())
        return x


@pytest.mark.parametrize("lr_b", [0.002, 0.032], ids=["same-lr", "loraplus-16x"])
def test_lora_with_zero_initialised_b_converts(lr_b, run, tmp_path):
    torch.manual_seed(0)
    model = LoRA()
    opt = schedulefree.AdamWScheduleFree([{"params": list(model.A), "lr": 0.002}, {"params": list(model.B), "lr": lr_b}])
    fit(model, opt, steps=30, batch=lambda: torch.randn(8, 256), loss=lambda m, b: (m(b) - 0.5).pow(2).mean())
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


def test_embedding_rows_no_batch_touched_convert(run, tmp_path):
    """Tokens 32-63 never occur: their rows move by weight decay alone (y, z and x stay together)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 128), nn.Linear(128, 8))
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01, weight_decay=0.1), steps=50,
              batch=lambda: torch.randint(0, 32, (16,)), loss=lambda m, b: (m(b) - 1).pow(2).mean())
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)
