"""diff: the gap, in float64, per tensor; check: the release gate."""
import json
import math
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
from conftest import FIXTURES

ADAMW = FIXTURES / "adamw_mlp.pt"

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def release(trained, run, tmp_path):
    """(checkpoint, x file, y file, x, y) for an AdamW-trained ConvBN model."""
    ckpt, x, y = trained("adamw", model=trainers.ConvBN())
    x_file, y_file = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    assert run("convert", ckpt, x_file).exit_code == 0
    save_file(y, str(y_file))
    return ckpt, x_file, y_file, x, y


def test_check_passes_on_x(release, run, tmp_path):
    ckpt, x_file, _, _, _ = release
    result = run("check", x_file, "--ckpt", ckpt)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert result.stdout.startswith("PASS")
    assert run("convert", ckpt, tmp_path / "rel", "--max-shard-size", "200B").exit_code == 0
    assert run("check", tmp_path / "rel", "--ckpt", ckpt).exit_code == 0
    assert run("check", tmp_path / "rel" / "model.safetensors.index.json", "--ckpt", ckpt).exit_code == 0
    shards = sorted((tmp_path / "rel").glob("model-*.safetensors"))
    assert run("check", *shards, "--ckpt", ckpt).exit_code == 0  # as pre-commit passes them


def test_check_fails_on_y_with_the_y_verdict(release, run):
    ckpt, _, y_file, _, _ = release
    result = run("check", y_file, "--ckpt", ckpt, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["verdict"].startswith("these are the training weights y (identical to the checkpoint's parameters)")
    assert "sfckpt convert" in report["verdict"]
    table = run("check", y_file, "--ckpt", ckpt)
    assert table.exit_code == 1 and "training weights y" in table.stdout


def test_check_names_a_tampered_tensor(release, run, tmp_path):
    ckpt, _, _, x, _ = release
    tampered = dict(x)
    tampered["conv.weight"] = x["conv.weight"].clone()
    tampered["conv.weight"][0, 0, 0, 0] += 0.5
    save_file(tampered, str(tmp_path / "t.safetensors"))
    result = run("check", tmp_path / "t.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1
    assert "1 tensor differs from x (worst: conv.weight, max abs 0.5)" in result.stdout


def test_check_missing_extra_nonfinite(release, run, tmp_path):
    ckpt, _, _, x, _ = release
    bad = {k: v for k, v in x.items() if k != "fc.bias"}
    bad["extra.weight"] = torch.zeros(2)
    bad["bn.weight"] = x["bn.weight"].clone()
    bad["bn.weight"][1] = float("nan")
    save_file(bad, str(tmp_path / "b.safetensors"))
    report = json.loads(run("check", tmp_path / "b.safetensors", "--ckpt", ckpt, "--json").stdout)
    kinds = {(f["kind"], f["name"]) for f in report["findings"]}
    assert kinds == {("missing", "fc.bias"), ("extra", "extra.weight"), ("nonfinite", "bn.weight")}


def test_check_cast_release_and_tolerances(release, run, tmp_path):
    ckpt, _, _, x, y = release
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}, str(tmp_path / "bf16.safetensors"))
    result = run("check", tmp_path / "bf16.safetensors", "--ckpt", ckpt, "--json")
    assert result.exit_code == 0
    assert "conv.weight" in json.loads(result.stdout)["cast_to_released_dtype"]
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in y.items()}, str(tmp_path / "ybf16.safetensors"))
    assert run("check", tmp_path / "ybf16.safetensors", "--ckpt", ckpt).exit_code == 1
    nudged = {k: v + 1e-6 if v.is_floating_point() else v for k, v in x.items()}
    save_file(nudged, str(tmp_path / "n.safetensors"))
    assert run("check", tmp_path / "n.safetensors", "--ckpt", ckpt).exit_code == 1
    assert run("check", tmp_path / "n.safetensors", "--ckpt", ckpt, "--atol", "1e-5").exit_code == 0


def test_check_refuses_lfs_pointer_and_bad_ckpt(release, run, tmp_path):
    ckpt, x_file, _, _, _ = release
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    result = run("check", pointer, "--ckpt", ckpt)
    assert result.exit_code == 2
    assert "Git LFS pointer" in result.stderr and "lfs: true" in result.stderr
    (tmp_path / "junk.pt").write_bytes(b"junk" * 100)
    assert run("check", x_file, "--ckpt", tmp_path / "junk.pt").exit_code == 2


def test_github_actions_annotation_and_summary(release, run, tmp_path, monkeypatch):
    ckpt, _, y_file, _, _ = release
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = run("check", y_file, "--ckpt", ckpt)
    assert result.exit_code == 1
    assert re.search(r"^::error title=sfckpt check::these are the training weights y", result.stdout, re.M)
    text = summary.read_text()
    assert "sfckpt check" in text and "| `conv.weight` | differs |" in text
    result = run("check", y_file, "--ckpt", ckpt, "--json")
    json.loads(result.stdout)  # stdout stays pure JSON
    assert "::error" in result.stderr


def _independent(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    d = a - b
    return {
        "max_abs": d.abs().max().item(),
        "mean_abs": d.abs().mean().item(),
        "rel_l2": (d.norm() / b.norm()).item(),
        "cosine": (a.flatten() @ b.flatten() / (a.norm() * b.norm())).item(),
    }


def test_diff_json_matches_independent_float64(release, run):
    ckpt, _, _, x, y = release
    result = run("diff", ckpt, "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["version"] == 1
    rows = {r["name"]: r for r in report["tensors"]}
    assert [r["name"] for r in report["tensors"]] == sorted(rows)
    for name in ("conv.weight", "fc.bias", "bn.weight"):
        expected = _independent(y[name], x[name])
        for key, value in expected.items():
            assert math.isclose(rows[name][key], value, rel_tol=1e-9, abs_tol=1e-15), (name, key)
        assert rows[name]["status"] == "differs"
    assert rows["bn.running_mean"]["status"] == "same"
    total = math.sqrt(sum(((y[n].double() - x[n].double()) ** 2).sum().item() for n in x if x[n].is_floating_point())
                      / sum((x[n].double() ** 2).sum().item() for n in x if x[n].is_floating_point()))
    assert math.isclose(report["summary"]["total_rel_l2"], total, rel_tol=1e-9)
    modules = {m["module"]: m for m in report["summary"]["modules"]}
    assert set(modules) == {"conv", "bn", "fc"}


def test_diff_two_sources_and_statuses(release, run, tmp_path):
    ckpt, x_file, y_file, x, _ = release
    result = run("diff", x_file, ckpt, "--json")  # a training checkpoint side is its x
    assert json.loads(result.stdout)["summary"]["differ"] == 0
    smaller = {k: v for k, v in x.items() if k != "fc.bias"}
    smaller["conv.weight"] = torch.zeros(2, 2)
    save_file(smaller, str(tmp_path / "s.safetensors"))
    s = json.loads(run("diff", tmp_path / "s.safetensors", x_file, "--json").stdout)["summary"]
    assert s["only_in_b"] == ["fc.bias"] and s["shape_differs"] == ["conv.weight"]
    table = run("diff", y_file, x_file, "--top", "2", "--sort", "max_abs")
    assert table.exit_code == 0 and "more rows" in table.stdout


def test_diff_plot_writes_png(release, run, tmp_path):
    pytest.importorskip("matplotlib")
    ckpt = release[0]
    result = run("diff", ckpt, "--plot", tmp_path / "gap.png")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_plot_format_follows_the_name(release, run, tmp_path):
    """An .svg name gets SVG; a name matplotlib would not match (gap.txt) is refused before any work."""
    pytest.importorskip("matplotlib")
    ckpt = release[0]
    assert run("diff", ckpt, "--plot", tmp_path / "gap.svg").exit_code == 0
    assert b"<svg" in (tmp_path / "gap.svg").read_bytes()[:400]
    result = run("diff", ckpt, "--plot", tmp_path / "gap.txt")
    assert result.exit_code == 2 and "PNG, SVG or PDF" in result.stderr and not (tmp_path / "gap.txt").exists()


def _sfckpt_on_path():
    exe = shutil.which("sfckpt") or str(Path(sys.executable).parent / "sfckpt")
    env = dict(os.environ, PATH=f"{Path(exe).parent}{os.pathsep}{os.environ['PATH']}")
    return env


@pytest.mark.slow
def test_docs_ci_workflow_step_runs(release, run, tmp_path):
    ckpt, _, y_file, _, _ = release
    text = (ROOT / "docs" / "ci.md").read_text()
    workflow = yaml.safe_load(re.search(r"```yaml\n(name: release-weights.*?)```", text, re.S).group(1))
    step = workflow["jobs"]["sfckpt"]["steps"][-1]["run"]
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(ckpt, tmp_path / "checkpoints" / "last.pt")
    assert run("convert", ckpt, tmp_path / "release").exit_code == 0
    env = dict(_sfckpt_on_path(), GITHUB_ACTIONS="true", GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"))
    ok = subprocess.run(step, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    shutil.copy(y_file, tmp_path / "release" / "model.safetensors")
    bad = subprocess.run(step, shell=True, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "::error" in bad.stdout
    assert "❌" in (tmp_path / "summary.md").read_text()


def test_fixture_diff_runs(run):
    assert run("diff", FIXTURES / "adamw_mlp.pt").exit_code == 0


def test_check_accepts_a_release_without_the_tied_duplicate(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw", model=trainers.TiedLM())
    save_file({k: v for k, v in x.items() if k != "head.weight"}, str(tmp_path / "hf_style.safetensors"))
    assert run("check", tmp_path / "hf_style.safetensors", "--ckpt", ckpt).exit_code == 0
    save_file({k: v for k, v in x.items() if k != "mid.bias"}, str(tmp_path / "missing.safetensors"))
    result = run("check", tmp_path / "missing.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1 and "missing from the release (first: mid.bias)" in result.stdout


def test_check_does_not_pass_a_folder_whose_model_safetensors_is_stale(run, tmp_path):
    """A release folder with x in index+shards but y in model.safetensors is not PASSed by check."""
    rel = tmp_path / "rel"
    assert run("convert", ADAMW, f"{rel}/", "--max-shard-size", "300B", "-q").exit_code == 0
    y = tmp_path / "y.safetensors"
    assert run("convert", ADAMW, y, "--params-are", "x", "-q").exit_code == 0  # y, copied unchanged
    shutil.move(y, rel / "model.safetensors")  # what transformers' from_pretrained loads first
    assert (rel / "model.safetensors.index.json").is_file()
    result = run("check", f"{rel}/", "--ckpt", ADAMW)
    assert result.exit_code != 0, result.stdout
