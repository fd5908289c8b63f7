"""Lightning, a real `Trainer.fit` on one CPU process: the x release beside each checkpoint equals the
optimizer's own eval() at that save (on copies), validation on x leaves the saved pair and the run
itself bit-identical, and nothing ever switches the optimizer's mode."""
import pytest
import torch
from safetensors import safe_open

import trainers
from conftest import assert_equal_tensors, read

L = pytest.importorskip("lightning")
schedulefree = pytest.importorskip("schedulefree")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from sfckpt.integrations.lightning import SfckptModelCheckpoint, ValidateOnX  # noqa: E402


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = trainers.MLP()
        self.seen_in_validation = []

    def training_step(self, batch, _):
        return self.model(batch[0]).pow(2).mean()

    def validation_step(self, batch, _):
        self.seen_in_validation.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        self.log("val_loss", self.model(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02, betas=(0.85, 0.999))

    def on_train_epoch_start(self):
        self.optimizers().optimizer.train()


class Truth(L.Callback):
    """x from the optimizer's own eval() on copies, at each save and at each validation start."""

    def __init__(self):
        self.at_save, self.at_validation = {}, []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.at_save[trainer.global_step] = trainers.eval_x(pl_module.model, trainer.optimizers[0])

    def on_validation_start(self, trainer, pl_module):
        if trainer.optimizers[0].state:
            self.at_validation.append(trainers.eval_x(pl_module.model, trainer.optimizers[0]))


def _fit(tmp_path, callbacks, validate=False, max_steps=6):
    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
    trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        limit_val_batches=1 if validate else 0, val_check_interval=2 if validate else None,
                        num_sanity_val_steps=0)
    module = Module()
    trainer.fit(module, data, data if validate else None)
    return trainer, module


def test_every_checkpoint_gets_its_x_beside_it(tmp_path):
    truth = Truth()
    _fit(tmp_path, [truth, SfckptModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1,
                                                 strip_prefix="model.")])
    assert len(list((tmp_path / "ckpt").glob("*.ckpt"))) == 3
    assert len(list((tmp_path / "ckpt").glob("*.x.safetensors"))) == 4
    for step in (2, 4, 6):
        (release,) = (tmp_path / "ckpt").glob(f"epoch=*-step={step}.x.safetensors")
        assert_equal_tensors(read(release), truth.at_save[step])
        with safe_open(str(release), "pt") as f:
            assert f.metadata()["sfckpt_checkpoint"] == release.name.replace(".x.safetensors", ".ckpt")
            assert f.metadata()["sfckpt_training_step"] == str(step)
    assert_equal_tensors(read(tmp_path / "ckpt" / "final.x.safetensors"), truth.at_save[6])


def test_rotation_removes_the_release_with_its_checkpoint(tmp_path):
    _fit(tmp_path, [SfckptModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=1,
                                          monitor="step", mode="max")])
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["epoch=1-step=6.ckpt", "epoch=1-step=6.x.safetensors", "final.x.safetensors"]


def _state():
    return torch.get_rng_state(), torch.get_default_dtype(), torch.get_num_threads()


def test_the_run_is_bit_identical_with_and_without_the_callbacks(tmp_path):
    _, plain = _fit(tmp_path / "plain", [ModelCheckpoint(dirpath=tmp_path / "plain", every_n_train_steps=2)],
                    validate=True)
    plain_state = _state()
    _, with_callbacks = _fit(tmp_path / "with", [ValidateOnX(), SfckptModelCheckpoint(dirpath=tmp_path / "with",
                                                                                        every_n_train_steps=2)],
                             validate=True)
    with_state = _state()
    assert torch.equal(plain_state[0], with_state[0]) and plain_state[1:] == with_state[1:]
    assert_equal_tensors(with_callbacks.state_dict(), plain.state_dict())
    assert_equal_tensors(torch.load(tmp_path / "with" / "epoch=1-step=6.ckpt")["state_dict"],
                         torch.load(tmp_path / "plain" / "epoch=1-step=6.ckpt")["state_dict"])


def test_validation_runs_on_x_and_the_saved_pair_stays_y(tmp_path, run):
    """ModelCheckpoint saves at validation end here (monitor=val_loss): after y is back, with its train_mode flag."""
    truth = Truth()
    _, module = _fit(tmp_path, [truth, ValidateOnX(),
                                ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)],
                     validate=True)
    assert len(module.seen_in_validation) == len(truth.at_validation) == 3
    for seen, x in zip(module.seen_in_validation, truth.at_validation):
        assert_equal_tensors(seen, x)
    result = run("convert", tmp_path / "ckpt" / "last.ckpt", tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), truth.at_save[6])
