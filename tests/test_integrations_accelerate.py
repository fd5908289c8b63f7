"""Accelerate: a real single-process loop, `save_and_release` after a few steps: the release equals the
optimizer's own eval() at that step (on copies), and training goes on from unchanged objects."""
import copy

import pytest
import schedulefree
import torch
from safetensors import safe_open

import trainers
from conftest import assert_equal_tensors, read

accelerate = pytest.importorskip("accelerate")
from sfckpt.integrations.accelerate import save_and_release  # noqa: E402


def _loop(tmp_path, release: bool):
    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    net = trainers.TiedLM()
    model, opt = acc.prepare(net, schedulefree.AdamWScheduleFree(net.parameters(), lr=0.02, betas=(0.85, 0.999)))
    opt.train()
    expected = {}
    for step in range(1, 7):
        opt.zero_grad()
        acc.backward(model(trainers.example_input(model)).float().pow(2).mean())
        opt.step()
        if step % 3 == 0 and release:
            twin, twin_opt = copy.deepcopy((model, opt.optimizer))
            twin_opt.eval()
            expected[step] = {k: v.detach().clone() for k, v in twin.state_dict().items()}
            save_and_release(acc, tmp_path / f"state_{step}", tmp_path / f"x_{step}.safetensors", step=step)
    return model, expected


def test_save_and_release_in_an_accelerate_loop_is_eval_x(tmp_path):
    model, expected = _loop(tmp_path, release=True)
    for step, x in expected.items():
        got = read(tmp_path / f"x_{step}.safetensors")
        del x["head.weight"]  # Accelerate's model.safetensors keeps one name per shared tensor
        assert_equal_tensors(got, x)
        with safe_open(str(tmp_path / f"x_{step}.safetensors"), "pt") as f:
            assert f.metadata()["sfckpt_checkpoint"] == f"state_{step}"
            assert f.metadata()["sfckpt_training_step"] == str(step)
    plain_model, _ = _loop(tmp_path / "plain", release=False)
    assert_equal_tensors(model.state_dict(), plain_model.state_dict())
