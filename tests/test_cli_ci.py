"""The CI gate where users put it: the pre-commit hook through the real `pre-commit`, and action.yml's script."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import trainers
from conftest import read, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PRE_COMMIT = shutil.which("pre-commit", path=str(BIN)) or shutil.which("pre-commit")


def _env(**extra):
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env=_env(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t"))


def _docs_yaml(first_key: str) -> list[dict]:
    text = (ROOT / "docs" / "ci.md").read_text()
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith(first_key)]


def _model_repo(tmp_path, sharded=False):
    """A model repository with a checkpoint and its release (x), committed."""
    repo = tmp_path / "model-repo"
    (repo / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    model = trainers.ConvBN()
    save_checkpoint(repo / "checkpoints" / "last.pt", model, trainers.train(model, "adamw", steps=3))
    args = ["--max-shard-size", "300B"] if sharded else []
    proc = subprocess.run([str(BIN / "sfckpt"), "convert", "checkpoints/last.pt", "release/", *args], cwd=repo,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    _git(repo, "init", "-q")
    return repo, model


def _pre_commit_config(repo, local: bool):
    """docs/ci.md's configuration; the published hook is run as `language: system` so that no
    environment is installed from the network (everything else is the manifest's and the docs')."""
    configs = _docs_yaml("repos:")
    remote = next(c for c in configs if c["repos"][0]["repo"] != "local")
    local_cfg = next(c for c in configs if c["repos"][0]["repo"] == "local")
    if local:
        config = local_cfg
    else:
        (manifest,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
        user = remote["repos"][0]["hooks"][0]
        assert user["id"] == manifest["id"]
        # language: system installs nothing, so it takes no additional_dependencies (the manifest's torch pin)
        hook = {**{k: v for k, v in manifest.items() if k != "additional_dependencies"},
                **{k: v for k, v in user.items() if k != "id"}, "language": "system"}
        config = {"repos": [{"repo": "local", "hooks": [hook]}]}
    (repo / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config))


def _pre_commit(repo, tmp_path):
    return subprocess.run([PRE_COMMIT, "run"], cwd=repo, capture_output=True, text=True,
                          env=_env(PRE_COMMIT_HOME=str(tmp_path / "pre-commit-home")))


@pytest.mark.slow
@pytest.mark.skipif(PRE_COMMIT is None, reason="pre-commit is not installed (it is in .[test])")
@pytest.mark.parametrize("local", [False, True], ids=["published-hook", "local-hook"])
def test_pre_commit_checks_the_whole_release_when_release_or_checkpoint_changes(local, tmp_path):
    repo, model = _model_repo(tmp_path, sharded=True)
    _pre_commit_config(repo, local)
    _git(repo, "add", ".")
    first = _pre_commit(repo, tmp_path)
    assert first.returncode == 0 and "Passed" in first.stdout, first.stdout + first.stderr

    _git(repo, "commit", "-q", "--no-verify", "-m", "release")
    # One shard changes (re-written with the same x): the whole release is checked, nothing "missing".
    shard = sorted((repo / "release").glob("model-*.safetensors"))[0]
    save_file(read(shard), str(shard), metadata={"format": "pt", "touched": "yes"})
    _git(repo, "add", str(shard))
    one_shard = _pre_commit(repo, tmp_path)
    assert one_shard.returncode == 0 and "Passed" in one_shard.stdout, one_shard.stdout + one_shard.stderr
    assert "missing" not in one_shard.stdout

    # Only the checkpoint changes (training went on): the release is now stale, and the hook says so.
    save_checkpoint(repo / "checkpoints" / "last.pt", model, trainers.train(model, "adamw", steps=2, seed=1))
    _git(repo, "add", "checkpoints/last.pt")
    stale = _pre_commit(repo, tmp_path)
    assert stale.returncode == 1 and "Failed" in stale.stdout, stale.stdout
    assert "from x" in stale.stdout

    # A change elsewhere does not run the check.
    _git(repo, "reset", "-q")
    (repo / "README.md").write_text("hi\n")
    _git(repo, "add", "README.md")
    skipped = _pre_commit(repo, tmp_path)
    assert skipped.returncode == 0 and "Skipped" in skipped.stdout, skipped.stdout


def test_hook_manifest_checks_the_release_as_a_whole():
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["pass_filenames"] is False and hook["entry"] == "sfckpt check"


def test_docs_say_how_to_get_the_cpu_build_and_install_from_git():
    text = (ROOT / "docs" / "ci.md").read_text()
    assert "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "git+https://github.com/sfckpt/sfckpt" in text and "No release of sfckpt is published yet" in text
    (workflow,) = _docs_yaml("name: release-weights")
    install = " ".join(s.get("run", "") for s in workflow["jobs"]["sfckpt"]["steps"])
    assert "--index-url https://download.pytorch.org/whl/cpu" in install and "pip install sfckpt" not in install
    assert "rev: v0.1.0" not in text


def _action_steps():
    action = yaml.safe_load((ROOT / "action.yml").read_text())
    assert action["runs"]["using"] == "composite"
    return action, {s.get("id"): s for s in action["runs"]["steps"]}


def test_action_installs_the_cpu_torch_and_sfckpt_from_its_checkout():
    action, steps = _action_steps()
    assert action["inputs"]["torch-index-url"]["default"] == "https://download.pytorch.org/whl/cpu"
    install = steps["install"]["run"]
    assert '--index-url "$TORCH_INDEX_URL"' in install and '"$GITHUB_ACTION_PATH"' in install
    # a few lines in a model repository's workflow, as docs/ci.md shows them
    (snippet,) = [b for b in re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "ci.md").read_text(), re.S)
                  if "uses: sfckpt/sfckpt@" in b]
    assert len(snippet.strip().splitlines()) <= 5
    uses = yaml.safe_load(snippet)[1]
    assert set(uses["with"]) <= set(action["inputs"])


def _run_action_check(repo, tmp_path, weights, ckpt, args=""):
    """action.yml's check step, as the runner runs it: inputs substituted into its env, bash, GitHub's variables."""
    action, steps = _action_steps()
    step = steps["check"]
    inputs = {name: spec.get("default", "") for name, spec in action["inputs"].items()}
    inputs.update(weights=weights, ckpt=ckpt, args=args)
    env = {k: re.sub(r"\$\{\{ inputs\.([\w-]+) \}\}", lambda m: inputs[m.group(1)], v) for k, v in step["env"].items()}
    summary, output = tmp_path / "summary.md", tmp_path / "output.txt"
    summary.write_text("")
    output.write_text("")
    proc = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=repo, capture_output=True, text=True,
                          env=_env(**env, GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(summary),
                                   GITHUB_OUTPUT=str(output), GITHUB_ACTION_PATH=str(ROOT)))
    return proc, summary.read_text(), output.read_text()


@pytest.mark.slow
def test_action_check_step_passes_and_fails_with_annotation_and_summary(tmp_path):
    repo, _ = _model_repo(tmp_path)
    ok, summary, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "✅" in summary and "passed=true" in output
    y = {k: v for k, v in torch.load(repo / "checkpoints" / "last.pt")["model"].items()}
    save_file(y, str(repo / "release" / "model.safetensors"))
    bad, summary, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt")
    assert bad.returncode == 1
    assert re.search(r"^::error title=sfckpt check::these are the training weights y", bad.stdout, re.M)
    assert "❌" in summary and "passed=false" in output
    several, _, _ = _run_action_check(repo, tmp_path, "release/model.safetensors", "checkpoints/last.pt", "--atol 0")
    assert several.returncode == 1
