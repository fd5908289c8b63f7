"""docs/integrations.md: every Python example runs as shown, in an empty folder, and writes what its
last comment says."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "integrations.md").read_text(), re.S)
# What each example writes, in the order of the page
WRITES = [["release/model.safetensors"],
          ["run/sfckpt-x/checkpoint-2/model.safetensors", "run/sfckpt-x/checkpoint-4/config.json",
           "run/sfckpt-x/final/model.safetensors"],
          ["ckpt/epoch=0-step=2.x.safetensors", "ckpt/epoch=0-step=4.x.safetensors", "ckpt/final.x.safetensors"],
          ["releases/step_4.safetensors", "state/step_4/optimizer.bin"]]


def test_every_framework_has_one_example():
    assert len(BLOCKS) == len(WRITES) == 4


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(WRITES)), ids=["release", "trainer", "lightning", "accelerate"])
def test_example_runs_and_writes_its_release(index, tmp_path):
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in WRITES[index]:
        assert (tmp_path / name).is_file(), name
