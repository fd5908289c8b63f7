"""inspect: what the checkpoint holds, from metadata alone."""
import json
import subprocess
import sys

from sfckpt.readers.torch_file import TorchArchive

import trainers
from conftest import FIXTURES


def test_inspect_json_report(trained, run):
    ckpt, _, _ = trained("adamw", model=trainers.ConvBN())
    result = run("inspect", ckpt, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    r = json.loads(result.stdout)
    assert r["version"] == 1
    assert r["container"] == "torch.save"
    assert r["optimizer"]["family"] == "adamw"
    assert r["params_hold"] == "y"
    g = r["groups"][0]
    assert (g["beta"], g["lr"], g["step"], g["train_mode"], g["params_hold"]) == (0.85, 0.02, 4, True, "y")
    assert r["mapping"]["entries_with_z"] == 6 and r["mapping"]["tensors_converted"] == 6
    assert r["tensors"]["by_dtype"]["int64"]["tensors"] == 1
    assert r["nonfinite"] is None


def test_inspect_reads_no_tensor_data(trained, run, monkeypatch):
    ckpt, _, _ = trained("adamw")

    def forbidden(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(TorchArchive, "read_elements", forbidden)
    result = run("inspect", ckpt)
    assert result.exit_code == 0, result.stderr
    assert "adamw" in result.stdout and "not scanned" in result.stdout


def test_inspect_scan_counts_nonfinite(run, tmp_path):
    import torch

    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    sd = model.state_dict()
    sd["fc2.bias"][0] = float("inf")
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    r = json.loads(run("inspect", tmp_path / "c.pt", "--json", "--scan").stdout)
    assert r["nonfinite"]["tensors"] == {"fc2.bias": {"weights": 1, "z": 0, "x": 1}}
    table = run("inspect", tmp_path / "c.pt", "--scan").stdout
    assert "fc2.bias" in table


def test_inspect_table_on_fixture(run):
    result = run("inspect", FIXTURES / "adamw_mlp_after_eval.pt")
    assert result.exit_code == 0
    assert "parameters hold   x" in result.stdout


def test_python_m_and_help_without_torch():
    code = "import sys, runpy; sys.argv=['sfckpt','--help']; runpy.run_module('sfckpt', run_name='__main__')"
    check = subprocess.run([sys.executable, "-c", code + "\n"], capture_output=True, text=True)
    assert check.returncode == 0 and "convert" in check.stdout
    probe = ("import sys\nfrom click.testing import CliRunner\nfrom sfckpt.cli import main\n"
             "r = CliRunner().invoke(main, ['convert', '--help'])\nassert r.exit_code == 0\n"
             "assert 'torch' not in sys.modules, 'help imported torch'\n")
    check = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
