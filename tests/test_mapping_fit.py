"""Every pair must fit by content (issue #20): no optimizer entry is paired with a tensor on shape, order
or name alone when their content says the two are unrelated, and content that claims to decide a pair
must not have a second candidate.

Each checkpoint is trained with the real optimizer and saved as real code saves it. Two contracts:
`assert_converts` (exit 0, every tensor `torch.equal` to the optimizer's own eval()) where the file
determines x, and `assert_refused` (exit 2, one `error:` line, nothing written) where it does not.
Before these checks, the fresh-tensor, stale-name, swapped --param-order, two-tower, another-run and
tie-copy setups converted with exit 0 and a wrong tensor; a deliberate frozen copy converted right and
now needs --twins frozen (the bytes cannot tell it from a tie); complex64 was refused as a damaged file.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import schedulefree
import torch
from torch import nn

import recipes
from conftest import assert_equal_tensors, read
from recipes import eval_x, fit, snapshot

W = recipes.W


def assert_converts(result, out, expected):
    """Exit 0 and every tensor bit-identical to eval()'s x."""
    assert result.exit_code == 0, f"exit {result.exit_code} where x is determined: {result.stderr}"
    assert_equal_tensors(read(out), expected)


def assert_refused(result, out, *words):
    """Exit 2, one `error:` line that holds `words`, and no output file."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert not Path(out).exists()
    print(lines[0])  # seen with pytest -s


def convert(run, tmp_path, obj, *args):
    ckpt = tmp_path / "ckpt.pt"
    torch.save(obj, ckpt)
    out = tmp_path / "x.safetensors"
    return run("convert", ckpt, out, *args), out


STALE = "belongs to a different tensor"


class Classifier(nn.Module):
    """A backbone and a head of its own shape: nothing else can take the head's optimizer entry."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(W, W), nn.Tanh(), nn.Linear(W, W), nn.Tanh())
        self.head = nn.Linear(W, classes)

    def forward(self, x):
        return self.head(self.body(x))


def _trained_classifier(dtype=torch.float32, opt_cls=schedulefree.AdamWScheduleFree, **kw):
    torch.manual_seed(0)
    model = Classifier().to(dtype)
    opt = opt_cls(model.parameters(), **kw)
    fit(model, opt, steps=6, loss=lambda m, b: m(b.to(dtype)).float().pow(2).mean())
    return model, opt


# ---- a fresh tensor in the place of a trained one: refused -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_head_replaced_after_the_optimizer_was_built(dtype, run, tmp_path):
    """`model.head = nn.Linear(...)` (a new task) after the optimizer was built, saved right after the swap."""
    model, opt = _trained_classifier(dtype, lr=0.01)
    model.head = nn.Linear(W, 10).to(dtype)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'head.weight'", STALE)


def test_head_replaced_sgd_in_a_lightning_file(run, tmp_path):
    """SGDScheduleFree, the LightningModule's head swapped, saved as Lightning saves (state_dict, optimizer_states)."""
    model, opt = _trained_classifier(opt_cls=schedulefree.SGDScheduleFree, lr=0.2, momentum=0.9)
    model.head = nn.Linear(W, 10)
    obj = {"epoch": 0, "global_step": 6, "pytorch-lightning_version": "2.4.0", "lr_schedulers": [],
           "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
           "optimizer_states": [opt.state_dict()]}
    result, out = convert(run, tmp_path, obj, "--strip-prefix", "model.")
    assert_refused(result, out, "'head.weight'", STALE)


def test_bert_classifier_replaced(run, tmp_path):
    """transformers BertForSequenceClassification (tiny config): `model.classifier = nn.Linear(...)` after training."""
    pytest.importorskip("transformers")
    model, loss, batch = recipes.tiny_hf("bert-cls")
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), loss=loss, batch=batch)
    model.classifier = nn.Linear(model.config.hidden_size, model.config.num_labels)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'classifier.weight'", STALE)


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, W)
        self.mix = nn.Linear(W, W)
        self.out = nn.Linear(W, 8)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids).mean(1))))


def test_token_embedding_reinitialised_for_a_new_tokenizer(run, tmp_path):
    """A new tokenizer of the same size: `model.embed = nn.Embedding(...)` after the optimizer was built."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=5,
              batch=lambda: torch.randint(0, 64, (6, 5)))
    model.embed = nn.Embedding(64, W)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'embed.weight'", STALE)


def sincos(n: int, dim: int) -> torch.Tensor:
    """The fixed sin-cos position table of "Attention is all you need" (MAE, ViT variants)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return table[None]


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 16, W) * 0.02)
        self.proj = nn.Linear(W, W)

    def forward(self, x):
        return self.proj(x + self.pos_embed)


def test_learned_pos_embed_swapped_for_a_sincos_buffer(run, tmp_path):
    """A learned pos_embed (trained, in the optimizer) replaced by a fixed sin-cos buffer of the same shape."""
    torch.manual_seed(0)
    model = Tokens()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=5,
              batch=lambda: torch.randn(4, 16, W))
    del model.pos_embed
    model.register_buffer("pos_embed", sincos(16, W))
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'pos_embed'", STALE)


class UncertaintyLoss(nn.Module):
    """Kendall et al.'s uncertainty weighting, per output: the loss owns a log-variance per dimension."""

    def __init__(self):
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(W))

    def forward(self, pred, target):
        return ((pred - target).pow(2) * torch.exp(-self.log_vars) + self.log_vars).mean()


class Scaled(nn.Module):
    """A model with a fixed per-output scale buffer of the loss's parameter shape."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(W, 2 * W), nn.Tanh(), nn.Linear(2 * W, W, bias=False))
        self.register_buffer("out_scale", torch.rand(W) + 0.5)

    def forward(self, x):
        return self.net(x) * self.out_scale


def test_loss_owned_log_vars_beside_a_buffer_of_their_shape(run, tmp_path):
    """Optimizer over model and loss parameters (the loss's log_vars are not in the model's state dict)."""
    torch.manual_seed(0)
    model, criterion = Scaled(), UncertaintyLoss()
    opt = fit(model, schedulefree.AdamWScheduleFree([*model.parameters(), *criterion.parameters()], lr=0.02),
              steps=6, loss=lambda m, b: criterion(m(b), torch.ones_like(b)))
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'out_scale'", STALE)


def test_saved_param_names_that_name_a_replaced_head(run, tmp_path):
    """torch >= 2.6 saves param_names (optimizer built from named_parameters()); 'head.weight' is a new tensor now."""
    torch.manual_seed(0)
    model = Classifier()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.named_parameters(), lr=0.01), steps=6)
    assert "head.weight" in opt.state_dict()["param_groups"][0]["param_names"]
    model.head = nn.Linear(W, 10)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'head.weight'", STALE, "saved name")


def test_param_order_with_two_biases_swapped(run, tmp_path):
    """A --param-order file that swaps two same-shape zero-initialised biases (look-alikes at the start, so no
    margin confirms either): the names fit the shapes, content does not."""
    torch.manual_seed(0)
    model = Classifier()
    for layer in (model.body[0], model.body[2]):
        nn.init.zeros_(layer.bias)
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=6)
    names = [n for n, _ in model.named_parameters()]
    swapped = [{"body.0.bias": "body.2.bias", "body.2.bias": "body.0.bias"}.get(n, n) for n in names]
    order = tmp_path / "order.txt"
    order.write_text("\n".join(swapped) + "\n")
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()},
                          "--param-order", order)
    assert_refused(result, out, "--param-order", "body.")


# ---- two candidates that share z's history: refused ------------------------------------------------

def test_two_towers_from_one_initialisation(run, tmp_path):
    """Tower A trained by SGDScheduleFree, tower B (a deep copy) by plain SGD at the same rate: B follows z's path."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": recipes.Stack(2)})
    model["b"] = copy.deepcopy(model["a"])
    sf = schedulefree.SGDScheduleFree(model["a"].parameters(), lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(model["b"].parameters(), lr=0.1)
    sf.train()
    torch.manual_seed(1)
    for _ in range(5):
        batch = torch.randn(8, W)
        for tower, o in ((model["a"], sf), (model["b"], plain)):
            o.zero_grad()
            (tower(batch) - 1).pow(2).mean().backward()
            o.step()
    obj = {"model": model.state_dict(), "optimizer": sf.state_dict(), "optimizer_b": plain.state_dict()}
    result, out = convert(run, tmp_path, obj)
    assert_refused(result, out, "shares its history")


# ---- legitimate setups: the same checks pass, x exact ----------------------------------------------

LEGITIMATE = {
    "two-steps": dict(steps=2, lr=0.01),
    "late-300-steps": dict(steps=300, lr=0.003),
    "beta-0.99": dict(steps=40, lr=0.01, betas=(0.99, 0.999)),
    "big-weight-decay": dict(steps=100, lr=0.01, betas=(0.95, 0.999), weight_decay=0.5),
    "zero-initialised-head": dict(steps=8, lr=0.01, zero_head=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", LEGITIMATE)
def test_unique_head_that_was_trained_converts(case, run, tmp_path):
    """The head's shape is unique, so shape alone places it; its own z passes the content check."""
    kw = dict(LEGITIMATE[case])
    steps, zero_head = kw.pop("steps"), kw.pop("zero_head", False)
    torch.manual_seed(0)
    model = Classifier()
    if zero_head:
        nn.init.zeros_(model.head.weight)
        nn.init.zeros_(model.head.bias)
    groups = [{"params": model.head.parameters()}, {"params": model.body.parameters()}]  # head first
    opt = fit(model, schedulefree.AdamWScheduleFree(groups, **kw), steps=steps,
              loss=lambda m, b: (m(b) - 1).pow(2).mean())
    y, expected = snapshot(model), eval_x(model, opt)
    assert recipes.changed(expected, y) >= {"head.weight", "body.0.weight"}
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


def test_bf16_head_first_sgd_converts(run, tmp_path):
    """bf16 and SGDScheduleFree, head first: content read at bf16 resolution still passes."""
    torch.manual_seed(0)
    model = Classifier().to(torch.bfloat16)
    opt = fit(model, schedulefree.SGDScheduleFree(
        [{"params": model.head.parameters()}, {"params": model.body.parameters()}], lr=0.2, momentum=0.9),
        steps=6, loss=lambda m, b: m(b.to(torch.bfloat16)).float().pow(2).mean())
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


# ---- tied weights saved apart: the bytes cannot tell a tie from a frozen copy ------------------------

def _tied_lm_saved_apart():
    import trainers

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    expected = trainers.eval_x(model, opt)
    # what `{k: v.cpu() for k, v in sd.items()}` gives on a GPU run: one tensor per name, no shared storage
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": weights, "optimizer": opt.state_dict()}, expected


def test_tie_saved_as_separate_copies_needs_twins(run, tmp_path):
    """A clone snapshot of a tied embedding/head: refused, naming both tensors and --twins."""
    obj, _ = _tied_lm_saved_apart()
    result, out = convert(run, tmp_path, obj)
    assert_refused(result, out, "'head.weight' = 'embed.weight'", "--twins tied", "--twins frozen")


def test_tie_saved_as_separate_copies_with_twins_tied(run, tmp_path):
    """--twins tied: the copy gets the trained tensor's x, as eval() gives the tied model."""
    obj, expected = _tied_lm_saved_apart()
    result, out = convert(run, tmp_path, obj, "--twins", "tied")
    assert_converts(result, out, expected)


def test_gpt2_clone_snapshot_with_tied_lm_head(run, tmp_path):
    """GPT-2 (tied lm_head) saved as `{k: v.clone() ...}`: refused without --twins; --twins tied gives eval()'s x."""
    pytest.importorskip("transformers")
    model, loss, batch = recipes.tiny_hf("gpt2")
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), loss=loss, batch=batch)
    expected = eval_x(model, opt)
    obj = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
    result, out = convert(run, tmp_path, obj)
    assert_refused(result, out, "'lm_head.weight' = 'transformer.wte.weight'", "--twins")
    result, out = convert(run, tmp_path, obj, "--twins", "tied")
    assert_converts(result, out, expected)


def test_frozen_target_copy_needs_twins_frozen(run, tmp_path):
    """A DQN target network hard-copied just before torch.save (optimizer built from named_parameters(), so the
    trained tensors are known): refused; --twins frozen keeps the target as saved."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"online": recipes.Net(), "target": recipes.Net()})
    model["target"].requires_grad_(False)
    online = [(n, p) for n, p in model.named_parameters() if n.startswith("online.")]
    opt = fit(model["online"], schedulefree.AdamWScheduleFree(online, lr=0.02))
    model["target"].load_state_dict(model["online"].state_dict())
    expected = eval_x(model, opt)
    obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    result, out = convert(run, tmp_path, obj)
    assert_refused(result, out, "--twins frozen")
    result, out = convert(run, tmp_path, obj, "--twins", "frozen")
    assert_converts(result, out, expected)


# ---- complex parameters --------------------------------------------------------------------------

class Spectral(nn.Module):
    """An FNO-style spectral layer: complex weights on the lowest Fourier modes, beside a real projection."""

    def __init__(self, dtype=torch.complex64, modes: int = 9, width: int = 16):
        super().__init__()
        self.modes = modes
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        self.spectral = nn.Parameter(0.1 * torch.randn(width, width, modes, dtype=dtype))
        self.proj = nn.Linear(width, width).to(real)

    def forward(self, x):  # x: (batch, width, 16)
        f = torch.fft.rfft(x, dim=-1)[..., :self.modes]
        g = torch.einsum("bim,iom->bom", f, self.spectral)
        y = torch.fft.irfft(g, n=x.shape[-1], dim=-1)
        return self.proj((x + y).transpose(1, 2))


def test_complex64_spectral_weights_convert(run, tmp_path):
    """complex64 parameters are ordinary parameters: x is eval()'s torch.lerp, bit for bit, written as C64."""
    torch.manual_seed(0)
    model = Spectral()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=5,
              batch=lambda: torch.randn(4, 16, 16))
    y, expected = snapshot(model), eval_x(model, opt)
    assert recipes.changed(expected, y) >= {"spectral"}
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)
    assert read(out)["spectral"].dtype == torch.complex64


def test_complex128_is_refused_naming_the_dtype(run, tmp_path):
    """safetensors has no complex128: refused with the tensor and its dtype, not as a damaged file."""
    torch.manual_seed(0)
    model = Spectral(torch.complex128)
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=3,
              batch=lambda: torch.randn(4, 16, 16, dtype=torch.float64))
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'spectral'", "complex128")


def test_tie_saved_apart_after_eval_needs_no_twins(run, tmp_path):
    """Saved after optimizer.eval() (parameters hold x, nothing is converted): tied and frozen give the same bytes."""
    import trainers

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    opt.eval()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result, out = convert(run, tmp_path, {"model": weights, "optimizer": opt.state_dict()})
    assert_converts(result, out, weights)


def test_optimizer_state_of_another_run_is_refused(run, tmp_path):
    """Weights of one run saved with the optimizer of another run of the same architecture (other seed)."""
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = Classifier()
        runs.append((model, fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=6)))
    result, out = convert(run, tmp_path, {"model": runs[0][0].state_dict(), "optimizer": runs[1][1].state_dict()})
    assert_refused(result, out, STALE)


def test_head_replaced_among_same_shape_tensors(run, tmp_path):
    """A head layer replaced by a fresh nn.Linear of the shape every other layer has: never exit 0 with a wrong x
    (content places every trained tensor, and no tensor is left for the stale entry)."""
    torch.manual_seed(0)
    model = recipes.HeadBackbone()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), steps=6)
    model.head[2] = recipes.lin()
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "fits no tensor of these weights")


def test_copy_of_a_tensor_the_optimizer_never_moved_needs_no_twins(run, tmp_path):
    """A frozen copy of a parameter whose gradient was always zero (its z is its y): tied and frozen agree."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"net": recipes.Net(), "unused": recipes.lin(), "copy": recipes.lin()})
    model["copy"].requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("copy.")]  # names tell unused from copy
    opt = schedulefree.AdamWScheduleFree(named, lr=0.02)
    fit(model["net"], opt, loss=lambda m, b: m(b).pow(2).mean() + 0.0 * model["unused"](b).sum())
    model["copy"].load_state_dict(model["unused"].state_dict())
    expected = eval_x(model, opt)
    assert torch.equal(expected["unused.weight"], model["unused"].weight)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)


def test_replaced_head_saved_after_eval_is_copied(run, tmp_path):
    """Saved after optimizer.eval(): the parameters hold x and are copied, so a stale z changes nothing."""
    model, opt = _trained_classifier(lr=0.01)
    opt.eval()
    model.head = nn.Linear(W, 10)
    weights = snapshot(model)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, weights)


# ---- float64 values near the top of the range: content still decides ----------------------------

def _scaled_float64_classifier(scale: float):
    """A float64 classifier trained with the real optimizer, then its y and z multiplied by `scale`
    (loaded back into the same model and optimizer, so eval() gives the truth for the scaled file)."""
    model, opt = _trained_classifier(torch.float64, lr=0.01)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
            opt.state[p]["z"].mul_(scale)
    return model, opt


def test_float64_near_the_range_limit_converts_exactly(run, tmp_path):
    """Values of 1e300: squares overflow float64, so content's distances are taken on samples scaled by a
    power of two (before, every ratio was NaN: no evidence, and numpy warned on stderr)."""
    model, opt = _scaled_float64_classifier(1e300)
    expected = eval_x(model, opt)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_converts(result, out, expected)
    assert "overflow" not in result.stderr and "warning" not in result.stderr


def test_float64_near_the_range_limit_still_refuses_a_replaced_head(run, tmp_path):
    model, opt = _scaled_float64_classifier(1e300)
    model.head = nn.Linear(W, 10).to(torch.float64)
    with torch.no_grad():
        for p in model.head.parameters():
            p.mul_(1e300)
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "'head.weight'", STALE)


# ---- found by an independent attack: content evidence at scale, swapped look-alikes, shared storage ---

def test_two_towers_at_expert_scale_are_refused(run, tmp_path):
    """Two towers of 500 same-shape experts from one initialisation, A trained by SGDScheduleFree and B by
    plain SGD: with 1,000 tensors of one shape the work budget shrinks the samples below 256 elements,
    where the two-candidate rule used to switch off, and every tensor came out wrong with exit 0."""
    experts = 500

    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(experts))

        def forward(self, x):
            return sum(torch.tanh(e(x)) for e in self.experts) / experts ** 0.5

    torch.manual_seed(0)
    model = nn.ModuleDict({"a": Tower()})
    model["b"] = copy.deepcopy(model["a"])
    sf = schedulefree.SGDScheduleFree(model["a"].parameters(), lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(model["b"].parameters(), lr=0.1)
    sf.train()
    for _ in range(10):
        b = torch.randn(8, 16)
        for tower, opt in ((model["a"], sf), (model["b"], plain)):
            opt.zero_grad()
            (tower(b) - 1).pow(2).mean().backward()
            opt.step()
    obj = {"model": model.state_dict(), "optimizer": sf.state_dict(), "optimizer_b": plain.state_dict()}
    result, out = convert(run, tmp_path, obj)
    assert_refused(result, out, "also shares its history")


class Gains(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(64), nn.Linear(64, 64)) for _ in range(6))
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        return self.head(x)


@pytest.mark.slow
def test_param_order_with_two_gains_swapped_is_refused(run, tmp_path):
    """The docs' two lines wrote the order, then two LayerNorm gains were swapped: each z lies 2-4x closer
    to its own gain, under the 4x that confirms a pair, and the swapped order converted with exit 0."""
    torch.manual_seed(0)
    model = Gains()
    named = list(model.named_parameters())
    opt = schedulefree.AdamWScheduleFree([{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.1},
                                          {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}],
                                         lr=3e-3)
    fit(model, opt, steps=100, loss=lambda m, b: (m(b) - b[:, :8].sign()).pow(2).mean(),
        batch=lambda: torch.randn(16, 64))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    (tmp_path / "right.txt").write_text("\n".join(order) + "\n")
    i, j = order.index("blocks.1.0.weight"), order.index("blocks.4.0.weight")
    order[i], order[j] = order[j], order[i]
    (tmp_path / "swapped.txt").write_text("\n".join(order) + "\n")
    obj = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    result, out = convert(run, tmp_path, obj, "--param-order", tmp_path / "swapped.txt")
    assert_refused(result, out, "swapped", "blocks.1.0.weight", "blocks.4.0.weight")
    result, out = convert(run, tmp_path, obj, "--param-order", tmp_path / "right.txt")
    assert_converts(result, out, eval_x(model, opt))


def test_two_parameters_viewing_one_storage_transposed_are_refused(run, tmp_path):
    """A tied autoencoder written as `dec_w = nn.Parameter(enc.weight.t())`: two entries, two z's, one
    storage that eval() moves twice in optimizer order; converted one by one, both came out wrong."""

    class TiedAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(32, 16)
            self.dec_w = nn.Parameter(self.enc.weight.t())

        def forward(self, x):
            return torch.tanh(self.enc(x)) @ self.dec_w.T

    torch.manual_seed(0)
    model = TiedAE()
    opt = fit(model, schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2), steps=10,
              loss=lambda m, b: (m(b) - b).pow(2).mean(), batch=lambda: torch.randn(16, 32))
    result, out = convert(run, tmp_path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
    assert_refused(result, out, "different views of the same data", "'dec_w'", "'enc.weight'")
