"""Setups the integrations' own tests do not build: each one once made a release, a watch or a
training run go wrong, and stays fixed here."""
import pytest
import torch

import sfckpt
import trainers
from conftest import assert_equal_tensors, read, save_checkpoint


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


def test_watch_does_not_follow_a_link_out_of_the_run_folder(tmp_path, run):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").mkdir()
    save_checkpoint(tmp_path / "elsewhere" / "step_4.pt", model, opt)
    (tmp_path / "run" / "step_4.pt").symlink_to(tmp_path / "elsewhere" / "step_4.pt")
    (tmp_path / "run" / "other").symlink_to(tmp_path / "elsewhere")
    result = run("watch", tmp_path / "run", "--out", tmp_path / "releases", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert list((tmp_path / "releases").iterdir()) == []
    assert "step_4.pt is a link, not followed" in result.stderr
    assert "other is a link, not followed" in result.stderr


def test_watch_refuses_the_run_folder_as_out(tmp_path, run):
    (tmp_path / "run").mkdir()
    result = run("watch", tmp_path / "run", "--out", tmp_path / "run" / ".", "--once", "--interval", "0.05")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --out") and "is the run folder" in result.stderr


def test_watch_forgets_a_checkpoint_deleted_while_it_was_converted(tmp_path):
    """The run's rotation deletes a save the watch is reading: a note, not a failure that fails the watch."""
    import shutil

    from sfckpt import watch
    from sfckpt.integrations.jobs import convert_folder

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run" / "step_4.pt", model, opt)

    def rotated_meanwhile(src, release, metadata):
        src.unlink()
        convert_folder(src, release, metadata)

    lines = []
    watcher = watch.Watcher(tmp_path / "run", tmp_path / "releases", rotated_meanwhile, lines.append)
    watcher.run(0.0, once=True, sleep=lambda _: None)
    assert watcher.failed == {}
    assert lines == ["note: step_4.pt was deleted while being converted (the run's rotation): no release"]


def test_validate_on_x_gives_y_back_when_validation_fails(tmp_path):
    L = pytest.importorskip("lightning")
    from test_integrations_lightning import Module

    from sfckpt.integrations.lightning import ValidateOnX

    class FailingValidation(Module):
        def validation_step(self, batch, _):
            raise KeyError("a bug in validation_step")

    class Before(L.Callback):
        """The parameters (y) as validation starts, before ValidateOnX puts x in."""

        def on_validation_start(self, trainer, pl_module):
            self.y = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    before = Before()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
    trainer = L.Trainer(max_steps=4, callbacks=[before, ValidateOnX()], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, limit_val_batches=1,
                        val_check_interval=2, num_sanity_val_steps=0, enable_checkpointing=False)
    module = FailingValidation()
    with pytest.raises(KeyError):
        trainer.fit(module, data, data)
    assert_equal_tensors({k: v.detach() for k, v in module.model.state_dict().items()}, before.y)


def test_save_and_release_of_a_compiled_model_in_accelerate_is_eval_x(tmp_path):
    """save_state saves the prepared model's names as they are (`_orig_mod.…`, under DDP `module.…`)."""
    accelerate = pytest.importorskip("accelerate")
    import copy

    import schedulefree

    from sfckpt.integrations.accelerate import save_and_release

    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    net = trainers.MLP()
    model, opt = acc.prepare(torch.compile(net), schedulefree.AdamWScheduleFree(net.parameters(), lr=0.02))
    opt.train()
    for _ in range(3):
        opt.zero_grad()
        acc.backward(model(trainers.example_input(net)).pow(2).mean())
        opt.step()
    twin, twin_opt = copy.deepcopy((net, opt.optimizer))
    twin_opt.eval()
    save_and_release(acc, tmp_path / "state", tmp_path / "x.safetensors", step=3)
    assert_equal_tensors(read(tmp_path / "x.safetensors"), {k: v.detach() for k, v in twin.state_dict().items()})


@pytest.mark.slow
def test_watch_takes_a_trainer_output_dir_that_also_holds_the_final_save_model(tmp_path, run):
    """`trainer.save_model()` writes model.safetensors into output_dir itself, beside the checkpoints:
    the run folder is still the run folder, not a checkpoint to refuse."""
    pytest.importorskip("transformers")
    from test_integrations_transformers import _train

    _train(tmp_path / "run", [], max_steps=2).save_model()
    result = run("watch", tmp_path / "run", "--out", tmp_path / "releases", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "releases" / "checkpoint-2" / "model.safetensors").is_file()


def test_watch_does_not_pass_one_release_off_as_two_saves_named_alike(tmp_path, run):
    """step_4.ckpt and step_4.pt would both be released as step_4/: the second is reported, not skipped
    as if the first's release were its own."""
    (tmp_path / "run").mkdir()
    for name, seed in (("step_4.ckpt", 0), ("step_4.pt", 1)):
        model = trainers.MLP()
        save_checkpoint(tmp_path / "run" / name, model, trainers.train(model, "adamw", seed=seed))
    result = run("watch", tmp_path / "run", "--out", tmp_path / "releases", "--once", "--interval", "0.05")
    assert result.exit_code == 2
    assert "warning: step_4.pt: no release: step_4 is step_4.ckpt's release" in result.stderr
    assert [p.name for p in (tmp_path / "releases").iterdir()] == ["step_4"]


def test_watch_once_names_a_save_it_left_because_it_is_still_being_written(tmp_path, run):
    """--once while the run writes its last save: the save is not read, and not passed over in silence."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "step_4.pt", model, opt)
    data = (tmp_path / "step_4.pt").read_bytes()
    (tmp_path / "run" / "step_4.pt").write_bytes(data[: len(data) // 2])
    result = run("watch", tmp_path / "run", "--out", tmp_path / "releases", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert list((tmp_path / "releases").iterdir()) == []
    assert "note: step_4.pt is not complete yet" in result.stderr


def _lora_llama():
    peft = pytest.importorskip("peft")
    from test_integrations_transformers import _model

    return peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))


@pytest.mark.slow
def test_trainer_final_release_of_a_peft_model_is_the_adapter_at_x(tmp_path):
    """The Trainer saves a PEFT model's adapter alone; the final release was the whole PeftModel under its
    wrapper names beside the base model's config.json, which from_pretrained fills at random."""
    transformers = pytest.importorskip("transformers")
    from test_integrations_transformers import CaptureX

    from sfckpt.integrations.transformers import SfckptCallback

    data = [{"input_ids": torch.randint(0, 48, (8,)), "labels": torch.randint(0, 48, (8,))} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), optim="schedule_free_adamw",
                                          learning_rate=1e-2, per_device_train_batch_size=4, max_steps=2, save_steps=2,
                                          report_to=[], use_cpu=True, logging_steps=100, lr_scheduler_type="constant")
    truth = CaptureX()
    transformers.Trainer(model=_lora_llama(), args=args, train_dataset=data, callbacks=[truth, SfckptCallback()]).train()
    final = tmp_path / "run" / "sfckpt-x" / "final"
    assert not (final / "config.json").exists()
    got = read(final / "adapter_model.safetensors")
    x = {k: v for k, v in truth.x[2].items() if "lora_" in k}
    assert_equal_tensors({k.removesuffix(".weight") + ".default.weight": v for k, v in got.items()}, x)


def test_release_of_a_peft_model_copies_no_base_config(tmp_path):
    import schedulefree

    model = _lora_llama()
    opt = schedulefree.AdamWScheduleFree([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.train()
    model(input_ids=torch.randint(0, 48, (2, 8)), labels=torch.randint(0, 48, (2, 8))).loss.backward()
    opt.step()
    sfckpt.release(model, opt, tmp_path / "release/")
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == ["model.safetensors"]


@pytest.mark.slow
def test_watch_leaves_the_trainer_callbacks_releases_alone(tmp_path, run):
    """A run with SfckptCallback holds sfckpt-x/ beside its checkpoints: releases, not saves to convert or wait for."""
    pytest.importorskip("transformers")
    from test_integrations_transformers import _train

    from sfckpt.integrations.transformers import SfckptCallback

    _train(tmp_path / "run", [SfckptCallback()], max_steps=2)
    result = run("watch", tmp_path / "run", "--out", tmp_path / "releases", "--once", "--interval", "0.05")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines() == [f"wrote {tmp_path / 'releases' / 'checkpoint-2'} (from checkpoint-2)"]


@pytest.mark.slow  # a DataLoader worker process
def test_bn_loader_with_persistent_workers_leaves_the_training_iterator_alone(tmp_path):
    """torch keeps one iterator per persistent-worker DataLoader: iterating the training loader to
    re-estimate BatchNorm reset it, and the training loop's epoch ended at the next batch."""
    model = trainers.ConvBN()
    opt = trainers.train(model, "adamw")
    images = torch.arange(8 * 75, dtype=torch.float32).reshape(8, 3, 5, 5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=2, num_workers=1,
                                         persistent_workers=True)
    training = iter(loader)
    next(training)
    sfckpt.release(model, opt, tmp_path / "x.safetensors", bn_loader=loader)
    assert torch.equal(next(training)[0], images[2:4])
