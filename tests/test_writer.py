"""The written file: safetensors layout, metadata, atomicity, determinism, sharding."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sfckpt
import trainers
from conftest import assert_equal_tensors, read


def test_bytes_equal_safetensors_save_file(trained, run, tmp_path):
    ckpt, x, _ = trained("sgd", model=trainers.ConvBN())
    out = tmp_path / "x.safetensors"
    assert run("convert", ckpt, out).exit_code == 0
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    save_file(x, str(tmp_path / "ref.safetensors"), metadata=metadata)
    ours, ref = _split(out), _split(tmp_path / "ref.safetensors")
    # Same tensors in the same order with the same offsets, and the same data bytes.
    # (safetensors writes metadata keys in hash order; we sort them, so our bytes are stable.)
    assert ours[0] == ref[0] and list(ours[0]) == list(ref[0])
    assert ours[1] == ref[1]


def _split(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def test_metadata_strings_and_no_timestamps(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    out = tmp_path / "x.safetensors"
    run("convert", ckpt, out)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["sfckpt_version"] == sfckpt.__version__
    assert meta["sfckpt_optimizer_family"] == "adamw"
    assert meta["sfckpt_beta"] == "0.85"
    assert meta["sfckpt_step"] == "4"
    assert meta["sfckpt_source_params"] == "y"
    assert meta["sfckpt_source"] == ckpt.name
    assert all(isinstance(v, str) for v in meta.values())


def test_same_input_same_bytes(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw", model=trainers.TiedLM())
    run("convert", ckpt, tmp_path / "a.safetensors")
    run("convert", ckpt, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_existing_output_kept_unless_force(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"precious")
    result = run("convert", ckpt, out)
    assert result.exit_code == 2 and "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"precious"
    assert run("convert", ckpt, out, "--force").exit_code == 0
    assert_equal_tensors(read(out), x)


def test_output_equal_to_input_refused(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    before = ckpt.read_bytes()
    result = run("convert", ckpt, ckpt, "--force")
    assert result.exit_code == 2 and "is the input checkpoint" in result.stderr
    assert ckpt.read_bytes() == before


def test_missing_output_folder(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    result = run("convert", ckpt, tmp_path / "nope" / "x.safetensors")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_dtype_cast_after_reconstruction(trained, run, tmp_path):
    ckpt, x, _ = trained("adamw")
    out = tmp_path / "x.safetensors"
    assert run("convert", ckpt, out, "--dtype", "bfloat16").exit_code == 0
    assert_equal_tensors(read(out), {k: v.to(torch.bfloat16) for k, v in x.items()})


def test_folder_and_sharded_output_round_trip(trained, run, tmp_path):
    ckpt, x, _ = trained("sgd", model=trainers.ConvBN())
    assert run("convert", ckpt, tmp_path / "single.safetensors").exit_code == 0
    assert run("convert", ckpt, tmp_path / "release").exit_code == 0
    assert_equal_tensors(read(tmp_path / "release" / "model.safetensors"), x)
    result = run("convert", ckpt, tmp_path / "sharded", "--max-shard-size", "300B")
    assert result.exit_code == 0, result.stderr
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in x.values())
    merged = {}
    for shard in shards:
        merged.update(read(tmp_path / "sharded" / shard))
    assert_equal_tensors(merged, read(tmp_path / "single.safetensors"))


def test_library_api(trained, tmp_path):
    ckpt, x, _ = trained("adamw")
    recon = sfckpt.reconstruct(sfckpt.load(ckpt))
    assert_equal_tensors(recon.state_dict(), x)
    paths = sfckpt.save(recon, tmp_path / "x.safetensors")
    assert_equal_tensors(read(paths[0]), x)
    sfckpt.convert(ckpt, tmp_path / "y.safetensors")
    assert_equal_tensors(read(tmp_path / "y.safetensors"), x)


def test_json_summary_on_stdout_only(trained, run, tmp_path):
    ckpt, _, _ = trained("adamw")
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--json")
    summary = json.loads(result.stdout)
    assert summary["tensors_converted"] == 4 and summary["source_params"] == "y"
    assert result.stderr == ""


def test_dash_is_not_standard_output(trained, run, tmp_path, monkeypatch):
    """`convert CKPT -` is refused (x is binary and may be sharded), not written to a folder named '-'."""
    ckpt, _, _ = trained()
    monkeypatch.chdir(tmp_path)
    result = run("convert", ckpt, "-")
    assert result.exit_code == 2 and "not to standard output" in result.stderr
    assert not (tmp_path / "-").exists()
