"""Hostile inputs, grouped by what they attack (issue #11): code, paths outside the input, cost out of
proportion to the input, and inputs that must be exit 2 rather than an internal error."""
import collections
import json
import os
import pathlib
import pickle
import zipfile

import pytest
import torch
from safetensors.torch import save_file

import sfckpt
import trainers
from conftest import assert_clean, assert_one_error_line, assert_refused, cli_capped, parts, read, saved_with


def _torch_zip(path, payload: bytes, records=(), compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compress) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for name, data in records:
            z.writestr(f"archive/data/{name}", data)
    return path


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
    sd, osd = parts()
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
    assert_one_error_line(cli_capped("inspect", bad), "SFCKPT_MAX_NESTING")


def test_allocation_by_number_is_refused(tmp_path):
    # builtins.bytearray(3 GiB): REDUCE with an integer argument
    payload = b"\x80\x02cbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\xc0\x00\x85R."
    assert_one_error_line(cli_capped("inspect", _torch_zip(tmp_path / "alloc.pt", payload)), "bytearray")


def test_compressed_records_inflate_only_to_the_limit(run, tmp_path, monkeypatch):
    sd, osd = parts()
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
    sd, osd = parts()
    for value in (10**400, 10**5000):
        osd["param_groups"][0]["betas"] = (value, 0.999)
        torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
        for command in ("inspect", "convert"):
            result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
                else run(command, tmp_path / "c.pt")
            assert_clean(result, tmp_path / "x.safetensors")
            assert "SFCKPT_MAX_INT_BITS" in result.stderr


def test_stride_zero_views_are_bounded_by_the_file_size(run, tmp_path, monkeypatch):
    sd, osd = parts()
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
    sd, osd = parts()
    sd["odd"] = Crafted(torch.arange(4.0), offset, size, stride)
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        result = run(command, tmp_path / "c.pt", tmp_path / "x.safetensors") if command == "convert" \
            else run(command, tmp_path / "c.pt")
        assert_clean(result, tmp_path / "x.safetensors")


def test_honest_views_still_convert_exactly(run, tmp_path):
    """Overlapping views within the limit are valid torch: they convert, bit for bit."""
    sd, osd = parts()
    sd["band"] = Crafted(torch.arange(8.0), 1, (3, 3), (1, 1))
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    assert torch.equal(read(tmp_path / "x.safetensors")["band"], torch.arange(8.0).as_strided((3, 3), (1, 1), 1))


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
    sd, osd = parts()
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "c.pt")
    assert run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors").exit_code == 0
    return tmp_path / "c.pt", tmp_path / "x.safetensors"


def test_hostile_pickle_never_runs(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    torch.save({"model": sd, "optimizer": osd, "extra": evil}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "c.pt", out)
    assert result.exit_code == 0, result.stderr
    assert out.exists()
    inspected = run("inspect", tmp_path / "c.pt", "--json")
    assert "posix.system" in inspected.stdout or "nt.system" in inspected.stdout
    assert not marker.exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_harmless_objects_beside_weights_load(run, tmp_path, ckpt_parts):
    import argparse
    import collections

    sd, osd = ckpt_parts
    extra = {"args": argparse.Namespace(lr=0.1, name="run"), "counts": collections.Counter(a=1),
             "hist": collections.defaultdict(list, loss=[1.0]), "best": torch.tensor(0.5), "tags": {"a", "b"}}
    try:
        import numpy as np

        extra.update(np_scalar=np.float64(0.25), np_array=np.arange(3))
    except ImportError:
        pass
    torch.save({"model": sd, "optimizer": osd, **extra}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr


def test_whole_module_pickle_is_refused_naming_the_class(run, tmp_path):
    torch.save(trainers.MLP(), tmp_path / "model.pt")
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "model.pt", out), out, "trainers.MLP", "does not load")


# ---- names that are not text, and limits raised far -----------------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "convert", "diff", "check"])
def test_lone_surrogate_in_a_tensor_name_is_exit_2(command, run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = model.state_dict()
    save_file(sd, tmp_path / "release.safetensors")
    sd["fc1.\ud800weight"] = sd.pop("fc1.weight")
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    out = tmp_path / "x.safetensors"
    args = {"inspect": ("inspect", tmp_path / "c.pt"), "convert": ("convert", tmp_path / "c.pt", out),
            "diff": ("diff", tmp_path / "c.pt"), "check": ("check", tmp_path / "release.safetensors", "--ckpt", tmp_path / "c.pt")}
    result = run(*args[command])
    assert_clean(result, out)
    assert "\\ud800" in result.stderr


@pytest.mark.parametrize("header", [{"\ud800a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                    {"__metadata__": {"format": "\udfff"}, "a": {"dtype": "F32", "shape": [2],
                                                                                 "data_offsets": [0, 8]}}],
                         ids=["name", "metadata"])
def test_lone_surrogate_escape_in_a_safetensors_header_is_exit_2(header, run, tmp_path):
    """Python's JSON parser keeps "\\ud800"; the safetensors library refuses the header, and so does sfckpt."""
    import struct

    text = json.dumps(header).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + bytes(8))
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    for args in (("check", tmp_path / "w.safetensors", "--ckpt", tmp_path / "c.pt"),
                 ("diff", tmp_path / "w.safetensors", tmp_path / "c.pt")):
        result = run(*args)
        assert_clean(result, tmp_path / "x")
        assert "lone surrogate" in result.stderr


@pytest.mark.parametrize("change,fragment", [
    (lambda g: g.update(lr=1 << 150_000), "at most 14284"),
    (lambda g: g.update(betas=(1 << 3000, 0.999)), "β is an integer of 3001 bits"),
    (lambda g: g.update(lr=1 << 5000, weight_sum=1 << 4000), None),
], ids=["wider-than-text", "beta-wider-than-a-float", "lr-wider-than-a-float"])
def test_wide_integers_under_a_raised_limit(change, fragment, run, tmp_path, monkeypatch):
    """SFCKPT_MAX_INT_BITS=200000 lets wide integers load: none may crash where it becomes a float or text."""
    monkeypatch.setenv("SFCKPT_MAX_INT_BITS", "200000")
    path = saved_with(tmp_path, lambda o: [change(g) for g in o["param_groups"]])
    for command in ("inspect", "convert", "diff"):
        args = (command, path, tmp_path / "x") if command == "convert" else (command, path)
        result = run(*args)
        assert_clean(result, tmp_path / "x", allow_success=fragment is None)
        assert fragment is None or fragment in result.stderr
    if fragment is None:
        assert json.loads(run("inspect", path, "--json").stdout)


@pytest.mark.slow
@pytest.mark.parametrize("value", ["1e30", "1_000_000_000_000_000_000_000"])
def test_expansion_limit_raised_to_1e30_still_bounds_stride_zero_views(value, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    sd = model.state_dict()
    sd["wide"] = Crafted(torch.zeros(1), 0, (1 << 20, 1 << 20, 1 << 10), (0, 0, 0))
    torch.save({"model": sd, "optimizer": opt.state_dict()}, tmp_path / "c.pt")
    for command in ("inspect", "convert"):
        args = (command, tmp_path / "c.pt", tmp_path / "x") if command == "convert" else (command, tmp_path / "c.pt")
        proc = cli_capped(*args, env={"SFCKPT_MAX_EXPANSION": value}, memory_gb=3)
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        if command == "convert":
            assert_one_error_line(proc)


def test_limits_read_whole_numbers_written_as_powers_of_ten(monkeypatch):
    from sfckpt import limits

    monkeypatch.setenv("SFCKPT_MAX_LAYERS", "1e3")
    assert limits.CONFIG_LAYERS.value == 1000
    for bad in ("1.5", "1e-3", "nan", "inf", "-1", "x"):
        monkeypatch.setenv("SFCKPT_MAX_LAYERS", bad)
        with pytest.raises(sfckpt.InputError):
            limits.CONFIG_LAYERS.value
