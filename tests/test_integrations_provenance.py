"""`inspect` warns when a checkpoint shows the traces of a community Schedule-Free callback, whose
train_mode may not describe the saved weights, and names --params-are."""
import json

import trainers
from conftest import save_checkpoint


def _inspect(run, path, *extra):
    result = run("inspect", path, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["warnings"]


def _trained(tmp_path, **extra):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    return model, opt, save_checkpoint(tmp_path / "ckpt.pt", model, opt, **extra)


def test_a_plain_checkpoint_gets_no_mode_warning(tmp_path, run):
    _, _, path = _trained(tmp_path)
    assert not any("train_mode" in w for w in _inspect(run, path))


def test_top_level_schedulefree_state_is_warned_about(tmp_path, run):
    model, opt, path = _trained(tmp_path)
    save_checkpoint(path, model, opt, schedulefree_optimizer_state_dict=opt.state_dict())
    # two copies of one optimizer state: which one is meant is the user's to say
    (warning,) = [w for w in _inspect(run, path, "--optimizer-key", "optimizer")
                  if "schedulefree_optimizer_state_dict" in w]
    assert "--params-are" in warning


def test_a_schedule_free_callback_in_a_lightning_checkpoint_is_warned_about(tmp_path, run):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    path = save_checkpoint(tmp_path / "l.ckpt", model, opt, layout="lightning",
                           callbacks={"ScheduleFreeCallback": {"mode": "train"}, "ModelCheckpoint{}": {}})
    (warning,) = [w for w in _inspect(run, path) if "ScheduleFreeCallback" in w]
    assert "--params-are" in warning


def test_groups_that_disagree_on_train_mode_are_warned_about(tmp_path, run):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", param_groups=[{"params": list(model.fc1.parameters())},
                                                        {"params": list(model.fc2.parameters())}])
    opt.param_groups[1]["train_mode"] = False
    path = save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    assert any("disagree on train_mode" in w and "--params-are" in w for w in _inspect(run, path))
    assert not any("disagree on train_mode" in w for w in _inspect(run, path, "--params-are", "y"))
