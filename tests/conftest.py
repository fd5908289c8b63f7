import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

import trainers  # noqa: E402
from sfckpt.cli import main  # noqa: E402

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SCRIPTS = Path(__file__).resolve().parent / "scripts"  # the training runs the framework tests start


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


def parts():
    """(state dict, optimizer state dict) of a tiny MLP trained with AdamWScheduleFree."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    return model.state_dict(), opt.state_dict()


@pytest.fixture
def ckpt_parts():
    """parts(), fresh for each test (tests edit them)."""
    return parts()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(a valid checkpoint, its x as safetensors): the undamaged inputs beside a damaged one."""
    tmp = tmp_path_factory.mktemp("good")
    model = trainers.ConvBN()
    opt = trainers.train(model, "adamw")
    ckpt = save_checkpoint(tmp / "good.pt", model, opt, epoch=1)
    save_file(trainers.eval_x(model, opt), str(tmp / "x.safetensors"))
    return ckpt, tmp / "x.safetensors"


def write_big_checkpoint(path: Path, tensors: int = 40, side: int = 1024) -> None:
    """A checkpoint big enough (40 MiB of y) that a conversion is still writing when a signal comes."""
    model = torch.nn.Sequential(*[torch.nn.Linear(side, side, bias=False) for _ in range(tensors)])
    opt = trainers.OPTIMIZERS["sgd"][0](model.parameters())
    opt.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)


def refuse_conversion(run, tmp_path: Path, obj, *fragments: str, extra=()) -> None:
    """`obj` saved and converted: a clean refusal whose message holds every fragment."""
    torch.save(obj, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "c.pt", out, *extra)
    assert_clean(result, out)
    for f in fragments:
        assert f in result.stderr, result.stderr


def cli_capped(*args, env: dict | None = None, memory_gb: int = 3) -> subprocess.CompletedProcess:
    """The CLI in a child process with its address space capped (a crash or a blow-up stays there)."""
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30)); "
            "from sfckpt.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def saved_with(tmp_path: Path, change) -> Path:
    """A trained MLP's checkpoint whose optimizer state dict `change` edited first."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    osd = opt.state_dict()
    change(osd)
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    return tmp_path / "c.pt"


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


def assert_clean(result, out: Path, allow_success: bool = False) -> None:
    """Exit 2 with one `error:` line and nothing written (or, where allowed, exit 0 or 1); never a
    traceback or an internal error."""
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    if allow_success and result.exit_code in (0, 1):
        return
    assert_one_error_line(result)
    assert_nothing_written(out)


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


def run_script(name: str, *args) -> None:
    """Run tests/scripts/NAME with `args` in a child process (the framework's training run); it must succeed."""
    result = subprocess.run([sys.executable, SCRIPTS / name, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """A LoRA adapter checkpoint as the Trainer saves it (scripts/peft_lora.py, as tests/test_readers_peft.py runs it)."""
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("lora")
    run_script("peft_lora.py", out)
    return out / "run" / "checkpoint-3"


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    """A Hugging Face Trainer checkpoint-N folder (scripts/hf_trainer.py, as tests/test_readers_hf_trainer.py runs it)."""
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("hf")
    run_script("hf_trainer.py", out, "schedule_free_adamw", "train")
    return out / "checkpoint-3"


def convert_traced(run, tmp_path: Path, model, opt):
    """Save {"model", "optimizer"} and convert it with Python's allocations traced: (result, output, peak bytes)."""
    import tracemalloc

    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "x.safetensors"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt)
    tracemalloc.start()
    try:
        result = run("convert", ckpt, out)
        return result, out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
