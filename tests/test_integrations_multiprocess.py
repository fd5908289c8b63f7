"""The Trainer callback under FSDP2 (2 CPU processes) and DeepSpeed ZeRO-2: the release of the checkpoint
the Trainer saved equals the x the optimizer's own eval() gives, gathered from the shards (tests/integration_runs.py)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_equal_tensors, read

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
HERE = Path(__file__).resolve().parent


def _run(tmp_path, case):
    result = subprocess.run([sys.executable, str(HERE / "integration_runs.py"), str(tmp_path), case],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(tmp_path / "expected.pt")


@pytest.mark.slow
def test_trainer_callback_under_fsdp2_on_two_processes(tmp_path):
    expected = _run(tmp_path, "fsdp")
    releases = tmp_path / "sfckpt-x"
    assert sorted(p.name for p in releases.iterdir()) == ["checkpoint-3", "final"]
    for name in ("checkpoint-3", "final"):
        # the sharded save holds the tied head as its own copy, which the release keeps
        assert_equal_tensors(read(releases / name / "model.safetensors"), expected)


@pytest.mark.slow
def test_trainer_callback_under_deepspeed_zero2(tmp_path):
    pytest.importorskip("deepspeed")
    expected = _run(tmp_path, "deepspeed")
    from transformers import AutoModelForCausalLM

    for name in ("checkpoint-3", "final"):
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sfckpt-x" / name))
        assert_equal_tensors(model.state_dict(), expected)


@pytest.mark.slow
def test_lightning_checkpoint_callback_under_fsdp_on_two_processes(tmp_path):
    """Lightning's sharded FSDP save (a `NAME.ckpt/` folder), converted by rank 0 after a barrier; the run
    is scripts/lightning_fsdp.py's, with SfckptModelCheckpoint saving at the last step."""
    pytest.importorskip("lightning")
    import os

    from conftest import SCRIPTS, free_port

    tests_dir = str(SCRIPTS.parent)  # the script finds trainers.py there, wherever it is copied to
    script = (SCRIPTS / "lightning_fsdp.py").read_text().replace("str(Path(__file__).resolve().parent.parent)",
                                                                 repr(tests_dir))
    script = script.replace("import torch\n", "import torch\nfrom sfckpt.integrations.lightning import SfckptModelCheckpoint\n", 1)
    script = script.replace("enable_checkpointing=False,", "callbacks=[SfckptModelCheckpoint(dirpath=out / 'ckpt', "
                            "every_n_train_steps=3, strip_prefix='model.')],")
    assert "SfckptModelCheckpoint(dirpath" in script
    (tmp_path / "train.py").write_text(script)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(tmp_path / "train.py"), str(tmp_path / "run"), "one"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    expected = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "run" / "expected_x.pt").items()}
    folder = tmp_path / "run" / "ckpt"
    assert (folder / "epoch=1-step=3.ckpt" / "meta.pt").is_file()  # two ranks: two batches an epoch
    for name in ("epoch=1-step=3.x.safetensors", "final.x.safetensors"):
        assert_equal_tensors(read(folder / name), expected)
