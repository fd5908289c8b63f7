"""Checkpoint layouts people use, and the parameter <-> optimizer-state mapping."""
import json

import pytest
import schedulefree
import torch

import trainers
from conftest import assert_equal_tensors, read, save_checkpoint


@pytest.mark.parametrize(
    "layout",
    ["model/optimizer", "state_dict/optimizer_state_dict", "model_state_dict/optimizer_state_dict", "module/optim", "net/opt"],
)
def test_common_layouts(layout, trained, run, tmp_path):
    ckpt, x, _ = trained("adamw", layout=layout, epoch=3, best_acc=0.5)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["keys"]["model"] == layout.split("/")[0]
    assert report["keys"]["optimizer"] == layout.split("/")[1]


def test_lightning_layout_keeps_or_strips_prefix(trained, run, tmp_path):
    ckpt, x, _ = trained("sgd", layout="lightning")
    assert run("convert", ckpt, tmp_path / "kept.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "kept.safetensors"), {f"model.{k}": v for k, v in x.items()})
    assert run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning"
    assert report["keys"]["optimizer"] == "optimizer_states.0"
    assert "--strip-prefix model." in report["hints"][0]
    assert "hint: every tensor name starts with 'model.'" in run("inspect", ckpt).stdout


def test_model_and_optimizer_keys_can_be_chosen(run, tmp_path):
    model, other = trainers.MLP(), trainers.MLP(width=4)
    opt = trainers.train(model, "adamw")
    other_opt = trainers.train(other, "sgd")
    torch.save({"model": other.state_dict(), "student": model.state_dict(), "optimizer": other_opt.state_dict(),
                "student_opt": opt.state_dict()}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "c.pt", out, "--model-key", "student", "--optimizer-key", "student_opt")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), trainers.eval_x(model, opt))
    result = run("convert", tmp_path / "c.pt", tmp_path / "y.safetensors", "--model-key", "nope")
    assert result.exit_code == 2 and "no entry 'nope'" in result.stderr


def test_tied_weights_are_written_under_both_names(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw", model=trainers.TiedLM())
    assert torch.equal(x["head.weight"], x["embed.weight"])
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, x)
    model = trainers.TiedLM()
    model.load_state_dict(got)  # strict
    assert model.head.weight is model.embed.weight


def _groups_out_of_model_order(model):
    return [
        {"params": list(model.fc2.parameters()), "betas": (0.8, 0.999)},
        {"params": list(model.fc1.parameters()), "betas": (0.9, 0.999)},
    ]


def test_several_groups_in_model_order(run, tmp_path):
    model = trainers.MLP()
    groups = [{"params": list(model.fc1.parameters()), "betas": (0.9, 0.999)},
              {"params": list(model.fc2.parameters()), "betas": (0.7, 0.999), "weight_decay": 0.1}]
    opt = trainers.train(model, "adamw", param_groups=groups)
    save_checkpoint(tmp_path / "c.pt", model, opt)
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))
    report = json.loads(run("inspect", tmp_path / "c.pt", "--json").stdout)
    assert [g["beta"] for g in report["groups"]] == [0.9, 0.7]


def test_groups_out_of_model_order_are_matched_by_content(run, tmp_path):
    """Head-first groups: the optimizer's order is not the model's; z content says which tensor is which."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", param_groups=_groups_out_of_model_order(model))
    save_checkpoint(tmp_path / "c.pt", model, opt)
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "c.pt", out)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), trainers.eval_x(model, opt))
    report = json.loads(run("inspect", tmp_path / "c.pt", "--json").stdout)
    assert report["mapping"]["confirmed_by_content"] >= 3  # fc2.bias has 4 elements: too few to tell by content
    assert report["mapping"]["untrained_parameters"] == []


def test_param_order_file_is_checked_against_content(run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", param_groups=_groups_out_of_model_order(model))
    save_checkpoint(tmp_path / "c.pt", model, opt)
    out = tmp_path / "x.safetensors"
    order = tmp_path / "order.txt"
    order.write_text("fc2.weight\nfc2.bias\nfc1.weight\nfc1.bias\n")
    result = run("convert", tmp_path / "c.pt", out, "--param-order", order)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), trainers.eval_x(model, opt))
    out.unlink()
    order.write_text("fc1.weight\nfc1.bias\nfc2.weight\nfc2.bias\n")
    result = run("convert", tmp_path / "c.pt", out, "--param-order", order)
    assert result.exit_code == 2 and "--param-order" in result.stderr
    assert not out.exists()


def test_named_optimizer_param_names_are_used(run, tmp_path):
    model = trainers.MLP()
    named = dict(model.named_parameters())
    groups = [
        {"params": [named["fc2.weight"], named["fc2.bias"]], "param_names": ["fc2.weight", "fc2.bias"], "betas": (0.8, 0.999)},
        {"params": [named["fc1.weight"], named["fc1.bias"]], "param_names": ["fc1.weight", "fc1.bias"]},
    ]
    opt = trainers.train(model, "adamw", param_groups=groups)
    assert "param_names" in opt.state_dict()["param_groups"][0]
    save_checkpoint(tmp_path / "c.pt", model, opt)
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))
    assert json.loads(run("inspect", tmp_path / "c.pt", "--json").stdout)["mapping"]["evidence"] == {"names": 4}


def test_frozen_parameters_not_given_to_optimizer_are_skipped_when_unambiguous(run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "sgd", param_groups=list(model.fc2.parameters()))
    save_checkpoint(tmp_path / "c.pt", model, opt)
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


def test_frozen_layer_told_apart_by_content(run, tmp_path):
    """Only the second of two same-shape layers is trained: its z lies next to its own weights."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = schedulefree.SGDScheduleFree(model[1].parameters(), lr=0.1)
    opt.train()
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))
    report = json.loads(run("convert", tmp_path / "c.pt", tmp_path / "x2.safetensors", "--json").stdout)
    assert report["untrained_parameters"] == ["0.weight", "0.bias"]


def test_ambiguous_alignment_is_refused(run, tmp_path):
    """A frozen copy of the trained layer's starting weights: content cannot tell which one was trained."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].load_state_dict(model[1].state_dict())
    model[0].requires_grad_(False)
    opt = schedulefree.SGDScheduleFree(model[1].parameters(), lr=0.1)
    opt.train()
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2, result.stderr
    assert "cannot tell which tensor" in result.stderr and "--param-order" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    order = tmp_path / "order.txt"
    order.write_text("1.weight\n1.bias\n")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors", "--param-order", order)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


def test_batchnorm_buffers_are_copied_and_flagged(trained, run, tmp_path):
    ckpt, x, y = trained("sgd", model=trainers.ConvBN())
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0
    assert "BatchNorm" in result.stderr
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, x)
    for name in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(got[name], y[name])
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["batchnorm"] == {"buffers": ["bn.running_mean", "bn.running_var"], "layers": 1}
    assert any("BatchNorm" in w for w in report["warnings"])
