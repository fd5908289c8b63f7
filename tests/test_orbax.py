"""Orbax checkpoints of optax Schedule-Free runs: x equals optax's own schedule_free_eval_params
(and rollfast's, for its Schedule-Free wrapper).

The fixtures in fixtures/orbax/ were trained with the real optax 0.2.8 and saved with the real
Orbax by fixtures/make_orbax_fixtures.py (JAX on CPU); each holds the x optax computed. JAX is
not installed here: reading needs only tensorstore. `test_regenerated_fixtures_convert_exactly`
runs the script again where JAX is available (SFCKPT_JAX_PYTHON names a Python that has it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES

ORBAX = FIXTURES / "orbax"
# case -> the folder a user passes
CASES = {"fp32": "ckpt", "bf16": "ckpt", "manager-fp32": "run/5", "legacy-bf16": "ckpt", "zarr3-fp32": "ckpt",
         "rollfast-fp32": "ckpt", "rollfast-bf16": "ckpt", "state-dtype-bf16": "ckpt"}
FROZEN, STATS = "params/embed/table", "batch_stats/block.norm/mean"


def reference(case_dir: Path) -> dict[str, torch.Tensor]:
    """The x optax computed, as torch tensors with the same bits."""
    saved = np.load(case_dir / "x.npz")
    dtypes = dict(entry.split("=") for entry in saved["dtypes"])
    out = {}
    for name, dtype in dtypes.items():
        bits = torch.from_numpy(saved[name].astype(saved[name].dtype.newbyteorder("=")))
        out[name] = bits.view({"uint16": torch.int16, "uint32": torch.int32}[saved[name].dtype.name]).view(
            getattr(torch, dtype))
    return out


def assert_bits_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name].view(torch.uint8), want.contiguous().view(torch.uint8)), f"{name} differs from optax"


def copy_case(tmp_path: Path, case: str = "legacy-bf16") -> Path:
    """A writable copy of a fixture checkpoint (the folder a user passes)."""
    shutil.copytree(ORBAX / case, tmp_path / case)
    return tmp_path / case / CASES[case]


@pytest.mark.parametrize("case", sorted(CASES))
def test_x_equals_optax_schedule_free_eval_params(run, tmp_path, case):
    out = tmp_path / "x.safetensors"
    result = run("convert", ORBAX / case / CASES[case], out)
    assert result.exit_code == 0, result.stderr
    assert_bits_equal(load_file(out), reference(ORBAX / case))


def test_bf16_uses_the_stored_b1(run):
    result = run("inspect", ORBAX / "bf16" / "ckpt", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["container"] == "orbax"
    assert [g["beta"] for g in doc["groups"]] == [0.8984375]  # bfloat16(0.9), as optax stores it


def test_frozen_subtree_and_statistics_are_copied_as_saved(run, tmp_path):
    out = tmp_path / "x.safetensors"
    assert run("convert", ORBAX / "fp32" / "ckpt", out).exit_code == 0
    y = tmp_path / "y.safetensors"
    assert run("convert", ORBAX / "fp32" / "ckpt", y, "--params-are", "x").exit_code == 0
    x, saved = load_file(out), load_file(y)
    assert torch.equal(x[FROZEN], saved[FROZEN]) and torch.equal(x[STATS], saved[STATS])
    assert not torch.equal(x["params/dense1/kernel"], saved["params/dense1/kernel"])


def test_inspect_names_the_state_and_what_is_copied(run):
    result = run("inspect", ORBAX / "fp32" / "ckpt")
    assert result.exit_code == 0, result.stderr
    assert "optax-sf" in result.stdout
    assert "opt_state/inner_states/train/inner_state/1" in result.stdout
    assert "batch_stats/block.norm copied as saved" in result.stdout


def test_item_folder_of_a_manager_step_converts_too(run, tmp_path):
    out = tmp_path / "x.safetensors"
    assert run("convert", ORBAX / "manager-fp32" / "run" / "5" / "default", out).exit_code == 0
    assert_bits_equal(load_file(out), reference(ORBAX / "manager-fp32"))


def test_manager_root_is_refused_naming_a_step(run, tmp_path):
    result = run("convert", ORBAX / "manager-fp32" / "run", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "pass one step folder" in result.stderr and "run/5" in result.stderr


def test_check_passes_x_and_fails_y(run, tmp_path):
    ckpt = ORBAX / "bf16" / "ckpt"
    x, y = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    assert run("convert", ckpt, x).exit_code == 0
    assert run("convert", ckpt, y, "--params-are", "x").exit_code == 0
    assert run("check", x, "--ckpt", ckpt).exit_code == 0
    failed = run("check", y, "--ckpt", ckpt)
    assert failed.exit_code == 1 and "training weights y" in failed.stdout + failed.stderr


def test_diff_compares_pytree_named_files(run, tmp_path):
    ckpt = ORBAX / "fp32" / "ckpt"
    x, y = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    run("convert", ckpt, x)
    run("convert", ckpt, y, "--params-are", "x")
    result = run("diff", y, x, "--json")
    assert result.exit_code == 0, result.stderr
    assert "params/dense1/kernel" in result.stdout


def test_documented_snippet_loads_x_into_a_nested_dict(run, tmp_path):
    text = Path(__file__).resolve().parent.parent.joinpath("docs", "containers.md").read_text()
    section = text[text.index("## Orbax checkpoints"):]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert run("convert", ORBAX / "fp32" / "ckpt", tmp_path / "x.safetensors").exit_code == 0
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        scope: dict = {}
        exec(snippet, scope)
    finally:
        os.chdir(cwd)
    x = scope["x"]
    assert sorted(x) == ["batch_stats", "params"] and sorted(x["params"]["dense1"]) == ["bias", "kernel"]
    assert x["params"]["block.norm"]["scale"].shape == (16,)


@pytest.mark.slow  # a child process importing torch and tensorstore
def test_reading_imports_no_jax(tmp_path):
    code = ("import sys, sfckpt; r = sfckpt.reconstruct(sfckpt.load(sys.argv[1])); r.state_dict(); "
            "bad = [m for m in ('jax', 'jaxlib', 'flax', 'optax', 'orbax') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(ORBAX / "bf16" / "ckpt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_missing_tensorstore_names_the_extra(run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorstore", None)
    result = run("convert", ORBAX / "fp32" / "ckpt", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "sfckpt[jax]" in result.stderr


def test_symlink_inside_the_folder_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    array = ckpt / "params.dense1.kernel" / "0.0"
    outside = tmp_path / "outside"
    shutil.move(array, outside)
    array.symlink_to(outside)
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "symbolic link" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_fifo_inside_the_folder_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    os.mkfifo(ckpt / "params.dense1.kernel" / "1.0")
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "not a regular file" in result.stderr


def test_tree_key_leading_outside_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    (tmp_path / "secret.weights").mkdir()
    shutil.copytree(ckpt / "params.dense1.kernel", tmp_path / "secret.weights" / "x")
    meta = json.loads((ckpt / "_METADATA").read_text())
    entry = meta["tree_metadata"].pop("('params', 'dense1', 'kernel')")
    entry["key_metadata"] = [{"key": "../../secret.weights/x", "key_type": 2}]
    meta["tree_metadata"]["escape"] = entry
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "is not a plain name" in result.stderr


def test_huge_shape_in_array_metadata_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    zarray = ckpt / "params.dense1.kernel" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["shape"] = [10**9, 10**9]
    zarray.write_text(json.dumps(meta))
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "SFCKPT_MAX_ARRAY_BYTES" in result.stderr
    assert "params/dense1/kernel" in result.stderr


def test_missing_array_is_exit_2(run, tmp_path):
    ckpt = copy_case(tmp_path)
    shutil.rmtree(ckpt / "params.dense1.kernel")
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "params/dense1/kernel" in result.stderr


def test_read_only_folder_is_read_without_writing(run, tmp_path):
    ckpt = tmp_path / "fp32"
    shutil.copytree(ORBAX / "fp32", ckpt)
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    for p in [ckpt, *ckpt.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        assert run("convert", ckpt / "ckpt", tmp_path / "x.safetensors").exit_code == 0
    finally:
        for p in [ckpt, *ckpt.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before


def test_orbax_tree_without_schedule_free_state_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    meta = json.loads((ckpt / "_METADATA").read_text())
    meta["tree_metadata"] = {k: v for k, v in meta["tree_metadata"].items() if "'b1'" not in k}
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "without an optax Schedule-Free state" in result.stderr


def _jax_python() -> str | None:
    if os.environ.get("SFCKPT_JAX_PYTHON"):
        return os.environ["SFCKPT_JAX_PYTHON"]
    import importlib.util

    found = all(importlib.util.find_spec(m) is not None for m in ("jax", "optax", "orbax", "rollfast"))
    return sys.executable if found else None


@pytest.mark.slow
@pytest.mark.skipif(_jax_python() is None, reason="needs jax, optax, orbax-checkpoint and rollfast (or SFCKPT_JAX_PYTHON)")
def test_regenerated_fixtures_convert_exactly(run, tmp_path):
    script = FIXTURES / "make_orbax_fixtures.py"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([_jax_python(), str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CASES)
    for case, folder in CASES.items():
        out = tmp_path / f"{case}.safetensors"
        result = run("convert", tmp_path / case / folder, out)
        assert result.exit_code == 0, result.stderr
        assert_bits_equal(load_file(out), reference(tmp_path / case))


def test_optimizer_state_without_its_parameters_is_refused(run, tmp_path):
    ckpt = copy_case(tmp_path)
    meta = json.loads((ckpt / "_METADATA").read_text())
    meta["tree_metadata"] = {k: v for k, v in meta["tree_metadata"].items() if not k.startswith("('params'")}
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "match no parameters saved beside it" in result.stderr


def test_single_ocdbt_database_without_process_folders_converts(run, tmp_path):
    """The layout of Orbax saves before per-process databases: one OCDBT database at the folder's root."""
    import tensorstore as ts

    source, ckpt = ORBAX / "bf16" / "ckpt", tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding"):
        shutil.copy(source / name, ckpt / name)
    old, new = (ts.KvStore.open({"driver": "ocdbt", "base": {"driver": "file", "path": f"{p}/"}}).result()
                for p in (source, ckpt))
    for key in old.list().result():
        new.write(key, old.read(key).result().value).result()
    assert not list(ckpt.glob("ocdbt.process_*"))
    out = tmp_path / "x.safetensors"
    assert run("convert", ckpt, out).exit_code == 0
    assert_bits_equal(load_file(out), reference(ORBAX / "bf16"))
