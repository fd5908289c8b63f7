"""Setups the integrations' own tests do not build: each one once made a release, a watch or a
training run go wrong, and stays fixed here."""
import torch

import sfckpt
import trainers
from conftest import assert_equal_tensors, read


def test_release_with_pytorch_optimizers_schedule_free_wrapper_is_eval_x(tmp_path):
    """Its state_dict() nests the inner optimizer's groups under base_optimizer (no top-level param_groups)."""
    model = trainers.MLP()
    opt = trainers.train(model, "pto-wrapper")
    expected = trainers.eval_x(model, opt)
    sfckpt.release(model, opt, tmp_path / "x.safetensors", beta=trainers.WRAPPER_BETA)
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)


def test_release_of_a_compiled_model_has_the_plain_names(tmp_path):
    """torch.compile's wrapper names every parameter `_orig_mod.…`, which the plain model does not load."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    expected = trainers.eval_x(model, opt)
    sfckpt.release(torch.compile(model), opt, tmp_path / "x.safetensors")
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)
