"""The integrations under DeepSpeed ZeRO-2 on 2 CPU processes: the Trainer's callback
(tests/deepspeed_ranks_runs.py) and Lightning's SfckptModelCheckpoint (scripts/lightning_deepspeed.py). The
release of every checkpoint, and the final one, equal the x schedulefree's own eval() gives at that step."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import SCRIPTS, assert_equal_tensors, free_port, read

pytest.importorskip("deepspeed")
HERE = Path(__file__).resolve().parent


def _trainer_run(out: Path, *extra: str) -> None:
    result = subprocess.run([sys.executable, str(HERE / "deepspeed_ranks_runs.py"), str(out), *extra],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_trainer_callback_under_deepspeed_zero2_on_two_processes(tmp_path):
    pytest.importorskip("transformers")
    _trainer_run(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoint-4" / "global_step4").glob("*optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    from transformers import AutoModelForCausalLM

    releases = tmp_path / "sfckpt-x"
    assert sorted(p.name for p in releases.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    for name, step in (("checkpoint-2", 2), ("checkpoint-4", 4), ("final", 4)):
        model = AutoModelForCausalLM.from_pretrained(str(releases / name))
        assert_equal_tensors(model.state_dict(), torch.load(tmp_path / f"expected-{step}.pt"))


@pytest.mark.slow
def test_trainer_run_with_the_callback_saves_what_it_saves_without(tmp_path):
    """The callback's barriers and conversions, and the test's own taking of x, change nothing training computes."""
    pytest.importorskip("transformers")
    _trainer_run(tmp_path / "with")
    _trainer_run(tmp_path / "bare", "bare")
    assert not (tmp_path / "bare" / "sfckpt-x").exists()
    for step in (2, 4):
        assert_equal_tensors(read(tmp_path / "with" / f"checkpoint-{step}" / "model.safetensors"),
                             read(tmp_path / "bare" / f"checkpoint-{step}" / "model.safetensors"))
        for rank in (0, 1):
            optim = f"checkpoint-{step}/global_step{step}/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            got, expected = (_partitions(tmp_path / run / optim) for run in ("with", "bare"))
            assert_equal_tensors(got, expected)


def _partitions(path: Path) -> dict:
    """A ZeRO-2 rank file's fp32 master partitions (y) and z, by group."""
    state = torch.load(path, weights_only=False)["optimizer_state_dict"]
    tensors = {f"y{i}": t for i, t in enumerate(state["single_partition_of_fp32_groups"])}
    tensors.update({f"z{i}": s["z"] for i, s in state["base_optimizer_state"]["state"].items()})
    return tensors

@pytest.mark.slow
def test_lightning_checkpoint_callback_under_deepspeed_zero2_on_two_processes(tmp_path):
    pytest.importorskip("lightning")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPTS / "lightning_deepspeed.py"), str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    folder = tmp_path / "ckpt"
    assert (folder / "epoch=0-step=4.ckpt" / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    for name, step in (("epoch=0-step=2.x.safetensors", 2), ("epoch=0-step=4.x.safetensors", 4),
                       ("final.x.safetensors", 4)):
        expected = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / f"expected-{step}.pt").items()}
        assert_equal_tensors(read(folder / name), expected)
