"""Threads and processes while x is written: one torch thread per op (the pipeline has its own
threads), and `--workers` forked once torch is imported, so they share its pages."""
import subprocess
import sys
import textwrap

import pytest
import torch

import sfckpt
from conftest import FIXTURES


def test_x_is_written_on_one_torch_thread_and_the_count_is_set_back(trained, tmp_path):
    ckpt, _, _ = trained("adamw")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    try:
        sfckpt.save(sfckpt.reconstruct(sfckpt.load(ckpt)), tmp_path / "x.safetensors",
                    progress=lambda n: seen.append(torch.get_num_threads()))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
    assert after == 2


WORKERS_FORK_AFTER_TORCH = textwrap.dedent(
    """
    import os, sys
    import sfckpt
    recon = sfckpt.reconstruct(sfckpt.load(sys.argv[1]))
    fork, seen = os.fork, []
    def spy():
        seen.append("torch" in sys.modules)
        return fork()
    os.fork = spy
    sfckpt.save(recon, sys.argv[2], max_shard_size="100B", workers=2)
    print(seen)
    """
)


@pytest.mark.slow
def test_workers_fork_with_torch_already_imported(tmp_path):
    ckpt = FIXTURES / "adamw_mlp.pt"
    result = subprocess.run([sys.executable, "-c", WORKERS_FORK_AFTER_TORCH, str(ckpt), f"{tmp_path / 'out'}/"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[True, True]"
