"""Optimizer states that do not fit the weights: refused with the entry and the tensors named, or, where
saved names cannot be right, matched without them."""
import torch

import trainers
from conftest import assert_refused, parts, read, refuse_conversion


def test_more_entries_than_parameters(run, tmp_path):
    sd, osd = parts()
    sd.pop("fc2.bias")
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": osd}, "entry 3 (group 0) has z of shape (4)",
                      "no parameter of that shape")


def _converts_as_without_names(run, tmp_path, sd, osd, warning):
    """Saved names that cannot be right are not used: the entries are matched by content, with a warning."""
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "named.pt")
    result = run("convert", tmp_path / "named.pt", tmp_path / "named.safetensors")
    assert result.exit_code == 0, result.stderr
    assert warning in result.stderr and "not used" in result.stderr
    for g in osd["param_groups"]:
        g.pop("param_names", None)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "plain.pt")
    assert run("convert", tmp_path / "plain.pt", tmp_path / "plain.safetensors").exit_code == 0
    got, want = read(tmp_path / "named.safetensors"), read(tmp_path / "plain.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_param_names_naming_missing_tensors(run, tmp_path):
    sd, osd = parts()
    osd["param_groups"][0]["param_names"] = ["fc1.weight", "fc1.bias", "fc2.weight", "nope.bias"]
    _converts_as_without_names(run, tmp_path, sd, osd, "named 'nope.bias' but the model has no such tensor")


def test_duplicate_names(run, tmp_path):
    sd, osd = parts()
    osd["param_groups"][0]["param_names"] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc1.bias"]
    _converts_as_without_names(run, tmp_path, sd, osd, "two entries are named 'fc1.bias'")
    osd["param_groups"][0]["params"] = [0, 1, 2, 2]
    refuse_conversion(run, tmp_path, {"model": sd, "optimizer": osd}, "entry 2 is listed twice")


def test_z_shape_or_dtype_disagrees(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    osd["state"][2]["z"] = torch.zeros(3, 3)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out,
                   "optimizer entry 2 (group 0) has z of shape (3, 3) but the model has no parameter of that shape")
    osd["state"][2]["z"] = torch.zeros(4, 16, dtype=torch.float64)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "entry 2 (group 0) has z of dtype float64")


def test_optimizer_of_another_model(run, tmp_path, ckpt_parts):
    sd, _ = ckpt_parts
    other = trainers.train(trainers.MLP(width=5), "adamw").state_dict()
    torch.save({"model": sd, "optimizer": other}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "c.pt", out), out, "optimizer entry 0", "does not belong to this model")
