"""x from every schedulefree optimizer equals the optimizer's own eval(), bit for bit."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sfckpt

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


def _prodigy_checkpoint(path, model, **kwargs):
    """Train with the real ProdigyPlusScheduleFree; returns (checkpoint path, x from its own eval(), y)."""
    from prodigyplus import ProdigyPlusScheduleFree

    torch.manual_seed(0)
    opt = ProdigyPlusScheduleFree(model.parameters() if "params" not in kwargs else kwargs.pop("params"),
                                  lr=1.0, d0=1e-3, **kwargs)
    dtype = next(model.parameters()).dtype
    for _ in range(4):
        opt.zero_grad()
        model(trainers.example_input(model).to(dtype)).float().pow(2).mean().backward()
        opt.step()
    y = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    opt.eval()
    return path, {k: v.detach().clone() for k, v in model.state_dict().items()}, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [
    {},  # the defaults: betas (0.9, 0.99), schedulefree_c=0, stochastic rounding of bfloat16 during training
    {"betas": (0.95, 0.99), "schedulefree_c": 20, "use_cautious": True, "weight_decay": 0.1, "weight_decay_by_lr": False},
    {"eps": None, "factored": False, "stochastic_rounding": False, "use_orthograd": True},
], ids=["defaults", "c20-cautious-wd", "atan2-orthograd"])
def test_prodigy_options_match_eval(options, dtype, run, tmp_path):
    """eval() lerps in the parameter's dtype whatever the training options; x must be its bits exactly."""
    ckpt, x, y = _prodigy_checkpoint(tmp_path / "c.pt", trainers.MLP().to(dtype), **options)
    assert any(not torch.equal(x[k], y[k]) for k in x)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)


def test_prodigy_groups_with_and_without_schedule_free(run, tmp_path):
    """A group with use_schedulefree=False is plain Prodigy: eval() leaves it, and so does sfckpt."""
    model = trainers.MLP()
    groups = [{"params": model.fc1.parameters()}, {"params": model.fc2.parameters(), "use_schedulefree": False}]
    ckpt, x, y = _prodigy_checkpoint(tmp_path / "c.pt", model, params=groups)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, x)
    assert torch.equal(got["fc2.weight"], y["fc2.weight"]) and not torch.equal(got["fc1.weight"], y["fc1.weight"])
    import json

    groups = json.loads(run("inspect", ckpt, "--json").stdout)["groups"]
    assert [g["params_hold"] for g in groups] == ["y", "x"]


def test_prodigy_without_schedule_free_is_refused(run, tmp_path):
    ckpt, _, _ = _prodigy_checkpoint(tmp_path / "c.pt", trainers.MLP(), use_schedulefree=False)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 2
    assert "ProdigyPlusScheduleFree" in result.stderr and "use_schedulefree=False" in result.stderr
    assert "not Schedule-Free" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def _train_plain(make, model, closure_needed=False):
    torch.manual_seed(0)
    opt = make(list(model.parameters()))
    for _ in range(3):
        inp = trainers.example_input(model).to(next(model.parameters()).dtype)  # heavyball's param_ecc makes them bf16

        def closure():
            opt.zero_grad()
            loss = model(inp).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure) if closure_needed else (closure(), opt.step())
    return opt


def _heavyball_class(name):
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return getattr(heavyball, name)


LOOKALIKES = {
    "DAdaptSGD": lambda p: __import__("pytorch_optimizer").DAdaptSGD(p, lr=1.0, momentum=0.9),
    "FTRL": lambda p: __import__("pytorch_optimizer").FTRL(p, lr=0.1),
    "SPlus": lambda p: __import__("pytorch_optimizer").SPlus(p, lr=0.01),
    "MSAMLaProp": lambda p: _heavyball_class("MSAMLaProp")(p, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(LOOKALIKES))
def test_lookalikes_are_refused_by_name(name, run, tmp_path):
    """Optimizers with a z or a train/eval switch that are not Schedule-Free: no x, and the refusal names them."""
    model = trainers.MLP()
    opt = _train_plain(LOOKALIKES[name], model)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert name in result.stderr and "not Schedule-Free" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_heavyball_sam_wrapper_around_sfadamw(run, tmp_path):
    """SAMWrapper saves {'wrapped': ..., 'ball': ...}; the wrapped SFAdamW's x is what its eval() gives."""
    SAMWrapper, SFAdamW = _heavyball_class("SAMWrapper"), _heavyball_class("SFAdamW")
    model = trainers.MLP()
    opt = _train_plain(lambda p: SAMWrapper(p, SFAdamW(p, lr=0.02, betas=(0.85, 0.99))), model, closure_needed=True)
    sd = opt.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "c.pt")
    model2 = trainers.MLP()
    params = list(model2.parameters())
    opt2 = SAMWrapper(params, SFAdamW(params, lr=0.02, betas=(0.85, 0.99)))
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(sd)
    opt2.eval()
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), model2.state_dict())


def test_heavyball_split_opt_is_refused_by_name(run, tmp_path):
    SplitOpt, SFAdamW = _heavyball_class("SplitOpt"), _heavyball_class("SFAdamW")
    model = trainers.MLP()
    opt = _train_plain(lambda p: SplitOpt([{"params": model.fc1.parameters(), "optimizer": SFAdamW, "lr": 0.02},
                                           {"params": model.fc2.parameters(), "optimizer": SFAdamW, "lr": 0.02}]), model)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "SplitOpt" in result.stderr and "Traceback" not in result.stderr


def test_heavyball_param_ecc_is_refused(run, tmp_path):
    """With param_ecc, heavyball keeps bfloat16 parameters plus a correction in its state, and eval() lerps their
    sum: converting the parameters alone would be silently wrong."""
    SFAdamW = _heavyball_class("SFAdamW")
    model = trainers.MLP()
    opt = _train_plain(lambda p: SFAdamW(p, lr=0.02, betas=(0.85, 0.99), param_ecc="bf16+16"), model)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "param_ecc" in result.stderr and "SFAdamW" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_heavyball_state_ecc_and_group_beta_match_eval(run, tmp_path):
    """ecc compresses exp_avg_sq only (z stays plain), and a group's own 'beta' is the β1 heavyball's eval() uses."""
    SFAdamW = _heavyball_class("SFAdamW")
    model = trainers.MLP()
    groups = [{"params": model.fc1.parameters(), "beta": 0.7}, {"params": model.fc2.parameters()}]
    opt = _train_plain(lambda p: SFAdamW(groups, lr=0.02, betas=(0.9, 0.99), ecc="bf16+8"), model)
    sd = opt.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": sd}, tmp_path / "c.pt")
    opt.eval()
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), model.state_dict())


def test_unknown_schedule_free_state_names_what_was_found(run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    osd = opt.state_dict()
    for g in osd["param_groups"]:
        g.pop("train_mode"), g.pop("weight_lr_power"), g.pop("weight_sum")
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "has a z but matches no known Schedule-Free family" in result.stderr
    assert "--optimizer" in result.stderr and "--beta" in result.stderr and "--params-are" in result.stderr


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


@settings(max_examples=int(os.environ.get("SFCKPT_PROPERTY_EXAMPLES", "40")), deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    beta=st.floats(0.01, 0.999),
    seed=st.integers(0, 2**16),
)
def test_property_reconstruction_is_eval(shape, dtype, beta, seed, tmp_path_factory):
    import schedulefree

    tmp = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g).to(dtype)
    # z a step away from x, as training leaves it (a z drawn independently of x is refused: it belongs
    # to another tensor, docs/mapping.md)
    z = (x0.float() + 0.5 * torch.randn(shape, generator=g)).to(dtype)
    p = torch.nn.Parameter(x0.clone())
    opt = schedulefree.SGDScheduleFree([p], momentum=beta)
    opt.state[p]["z"] = z.clone()
    opt.train()  # the library's own train(): p becomes y = lerp(x, z, 1 - β)
    torch.save({"model": {"w": p.detach()}, "optimizer": opt.state_dict()}, tmp / "y.pt")
    opt.eval()  # the library's own eval(): the reference x
    expected = p.detach().clone()
    got = sfckpt.reconstruct(sfckpt.load(tmp / "y.pt")).state_dict()["w"]
    assert torch.equal(_bits(got), _bits(expected))
    torch.save({"model": {"w": p.detach()}, "optimizer": opt.state_dict()}, tmp / "x.pt")
    again = sfckpt.reconstruct(sfckpt.load(tmp / "x.pt")).state_dict()["w"]
    assert torch.equal(_bits(again), _bits(expected))  # holding x already: nothing changes
