"""Hostile inputs, grouped by what they attack (issue #11): code, paths outside the input,
files destroyed, cost out of proportion to the input, and failures that must be exit 2."""
import collections
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch

import sfckpt
import trainers
from conftest import assert_one_error_line, read
from test_hardening import assert_clean


def _parts():
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    return model.state_dict(), opt.state_dict()


def _torch_zip(path, payload: bytes, records=(), compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for name, data in records:
            z.writestr(f"archive/data/{name}", data)
    return path


def _cli(*args, env=None, memory_gb=3):
    """The CLI in a child process with its address space capped (a crash or a blow-up stays there)."""
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({memory_gb} << 30, {memory_gb} << 30)); "
            "from sfckpt.cli import main; main()")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


class Crafted:
    """A tensor pickled with any offset, shape and stride (torch itself would refuse to make it)."""

    def __init__(self, t, offset, size, stride):
        self.t, self.view = t, (offset, size, stride)

    def __reduce_ex__(self, proto):
        storage = torch.storage.TypedStorage(wrap_storage=self.t.untyped_storage(), dtype=self.t.dtype, _internal=True)
        return torch._utils._rebuild_tensor_v2, (storage, *self.view, False, collections.OrderedDict())


# ---- 1. no code, no changes to sfckpt's own objects ---------------------------------------------

def _build_on_global(module: str, name: str, attribute: str) -> bytes:
    """GLOBAL module.name, then BUILD (None, {attribute: 1}): set an attribute on a global."""
    attr = attribute.encode()
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\nN}X" + len(attr).to_bytes(4, "little")
            + attr + b"K\x01s\x86b.")


@pytest.mark.parametrize("module,name,attribute", [
    ("collections", "OrderedDict", "fromkeys"),
    ("builtins", "set", "add"),
    ("_codecs", "encode", "__defaults__"),
    ("torch._utils", "_rebuild_parameter", "__defaults__"),
    ("torch.serialization", "_get_layout", "cache"),
    ("torch", "device", "__defaults__"),
])
def test_build_in_a_torch_file_never_changes_globals(module, name, attribute, run, tmp_path):
    from sfckpt.readers import torch_file

    before = {k: (v, getattr(v, "__dict__", {}).copy(), getattr(v, "__defaults__", None))
              for k, v in vars(torch_file).items() if callable(v)}
    bad = _torch_zip(tmp_path / "b.pt", _build_on_global(module, name, attribute))
    assert_clean(run("inspect", bad), tmp_path / "none")
    after = {k: (v, getattr(v, "__dict__", {}).copy(), getattr(v, "__defaults__", None))
             for k, v in vars(torch_file).items() if callable(v)}
    assert before == after


def test_build_on_placeholders_and_state_dicts_still_works(run, tmp_path):
    """The two BUILDs honest checkpoints use: an OrderedDict's _metadata, an unknown object's state."""
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    torch.save({"model": sd, "optimizer": opt.state_dict(), "obj": pathlib.PurePosixPath("a")}, tmp_path / "c.pt")
    obj, _ = sfckpt.readers.load_torch(tmp_path / "c.pt")
    assert obj["model"]._metadata == sd._metadata
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0


def _dcp(tmp_path, name="good"):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    folder = tmp_path / name
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=folder, no_dist=True)
    return folder


def _edit_metadata(folder, edit):
    """Rewrite a (trusted, test-made) .metadata with `edit(metadata)` applied."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    edit(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


@pytest.mark.parametrize("module,name,attribute", [
    ("pathlib", "PosixPath", "is_dir"),
    ("torch.distributed.checkpoint.metadata", "Metadata", "__init__"),
    ("torch", "float32", "is_floating_point"),
    ("torch.serialization", "_get_layout", "cache"),
])
def test_build_in_dcp_metadata_never_changes_globals(module, name, attribute, run, tmp_path):
    import torch.serialization

    folder = _dcp(tmp_path)
    is_dir, cache = pathlib.PosixPath.is_dir, dict(torch.serialization._get_layout.__dict__)
    (folder / ".metadata").write_bytes(_build_on_global(module, name, attribute))
    assert_clean(run("inspect", folder), tmp_path / "none")
    assert pathlib.PosixPath.is_dir is is_dir and torch.serialization._get_layout.__dict__ == cache


def test_build_in_dcp_metadata_sets_only_dataclass_fields(run, tmp_path):
    folder = _dcp(tmp_path)
    data = (folder / ".metadata").read_bytes()
    # A NEWOBJ'd StorageMeta whose BUILD state names an attribute that is not a field.
    bad = data.replace(b"load_id", b"zzzz_id", 1)
    assert bad != data
    (folder / ".metadata").write_bytes(bad)
    assert_clean(run("inspect", folder), tmp_path / "none")


# ---- 2. every path an input names stays inside the input -----------------------------------------

@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_dcp_storage_paths_confined_to_the_folder(where, run, tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    outside = _dcp(tmp_path, "outside")
    folder = _dcp(tmp_path)
    if where == "symlink":
        (folder / "link.distcp").symlink_to(outside / "__0_0.distcp")
        target = "link.distcp"
    else:
        target = str(outside / "__0_0.distcp") if where == "absolute" else "../outside/__0_0.distcp"

    def point_outside(md):
        for index, info in md.storage_data.items():
            md.storage_data[index] = _StorageInfo(target, info.offset, info.length)

    _edit_metadata(folder, point_outside)
    for command in ("inspect", "convert"):
        result = run(command, folder, tmp_path / "x.safetensors") if command == "convert" else run(command, folder)
        assert_clean(result, tmp_path / "x.safetensors")
        assert "outside the checkpoint folder" in result.stderr and target[:40] in result.stderr


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside/model.safetensors", 7, ["a"]])
def test_index_weight_map_confined_to_the_folder(value, run, tmp_path, trained):
    import json

    ckpt, _, _ = trained("adamw")
    outside = tmp_path / "outside"
    outside.mkdir()
    assert run("convert", ckpt, outside).exit_code == 0
    release = tmp_path / "release"
    assert run("convert", ckpt, release, "--max-shard-size", "200B").exit_code == 0
    index_path = release / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(index["weight_map"])[0]
    index["weight_map"][first] = str(outside / "model.safetensors") if value == "/etc/passwd" else value
    index_path.write_text(json.dumps(index))
    for args in (("check", release, "--ckpt", ckpt), ("diff", release, ckpt), ("check", index_path, "--ckpt", ckpt)):
        result = run(*args)
        assert_clean(result, tmp_path / "none")
        assert "weight_map" in result.stderr or "outside" in result.stderr, result.stderr


# ---- 4. cost bounded by the input's honest size ------------------------------------------------------

def _laughs(depth=64, tuple_=False):
    x = () if tuple_ else []
    for _ in range(depth):
        x = (x, x) if tuple_ else [x, x]
    return x


@pytest.mark.parametrize("where", ["hyper-parameter", "top level"])
def test_billion_laughs_are_refused(where, run, tmp_path):
    sd, osd = _parts()
    obj = {"model": sd, "optimizer": osd}
    if where == "hyper-parameter":
        osd["param_groups"][0]["lr"] = _laughs()
    else:
        obj["extra"] = _laughs()
    torch.save(obj, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
            else run(command, tmp_path / "c.pt", "--json")
        assert_clean(result, tmp_path / "x.safetensors")
        assert "SFCKPT_MAX_PICKLE_NODES" in result.stderr, result.stderr


def _tuple_bomb(depth=64) -> bytes:
    """((t, t), (t, t)) ... `depth` levels through the memo: hashing it takes 2**depth steps."""
    out = b")q\x00"
    for i in range(1, depth + 1):
        out += b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i])
    return out


@pytest.mark.parametrize("payload", [
    b"\x80\x02}" + _tuple_bomb() + b"K\x01s.",  # a dict key
    b"\x80\x04\x8f(" + _tuple_bomb() + b"\x90.",  # a set member (ADDITEMS)
    b"\x80\x04(" + _tuple_bomb() + b"\x91.",  # a frozenset member
    b"\x80\x02cbuiltins\nset\n(" + _tuple_bomb() + b"\x85\x85R.",  # set([bomb]) through REDUCE
    b"\x80\x02ccollections\nOrderedDict\n(" + _tuple_bomb() + b"K\x01\x86\x85\x85R.",
], ids=["dict-key", "set", "frozenset", "set-call", "ordereddict-call"])
def test_hash_bombs_are_refused_before_hashing(payload, run, tmp_path):
    result = run("inspect", _torch_zip(tmp_path / "h.pt", payload))
    assert_clean(result, tmp_path / "none")


def _deep_tuple_pickle(depth: int, as_key: bool) -> bytes:
    nest = b")" + b"\x85" * depth  # EMPTY_TUPLE, then TUPLE1 `depth` times
    if as_key:
        return b"\x80\x02}" + nest + b"Ns."  # EMPTY_DICT key NONE SETITEM
    return b"\x80\x02}X\x01\x00\x00\x00a" + nest + b"s."


@pytest.mark.parametrize("as_key", [True, False])
def test_deep_nesting_is_refused_not_a_crash(as_key, tmp_path):
    bad = _torch_zip(tmp_path / "deep.pt", _deep_tuple_pickle(200_000, as_key))
    assert_one_error_line(_cli("inspect", bad), "SFCKPT_MAX_NESTING")


def test_allocation_by_number_is_refused(tmp_path):
    # builtins.bytearray(3 GiB): REDUCE with an integer argument
    payload = b"\x80\x02cbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\xc0\x00\x85R."
    assert_one_error_line(_cli("inspect", _torch_zip(tmp_path / "alloc.pt", payload)), "bytearray")


def test_compressed_records_inflate_only_to_the_limit(run, tmp_path, monkeypatch):
    sd, osd = _parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(tmp_path / "c.pt") as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert run("convert", deflated, tmp_path / "x.safetensors").exit_code == 0  # honest: converts
    monkeypatch.setenv("SFCKPT_MAX_INFLATED_BYTES", "100")
    result = run("inspect", deflated)
    assert_clean(result, tmp_path / "none")
    assert "SFCKPT_MAX_INFLATED_BYTES" in result.stderr


def test_integers_too_wide_for_a_float_are_refused(run, tmp_path):
    sd, osd = _parts()
    for value in (10**400, 10**5000):
        osd["param_groups"][0]["betas"] = (value, 0.999)
        torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
        for command in ("inspect", "convert"):
            result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
                else run(command, tmp_path / "c.pt")
            assert_clean(result, tmp_path / "x.safetensors")
            assert "SFCKPT_MAX_INT_BITS" in result.stderr


def test_stride_zero_views_are_bounded_by_the_file_size(run, tmp_path, monkeypatch):
    sd, osd = _parts()
    sd["big"] = Crafted(torch.zeros(1), 0, (20_000_000,), (0,))  # 80 MB described by 4 bytes
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert_clean(result, tmp_path / "x.safetensors")
    assert "SFCKPT_MAX_EXPANSION" in result.stderr
    monkeypatch.setenv("SFCKPT_MAX_EXPANSION", str(10**9))  # the user opts in: valid torch semantics
    assert run("inspect", tmp_path / "c.pt").exit_code == 0


def test_dcp_chunk_count_and_sizes_are_bounded(run, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    folder = _dcp(tmp_path)

    def split(md):
        key = "model.fc1.weight"
        size = md.state_dict_metadata[key].size
        md.state_dict_metadata[key].chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size(size))] * 50

    _edit_metadata(folder, split)
    monkeypatch.setenv("SFCKPT_MAX_DCP_CHUNKS", "10")
    result = run("inspect", folder)
    assert_clean(result, tmp_path / "none")
    assert "50 chunks" in result.stderr and "SFCKPT_MAX_DCP_CHUNKS" in result.stderr
    monkeypatch.delenv("SFCKPT_MAX_DCP_CHUNKS")

    folder = _dcp(tmp_path, "huge")

    def huge(md):
        md.state_dict_metadata["model.fc1.weight"].size = torch.Size([1 << 40])

    _edit_metadata(folder, huge)
    for command in ("inspect", "convert"):
        result = run(command, folder, tmp_path / "x.safetensors") if command == "convert" else run(command, folder)
        assert_clean(result, tmp_path / "x.safetensors")


def test_dcp_chunks_that_overlap_are_refused(run, tmp_path):
    """Two copies of a tensor's top half: the sizes add up to the whole, but the bottom half would be
    written from uninitialised memory (a review converted such a folder with exit 0)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    folder = _dcp(tmp_path)

    def overlap(md):
        entry = md.state_dict_metadata["model.fc1.weight"]
        rows, cols = entry.size
        half = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([rows // 2, cols]))
        entry.chunks = [half, half]

    _edit_metadata(folder, overlap)
    for command in ("inspect", "convert"):
        result = run(command, folder, tmp_path / "x.safetensors") if command == "convert" else run(command, folder)
        assert_clean(result, tmp_path / "x.safetensors")
        assert "exactly once" in result.stderr


# ---- 5. tensors no torch can make: exit 2, not an internal error -----------------------------------

@pytest.mark.parametrize("offset,size,stride", [
    (0, (4,), (-1,)),  # negative stride
    (0, (0, 10**30), (1, 1)),  # no elements, but a dimension past int64
    (-1, (2,), (1,)),
    (0, (2**62, 2**62), (1, 1)),
])
def test_impossible_views_are_refused(offset, size, stride, run, tmp_path):
    sd, osd = _parts()
    sd["odd"] = Crafted(torch.arange(4.0), offset, size, stride)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
            else run(command, tmp_path / "c.pt")
        assert_clean(result, tmp_path / "x.safetensors")


def test_honest_views_still_convert_exactly(run, tmp_path):
    """Overlapping views within the limit are valid torch: they convert, bit for bit."""
    sd, osd = _parts()
    sd["band"] = Crafted(torch.arange(8.0), 1, (3, 3), (1, 1))
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    assert torch.equal(read(tmp_path / "x.safetensors")["band"], torch.arange(8.0).as_strided((3, 3), (1, 1), 1))


# ---- Hugging Face Trainer folders: config.json never brings code, and stays cheap ------------------

from test_readers_hf_trainer import hf_run  # noqa: E402,F401  (the module-scoped Trainer run)


@pytest.fixture(scope="module")
def trainer_folder(hf_run):
    return hf_run()[0]  # one Trainer run for the module: it takes seconds


def _trainer_copy(trainer_folder, tmp_path, edit):
    import json
    import shutil

    ckpt = trainer_folder
    folder = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt, folder)
    config = json.loads((folder / "config.json").read_text())
    new = edit(config, folder)
    (folder / "config.json").write_text(new if isinstance(new, str) else json.dumps(config))
    return folder


def test_trainer_config_with_custom_code_is_refused_without_a_prompt(trainer_folder, run, tmp_path):
    marker = tmp_path / "pwned"

    def custom(config, folder):
        config.update(model_type="evil_model", auto_map={"AutoConfig": "evil.EvilConfig"}, architectures=["EvilModel"])
        (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                        "from transformers import PretrainedConfig\n"
                                        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil_model'\n")

    folder = _trainer_copy(trainer_folder, tmp_path, custom)
    for command in ("inspect", "convert"):
        result = run(command, folder, tmp_path / "x.safetensors") if command == "convert" else run(command, folder)
        assert_clean(result, tmp_path / "x.safetensors")
        assert "--param-order" in result.stderr and "custom code" in result.stderr
        assert "trust_remote_code" not in result.stdout and "[y/N]" not in result.stdout
    assert not marker.exists()


@pytest.mark.parametrize("edit,fragment", [
    (lambda c, f: c.update(architectures=[123]), "architectures"),
    (lambda c, f: c.update(model_type="no_such_model"), "does not ship"),
    (lambda c, f: c.update(n_layer=20000, num_hidden_layers=20000), "SFCKPT_MAX_LAYERS"),
    (lambda c, f: "[1, 2]", "not an object"),
    (lambda c, f: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (lambda c, f: '{"a": ' + "9" * 5000 + "}", "not valid JSON"),
], ids=["architectures-int", "unknown-type", "huge-n_layer", "list", "deep", "5000-digits"])
def test_trainer_config_nonsense_is_exit_2(edit, fragment, trainer_folder, tmp_path):
    from sfckpt.readers.hf_trainer import load_config

    folder = _trainer_copy(trainer_folder, tmp_path, edit)
    with pytest.raises(sfckpt.InputError) as info:
        load_config(folder)
    assert fragment in str(info.value)


# ---- 3. outputs never destroy files -----------------------------------------------------------------

def test_plot_never_overwrites_an_input_or_an_existing_file(run, tmp_path, trained):
    pytest.importorskip("matplotlib")
    ckpt, _, _ = trained("adamw")
    before = ckpt.read_bytes()
    for args in (("diff", ckpt, "--plot", ckpt), ("diff", ckpt, "--plot", ckpt, "--force")):
        result = run(*args)
        assert_clean(result, tmp_path / "none")
        assert "input" in result.stderr
    assert ckpt.read_bytes() == before
    picture = tmp_path / "gap.png"
    picture.write_bytes(b"precious")
    result = run("diff", ckpt, "--plot", picture)
    assert result.exit_code == 2 and "--force" in result.stderr and picture.read_bytes() == b"precious"
    assert run("diff", ckpt, "--plot", picture, "--force").exit_code == 0
    assert picture.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob("*sfckpt-tmp"))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_force_run_leaves_the_previous_release_as_it_was(run, tmp_path):
    sd, osd = _parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "good.pt")
    sd["fc2.bias"][0] = float("nan")  # fails on the last shard, after others were written
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "bad.pt")
    release = tmp_path / "release"
    for layout in (("--max-shard-size", "200B"), ()):
        assert run("convert", tmp_path / "good.pt", release, *layout, "--force").exit_code == 0
        before = _snapshot(release)
        for other in (("--max-shard-size", "200B"), ()):
            result = run("convert", tmp_path / "bad.pt", release, *other, "--force")
            assert result.exit_code == 2 and "NaN" in result.stderr
            assert _snapshot(release) == before


def test_successful_force_run_leaves_no_stale_layout(run, tmp_path):
    sd, osd = _parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    release = tmp_path / "release"
    release.mkdir()
    (release / "README.md").write_text("mine")
    assert run("convert", tmp_path / "c.pt", release, "--force").exit_code == 0
    assert run("convert", tmp_path / "c.pt", release, "--max-shard-size", "200B", "--force").exit_code == 0
    names = sorted(p.name for p in release.iterdir())
    assert "model.safetensors" not in names and "README.md" in names and "model.safetensors.index.json" in names
    assert run("convert", tmp_path / "c.pt", release, "--force").exit_code == 0
    assert sorted(p.name for p in release.iterdir()) == ["README.md", "model.safetensors"]


def test_output_names_and_places_that_cannot_work_are_exit_2(run, tmp_path):
    sd, osd = _parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    ckpt = tmp_path / "c.pt"
    long_ok = tmp_path / ("x" * 228 + ".safetensors")  # 240 characters: fits, even with a temporary suffix
    assert run("convert", ckpt, long_ok).exit_code == 0 and long_ok.exists()
    assert not list(tmp_path.glob("*sfckpt-tmp"))
    for out in (tmp_path / ("y" * 300 + ".safetensors"), tmp_path / ("z" * 300)):
        assert_clean(run("convert", ckpt, out), tmp_path / "none")
    (tmp_path / "d.safetensors").mkdir()
    assert_clean(run("convert", ckpt, tmp_path / "d.safetensors", "--force"), tmp_path / "none")
    assert_clean(run("inspect", tmp_path / ("q" * 300 + ".pt")), tmp_path / "none")
    assert_clean(run("convert", ckpt, pathlib.Path("/proc/sfckpt-release")), tmp_path / "none")  # no mkdir there
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        for out in (locked / "release", locked / "x.safetensors"):
            assert_clean(run("convert", ckpt, out), out)
    finally:
        locked.chmod(0o700)


# ---- 5. more inputs that must be exit 2, not an internal error ----------------------------------------

@pytest.mark.parametrize("header", [
    b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # deep JSON
    b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}',  # 5000-digit integer
    b'{"__metadata__":{"format":7}}',  # metadata that is not text: the library refuses it
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',  # a gap before the first tensor
], ids=["deep", "digits", "metadata", "overlap", "gap"])
def test_safetensors_headers_the_library_would_refuse(header, run, good_pair, tmp_path):
    ckpt, weights = good_pair
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    for args in (("check", bad, "--ckpt", ckpt), ("diff", bad, weights)):
        assert_clean(run(*args), tmp_path / "none")


def test_safetensors_header_size_is_bounded(run, good_pair, tmp_path, monkeypatch):
    ckpt, weights = good_pair
    monkeypatch.setenv("SFCKPT_MAX_JSON_BYTES", "64")
    result = run("check", weights, "--ckpt", ckpt)
    assert_clean(result, tmp_path / "none")
    assert "SFCKPT_MAX_JSON_BYTES" in result.stderr


@pytest.fixture
def good_pair(tmp_path, run):
    sd, osd = _parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    return tmp_path / "c.pt", tmp_path / "x.safetensors"


@pytest.mark.parametrize("edit", [
    pytest.param(lambda sd, osd: osd["param_groups"][0].update({7: "x"}), id="int-key-in-group"),
    pytest.param(lambda sd, osd: osd["param_groups"][0].update(params=[[0], [1], [2], [3]]), id="unhashable-params"),
    pytest.param(lambda sd, osd: osd["param_groups"][0].update(param_names=[["a"], ["b"], ["c"], ["d"]]),
                 id="unhashable-param-names"),
])
def test_parameter_group_nonsense_is_clean(edit, run, tmp_path):
    """An extra int key changes nothing (success is fine); unhashable params are exit 2; never an internal error."""
    sd, osd = _parts()
    edit(sd, osd)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
            else run(command, tmp_path / "c.pt")
        assert_clean(result, tmp_path / "x.safetensors", allow_success=True)
        (tmp_path / "x.safetensors").unlink(missing_ok=True)


@pytest.mark.parametrize("dtype", [
    torch.int64, torch.bool,
    torch.float8_e4m3fn,
])
def test_parameters_lerp_cannot_combine_are_copied_or_refused(dtype, run, tmp_path):
    sd, osd = _parts()
    sd["fc1.bias"] = sd["fc1.bias"].to(dtype)
    osd["state"][1]["z"] = osd["state"][1]["z"].to(dtype)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert_clean(result, tmp_path / "x.safetensors", allow_success=True)


def test_trainer_state_that_is_not_an_object(trainer_folder, run, tmp_path):
    folder = _trainer_copy(trainer_folder, tmp_path, lambda c, f: None)
    (folder / "trainer_state.json").write_text("[1, 2]")
    result = run("inspect", folder)
    assert_clean(result, tmp_path / "none", allow_success=True)


def test_signal_storm_exits_130_without_a_traceback(tmp_path):
    import signal
    import time

    from test_hardening import _big_checkpoint

    _big_checkpoint(tmp_path / "big.pt")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "sfckpt", "convert", str(tmp_path / "big.pt"), str(out_dir / "x.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(out_dir.glob("*sfckpt-tmp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    for i in range(200):
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT if i % 2 else signal.SIGTERM)
        time.sleep(0.0005)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("conversion finished before the signals arrived")
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["error: interrupted; nothing was written"]
    assert list(out_dir.iterdir()) == []
