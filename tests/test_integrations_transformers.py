"""The Hugging Face Trainer callback, with the real Trainer on one CPU process: every release is the x
the optimizer's own eval() gives at that step (captured on deep copies in the same run), loads with
from_pretrained, and the run itself is bit-identical to a run without the callback."""
import copy
import json

import pytest
import torch
from safetensors import safe_open

from conftest import assert_equal_tensors, read

transformers = pytest.importorskip("transformers")
from sfckpt.integrations.transformers import SfckptCallback  # noqa: E402


class CaptureX(transformers.TrainerCallback):
    """x at every save, from eval() on deep copies of the model and the optimizer (the run is not disturbed)."""

    def __init__(self):
        self.x = {}

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        twin, twin_opt = copy.deepcopy((model, optimizer.optimizer))
        twin_opt.eval()
        self.x[state.global_step] = {k: v.detach().clone() for k, v in twin.state_dict().items()}


def _model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config)


def _train(out, callbacks, max_steps=6, **args):
    model = _model()
    data = [{"input_ids": torch.randint(0, 48, (8,)), "labels": torch.randint(0, 48, (8,))} for _ in range(16)]
    settings = dict(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                    per_device_train_batch_size=4, max_steps=max_steps, save_steps=2, report_to=[], use_cpu=True,
                    logging_steps=100, lr_scheduler_type="constant", seed=0, data_seed=0)
    settings.update(args)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings), train_dataset=data,
                                   callbacks=callbacks)
    trainer.train()
    return trainer


def _without_tie(x):
    return {k: v for k, v in x.items() if k != "lm_head.weight"}  # one name per shared tensor, as from_pretrained saves


@pytest.mark.parametrize("background", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["in-process", "child-process"])
def test_every_save_gets_its_x_release(tmp_path, background):
    capture = CaptureX()
    _train(tmp_path / "run", [capture, SfckptCallback(background=background)], save_total_limit=2)
    releases = tmp_path / "run" / "sfckpt-x"
    assert sorted(p.name for p in releases.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "final"]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    for step, x in capture.x.items():
        got = read(releases / f"checkpoint-{step}" / "model.safetensors")
        assert_equal_tensors(got, _without_tie(x))
        loaded = transformers.LlamaForCausalLM.from_pretrained(releases / f"checkpoint-{step}")
        assert_equal_tensors(loaded.state_dict(), x)
    # from the live model: both names of the tied tensor, as its state_dict has them
    assert_equal_tensors(read(releases / "final" / "model.safetensors"), capture.x[6])


def test_releases_record_the_checkpoint_name_and_step_not_a_path(tmp_path):
    _train(tmp_path / "run", [SfckptCallback()], max_steps=2)
    with safe_open(str(tmp_path / "run" / "sfckpt-x" / "checkpoint-2" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["sfckpt_checkpoint"] == "checkpoint-2" and meta["sfckpt_training_step"] == "2"
    assert str(tmp_path) not in json.dumps(meta)


def test_keep_last_keeps_the_latest_releases(tmp_path):
    _train(tmp_path / "run", [SfckptCallback(tmp_path / "releases", keep_last=1)])
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["checkpoint-6", "final"]


def _global_state():
    return (torch.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(), torch.get_default_device())


def test_the_run_is_bit_identical_with_and_without_the_callback(tmp_path):
    plain = _train(tmp_path / "plain", [])
    state_plain = _global_state()
    with_callback = _train(tmp_path / "with", [SfckptCallback()])
    state_with = _global_state()
    assert (tmp_path / "with" / "sfckpt-x" / "final" / "model.safetensors").is_file()
    assert torch.equal(state_plain[0], state_with[0]) and state_plain[1:] == state_with[1:]
    assert_equal_tensors({k: v.detach() for k, v in with_callback.model.state_dict().items()},
                         {k: v.detach() for k, v in plain.model.state_dict().items()})
    for step in (2, 4, 6):  # what the Trainer saved, too
        assert_equal_tensors(read(tmp_path / "with" / f"checkpoint-{step}" / "model.safetensors"),
                             read(tmp_path / "plain" / f"checkpoint-{step}" / "model.safetensors"))


def test_final_release_after_load_best_model_at_end_is_the_best_checkpoints_x(tmp_path):
    """The model then holds the best checkpoint's weights, not those the optimizer's z belongs to."""
    capture = CaptureX()
    data = [{"input_ids": torch.randint(0, 48, (8,)), "labels": torch.randint(0, 48, (8,))} for _ in range(4)]
    model = _model()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), optim="schedule_free_adamw",
                                          learning_rate=1e-2, per_device_train_batch_size=4, max_steps=6, save_steps=2,
                                          eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                          report_to=[], use_cpu=True, logging_steps=100, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data * 4, eval_dataset=data,
                                   callbacks=[capture, SfckptCallback()])
    trainer.train()
    best = int(trainer.state.best_model_checkpoint.rsplit("-", 1)[-1])
    final = tmp_path / "run" / "sfckpt-x" / "final" / "model.safetensors"
    assert_equal_tensors(read(final), read(tmp_path / "run" / "sfckpt-x" / f"checkpoint-{best}" / "model.safetensors"))


def test_a_failed_conversion_is_reported_not_fatal_unless_strict(tmp_path):
    """AdamW without Schedule-Free has no x: each release fails, training goes on (or stops, with strict)."""
    with pytest.warns(RuntimeWarning, match="no x release for checkpoint-2: .*Schedule-Free z"):
        trainer = _train(tmp_path / "run", [SfckptCallback()], max_steps=2, optim="adamw_torch")
    assert trainer.state.global_step == 2 and not (tmp_path / "run" / "sfckpt-x" / "checkpoint-2").exists()
    with pytest.raises(Exception, match="Schedule-Free z") as failure:
        _train(tmp_path / "strict", [SfckptCallback(strict=True)], max_steps=2, optim="adamw_torch")
    assert type(failure.value).__name__ == "ConversionFailed"


@pytest.mark.slow
def test_a_background_conversion_killed_midway_leaves_no_release(tmp_path):
    """The child is killed while it writes (its staging folder exists): nothing appears under the final name."""
    import os
    import signal
    import time

    import schedulefree

    from sfckpt.integrations.jobs import Converter

    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048)
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01)
    opt.train()
    model(torch.randn(2, 2048)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "step_1.pt")
    releases = tmp_path / "releases"
    releases.mkdir()
    converter = Converter(background=True)
    converter.submit(tmp_path / "step_1.pt", releases / "step_1", {})
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".sfckpt-tmp") for p in releases.iterdir()):
        assert time.monotonic() < deadline and converter._child.poll() is None, "the child finished before it was killed"
        time.sleep(0.002)
    os.kill(converter._child.pid, signal.SIGKILL)
    with pytest.warns(RuntimeWarning, match="no x release for step_1.pt"):
        converter.wait()
    assert not (releases / "step_1").exists()


def test_bn_loader_re_estimates_batchnorm_statistics_at_x(tmp_path):
    """A ResNet (BatchNorm) under the Trainer: the release's statistics are torch's update_bn at x on the loader."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=2)
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
    calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16)), batch_size=4)
    captured = {}

    class CaptureBN(transformers.TrainerCallback):
        def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
            twin, twin_opt = copy.deepcopy((model, optimizer.optimizer))
            twin_opt.eval()
            update_bn(calib, twin)
            captured[state.global_step] = {k: v.detach().clone() for k, v in twin.state_dict().items()}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), optim="schedule_free_adamw",
                                          learning_rate=1e-2, per_device_train_batch_size=4, max_steps=2, save_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=100, seed=0)
    trainer = transformers.Trainer(model=transformers.ResNetForImageClassification(config), args=args,
                                   train_dataset=data, callbacks=[CaptureBN(), SfckptCallback(bn_loader=calib)])
    trainer.train()
    got = read(tmp_path / "run" / "sfckpt-x" / "checkpoint-2" / "model.safetensors")
    expected = captured[2]
    assert any(k.endswith("running_mean") for k in got)
    assert_equal_tensors(got, expected)
