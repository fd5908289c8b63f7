"""Hints that used to send new users the wrong way (issue #24): the --strip-prefix hint only for
Lightning, a --strip-prefix that matches nothing, names that differ by a prefix in `check`, and
checkpoints of optimizers that are not Schedule-Free."""
import json

import pytest
import torch
from torch import nn

import trainers
from conftest import save_checkpoint


class Wrapped(nn.Module):
    """Every parameter under `transformer.`, as in GPT-2: the model's own names, not a Lightning attribute."""

    def __init__(self):
        super().__init__()
        self.transformer = trainers.MLP()

    def forward(self, x):
        return self.transformer(x)


def _trained(tmp_path, model, layout):
    opt = trainers.train(model, "adamw", steps=3)
    return save_checkpoint(tmp_path / f"{layout.replace('/', '_')}.ckpt", model, opt, layout)


def test_shared_first_name_outside_lightning_gets_no_strip_prefix_hint(run, tmp_path):
    ckpt = _trained(tmp_path, Wrapped(), "model/optimizer")
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert not any("--strip-prefix" in h for h in report["hints"])
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0 and "hint" not in result.stderr


def test_lightning_checkpoint_gets_the_strip_prefix_hint_from_inspect_and_convert(run, tmp_path):
    ckpt = _trained(tmp_path, trainers.MLP(), "lightning")
    assert "hint: every tensor name starts with 'model.' (the LightningModule attribute)" in run("inspect", ckpt).stdout
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0
    assert "hint: every tensor name starts with 'model.'" in result.stderr
    stripped = run("convert", ckpt, tmp_path / "y.safetensors", "--strip-prefix", "model.")
    assert stripped.exit_code == 0 and "hint" not in stripped.stderr


def test_strip_prefix_matching_no_name_is_exit_2_naming_the_prefixes(run, tmp_path):
    ckpt = _trained(tmp_path, trainers.MLP(), "lightning")
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "modle.")
    assert result.exit_code == 2
    assert result.stderr == ("error: --strip-prefix 'modle.' matches no tensor name; the names start with 'model.'; "
                             "give one of those prefixes, or leave --strip-prefix out\n")
    assert not (tmp_path / "x.safetensors").exists()


def test_check_says_names_carry_a_prefix_the_check_strips(run, tmp_path):
    ckpt = _trained(tmp_path, trainers.MLP(), "lightning")
    assert run("convert", ckpt, tmp_path / "kept.safetensors").exit_code == 0
    result = run("check", tmp_path / "kept.safetensors", "--ckpt", ckpt, "--strip-prefix", "model.")
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0] == (
        f"FAIL: {tmp_path / 'kept.safetensors'}: the released tensor names are x's with 'model.' in front (the release "
        "was converted without --strip-prefix model.); check without --strip-prefix model., or convert again with it")


def test_check_says_names_lack_a_prefix_the_checkpoint_has(run, tmp_path):
    ckpt = _trained(tmp_path, trainers.MLP(), "lightning")
    assert run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.").exit_code == 0
    result = run("check", tmp_path / "x.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1
    assert "the released tensor names are x's without 'model.'" in result.stdout
    assert "check with --strip-prefix model. too" in result.stdout
    assert run("check", tmp_path / "x.safetensors", "--ckpt", ckpt, "--strip-prefix", "model.").exit_code == 0


def _plain(tmp_path, cls, **kw):
    torch.manual_seed(0)
    model = trainers.MLP()
    opt = cls(model.parameters(), **kw)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
    return save_checkpoint(tmp_path / f"{cls.__name__}.pt", model, opt)


@pytest.mark.parametrize("cls, kw", [(torch.optim.AdamW, {"lr": 1e-3}), (torch.optim.Adam, {"lr": 1e-3}),
                                     (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9})], ids=lambda v: getattr(v, "__name__", ""))
def test_convert_of_a_plain_torch_optimizer_names_its_class(cls, kw, run, tmp_path):
    ckpt = _plain(tmp_path, cls, **kw)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: the optimizer state is torch.optim.{cls.__name__}'s and holds no "
                                    "Schedule-Free z: this is not a Schedule-Free checkpoint, so there is no x to "
                                    "reconstruct; ")
    assert not (tmp_path / "x.safetensors").exists()


def test_inspect_describes_an_adamw_checkpoint_as_not_schedule_free(run, tmp_path):
    ckpt = _plain(tmp_path, torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    result = run("inspect", ckpt)
    assert result.exit_code == 0, result.stderr
    assert "optimizer      torch.optim.AdamW (not Schedule-Free)" in result.stdout
    assert "note: not Schedule-Free (torch.optim.AdamW): there is no x to reconstruct" in result.stdout
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["optimizer"] == {"class": "torch.optim.AdamW", "schedule_free": False}
    assert report["groups"] == [{"index": 0, "lr": 1e-3, "weight_decay": 0.05, "params": 4}]
