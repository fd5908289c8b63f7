"""fixtures/ is what `python fixtures/make_fixtures.py` writes (within the tolerance its docstring explains)."""
import subprocess
import sys

import torch

from conftest import FIXTURES

# Regenerating on another CPU may change a float's last bits (other vector instructions); nothing
# in the tests depends on the fixtures' exact bytes, only on them being these runs.
RTOL, ATOL = 1e-5, 1e-6


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def test_make_fixtures_reproduces_the_committed_files(tmp_path):
    proc = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(p.name for p in tmp_path.glob("*.pt"))
    assert len(made) == 4 and all((FIXTURES / name).is_file() for name in made)
    for name in made:
        new, old = torch.load(tmp_path / name), torch.load(FIXTURES / name)
        new_t, old_t = dict(_tensors(new)), dict(_tensors(old))
        assert new_t.keys() == old_t.keys(), name
        for key in new_t:
            torch.testing.assert_close(new_t[key], old_t[key], rtol=RTOL, atol=ATOL, msg=f"{name}{key}")
