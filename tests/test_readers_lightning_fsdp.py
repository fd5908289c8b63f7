"""Lightning's sharded FSDP checkpoints (`NAME.ckpt/` folders), made by a real Lightning Trainer.

Two CPU processes over gloo, launched by Lightning itself, train a tiny model with
`FSDPStrategy(state_dict_type="sharded")` and save with `trainer.save_checkpoint`, which runs
Lightning's own `FSDPStrategy.save_checkpoint` (lightning/pytorch/strategies/fsdp.py): DCP of
`{'model', 'optimizer_0', ...}` plus `meta.pt`. Two things differ from a GPU run, both because
Lightning and FSDP refuse CPU otherwise, neither touching what is saved:

* the strategy is a subclass of `FSDPStrategy` with nothing overridden: the Trainer refuses
  FSDP without a GPU only by `type(strategy) is FSDPStrategy`
  (lightning/pytorch/trainer/connectors/accelerator_connector.py, `_check_strategy_and_fallback`);
* the LightningModule wraps its model in `configure_model` with `device_id=cpu`: Lightning wraps
  with `device_id=None`, which FSDP refuses on a machine without an accelerator, and leaves a
  module already wrapped as it is (`FSDPStrategy._setup_model`).

x is the optimizers' own `eval()` in the same run, after saving, gathered with
`FSDP.summon_full_params` and saved from rank 0; compared by torch.equal.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_equal_tensors, Evil, free_port, read, SCRIPTS

pytestmark = pytest.mark.slow  # every test here reads a two-process Lightning FSDP run


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """{'one': (ckpt folder, x), 'two': ...}: one optimizer, and two (AdamW on fc1, SGD on fc2); run side by side."""
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("lightning-fsdp")
    procs = {}
    for mode in ("one", "two"):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
        procs[mode] = subprocess.Popen([sys.executable, SCRIPTS / "lightning_fsdp.py", root / mode, mode], cwd=root, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    runs = {}
    for mode, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0 and "gloo" in output.lower() and "not available" in output.lower():
            pytest.skip("gloo backend unavailable")
        assert proc.returncode == 0, output[-3000:]
        runs[mode] = (root / mode / "last.ckpt", torch.load(root / mode / "expected_x.pt"))
    return runs


def test_one_optimizer(lightning_runs, run, tmp_path):
    ckpt, expected = lightning_runs["one"]
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning-fsdp"
    assert report["keys"]["model"] == "model" and report["keys"]["optimizer"] == "optimizer_0"
    assert "global_step 3" in report["notes"][-1] and "2 shard files" in report["notes"][-1]
    assert any("--strip-prefix model." in h for h in report["hints"])
    assert [g["step"] for g in report["groups"]] == [3] and report["params_hold"] == "y"
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), {k.removeprefix("model."): v for k, v in expected.items()})
    assert run("convert", ckpt, tmp_path / "prefixed.safetensors").exit_code == 0  # names as saved, as for .ckpt
    assert_equal_tensors(read(tmp_path / "prefixed.safetensors"), expected)
    assert run("check", tmp_path / "prefixed.safetensors", "--ckpt", ckpt).exit_code == 0


def test_two_optimizers(lightning_runs, run, tmp_path):
    """optimizer_0 trains fc1, optimizer_1 fc2: each tensor converted with its own optimizer's z and β."""
    ckpt, expected = lightning_runs["two"]
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning-fsdp"
    assert [(o["key"], o["family"], o["entries"]) for o in report["optimizers"]] == [
        ("optimizer_0", "adamw", 2), ("optimizer_1", "sgd", 2)]
    assert [g["beta"] for g in report["groups"]] == [0.85, 0.8]
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), {k.removeprefix("model."): v for k, v in expected.items()})


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_malicious_meta_is_refused(how, lightning_runs, run, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(lightning_runs["one"][0], ckpt)
    marker = tmp_path / "pwned"
    if how == "pickle":
        (ckpt / "meta.pt").write_bytes(pickle.dumps(Evil(str(marker))))
    else:
        torch.save(Evil(str(marker)), ckpt / "meta.pt")
    for command in (["inspect", ckpt], ["convert", ckpt, tmp_path / "x.safetensors"]):
        result = run(*command)
        assert result.exit_code == 2 and "meta.pt" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not marker.exists() and not (tmp_path / "x.safetensors").exists()


def test_foreign_object_inside_meta_stays_inert(lightning_runs, run, tmp_path):
    """An object inside meta.pt's dict (as callbacks may save) becomes a placeholder; nothing runs."""
    source, expected = lightning_runs["one"]
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(source, ckpt)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 2, "global_step": 3, "callbacks": {"evil": Evil(str(marker))}}, ckpt / "meta.pt")
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning-fsdp" and "posix.system" in report["unloaded_classes"]
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)
    assert not marker.exists()


@pytest.mark.parametrize("plant", ["state_dict", "weight_averaging"])
def test_weights_in_meta_are_never_the_weights(plant, lightning_runs, run, tmp_path):
    """meta.pt never holds the model (FSDPStrategy pops it into the DCP part). A state_dict planted there is
    ignored; WeightAveraging's keys there (its on_save_checkpoint runs first, so the DCP model would be the
    average and y would sit in meta.pt) are refused, never converted from the average."""
    source, expected = lightning_runs["one"]
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(source, ckpt)
    fake = {k: torch.zeros_like(v) for k, v in expected.items()}
    meta = {"epoch": 2, "global_step": 3, "state_dict": fake}
    if plant == "weight_averaging":
        meta.update(current_model_state=fake, averaging_state={"n_averaged": torch.tensor(3)})
    torch.save(meta, ckpt / "meta.pt")
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    if plant == "state_dict":
        assert result.exit_code == 0, result.stderr
        assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)
    else:
        assert result.exit_code == 2 and "WeightAveraging" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.safetensors").exists()


def test_missing_shard_is_refused(lightning_runs, run, tmp_path):
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(lightning_runs["one"][0], ckpt)
    (ckpt / "__1_0.distcp").unlink()
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "__1_0.distcp" in result.stderr and "missing" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "x.safetensors").exists()
