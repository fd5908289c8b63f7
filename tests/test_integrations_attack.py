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


def _dcp_save(folder, seed):
    import torch.distributed.checkpoint as dcp

    model = trainers.MLP()
    opt = trainers.train(model, "adamw", seed=seed)
    dcp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_id=folder)


def test_watch_waits_while_a_dcp_folder_is_overwritten_under_its_old_metadata(tmp_path):
    """DCP writes into an existing folder (Lightning's sharded last.ckpt/) and renames `.metadata` in last:
    until then the old `.metadata` describes shards that are being replaced."""
    from sfckpt import watch

    _dcp_save(tmp_path / "last", seed=0)
    _dcp_save(tmp_path / "next", seed=1)
    assert watch.save_complete(tmp_path / "last")
    for shard in (tmp_path / "next").glob("*.distcp"):  # the new save's shard lands; its .metadata not yet
        (tmp_path / "last" / shard.name).write_bytes(shard.read_bytes())
    assert watch.save_complete(tmp_path / "last") is False
