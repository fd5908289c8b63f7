import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

import trainers  # noqa: E402
from sfckpt.cli import main  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def run():
    """Invoke the CLI in-process; stdout and stderr stay separate."""

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def save_checkpoint(path, model, opt, layout="model/optimizer", **extra):
    """Save model + optimizer state the way people do; returns the path."""
    sd, osd = model.state_dict(), opt.state_dict()
    if layout == "lightning":
        obj = {
            "epoch": 0,
            "global_step": 4,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [osd],
            "lr_schedulers": [],
        }
    else:
        model_key, opt_key = layout.split("/")
        obj = {model_key: sd, opt_key: osd}
    obj.update(extra)
    torch.save(obj, path)
    return path


@pytest.fixture
def trained(tmp_path):
    """(checkpoint path, expected x from the optimizer's own eval(), y) for a family."""

    def make(family="adamw", model=None, dtype=torch.float32, layout="model/optimizer", steps=4, **extra):
        model = (model or trainers.MLP()).to(dtype)
        opt = trainers.train(model, family, steps=steps)
        path = save_checkpoint(tmp_path / f"{family}.pt", model, opt, layout, **extra)
        y = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return path, trainers.eval_x(model, opt), y

    return make


def assert_equal_tensors(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), f"{name} differs from optimizer.eval()"


def assert_one_error_line(result, *fragments: str, github: bool = False) -> str:
    """Exit 2 and one `error:` line on stderr holding every fragment; no traceback, no "internal error".

    `result` is click's Result or a finished subprocess (text or bytes). With `github`, stderr also
    holds that error's one `::error` annotation. Returns the error line."""
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode(errors="replace")
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    lines = err.strip().splitlines()
    if github:
        annotations = [line for line in lines if line.startswith("::error")]
        assert len(annotations) == 1 and annotations[0].startswith("::error title=sfckpt::"), err
        lines = [line for line in lines if not line.startswith("::error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_nothing_written(out: Path) -> None:
    """Neither the output nor a temporary beside it exists."""
    assert not out.exists(), f"{out} was written"
    assert not [p.name for p in out.parent.iterdir() if "sfckpt-tmp" in p.name]


def assert_refused(result, out: Path, *fragments: str) -> str:
    """A clean refusal: one `error:` line holding `fragments`, nothing on stdout, nothing written."""
    line = assert_one_error_line(result, *fragments)
    assert result.stdout == "", result.stdout
    assert_nothing_written(out)
    return line


def read(path):
    return load_file(str(path))


def free_port() -> str:
    """A TCP port for a process group's rendezvous (MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


class Evil:
    """Pickles to a call of os.system that touches `marker`: proof that no code from a file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))
