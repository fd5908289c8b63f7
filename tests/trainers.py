"""Train tiny models with the real Schedule-Free optimizers, to make real checkpoints.

Shared by the tests and by fixtures/make_fixtures.py. Expected x always comes
from the optimizer's own eval() (never hand-written), so a test compares
sfckpt with the library itself.
"""
from __future__ import annotations

import copy

import schedulefree
import torch
from torch import nn

# family name -> (constructor, uses a closure)
OPTIMIZERS = {
    "sgd": (lambda p: schedulefree.SGDScheduleFree(p, lr=0.5, momentum=0.8), False),
    "adamw": (lambda p: schedulefree.AdamWScheduleFree(p, lr=0.02, betas=(0.85, 0.999), weight_decay=0.01), False),
    "adamw-paper": (lambda p: schedulefree.AdamWScheduleFreePaper(p, lr=0.02, betas=(0.9, 0.99)), False),
    "radam": (lambda p: schedulefree.RAdamScheduleFree(p, lr=0.02, betas=(0.9, 0.999)), False),
    "sgd-closure": (lambda p: schedulefree.SGDScheduleFreeClosure(p, lr=0.5, momentum=0.9), True),
    "adamw-closure": (lambda p: schedulefree.AdamWScheduleFreeClosure(p, lr=0.02), True),
    "radam-closure": (lambda p: schedulefree.RAdamScheduleFreeClosure(p, lr=0.02), True),
    "sgd-reference": (lambda p: schedulefree.SGDScheduleFreeReference(p, lr=0.5, momentum=0.9), False),
    "adamw-reference": (lambda p: schedulefree.AdamWScheduleFreeReference(p, lr=0.02), False),
    "wrapper": (lambda p: schedulefree.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.1, momentum=0.5), momentum=0.75), False),
    "wrapper-reference": (
        lambda p: schedulefree.ScheduleFreeWrapperReference(torch.optim.SGD(p, lr=0.1), momentum=0.75),
        False,
    ),
}
WRAPPER_BETA = 0.75


def _pto(name, **kw):
    def make(p):
        import pytorch_optimizer

        if name == "ScheduleFreeWrapper":
            return pytorch_optimizer.ScheduleFreeWrapper(torch.optim.SGD(p, lr=0.1), momentum=WRAPPER_BETA)
        return getattr(pytorch_optimizer, name)(p, **kw)

    return make, False


def _heavyball(p):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None  # no torch.compile in tests: slow on CPU, and eval() is plain torch anyway
    return heavyball.SFAdamW(p, lr=0.02, betas=(0.85, 0.99))


def _prodigy(p):
    from prodigyplus import ProdigyPlusScheduleFree

    # d0 well above the default so that Prodigy's step size, and with it the y/x gap, grows within four steps
    return ProdigyPlusScheduleFree(p, lr=1.0, betas=(0.9, 0.99), d0=1e-3, schedulefree_c=8, weight_decay=0.01)


# Other libraries' Schedule-Free optimizers (test dependencies): family name -> (constructor, closure)
OTHER_OPTIMIZERS = {
    "pto-sgd": _pto("ScheduleFreeSGD", lr=0.5, momentum=0.8),
    "pto-adamw": _pto("ScheduleFreeAdamW", lr=0.02, betas=(0.85, 0.999)),
    "pto-radam": _pto("ScheduleFreeRAdam", lr=0.02),
    "pto-wrapper": _pto("ScheduleFreeWrapper"),
    "heavyball-sfadamw": (_heavyball, False),
    "prodigy-plus-sf": (_prodigy, False),
}
OPTIMIZERS.update(OTHER_OPTIMIZERS)
NEEDS_BETA = ("wrapper", "wrapper-reference", "pto-wrapper")


class MLP(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class TiedLM(nn.Module):
    """An embedding tied to the output head, as in most language models."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.embed(x).mean(1))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def example_input(model: nn.Module, n: int = 6, generator=None) -> torch.Tensor:
    if isinstance(model, TiedLM):
        return torch.randint(0, 10, (n, 5), generator=generator)
    if isinstance(model, ConvBN):
        return torch.randn(n, 3, 5, 5, generator=generator)
    return torch.randn(n, 8, generator=generator)


def train(model: nn.Module, family: str, steps: int = 4, param_groups=None, seed: int = 0):
    """Train `model` a few steps with the real optimizer of `family`; return the optimizer (in train mode)."""
    torch.manual_seed(seed)
    make, uses_closure = OPTIMIZERS[family]
    opt = make(param_groups if param_groups is not None else model.parameters())
    opt._sfckpt_family = family
    if hasattr(opt, "train"):
        opt.train()
    model.train()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        inp = example_input(model)
        if inp.is_floating_point():
            inp = inp.to(dtype)

        def closure():
            opt.zero_grad()
            loss = model(inp).float().pow(2).mean()
            loss.backward()
            return loss

        if uses_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return opt


def eval_x(model: nn.Module, opt) -> dict[str, torch.Tensor]:
    """x as the optimizer's own eval() gives it, on deep copies (the originals stay in train mode).

    Copying model and optimizer together keeps the optimizer's references
    pointing at the copied parameters.
    """
    family = getattr(opt, "_sfckpt_family", None)
    if family in OTHER_OPTIMIZERS:
        # These do not deep-copy faithfully (pytorch_optimizer's wrapper drops its settings, heavyball
        # its compiled functions); their state_dict is complete, so rebuild and load it.
        model2 = copy.deepcopy(model)
        opt2 = OPTIMIZERS[family][0](model2.parameters())
        opt2.load_state_dict(opt.state_dict())
    else:
        model2, opt2 = copy.deepcopy((model, opt))
    if hasattr(opt2, "eval"):
        opt2.eval()
    return {k: v.detach().clone() for k, v in model2.state_dict().items()}
