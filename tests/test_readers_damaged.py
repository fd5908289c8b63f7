"""Damaged files in every format (seeded fuzzing of bytes and of the formats' own fields) and hostile
pickles: exit 2 with one `error:` line, never a traceback, and no code from the file runs.

Fast by default; set SFCKPT_FUZZ=N (e.g. 2000) for a longer fuzz run.
"""
import io
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import sfckpt
import trainers
from conftest import assert_clean, assert_one_error_line, assert_refused, read, save_checkpoint

FUZZ = int(os.environ.get("SFCKPT_FUZZ", "12"))
COMMANDS = ("inspect", "convert", "diff", "check")


def invoke(run, command, bad, good_ckpt, good_weights, out):
    if command == "inspect":
        return run("inspect", bad)
    if command == "convert":
        return run("convert", bad, out)
    if command == "diff":
        return run("diff", bad, good_weights)
    return run("check", good_weights, "--ckpt", bad) if bad.suffix == ".pt" else run("check", bad, "--ckpt", good_ckpt)


def run_cases(run, command, cases, bad: Path, good) -> None:
    """Write each damaged file to `bad`, run `command` on it, and require a clean answer."""
    out = bad.parent / "out.safetensors"
    for name, blob, may_be_valid in cases:
        bad.write_bytes(blob)
        try:
            assert_clean(invoke(run, command, bad, *good, out), out, allow_success=may_be_valid)
        except AssertionError as exc:
            raise AssertionError(f"{command} on {name}: {exc}") from None
        out.unlink(missing_ok=True)


def corruptions(data: bytes, rng: random.Random, n: int):
    """(name, bytes, may_still_be_valid) cases derived from a valid file."""
    size = len(data)
    yield "empty", b"", False
    yield "random", rng.randbytes(rng.randint(1, 4096)), False
    for _ in range(n):
        cut = rng.randint(1, size - 1)
        yield f"truncated@{cut}", data[:cut], False
    for _ in range(n):
        pos = rng.randrange(size)
        flipped = bytearray(data)
        flipped[pos] ^= 1 << rng.randrange(8)
        # A flip inside raw tensor bytes changes numbers, not structure: no format can tell.
        yield f"flip@{pos}", bytes(flipped), True


@pytest.mark.parametrize("command", COMMANDS)
def test_fuzz_torch_checkpoint(command, good, run, tmp_path):
    good_ckpt, good_weights = good
    rng = random.Random(f"torch-{command}")
    run_cases(run, command, corruptions(good_ckpt.read_bytes(), rng, FUZZ), tmp_path / "bad.pt", good)


@pytest.mark.parametrize("command", ["diff", "check"])
def test_fuzz_safetensors(command, good, run, tmp_path):
    good_ckpt, good_weights = good
    data = good_weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    rng = random.Random(f"st-{command}")
    cases = list(corruptions(data, rng, FUZZ))
    for _ in range(FUZZ):  # damage inside the JSON header specifically
        pos = rng.randrange(8, 8 + header_len)
        broken = bytearray(data)
        broken[pos] = rng.choice(b'{}[]:,"0x\xff')
        cases.append((f"header@{pos}", bytes(broken), True))
    cases.append(("huge header length", (2**62).to_bytes(8, "little") + data[8:], False))
    run_cases(run, command, cases, tmp_path / "bad.safetensors", good)


def _zip_without(data: bytes, predicate) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            if not predicate(info.filename):
                dst.writestr(info, src.read(info))
    return buf.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_structural_damage(command, good, run, tmp_path):
    good_ckpt, good_weights = good
    data = good_ckpt.read_bytes()
    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "legacy.pt",
               _use_new_zipfile_serialization=False)
    cases = {
        "no data.pkl": _zip_without(data, lambda n: n.endswith("data.pkl")),
        "no tensor record": _zip_without(data, lambda n: n.endswith("/data/0")),
        "not a torch zip": _zip_without(data, lambda n: True),
        "lfs pointer": b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"1" * 64 + b"\nsize 99\n",
        "legacy": (tmp_path / "legacy.pt").read_bytes(),
    }
    out = tmp_path / "out.safetensors"
    for name, blob in cases.items():
        bad = tmp_path / "bad.pt"
        bad.write_bytes(blob)
        try:
            assert_clean(invoke(run, command, bad, good_ckpt, good_weights, out), out)
        except AssertionError as exc:
            raise AssertionError(f"{command} on {name}: {exc}") from None
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert_clean(invoke(run, command, folder, good_ckpt, good_weights, out), out)


# ---- hostile pickles ----------------------------------------------------------------------

class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Execs:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class Imports:
    def __reduce__(self):
        import importlib

        return (importlib.import_module, ("this",))  # importing `this` prints; must never happen


def _hostile(marker):
    return {"cmd": RunsCommand(marker), "exec": Execs(marker), "imp": Imports()}


@pytest.mark.parametrize("command", COMMANDS)
def test_hostile_objects_never_run(command, good, run, tmp_path):
    good_ckpt, good_weights = good
    marker = tmp_path / "pwned"
    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    beside = save_checkpoint(tmp_path / "beside.pt", model, opt, **_hostile(marker))
    alone = tmp_path / "alone.pt"
    torch.save(RunsCommand(marker), alone)
    sys.modules.pop("this", None)
    out = tmp_path / "x.safetensors"
    result = invoke(run, command, beside, good_ckpt, good_weights, out)
    if command in ("inspect", "convert"):
        assert result.exit_code == 0, result.stderr
        assert "posix.system" in result.stdout + result.stderr
    assert_clean(invoke(run, command, alone, good_ckpt, good_weights, tmp_path / "y.safetensors"),
                 tmp_path / "y.safetensors")
    assert not marker.exists()
    assert "this" not in sys.modules


def test_hostile_globals_are_never_imported(tmp_path):
    """A GLOBAL naming a module with import side effects resolves to a placeholder."""
    payload = b"\x80\x02cthis\nd\nq\x00."  # protocol 2: GLOBAL this.d
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    (tmp_path / "g.pt").write_bytes(buf.getvalue())
    sys.modules.pop("this", None)
    with pytest.raises(sfckpt.InputError):
        sfckpt.load(tmp_path / "g.pt")
    assert "this" not in sys.modules


# ---- damaged folders and pickles that expand ----------------------------------------------------

def test_damaged_dcp_folder(run, tmp_path):
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    good = tmp_path / "good"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=good, no_dist=True)
    rng = random.Random("dcp")
    out = tmp_path / "x.safetensors"
    assert run("convert", good, tmp_path / "good.safetensors").exit_code == 0
    expected = read(tmp_path / "good.safetensors")
    for target in (".metadata", "__0_0.distcp"):
        data = (good / target).read_bytes()
        for name, blob, may_be_valid in corruptions(data, rng, max(3, FUZZ // 3)):
            bad = tmp_path / "bad"
            shutil.rmtree(bad, ignore_errors=True)
            shutil.copytree(good, bad)
            (bad / target).write_bytes(blob)
            for command in ("inspect", "convert"):
                result = run(command, bad, out) if command == "convert" else run(command, bad)
                # inspect reads no tensor data, and convert never reads exp_avg_sq: damage there
                # may go unnoticed, but then the output must still be exactly x.
                unread_damage_possible = target != ".metadata"
                try:
                    assert_clean(result, out, allow_success=may_be_valid or unread_damage_possible)
                    if result.exit_code == 0 and command == "convert" and not may_be_valid:
                        got = read(out)
                        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), \
                            "damaged input gave a different x"
                except AssertionError as exc:
                    raise AssertionError(f"{command} on {target} {name}: {exc}") from None
                out.unlink(missing_ok=True)


def test_memo_index_bomb_is_harmless(run, tmp_path):
    """A damaged LONG_BINPUT index must not make the unpickler allocate a giant memo table."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}r\xff\xff\xff\x7f.")  # EMPTY_DICT; LONG_BINPUT 2**31-1
        z.writestr("archive/byteorder", "little")
    (tmp_path / "bomb.pt").write_bytes(buf.getvalue())
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from sfckpt.cli import main; main()")
    result = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "bomb.pt")],
                            capture_output=True, text=True, timeout=60)
    assert_one_error_line(result, "no model weights")


# ---- structural fuzzing of the formats' own fields (issue #11) ----------------------------------------

def _random_json(rng: random.Random, depth=0):
    kind = rng.randrange(9 if depth < 3 else 5)
    return [lambda: rng.randint(-2, 2**64), lambda: rng.choice(["", "../x", "/etc/passwd", "F32", "a" * 300]),
            lambda: None, lambda: rng.random() * 1e300, lambda: 10 ** rng.randint(20, 400),
            lambda: [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))],
            lambda: {str(rng.randint(0, 9)): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))},
            lambda: "[" * 5000, lambda: [[[]]] * rng.randint(0, 5)][kind]()


@pytest.mark.parametrize("command", ["diff", "check"])
def test_fuzz_safetensors_header_fields(command, good, run, tmp_path):
    """Each header field replaced by nonsense: sfckpt refuses, or the safetensors library agrees it is valid."""
    import json

    from safetensors import safe_open

    _, good_weights = good
    data = good_weights.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8:8 + n]), data[8 + n:]
    rng = random.Random(f"st-fields-{command}")
    bad = tmp_path / "bad.safetensors"
    for case in range(FUZZ):
        h = json.loads(json.dumps(header))
        name = rng.choice(sorted(h))
        if name == "__metadata__" or rng.random() < 0.2:
            h["__metadata__"] = {"format": _random_json(rng)}
        else:
            h[name][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
        text = json.dumps(h).encode()
        bad.write_bytes(len(text).to_bytes(8, "little") + text + body[: rng.choice([len(body), len(body) - 1])])
        result = invoke(run, command, bad, *good, tmp_path / "out.safetensors")
        try:
            assert_clean(result, tmp_path / "out.safetensors", allow_success=True)
        except AssertionError as exc:
            raise AssertionError(f"{command} on header case {case}: {exc}") from None
        if result.exit_code in (0, 1):
            with safe_open(str(bad), "pt") as f:  # what sfckpt accepted, the library opens
                for key in f.keys():
                    f.get_tensor(key)


def test_fuzz_index_files(good, run, tmp_path):
    import json

    ckpt, _ = good
    release = tmp_path / "release"
    assert run("convert", ckpt, release, "--max-shard-size", "100B").exit_code == 0
    index_path = release / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    rng = random.Random("index")
    for case in range(FUZZ):
        broken = json.loads(json.dumps(index))
        target = rng.choice(["weight_map-value", "weight_map", "root", "metadata"])
        if target == "weight_map-value":
            broken["weight_map"][rng.choice(sorted(broken["weight_map"]))] = _random_json(rng)
        elif target == "weight_map":
            broken["weight_map"] = _random_json(rng)
        elif target == "root":
            broken = _random_json(rng)
        else:
            broken["metadata"] = _random_json(rng)
        index_path.write_text(json.dumps(broken))
        result = run("check", release, "--ckpt", ckpt)
        try:
            assert_clean(result, tmp_path / "none", allow_success=target == "metadata")
        except AssertionError as exc:
            raise AssertionError(f"index case {case} ({target}): {exc}") from None


def test_fuzz_dcp_metadata_fields(run, tmp_path):
    """DCP metadata with each field replaced by nonsense (paths, sizes, chunks): exit 2, or exactly x."""
    import pickle
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    good = tmp_path / "good"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=good, no_dist=True)
    assert run("convert", good, tmp_path / "good.safetensors").exit_code == 0
    expected = read(tmp_path / "good.safetensors")
    rng = random.Random("dcp-fields")
    numbers = [0, 1, -1, 2**40, 10**30, 2**63]
    for case in range(max(4, FUZZ // 2)):
        md = pickle.loads((good / ".metadata").read_bytes())
        kind = rng.choice(["path", "offset", "length", "size", "chunks", "chunk-offsets"])
        tensors = [k for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)]
        key = rng.choice(tensors)
        entry = md.state_dict_metadata[key]
        if kind in ("path", "offset", "length"):
            index = rng.choice(sorted(md.storage_data, key=str))
            info = md.storage_data[index]
            fields = {"path": info.relative_path, "offset": info.offset, "length": info.length}
            fields[kind] = rng.choice(["/etc/passwd", "../good/__0_0.distcp", "", ".metadata", "nope"]) \
                if kind == "path" else rng.choice(numbers)
            md.storage_data[index] = _StorageInfo(fields["path"], fields["offset"], fields["length"])
        elif kind == "size":
            entry.size = torch.Size([rng.choice(numbers[:4])] * len(entry.size))
        elif kind == "chunks":
            entry.chunks = entry.chunks * rng.choice([0, 2, 3])
        else:
            entry.chunks = [ChunkStorageMetadata(torch.Size([rng.choice(numbers[:4])] * len(entry.size)), c.sizes)
                            for c in entry.chunks]
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(good, bad)
        (bad / ".metadata").write_bytes(pickle.dumps(md))
        out = tmp_path / "x.safetensors"
        result = run("convert", bad, out)
        try:
            assert_clean(result, out, allow_success=True)
            if result.exit_code == 0:
                got = read(out)
                assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), \
                    "damaged metadata gave a different x"
        except AssertionError as exc:
            raise AssertionError(f"dcp case {case} ({kind} of {key}): {exc}") from None
        out.unlink(missing_ok=True)


_ALLOWED_GLOBALS = [("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "dict"), ("builtins", "bytearray"),
                    ("builtins", "str"), ("_codecs", "encode"), ("torch._utils", "_rebuild_tensor_v2"),
                    ("torch._utils", "_rebuild_parameter"), ("torch", "device"), ("torch", "Size"),
                    ("torch", "FloatStorage"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")]


def test_fuzz_pickle_opcodes(good, run, tmp_path):
    """Snippets (a GLOBAL of every allowed name, then BUILD, REDUCE, SETITEM...) spliced into a valid
    data.pkl: always a clean answer, and sfckpt's own objects are unchanged afterwards."""
    import pickletools

    from sfckpt.readers import torch_file

    good_ckpt, _ = good
    with zipfile.ZipFile(good_ckpt) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    pkl_name = next(n for n in members if n.endswith("data.pkl"))
    data = members[pkl_name]
    boundaries = [pos for _, _, pos in pickletools.genops(data)][1:-1]
    rng = random.Random("opcodes")
    before = {k: (getattr(v, "__dict__", {}).copy(), getattr(v, "__defaults__", None))
              for k, v in vars(torch_file).items() if callable(v)}
    bad = tmp_path / "bad.pt"
    for case in range(FUZZ * 2):
        module, name = rng.choice(_ALLOWED_GLOBALS)
        arg = rng.choice([b"N", b"K\x05", b")", b"}", b"]", b"X\x01\x00\x00\x00a", b"\x8a\x05\x00\x00\x00\xc0\x00"])
        tail = rng.choice([b"N}X\x01\x00\x00\x00aK\x01s\x86b", b"}b", arg + b"\x85R", arg + b"\x85Rb", arg + b"\x81",
                           b"(" + arg + b"\x90", arg + b"Ns"])
        snippet = b"c" + module.encode() + b"\n" + name.encode() + b"\n" + tail
        if rng.random() < 0.5:
            snippet += b"0"  # POP: keeps the rest of the pickle valid
        at = rng.choice(boundaries)
        blob = data[:at] + snippet + data[at:]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
            for member, content in members.items():
                dst.writestr(member, blob if member == pkl_name else content)
        bad.write_bytes(buf.getvalue())
        result = run("inspect", bad)
        try:
            assert_clean(result, tmp_path / "none", allow_success=True)
        except AssertionError as exc:
            raise AssertionError(f"opcode case {case} ({module}.{name} {tail!r} at {at}): {exc}") from None
    after = {k: (getattr(v, "__dict__", {}).copy(), getattr(v, "__defaults__", None))
             for k, v in vars(torch_file).items() if callable(v)}
    assert before == after


def test_fuzz_trainer_config_fields(tmp_path):
    """config.json fields replaced by nonsense: a config, or InputError; nothing else, no code."""
    import json

    pytest.importorskip("transformers")
    from sfckpt.readers.hf_trainer import load_config

    base = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 8, "n_head": 2,
            "vocab_size": 16, "n_positions": 8}
    rng = random.Random("config")
    for case in range(FUZZ):
        config = dict(base)
        config[rng.choice([*base, "auto_map", "num_hidden_layers", "text_config"])] = _random_json(rng)
        (tmp_path / "config.json").write_text(json.dumps(config))
        try:
            load_config(tmp_path)
        except sfckpt.InputError:
            pass
        except Exception as exc:  # noqa: BLE001 - anything else is the bug this test looks for
            raise AssertionError(f"config case {case} {json.dumps(config)[:200]}: {type(exc).__name__}: {exc}") from None


# ---- files that are not a checkpoint -----------------------------------------------------------------

def test_garbage_empty_truncated(run, tmp_path, trained):
    out = tmp_path / "x.safetensors"
    # Seeded: one os.urandom draw in 256 starts with 0x80, a pickle's first byte, and reads as a legacy torch file
    (tmp_path / "garbage.pt").write_bytes(random.Random(0).randbytes(4096))
    assert_refused(run("convert", tmp_path / "garbage.pt", out), out, "not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_refused(run("convert", tmp_path / "empty.pt", out), out, "empty")
    good, _, _ = trained("adamw")
    data = good.read_bytes()
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        assert_refused(run("convert", tmp_path / "cut.pt", out), out)
        assert_refused(run("inspect", tmp_path / "cut.pt"), out)
    assert_refused(run("convert", tmp_path / "missing.pt", out), out, "no such file")


def test_legacy_and_lfs_pointer(run, tmp_path, ckpt_parts):
    sd, osd = ckpt_parts
    torch.save({"model": sd, "optimizer": osd}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", tmp_path / "legacy.pt", out), out, "legacy")
    (tmp_path / "lfs.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    assert_refused(run("inspect", tmp_path / "lfs.pt"), out, "Git LFS pointer")
