"""Lightning `.ckpt` files from ModelCheckpoint, and with the WeightAveraging callback, where x is built
from current_model_state, never from the average.

The callback saves the average of the y's the model held under `state_dict` and the model's own
parameters (y, which the optimizer's z belongs to) under `current_model_state`. The truth is the
optimizer's own eval() on the trained module at the moment the checkpoint was saved.
"""
import json

import pytest
import torch

import trainers
from conftest import assert_clean, assert_equal_tensors, read

L = pytest.importorskip("lightning")
schedulefree = pytest.importorskip("schedulefree")
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, WeightAveraging  # noqa: E402

NOTE = "state_dict holds WeightAveraging's averaged weights (an average of y); x is built from current_model_state"


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.02})
        self.model = trainers.ConvBN()  # BatchNorm: the callback averages buffers too

    def training_step(self, batch, _):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02)

    def on_train_epoch_start(self):
        self.optimizers().optimizer.train()


class Truth(L.Callback):
    """x from the optimizer's own eval() at each save, on copies (training goes on untouched)."""

    def __init__(self):
        self.x = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.x[trainer.global_step] = trainers.eval_x(pl_module.model, trainer.optimizers[0])


def fit(tmp_path, averaging):
    """Train 4 steps; ModelCheckpoint saves last.ckpt during fit, then after_fit.ckpt is saved once fit returned."""
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 5, 5)), batch_size=4)
    truth = Truth()
    trainer = L.Trainer(max_steps=4, callbacks=[averaging, truth, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(Module(), data)
    expected = truth.x[4]
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")  # on_train_end has copied the average into the model
    return tmp_path / "last.ckpt", tmp_path / "after_fit.ckpt", expected


@pytest.fixture(scope="module", params=["ema", "swa"])
def averaged_run(request, tmp_path_factory):
    averaging = EMAWeightAveraging() if request.param == "ema" else WeightAveraging()
    return fit(tmp_path_factory.mktemp(f"wa-{request.param}"), averaging)


def test_x_is_built_from_current_model_state(averaged_run, run, tmp_path):
    ckpt, _, expected = averaged_run
    saved = torch.load(ckpt, weights_only=True)
    assert not torch.equal(saved["state_dict"]["model.conv.weight"], saved["current_model_state"]["model.conv.weight"])
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning" and report["keys"]["model"] == "current_model_state"
    assert report["keys"]["model_candidates"][0] == "current_model_state"
    assert any(n.startswith(NOTE) for n in report["notes"])
    assert f"note: {NOTE}" in run("inspect", ckpt).stdout
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)
    assert run("check", tmp_path / "x.safetensors", "--ckpt", ckpt, "--strip-prefix", "model.").exit_code == 0
    # The averaged weights, taken as docs/containers.md shows, are not x: the CI gate says so
    from safetensors.torch import save_file

    averaged = torch.load(ckpt, weights_only=True)["state_dict"]
    release = tmp_path / "averaged.safetensors"
    save_file({k.removeprefix("model."): v.contiguous() for k, v in averaged.items()}, release)
    assert run("check", release, "--ckpt", ckpt, "--strip-prefix", "model.").exit_code == 1


def test_averaged_weights_are_refused_as_y(averaged_run, run, tmp_path):
    """--model-key state_dict would lerp the average with z: an x no optimizer ever held."""
    ckpt, _, _ = averaged_run
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--model-key", "state_dict")
    assert result.exit_code == 2
    assert "WeightAveraging callback averaged" in result.stderr and "current_model_state" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_checkpoint_saved_after_fit_is_refused(averaged_run, run, tmp_path):
    """After on_train_end both entries hold the average: y is gone, and no x can be made."""
    _, after_fit, _ = averaged_run
    saved = torch.load(after_fit, weights_only=True)
    assert all(torch.equal(v, saved["current_model_state"][k]) for k, v in saved["state_dict"].items())
    for args in (("convert", after_fit, tmp_path / "x.safetensors"),
                 ("convert", after_fit, tmp_path / "x.safetensors", "--model-key", "current_model_state"),
                 ("inspect", after_fit)):
        result = run(*args)
        assert result.exit_code == 2 and "saved after training ended" in result.stderr, args
    assert not (tmp_path / "x.safetensors").exists()


def test_single_update_at_the_saved_step_is_y(run, tmp_path):
    """An average of one update taken at the saved step is that step's y: identical entries, still convertible."""
    ckpt, after_fit, expected = fit(tmp_path, EMAWeightAveraging(update_starting_at_step=3))
    for path in (ckpt, after_fit):
        saved = torch.load(path, weights_only=True)
        assert all(torch.equal(v, saved["current_model_state"][k]) for k, v in saved["state_dict"].items())
        out = tmp_path / f"{path.stem}.safetensors"
        result = run("convert", path, out, "--strip-prefix", "model.")
        assert result.exit_code == 0, result.stderr
        assert_equal_tensors(read(out), expected)


def test_lightning_model_checkpoint(run, tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    import schedulefree

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"width": 16, "lr": 0.02})
            self.model = trainers.ConvBN()

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02)

        def on_train_epoch_start(self):
            self.optimizers().optimizer.train()

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 5, 5)), batch_size=4)
    module = Module()
    trainer = L.Trainer(max_steps=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    expected = trainers.eval_x(module.model, trainer.optimizers[0])
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning" and report["keys"]["optimizer"] == "optimizer_states.0"
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)


@pytest.mark.parametrize("count", [torch.tensor(float("nan")), torch.tensor(True)], ids=["nan", "bool"])
def test_weight_averaging_count_that_is_not_a_count(count, run, tmp_path):
    """Lightning WeightAveraging's n_averaged read where it decides whether the model held the average."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "current_model_state": dict(sd), "averaging_state": {"n_averaged": count},
                "optimizer_states": [opt.state_dict()], "global_step": 4, "epoch": 0,
                "pytorch-lightning_version": "2.5.0"}, tmp_path / "last.ckpt")
    result = run("convert", tmp_path / "last.ckpt", tmp_path / "x.safetensors")
    assert_clean(result, tmp_path / "x.safetensors")
    assert "saved after training ended" in result.stderr
