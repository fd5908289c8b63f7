"""Attacks on the Orbax reader that its own tests do not cover: saved trees the author did not
write, built from the real optax fixtures (fixtures/orbax/, made by make_orbax_fixtures.py) by
moving their arrays (the layout without OCDBT keeps one zarr folder per array, named by its
dot-joined path) and rewriting `_METADATA` as Orbax would have written it for that tree.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from test_orbax import ORBAX, assert_bits_equal, reference

CASE = "legacy-bf16"


def _retree(tmp_path: Path, move: dict[str, str], copies: dict[str, str] = {}) -> Path:
    """The fixture's tree with top-level keys renamed (`move`: old -> new dotted prefix) and
    subtrees copied under new names (`copies`), each copy's arrays halved so it differs from y."""
    import tensorstore as ts

    source, ckpt = ORBAX / CASE / "ckpt", tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("_CHECKPOINT_METADATA", "_sharding", "commit_success.txt"):
        shutil.copy(source / name, ckpt / name)
    meta = json.loads((source / "_METADATA").read_text())
    entries = {}
    for entry in meta["tree_metadata"].values():
        keys = [k["key"] for k in entry["key_metadata"]]
        names = [move.get(keys[0], keys[0])] + ([copies[keys[0]]] if keys[0] in copies else [])
        for i, name in enumerate(names):
            new = name.split(".") + keys[1:]
            entries[str(tuple(new))] = {**entry, "key_metadata": [{"key": k, "key_type": 2} for k in new]}
            if not (source / ".".join(keys)).is_dir():
                continue  # None and masked-out leaves have no array
            shutil.copytree(source / ".".join(keys), ckpt / ".".join(new))
            if i:
                spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(ckpt / ".".join(new))}}
                store = ts.open(spec).result()
                store.write(store.read().result() * np.array(0.5, store.dtype.numpy_dtype)).result()
    meta["tree_metadata"] = entries
    (ckpt / "_METADATA").write_text(json.dumps(meta))
    return ckpt


def test_ema_params_beside_a_nested_train_state_are_not_taken_for_y(run, tmp_path):
    # {'state': {'params', 'opt_state'}, 'ema_params'}: the EMA copy sits nearer the root than y.
    ckpt = _retree(tmp_path, {"params": "state.params", "opt_state": "state.opt_state"}, {"params": "ema_params"})
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    got = load_file(out)
    x = {n.removeprefix("state/"): t for n, t in got.items() if not n.startswith("ema_params/")}
    assert_bits_equal(x, reference(ORBAX / CASE))
    assert any(n.startswith("ema_params/") for n in got)


def test_ema_params_beside_params_leave_params_as_y(run, tmp_path):
    ckpt = _retree(tmp_path, {}, {"params": "ema_params"})
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out)
    assert result.exit_code == 0, result.stderr
    got = load_file(out)
    assert_bits_equal({n: t for n, t in got.items() if not n.startswith("ema_params/")}, reference(ORBAX / CASE))


def test_two_mirrors_without_a_params_key_are_refused(run, tmp_path):
    ckpt = _retree(tmp_path, {"params": "model"}, {"params": "ema"})
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "mirrors several saved trees" in result.stderr and "under the key 'params'" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_chunk_grid_larger_than_the_array_is_refused_before_reading(run, tmp_path):
    # A tiny array whose .zarray claims 2**34-element chunks: decoding one would allocate 32 GB.
    shutil.copytree(ORBAX / CASE, tmp_path / CASE)
    ckpt = tmp_path / CASE / "ckpt"
    zarray = ckpt / "params.dense1.kernel" / ".zarray"
    meta = json.loads(zarray.read_text())
    meta["chunks"] = [1 << 17, 1 << 17]
    zarray.write_text(json.dumps(meta))
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "params/dense1/kernel" in result.stderr and "claims chunks" in result.stderr
