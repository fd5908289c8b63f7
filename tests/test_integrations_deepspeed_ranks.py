"""The Trainer callback under DeepSpeed ZeRO-2 on 2 CPU processes (tests/deepspeed_ranks_runs.py): the
release of every checkpoint, and the final one, equal the x schedulefree's own eval() gives at that step."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_equal_tensors

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")
HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_trainer_callback_under_deepspeed_zero2_on_two_processes(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / "deepspeed_ranks_runs.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (tmp_path / "checkpoint-4" / "global_step4").glob("*optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    from transformers import AutoModelForCausalLM

    releases = tmp_path / "sfckpt-x"
    assert sorted(p.name for p in releases.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    for name, step in (("checkpoint-2", 2), ("checkpoint-4", 4), ("final", 4)):
        model = AutoModelForCausalLM.from_pretrained(str(releases / name))
        assert_equal_tensors(model.state_dict(), torch.load(tmp_path / f"expected-{step}.pt"))
