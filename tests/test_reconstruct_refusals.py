"""Optimizer states x cannot be built from (no state, not Schedule-Free, β out of range, damaged groups,
non-finite z or x): exit 2, one `error:` line on stderr, no traceback, nothing written."""

import pytest
import torch

import trainers
from conftest import assert_clean, assert_refused, parts, refuse_conversion, save_checkpoint, saved_with


def test_no_optimizer_state(run, tmp_path, ckpt_parts):
    sd, _ = ckpt_parts
    torch.save({"model": sd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "no optimizer state")
    torch.save(sd, tmp_path / "bare.pt")
    assert_refused(run("convert", tmp_path / "bare.pt", out), out, "no optimizer state")


def test_not_schedule_free(run, tmp_path):
    model = trainers.MLP()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "c.pt", model, opt)
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "holds no Schedule-Free z", "not a Schedule-Free checkpoint")


@pytest.mark.parametrize("beta", [0.0, 1.0, float("nan"), -0.5, 1.5, "0.9"])
def test_beta_out_of_range(beta, run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    osd["param_groups"][0]["betas"] = (beta, 0.999)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "param_groups[0] betas[0]")


def test_beta_option_out_of_range(run, tmp_path, trained):
    ckpt, _, _ = trained("wrapper")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", ckpt, out, "--beta", "1"), out, "--beta", "outside (0, 1)")


def test_nonfinite_x_refused_unless_allowed(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    sd["fc1.bias"][3] = float("nan")
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "'fc1.bias' has 1 NaN/Inf", "--allow-nonfinite")
    assert run("convert", tmp_path / "c.pt", out, "--allow-nonfinite").exit_code == 0
    assert out.exists()


def test_nonfinite_z(run, tmp_path):
    sd, osd = parts()
    osd["state"][1]["z"][0] = float("inf")
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": osd}, "'fc1.bias' has", "--allow-nonfinite")


def test_damaged_groups(run, tmp_path):
    sd, osd = parts()
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": {"state": osd["state"], "param_groups": [{"lr": 1}]}}, "no 'params'")
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": {"state": {9: {}}, "param_groups": osd["param_groups"]}},
                      "entry 9 belongs to no parameter group")


def test_beta_missing_from_groups(run, tmp_path):
    sd, osd = parts()
    for g in osd["param_groups"]:
        g.pop("betas")
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": osd}, "param_groups[0] betas[0]", "--beta",
                      extra=("--optimizer", "adamw"))


@pytest.mark.parametrize("edit", [
    pytest.param(lambda sd, osd: osd["param_groups"][0].update({7: "x"}), id="int-key-in-group"),
    pytest.param(lambda sd, osd: osd["param_groups"][0].update(params=[[0], [1], [2], [3]]), id="unhashable-params"),
    pytest.param(lambda sd, osd: osd["param_groups"][0].update(param_names=[["a"], ["b"], ["c"], ["d"]]),
                 id="unhashable-param-names"),
])
def test_parameter_group_nonsense_is_clean(edit, run, tmp_path):
    """An extra int key changes nothing (success is fine); unhashable params are exit 2; never an internal error."""
    sd, osd = parts()
    edit(sd, osd)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
            else run(command, tmp_path / "c.pt")
        assert_clean(result, tmp_path / "x.safetensors", allow_success=True)
        (tmp_path / "x.safetensors").unlink(missing_ok=True)


@pytest.mark.parametrize("dtype", [
    torch.int64, torch.bool,
    torch.float8_e4m3fn,
])
def test_parameters_lerp_cannot_combine_are_copied_or_refused(dtype, run, tmp_path):
    sd, osd = parts()
    sd["fc1.bias"] = sd["fc1.bias"].to(dtype)
    osd["state"][1]["z"] = osd["state"][1]["z"].to(dtype)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert_clean(result, tmp_path / "x.safetensors", allow_success=True)


# ---- optimizer state of the wrong shape, where no family or a normaliser reads it ----------------------------

def _unknown_family_with_int_key(osd):
    for g in osd["param_groups"]:
        g.pop("betas")
        g[7] = 1.0


@pytest.mark.parametrize("change", [
    _unknown_family_with_int_key,
    lambda o: o.update(heavyball={"x": 1}, state=list(o["state"].values())),
    lambda o: o.update(heavyball={"x": 1}, state={0: {0: [1, 2]}}),
    lambda o: o.update(heavyball={"x": 1}, param_groups=5),
    lambda o: o.__setitem__("param_groups", [1, 2]),
], ids=["int-key-no-family", "heavyball-state-list", "heavyball-view-not-a-dict", "heavyball-groups-int", "groups-ints"])
def test_optimizer_state_of_the_wrong_shape_is_exit_2(change, run, tmp_path):
    path = saved_with(tmp_path, change)
    for command in ("inspect", "convert", "diff"):
        args = (command, path, tmp_path / "x") if command == "convert" else (command, path)
        assert_clean(run(*args), tmp_path / "x")


@pytest.mark.parametrize("groups", [[1, 2], [[0]], "x", [{"params": 5}]], ids=["ints", "lists", "text", "params-int"])
def test_pytorch_optimizer_wrapper_with_odd_base_groups_is_exit_2(groups, run, tmp_path):
    pytest.importorskip("pytorch_optimizer")
    model = trainers.MLP()
    opt = trainers.train(model, "pto-wrapper")
    osd = opt.state_dict()
    osd["base_optimizer"]["param_groups"] = groups
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        args = (command, tmp_path / "c.pt", tmp_path / "x") if command == "convert" else (command, tmp_path / "c.pt")
        assert_clean(run(*args), tmp_path / "x")
