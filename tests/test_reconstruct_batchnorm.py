"""convert --bn-calib: BatchNorm statistics re-estimated at x, as update_bn on the model after eval()."""
import copy
import json
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

import trainers
from conftest import read, save_checkpoint

MODEL_FILE = """
import sys

import torch

sys.path.insert(0, {tests!r})
from trainers import ConvBN  # the architecture the checkpoint was trained with


def build():
    return ConvBN()


def not_a_module():
    return 42


def loader():
    torch.manual_seed(5)
    data = torch.randn(40, 3, 5, 5)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, torch.zeros(40)), batch_size=8)
"""


@pytest.fixture
def bn_setup(tmp_path):
    torch.manual_seed(0)
    model = trainers.ConvBN()
    opt = trainers.train(model, "sgd", steps=6)
    ckpt = save_checkpoint(tmp_path / "c.pt", model, opt)
    torch.manual_seed(5)
    data = torch.randn(40, 3, 5, 5)
    torch.save(data, tmp_path / "calib.pt")
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    # The reference: the optimizer's own eval(), then update_bn on the same batches.
    ref_model, ref_opt = copy.deepcopy((model, opt))
    ref_opt.eval()
    x = {k: v.clone() for k, v in ref_model.state_dict().items()}
    update_bn(DataLoader(TensorDataset(data), batch_size=8), ref_model)
    return ckpt, x, ref_model.state_dict(), tmp_path


def test_bn_calib_equals_update_bn_after_eval(bn_setup, run):
    ckpt, x, expected, tmp = bn_setup
    out = tmp / "x.safetensors"
    result = run("convert", ckpt, out, "--bn-calib", tmp / "calib.pt", "--model", f"{tmp / 'model_def.py'}:build",
                 "--bn-batch-size", 8)
    assert result.exit_code == 0, result.stderr
    assert "bn" in result.stdout and "running_mean" in result.stdout
    got = read(out)
    for name in ("bn.running_mean", "bn.running_var"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[name], x[name])
    assert got["bn.num_batches_tracked"].item() == expected["bn.num_batches_tracked"].item() == 5
    for name in x:
        if not name.startswith("bn.running") and name != "bn.num_batches_tracked":
            assert torch.equal(got[name], x[name]), name  # everything else is x, bit for bit
    assert "BatchNorm statistics" not in result.stderr  # no stale-statistics warning


def test_bn_calib_json_report_and_loader_spec(bn_setup, run, monkeypatch):
    ckpt, _, expected, tmp = bn_setup
    monkeypatch.syspath_prepend(str(tmp))
    out = tmp / "x.safetensors"
    result = run("convert", ckpt, out, "--bn-calib", "model_def:loader", "--model", "model_def:build", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (layer,) = report["batchnorm"]
    assert layer["layer"] == "bn" and layer["mean_max_abs"] > 0
    torch.testing.assert_close(read(out)["bn.running_var"], expected["bn.running_var"], rtol=1e-6, atol=1e-7)


def test_bn_batches_limit(bn_setup, run):
    ckpt, _, _, tmp = bn_setup
    out = tmp / "x.safetensors"
    assert run("convert", ckpt, out, "--bn-calib", tmp / "calib.pt", "--model", f"{tmp / 'model_def.py'}:build",
               "--bn-batch-size", 8, "--bn-batches", 2).exit_code == 0
    assert read(out)["bn.num_batches_tracked"].item() == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "MODEL:build"], "go together"),
        (["--bn-calib", "CALIB", "--model", "nowhere.py:build"], "does not exist"),
        (["--bn-calib", "CALIB", "--model", "MODEL:nothing"], "has no 'nothing'"),
        (["--bn-calib", "CALIB", "--model", "MODEL:not_a_module"], "not a torch.nn.Module"),
        (["--bn-calib", "CALIB", "--model", "trainers:MLP"], "does not match the checkpoint"),
        (["--bn-calib", "BADSHAPE", "--model", "MODEL:build"], "forward pass failed"),
        (["--bn-calib", "missing.pt", "--model", "MODEL:build"], "does not exist"),
    ],
)
def test_bn_calib_bad_input(args, message, bn_setup, run):
    ckpt, _, _, tmp = bn_setup
    torch.save(torch.randn(4, 7), tmp / "bad.pt")
    subst = {"MODEL": str(tmp / "model_def.py"), "CALIB": str(tmp / "calib.pt"), "BADSHAPE": str(tmp / "bad.pt")}
    args = [subst.get(a, a) if ":" not in a else a.replace("MODEL", subst["MODEL"]) for a in args]
    out = tmp / "x.safetensors"
    result = run("convert", ckpt, out, *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    assert not out.exists()


def test_warns_without_calibration(bn_setup, run):
    ckpt, _, _, tmp = bn_setup
    result = run("convert", ckpt, tmp / "x.safetensors")
    assert "BatchNorm" in result.stderr and "re-estimate" in result.stderr
