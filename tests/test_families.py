"""x from every schedulefree optimizer equals the optimizer's own eval(), bit for bit."""
import pytest
import torch

import trainers
from conftest import assert_equal_tensors, read

FAMILY_OF = {"adamw-paper": "adamw"}
# heavyball rounds bfloat16 stochastically in eval(): only float32 is bit-exact there (tested below)
BIT_EXACT_ONLY_FP32 = {"heavyball-sfadamw"}


# Adam-type optimizers with eps=1e-8 underflow in pure float16 and train to NaN in a few
# steps (so eval() gives NaN too); float16 is tested with the SGD-based families.
CASES = [(f, d) for f in sorted(trainers.OPTIMIZERS) for d in (torch.float32, torch.bfloat16)
         if d == torch.float32 or f not in BIT_EXACT_ONLY_FP32] + [
    (f, torch.float16) for f in sorted(trainers.OPTIMIZERS) if f.startswith(("sgd", "wrapper", "pto-sgd", "pto-wrapper"))
]


@pytest.mark.parametrize("family,dtype", CASES, ids=str)
def test_convert_matches_eval(family, dtype, trained, run, tmp_path):
    ckpt, x, y = trained(family, dtype=dtype)
    out = tmp_path / "x.safetensors"
    args = ["convert", ckpt, out]
    if family in trainers.NEEDS_BETA:
        args += ["--beta", trainers.WRAPPER_BETA]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert_equal_tensors(read(out), x)


@pytest.mark.parametrize("family", sorted(trainers.OPTIMIZERS))
def test_family_is_detected(family, trained, run):
    ckpt, _, _ = trained(family)
    result = run("inspect", ckpt, "--json", *(["--beta", 0.75] if family in trainers.NEEDS_BETA else []))
    import json

    report = json.loads(result.stdout)
    assert report["optimizer"]["family"] == FAMILY_OF.get(family, family)


@pytest.mark.parametrize("family", ["sgd-closure", "adamw-closure", "radam-closure"])
def test_closure_variants_hold_x(family, trained, run, tmp_path):
    ckpt, x, y = trained(family)
    assert_equal_tensors(x, y)  # the library's own view: between steps params are x
    result = run("inspect", ckpt, "--json")
    assert '"params_hold": "x"' in result.stdout


def test_wrapper_without_beta_is_refused(trained, run, tmp_path):
    ckpt, _, _ = trained("wrapper")
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 2
    assert "does not save β" in result.stderr and "--beta" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_wrapper_reference_needs_no_beta(trained, run, tmp_path):
    ckpt, x, _ = trained("wrapper-reference")
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), x)


def test_saved_after_eval_is_copied_not_converted_twice(run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    opt.eval()
    x = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)


def test_params_are_override(trained, run, tmp_path):
    ckpt, x, y = trained("adamw")
    run("convert", ckpt, tmp_path / "as_x.safetensors", "--params-are", "x")
    assert_equal_tensors(read(tmp_path / "as_x.safetensors"), y)


def test_optimizer_override_and_unknown_family(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--optimizer", "adamw")
    assert result.exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)
    result = run("convert", ckpt, tmp_path / "y.safetensors", "--optimizer", "lion")
    assert result.exit_code == 2 and "unknown optimizer family 'lion'" in result.stderr


def test_frozen_group_without_z_passes_through(run, tmp_path):
    model = trainers.MLP()
    model.fc1.requires_grad_(False)
    opt = trainers.train(model, "sgd")  # fc1 is given to the optimizer but never stepped
    y = {k: v.clone() for k, v in model.state_dict().items()}
    x = trainers.eval_x(model, opt)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, x)
    assert torch.equal(got["fc1.weight"], y["fc1.weight"])


def test_heavyball_bfloat16_is_within_one_rounding(trained, run, tmp_path):
    """heavyball's eval() rounds bf16 stochastically; sfckpt rounds to nearest: at most one bf16 ulp apart."""
    ckpt, x, _ = trained("heavyball-sfadamw", dtype=torch.bfloat16)
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    for name, want in x.items():
        gap = (got[name].float() - want.float()).abs()
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
        assert bool((gap <= ulp * 1.01).all()), name
    report = run("inspect", ckpt, "--json").stdout
    assert "stochastically" in report


def test_pto_wrapper_needs_beta_and_reads_its_mode(trained, run, tmp_path):
    ckpt, x, _ = trained("pto-wrapper")
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "--beta" in result.stderr
    import json

    report = json.loads(run("inspect", ckpt, "--json", "--beta", "0.75").stdout)
    assert report["optimizer"]["library"] == "pytorch_optimizer" and report["params_hold"] == "y"
