"""Accelerate `save_state(dir)` folders, made by the real Accelerator on one CPU process.

x is what the optimizer's own eval() gives (through Accelerate's AcceleratedOptimizer),
compared by torch.equal.
"""
import json

import pytest
import schedulefree
import torch

import trainers
from conftest import assert_equal_tensors, read

accelerate = pytest.importorskip("accelerate")


def _train_and_save(folder, pairs, safe_serialization=True, steps=4):
    """prepare() every (model, optimizer) pair, train each a few steps, save_state; x of each pair from eval()."""
    acc = accelerate.Accelerator(cpu=True)
    flat = acc.prepare(*[obj for pair in pairs for obj in pair])
    prepared = list(zip(flat[::2], flat[1::2]))
    for model, opt in prepared:
        opt.train()
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            acc.backward(model(trainers.example_input(model)).float().pow(2).mean())
            opt.step()
    acc.save_state(str(folder), safe_serialization=safe_serialization)
    xs = []
    for model, opt in prepared:
        opt.eval()
        xs.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return xs


def _param_order(path, model):
    """What docs/mapping.md tells users to write when the weights file keeps no order: the names in optimizer order."""
    path.write_text("\n".join(name for name, _ in model.named_parameters()) + "\n")
    return path


def _adamw(model):
    return model, schedulefree.AdamWScheduleFree(model.parameters(), lr=0.02, betas=(0.85, 0.999), weight_decay=0.01)


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("model_cls", [trainers.MLP, trainers.TiedLM, trainers.ConvBN], ids=lambda c: c.__name__)
def test_save_state_converts_to_eval_x(model_cls, safe_serialization, run, tmp_path):
    """pytorch_model.bin keeps the model's order; model.safetensors lists names sorted and Accelerate saves no
    other trace of the order, so there the user gives it (--param-order) unless content tells every tensor apart."""
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = model_cls()
    (x,) = _train_and_save(folder, [_adamw(model)], safe_serialization)
    names = sorted(p.name for p in folder.iterdir())
    assert ("model.safetensors" if safe_serialization else "pytorch_model.bin") in names and "optimizer.bin" in names
    out = tmp_path / "x.safetensors"
    order = ["--param-order", _param_order(tmp_path / "order.txt", model)] if safe_serialization else []
    result = run("convert", folder, out, *order)
    assert result.exit_code == 0, result.stderr
    got = read(out)
    if model_cls is trainers.TiedLM and safe_serialization:
        # Accelerate drops the tied duplicate from model.safetensors; from_pretrained-style loading re-ties it
        assert "head.weight" not in got and torch.equal(got["embed.weight"], x["head.weight"])
        x.pop("head.weight")
    assert_equal_tensors(got, x)


@pytest.mark.parametrize("model_cls", [trainers.MLP, trainers.TiedLM, trainers.ConvBN], ids=lambda c: c.__name__)
def test_safetensors_without_order_is_x_or_refused(model_cls, run, tmp_path):
    """Without the order, sfckpt converts only what shapes and content decide, and otherwise refuses
    pointing at --param-order: never weights matched to the wrong optimizer entries."""
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    (x,) = _train_and_save(folder, [_adamw(model_cls())])
    out = tmp_path / "x.safetensors"
    result = run("convert", folder, out)
    if result.exit_code == 0:
        got = read(out)
        assert_equal_tensors(got, {k: x[k] for k in got})
    else:
        assert result.exit_code == 2 and "--param-order" in result.stderr and not out.exists()


def test_two_models_and_optimizers(run, tmp_path):
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    adamw, sgd = trainers.MLP(), trainers.ConvBN()
    x0, x1 = _train_and_save(
        folder, [_adamw(adamw), (sgd, schedulefree.SGDScheduleFree(sgd.parameters(), lr=0.5))], safe_serialization=False)
    assert {"pytorch_model_1.bin", "optimizer_1.bin"} <= {p.name for p in folder.iterdir()}

    report = json.loads(run("inspect", folder, "--json").stdout)
    assert report["container"] == "accelerate"
    assert json.dumps(report).count("model_1") >= 1 and json.dumps(report).count("optimizer_1") >= 1
    text = run("inspect", folder).stdout
    assert "accelerate" in text and "model_1" in text and "optimizer_1" in text

    assert run("convert", folder, tmp_path / "x0.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x0.safetensors"), x0)
    result = run("convert", folder, tmp_path / "x1.safetensors", "--model-key", "model_1", "--optimizer-key", "optimizer_1")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x1.safetensors"), x1)


def test_two_models_in_safetensors_with_param_order(run, tmp_path):
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    first, second = trainers.MLP(), trainers.TiedLM()
    _, x1 = _train_and_save(folder, [_adamw(first), _adamw(second)])
    result = run("convert", folder, tmp_path / "x1.safetensors", "--model-key", "model_1", "--optimizer-key", "optimizer_1",
                 "--param-order", _param_order(tmp_path / "order.txt", second))
    assert result.exit_code == 0, result.stderr
    got = read(tmp_path / "x1.safetensors")
    x1.pop("head.weight")  # the tied duplicate Accelerate leaves out of model_1.safetensors
    assert_equal_tensors(got, x1)


def test_random_states_pickle_is_never_read(run, tmp_path):
    """random_states_0.pkl is plain pickle; sfckpt needs nothing from it and must not unpickle it."""
    folder = tmp_path / "ckpt"
    (x,) = _train_and_save(folder, [_adamw(trainers.MLP())], safe_serialization=False)
    (folder / "random_states_0.pkl").write_bytes(b"\x80\x04not a pickle sfckpt may open")
    (folder / "scheduler.bin").write_bytes(b"garbage")
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)


def test_diff_and_check_read_the_folder_as_x(run, tmp_path):
    folder = tmp_path / "ckpt"
    _train_and_save(folder, [_adamw(trainers.MLP())], safe_serialization=False)
    assert run("convert", folder, tmp_path / "x.safetensors").exit_code == 0
    assert run("check", tmp_path / "x.safetensors", "--ckpt", folder).exit_code == 0
    assert run("convert", folder, tmp_path / "x.safetensors", "--params-are", "x", "--force").exit_code == 0  # y, as saved
    result = run("check", tmp_path / "x.safetensors", "--ckpt", folder)
    assert result.exit_code == 1 and "y" in result.stdout + result.stderr
    assert run("diff", folder).exit_code == 0


def test_folder_without_model_weights_is_refused(run, tmp_path):
    folder = tmp_path / "ckpt"
    _train_and_save(folder, [_adamw(trainers.MLP())])
    (folder / "model.safetensors").unlink()
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "Accelerate" in result.stderr and "model.safetensors" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prodigy_plus_schedule_free_through_accelerate(dtype, run, tmp_path):
    """What diffusion fine-tuning scripts (kohya's sd-scripts) save: Accelerate's save_state of a model trained
    with ProdigyPlusScheduleFree, often in bfloat16."""
    prodigyplus = pytest.importorskip("prodigyplus")
    folder = tmp_path / "ckpt"
    torch.manual_seed(0)
    model = trainers.ConvBN().to(dtype)
    opt = prodigyplus.ProdigyPlusScheduleFree(model.parameters(), lr=1.0, d0=1e-3)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    opt.train()
    for _ in range(4):
        opt.zero_grad()
        acc.backward(model(trainers.example_input(model).to(dtype)).float().pow(2).mean())
        opt.step()
    acc.save_state(str(folder), safe_serialization=False)
    opt.eval()
    x = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), x)
    report = json.loads(run("inspect", folder, "--json").stdout)
    assert report["container"] == "accelerate" and report["optimizer"]["family"] == "prodigy-plus-sf"


def test_empty_fsdp_folders_are_refused(run, tmp_path):
    """An interrupted sharded save (pytorch_model_fsdp_0/ without DCP's .metadata) is named as incomplete.
    Complete FSDP folders are tested in tests/test_readers_fsdp_frameworks.py."""
    folder = tmp_path / "ckpt"
    _train_and_save(folder, [_adamw(trainers.MLP())], safe_serialization=False)
    for name in ("pytorch_model.bin", "optimizer.bin"):
        (folder / name).unlink()
    (folder / "pytorch_model_fsdp_0").mkdir()
    (folder / "optimizer_0").mkdir()
    result = run("convert", folder, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "no .metadata, so not a complete" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "x.safetensors").exists()
