"""More setups whose file determines x (issue #20, "refused although the file determines x"), and the
refusals that keep the new allowances honest.

Each checkpoint is trained with the real optimizer, saved in train mode, and compared with the optimizer's
own eval() from the same run (`assert_converts`); refusals are exit 2 with one `error:` line, nothing written.
"""
from __future__ import annotations

import pytest
import schedulefree
import torch
from torch import nn

from conftest import SCRIPTS, assert_equal_tensors, read
from recipes import eval_x, fit
from test_mapping_determined import LoRA, TFBatchNorm
from test_mapping_fit import STALE, assert_converts, assert_refused, convert
from test_mapping_partial import _trained

W = 32


def _checkpoint(model, opt):
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


# ---- zero-initialised heads after 300 steps -------------------------------------------------------------

@pytest.mark.slow
def test_zero_head_300_steps_beta_095_big_weight_decay(run, tmp_path):
    """lr 0.1, weight decay 0.5: every head output gets one gradient, so head.bias's y is one float32 value
    while its z holds two, one ulp apart (rounded away in y); content confirms no pair (0.2 to 0.8)."""
    model, opt = _trained(steps=300, zero_head=True, betas=(0.95, 0.999), weight_decay=0.5, lr=0.1)
    expected = eval_x(model, opt)
    assert_converts(*convert(run, tmp_path, _checkpoint(model, opt)), expected)


@pytest.mark.xfail(strict=True, reason="head.weight (6,400 elements, rows all equal) gives d²/(‖y‖²+‖z‖²) = 0.99 "
                   "with y and z 0.76 times the run's drift apart and barely aligned (cosine 0.02): exactly what a "
                   "fresh head initialised near zero in the place of a zero-initialised one gives "
                   "(test_fresh_head_near_zero_in_place_of_a_zero_initialised_one_is_refused: 0.96 at 1.7 times the "
                   "drift); no test on the samples tells the two apart, so both are refused")
@pytest.mark.slow
def test_zero_head_300_steps_bfloat16_beta_099(run, tmp_path):
    model, opt = _trained(torch.bfloat16, steps=300, zero_head=True, betas=(0.99, 0.999), lr=0.1)
    expected = eval_x(model, opt)
    assert_converts(*convert(run, tmp_path, _checkpoint(model, opt)), expected)


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, W), nn.Tanh())
        self.head = nn.Linear(W, 10)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.slow
def test_fresh_head_near_zero_in_place_of_a_zero_initialised_one_is_refused(run, tmp_path):
    """A zero-initialised head trained 300 steps (lr 0.03, β 0.99), then replaced by a fresh head drawn from
    N(0, 0.02): y and z both lie near zero on the run's scale, as a true zero-initialised pair's do, but they
    are independent. Refused: the scale alone is not used on samples of 256 elements or more."""
    torch.manual_seed(0)
    model = Classifier()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.03, betas=(0.99, 0.999))
    fit(model, opt, steps=300, loss=lambda m, b: (m(b) - 1).pow(2).mean())
    model.head = nn.Linear(W, 10)
    nn.init.normal_(model.head.weight, std=0.02)
    nn.init.normal_(model.head.bias, std=0.02)
    assert_refused(*convert(run, tmp_path, _checkpoint(model, opt)), "'head.weight'", STALE)


# ---- small zero-initialised tensors within the run's drift ------------------------------------------------

def _batchnorm_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(W, W), TFBatchNorm(), nn.Tanh(), nn.Linear(W, W), TFBatchNorm())
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    fit(model, opt, steps=6)
    return model, opt


def test_zero_initialised_beta_replaced_by_fresh_zeros_is_refused(run, tmp_path):
    """The second beta reset to zeros after training: y is one value while z is not, which a true pair's y,
    moving with its z, never is; the run's drift does not excuse it."""
    model, opt = _batchnorm_model()
    with torch.no_grad():
        model[4].beta.zero_()
    assert_refused(*convert(run, tmp_path, _checkpoint(model, opt)), "optimizer entry 7 (group 0)")


def test_zero_initialised_beta_replaced_by_a_fresh_init_is_refused(run, tmp_path):
    """The second beta re-drawn as a Linear bias is (uniform ±1/√32): 0.1 RMS, over twice the run's drift."""
    model, opt = _batchnorm_model()
    with torch.no_grad():
        model[4].beta.copy_(nn.Linear(W, W).bias)
    assert_refused(*convert(run, tmp_path, _checkpoint(model, opt)), "optimizer entry 7 (group 0)", STALE)


# ---- a Hugging Face Trainer with one frozen layer --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["trainer", "own-all", "own-trainable"])
def test_hf_trainer_with_one_frozen_layer(optimizer, run, tmp_path, monkeypatch):
    """The real Trainer, a tiny Llama whose first layer is frozen, three steps: with optim="schedule_free_adamw"
    (the Trainer's decay / no-decay groups), or an AdamWScheduleFree of the user's own through
    `optimizers=(opt, None)` over all parameters or the trainable ones (one group, which the Trainer's grouping
    rule does not describe: placed in the rebuilt model's order, as in any file)."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import tiny_llama

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama.config())
    model.model.layers[0].requires_grad_(False)
    params = model.parameters() if optimizer == "own-all" else [p for p in model.parameters() if p.requires_grad]
    own = None if optimizer == "trainer" else schedulefree.AdamWScheduleFree(params, lr=1e-2)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), optim="schedule_free_adamw",
                                          learning_rate=1e-2, weight_decay=0.1, per_device_train_batch_size=4,
                                          max_steps=3, save_steps=3, report_to=[], use_cpu=True, logging_steps=100,
                                          lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=tiny_llama.data(), optimizers=(own, None))
    trainer.train()
    trainer.optimizer.eval()
    expected = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not saved
    result = run("convert", tmp_path / "run" / "checkpoint-3", tmp_path / "release")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "release" / "model.safetensors"), expected)


# ---- each group in its own order ------------------------------------------------------------------------

class ScaledLoRA(LoRA):
    """LoRA pairs and a per-layer scale: a vector of ones (content tells them apart) or a zero scalar gate
    (too few numbers for content: only an order places it)."""

    def __init__(self, gate: bool, n: int = 12):
        super().__init__(n)
        self.gate = gate
        self.C = nn.ParameterList(nn.Parameter(torch.zeros(1) if gate else torch.ones(W)) for _ in range(n))

    def forward(self, x):
        for base, a, b, c in zip(self.base, self.A, self.B, self.C):
            x = torch.tanh(base(x) + x @ a.t() @ b.t()) * ((1 + c) if self.gate else c)
        return x


def _three_groups(gate: bool):
    """A sorted by name, B in the model's order, C in the reverse of it."""
    torch.manual_seed(0)
    model = ScaledLoRA(gate)
    named = dict(model.named_parameters())
    a = [named[n] for n in sorted(n for n in named if n.startswith("A."))]
    b = [p for n, p in named.items() if n.startswith("B.")]
    c = [p for n, p in named.items() if n.startswith("C.")][::-1]
    opt = schedulefree.AdamWScheduleFree([{"params": a, "lr": 0.005}, {"params": b, "lr": 0.08},
                                          {"params": c, "lr": 0.001}])
    fit(model, opt, steps=6)
    return model, opt


def test_three_groups_each_in_the_order_its_confirmed_entries_show(run, tmp_path):
    model, opt = _three_groups(gate=False)
    expected = eval_x(model, opt)
    assert_converts(*convert(run, tmp_path, _checkpoint(model, opt)), expected)


def test_group_of_gates_showing_no_order_beside_groups_that_disagree_is_refused(run, tmp_path):
    """The gates (one element each) carry no content and their group no confirmed entry; the other groups
    show two different orders, so none is theirs to follow: refused."""
    model, opt = _three_groups(gate=True)
    assert_refused(*convert(run, tmp_path, _checkpoint(model, opt)), "--param-order")
