"""The docs match the tool: README's and docs/' examples run in order in a fresh copy, docs/api.md's
snippets run, the quick start is what .ci/run runs, every documented --json key is there, and fixtures/ is what
fixtures/make_fixtures.py writes."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from test_reconstruct_batchnorm import MODEL_FILE

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Examples that need your own data (a run's checkpoint, your model code, calibration images) are
# shown in the docs but cannot run in a clone; they are skipped, and listed here so that a new one
# is a decision, not an accident.
NOT_SHIPPED = ("run/", "checkpoints/", "models.py", "calib_images.pt")
EXPECTED_SKIPS = {"docs/batchnorm.md": 1}
DOCUMENTS = ["README.md", "docs/ci.md", "docs/cli.md", "docs/batchnorm.md", "docs/api.md", "docs/containers.md",
             "docs/families.md", "docs/performance.md", "docs/guarantees.md", "docs/mapping.md", "docs/theory.md"]


def console_examples(text: str) -> list[tuple[str, list[str]]]:
    """(command, shown output lines) for every `$ ` line of every ```console block, in order."""
    examples = []
    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
            i += 1
            output = []
            while i < len(lines) and not lines[i].startswith("$ "):
                output.append(lines[i])
                i += 1
            examples.append((command, output))
    return examples


def fresh_copy(tmp_path: Path) -> Path:
    """What a clone holds that the examples use: the fixtures."""
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copytree(FIXTURES, clone / "fixtures")
    return clone


def _normal(line: str) -> str:
    return " ".join(line.split())


@pytest.mark.slow
@pytest.mark.parametrize("document", DOCUMENTS)
def test_console_examples_run_in_order_in_a_fresh_copy(document, tmp_path):
    examples = console_examples((ROOT / document).read_text())
    clone = fresh_copy(tmp_path)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("GITHUB_ACTIONS", None)
    skipped = []
    # Twice in the same copy: users run the examples again in the same clone, and copy them
    for round_, (command, shown) in ((r, e) for r in (1, 2) for e in examples):
        if any(marker in command for marker in NOT_SHIPPED):
            if round_ == 1:
                skipped.append(command)
            continue
        proc = subprocess.run(command, shell=True, cwd=clone, capture_output=True, text=True, env=env)
        expected_code = 1 if shown and shown[0].startswith("FAIL") else 0
        assert proc.returncode == expected_code, f"{document}: `{command}` (run {round_}) exited {proc.returncode}:\n{proc.stderr}"
        got = {_normal(line) for line in (proc.stdout + proc.stderr).splitlines()}
        for line in shown:
            if line.strip() and line.strip() != "...":
                assert _normal(line) in got, f"{document}: `{command}` did not print:\n{line}\nit printed:\n{proc.stdout}{proc.stderr}"
    assert len(skipped) == EXPECTED_SKIPS.get(document, 0), skipped


def test_outputs_of_the_examples_are_ignored_by_git(tmp_path):
    """Run in the repository itself, the README's examples would leave these; .gitignore covers them."""
    written = set()
    for command, _ in console_examples((ROOT / "README.md").read_text()) + console_examples((ROOT / "docs/ci.md").read_text()):
        args = shlex.split(command, comments=True)
        if args[1] == "convert":
            written.add(args[3])
        if "--plot" in args:
            written.add(args[args.index("--plot") + 1])
    written.add("x.safetensors")  # the quick start
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(ROOT / ".gitignore", tmp_path / ".gitignore")
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *sorted(written)], cwd=tmp_path, capture_output=True, text=True)
    assert sorted(ignored.stdout.split()) == sorted(written)


def test_api_snippets_run_top_to_bottom(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(fresh_copy(tmp_path))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)
    assert Path("model.safetensors").is_file() and Path("release/model.safetensors").is_file()
    assert namespace["report"]["passed"] and namespace["same"]["summary"]["differ"] == 0


def quick_start() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_them():
    commands = quick_start()
    assert len(commands) == 2
    assert commands[0].startswith("pip install . && sfckpt ") and "fixtures/" in commands[0]
    assert commands[1].startswith("pip install '.[test]'") and "pytest" in commands[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "pip install torch==2.13.0" in ci
    assert ci[-3:-1] == commands and ci.index("pip install torch==2.13.0") < len(ci) - 3
    # the README's pytest skips the slow tests and CI runs them next: together they run every test
    assert "-m 'not slow'" in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert ci[-1] == "python -m pytest -m slow"
    assert any("venv" in line for line in ci)
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "venv" in section and "--index-url https://download.pytorch.org/whl/cpu" in section


@pytest.mark.slow
def test_quick_start_main_job_runs(tmp_path):
    job = quick_start()[0].split("&&", 1)[1].strip()
    clone = fresh_copy(tmp_path)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(job, shell=True, cwd=clone, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (clone / "x.safetensors").is_file()


# ---- the documented --json keys -----------------------------------------------------------------


def documented_keys() -> dict[str, list[str]]:
    """docs/cli.md's JSON section: heading -> the keys in its tables' first column."""
    section = (ROOT / "docs" / "cli.md").read_text().split("## JSON output", 1)[1].split("\n## ", 1)[0]
    keys: dict[str, list[str]] = {}
    for part in section.split("\n### ")[1:]:
        heading, body = part.split("\n", 1)
        keys[heading.strip()] = [k for row in re.findall(r"^\| (.*?) \|", body, re.M) if row != "key"
                                 for k in re.findall(r"`([^`]+)`", row)]
    return keys


def has_key(doc, path: str) -> bool:
    head, _, rest = path.partition(".")
    many = head.endswith("[]")
    head = head.removesuffix("[]")
    if not isinstance(doc, dict) or head not in doc:
        return False
    value = doc[head]
    if many:
        return isinstance(value, list) and bool(value) and (not rest or all(has_key(v, rest) for v in value))
    return not rest or has_key(value, rest)


@pytest.fixture
def documents(run, tmp_path):
    import trainers
    from conftest import save_checkpoint

    torch.manual_seed(0)
    model = trainers.ConvBN()
    ckpt = save_checkpoint(tmp_path / "c.pt", model, trainers.train(model, "sgd", steps=3))
    torch.save(torch.randn(16, 3, 5, 5), tmp_path / "calib.pt")
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    converted = run("convert", ckpt, tmp_path / "bn.safetensors", "--bn-calib", tmp_path / "calib.pt",
                    "--model", f"{tmp_path / 'model_def.py'}:build", "--json")
    run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "release")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"fc1.weight": torch.zeros(16, 8)}, str(bad))
    return {
        "Failure (any command, exit 2)": run("inspect", tmp_path / "missing.pt", "--json"),
        "inspect --json": run("inspect", FIXTURES / "sgd_convbn.pt", "--json"),
        "convert --json": converted,
        "diff --json": run("diff", FIXTURES / "sgd_convbn.pt", "--json"),
        "check --json": run("check", bad, "--ckpt", FIXTURES / "adamw_mlp.pt", "--json"),
    }


def test_every_documented_json_key_is_there(documents):
    keys = documented_keys()
    assert set(keys) == set(documents)
    for heading, result in documents.items():
        doc = json.loads(result.stdout)
        assert doc["version"] == 1
        assert keys[heading], heading
        missing = [k for k in keys[heading] if not has_key(doc, k)]
        assert not missing, f"{heading}: documented but not in the output: {missing}"


# ---- fixtures/ is what `python fixtures/make_fixtures.py` writes (README, Development) -----------------

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


@pytest.mark.slow
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
