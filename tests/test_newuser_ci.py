"""CI as a new user meets it (issue #24): the Action's `result` output and shell-like `args`, exit 2
in the step summary, the pinned pre-commit hook, and `check` on torch.save state dicts with --top."""
import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

import trainers
from conftest import save_checkpoint
from test_cli_ci import ROOT, _run_action_check


def _repo(tmp_path, layout="model/optimizer"):
    """A checkpoint and its release (x), as a model repository holds them."""
    repo = tmp_path / "repo"
    (repo / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    model = trainers.MLP()
    opt = trainers.train(model, "adamw", steps=3)
    save_checkpoint(repo / "checkpoints" / "last.pt", model, opt, layout)
    x = trainers.eval_x(model, opt)
    y = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return repo, x, y


def _outputs(text):
    return dict(line.split("=", 1) for line in text.splitlines() if line)


def test_action_result_output_tells_x_not_x_and_error_apart(tmp_path):
    repo, x, y = _repo(tmp_path)
    (repo / "release").mkdir()
    save_file(x, str(repo / "release" / "model.safetensors"))
    ok, _, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt")
    assert ok.returncode == 0 and _outputs(output) == {"passed": "true", "result": "x"}
    save_file(y, str(repo / "release" / "model.safetensors"))
    bad, _, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt")
    assert bad.returncode == 1 and _outputs(output) == {"passed": "false", "result": "not-x"}
    missing, summary, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/gone.pt")
    assert missing.returncode == 2 and _outputs(output) == {"passed": "false", "result": "error"}
    assert re.search(r"^::error title=sfckpt::checkpoints/gone.pt: no such file or folder", missing.stderr, re.M)
    # the line as markdown, its punctuation escaped (no name from an input can make markup)
    assert summary == "### ⚠️ sfckpt: could not decide (exit 2)\n\ncheckpoints\\/gone\\.pt\\: no such file or folder\\; " \
                      "check the path\n"


def test_action_args_are_split_as_a_shell_splits_them(tmp_path):
    repo, x, _ = _repo(tmp_path, layout="lightning")
    (repo / "my release").mkdir()
    save_file(x, str(repo / "my release" / "model.safetensors"))
    result, _, output = _run_action_check(repo, tmp_path, '"my release/"', "checkpoints/last.pt",
                                          '--strip-prefix "model."')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("PASS: my release: these are x")
    assert _outputs(output)["result"] == "x"


def test_action_args_are_never_run_through_a_shell(tmp_path):
    repo, x, _ = _repo(tmp_path)
    (repo / "release").mkdir()
    save_file(x, str(repo / "release" / "model.safetensors"))
    result, _, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt",
                                          '--atol "$(touch pwned)" $HOME')
    assert result.returncode == 2 and not (repo / "pwned").exists()
    assert "'$(touch pwned)' is not a valid float" in result.stderr
    assert _outputs(output)["result"] == "error"


def test_action_args_with_an_unclosed_quote_are_exit_2(tmp_path):
    repo, _, _ = _repo(tmp_path)
    result, summary, output = _run_action_check(repo, tmp_path, "release/", "checkpoints/last.pt", '--atol "1e-6')
    assert result.returncode == 2 and _outputs(output) == {"passed": "false", "result": "error"}
    assert "error: the action's input in SFCKPT_ARGS cannot be split into words (No closing quotation)" in result.stderr
    assert "could not decide" in summary


def test_exit_2_of_any_command_goes_to_the_step_summary(run, tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = run("inspect", tmp_path / "missing.pt")
    assert result.exit_code == 2
    assert re.search(r"^::error title=sfckpt::.*missing.pt: no such file or folder", result.stderr, re.M)
    assert summary.read_text().startswith("### ⚠️ sfckpt: could not decide (exit 2)\n\n")
    assert "missing\\.pt\\: no such file or folder\\; check the path" in summary.read_text()


def test_pre_commit_hook_pins_torch_and_docs_use_no_branch_as_rev():
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["additional_dependencies"] == [f"torch=={torch.__version__.split('+')[0]}"]
    text = (ROOT / "docs" / "ci.md").read_text()
    revs = re.findall(r"^\s+rev: (\S+)", text, re.M)
    assert revs and all(re.fullmatch(r"[0-9a-f]{40}", r) for r in revs)
    assert "additional_dependencies: [torch==2.13.0+cpu]" in text


@pytest.mark.parametrize("name", ["mnist_cnn.pt", "pytorch_model.bin"])
def test_check_judges_a_torch_saved_state_dict(name, run, tmp_path):
    repo, x, y = _repo(tmp_path)
    torch.save(x, repo / name)
    result = run("check", repo / name, "--ckpt", repo / "checkpoints" / "last.pt")
    assert result.exit_code == 0 and result.stdout == f"PASS: {repo / name}: these are x\n"
    torch.save(y, repo / name)
    result = run("check", repo / name, "--ckpt", repo / "checkpoints" / "last.pt")
    assert result.exit_code == 1 and "these are the training weights y" in result.stdout


def test_check_refuses_a_training_checkpoint_as_the_release(run, tmp_path):
    repo, _, _ = _repo(tmp_path)
    ckpt = repo / "checkpoints" / "last.pt"
    result = run("check", ckpt, "--ckpt", ckpt)
    assert result.exit_code == 2
    assert "is a training checkpoint (it holds an optimizer state), not released weights" in result.stderr


def test_check_top_limits_the_rows_of_findings(run, tmp_path):
    repo, _, y = _repo(tmp_path)
    torch.save(y, repo / "y.pt")
    result = run("check", repo / "y.pt", "--ckpt", repo / "checkpoints" / "last.pt", "--top", "2")
    assert result.exit_code == 1
    rows = [line for line in result.stdout.splitlines() if " differs " in line]
    assert len(rows) == 2
    assert result.stdout.rstrip().endswith("(2 more findings: --top 0 shows all, --json lists them)")
    everything = run("check", repo / "y.pt", "--ckpt", repo / "checkpoints" / "last.pt", "--top", "0")
    assert len([line for line in everything.stdout.splitlines() if " differs " in line]) == 4
