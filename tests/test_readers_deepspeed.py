"""DeepSpeed ZeRO checkpoints (stages 1-3, float32 and bfloat16) against schedulefree's own eval().

The checkpoints in fixtures/deepspeed/ were made by real DeepSpeed on CPU with two ranks
(fixtures/make_deepspeed_fixtures.py); each case's expected.pt holds the truth the libraries
computed in that run. `test_fixtures_regenerate` makes them again when deepspeed is installed.
"""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sfckpt
from conftest import assert_clean, assert_refused, FIXTURES, read, SCRIPTS
from sfckpt.reconstruct import reconstruct
from sfckpt.sources import is_training_checkpoint

DS = FIXTURES / "deepspeed"
CASES = sorted(p.name for p in DS.iterdir() if p.is_dir())
TRAINED = {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "head.weight"}  # head.weight is tied to fc2.weight
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def expected_output(case_dir: Path, dtype: str | None) -> dict[str, torch.Tensor]:
    """What convert must write: x (float32 from the master) and the rest as the module holds it,
    all cast to `dtype`; by default x in the module's 16-bit dtype (ordinary rounding), buffers and
    frozen parameters as the module saved them."""
    saved = torch.load(case_dir / "expected.pt", weights_only=True)
    out = {}
    for key, value in saved.items():
        if key == "meta":
            continue
        kind, name = key.split(".", 1)
        target = dtype or (saved["meta"]["dtype"] if kind == "x" else None)
        out[name] = value.to(getattr(torch, target)) if target else value
    return out


def assert_identical(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("case", CASES)
def test_x_is_what_eval_gives(case):
    ckpt = sfckpt.load(DS / case)
    assert ckpt.container == "deepspeed"
    meta = torch.load(DS / case / "expected.pt", weights_only=True)["meta"]
    assert ckpt.default_dtype == (None if meta["dtype"] == "float32" else meta["dtype"])
    for dtype in (None, "float32"):
        recon = reconstruct(ckpt, dtype=dtype)
        assert_identical(recon.state_dict(), expected_output(DS / case, dtype))
        assert [g.beta for g in recon.groups] == list(meta["betas"])
    # Saved during training (or at ZeRO-3, where eval() cannot reach the partitions): x comes from y and z.
    master_holds_x = meta["after_eval"] and meta["stage"] != 3
    assert {t.name for t in recon.tensors if t.how == "lerp"} == (set() if master_holds_x else TRAINED)
    if not master_holds_x:
        y = ckpt.weights["fc1.weight"].load()
        assert not torch.equal(recon.state_dict()["fc1.weight"], y)  # the test can tell x from y


def test_inspect_notes_and_cli_convert(run, tmp_path):
    ckpt = sfckpt.load(DS / "zero3-bf16")
    notes = " ".join(ckpt.notes)
    assert "ZeRO stage 3" in notes and "2 data-parallel ranks" in notes and "module bfloat16" in notes
    assert "holds y even when train_mode is False" in notes and "zero_to_fp32.py" in notes
    after = " ".join(sfckpt.load(DS / "zero3-fp32-after-eval").notes)
    assert "eval() cannot reach ZeRO-3 partitions" in after
    assert "BF16_Optimizer" in " ".join(sfckpt.load(DS / "bf16-optimizer").notes)
    assert ckpt.unloaded_classes == []  # DeepSpeed's own objects are known, not reported as skipped

    report = json.loads(run("inspect", DS / "zero2-bf16", "--json").stdout)
    assert report["container"] == "deepspeed"
    out = tmp_path / "x.safetensors"
    result = run("convert", DS / "zero2-bf16", out)
    assert result.exit_code == 0, result.stderr
    assert_identical(read(out), expected_output(DS / "zero2-bf16", None))
    assert run("convert", DS / "zero2-bf16", tmp_path / "x32.safetensors", "--dtype", "float32").exit_code == 0
    assert_identical(read(tmp_path / "x32.safetensors"), expected_output(DS / "zero2-bf16", "float32"))
    assert run("check", out, "--ckpt", DS / "zero2-bf16").exit_code == 0


def _layouts(tmp_path: Path, case: str) -> dict[str, Path]:
    """The same DeepSpeed save where each wrapper puts it."""
    src = DS / case
    hf = tmp_path / "checkpoint-3"  # Hugging Face Trainer: global_stepN/ and latest in checkpoint-N/
    shutil.copytree(src / "global_step3", hf / "global_step3")
    shutil.copy(src / "latest", hf / "latest")
    accelerate = tmp_path / "accelerate_state"  # Accelerate save_state: tag pytorch_model
    shutil.copytree(src / "global_step3", accelerate / "pytorch_model")
    (accelerate / "latest").write_text("pytorch_model")
    no_latest = tmp_path / "accelerate_no_latest"
    shutil.copytree(src / "global_step3", no_latest / "pytorch_model")
    lightning = tmp_path / "epoch=0-step=3.ckpt"  # Lightning's DeepSpeed strategy: a folder, tag checkpoint
    shutil.copytree(src / "global_step3", lightning / "checkpoint")
    (lightning / "latest").write_text("checkpoint")
    return {"tag": src / "global_step3", "parent": src, "hf": hf, "accelerate": accelerate,
            "accelerate without latest": no_latest, "lightning": lightning}


def test_every_wrapper_folder_reads_the_same(tmp_path):
    want = expected_output(DS / "zero3-bf16", None)
    for label, path in _layouts(tmp_path, "zero3-bf16").items():
        assert is_training_checkpoint(path), label
        ckpt = sfckpt.load(path)
        assert ckpt.container == "deepspeed", label
        assert_identical(reconstruct(ckpt).state_dict(), want)


def _copy(case: str, tmp_path: Path) -> Path:
    dst = tmp_path / case
    shutil.copytree(DS / case, dst)
    return dst


def test_bad_folders_are_refused(run, tmp_path):
    out = tmp_path / "x.safetensors"
    tag = "global_step3"

    ckpt = _copy("zero2-fp32", tmp_path)
    (ckpt / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert_refused(run("convert", ckpt, out), out, "the run had 2 data-parallel ranks but 1 rank files")

    ckpt = _copy("zero1-fp32", tmp_path)
    (ckpt / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert_refused(run("convert", ckpt, out), out, "optimizer file of rank 0 is missing")

    ckpt = _copy("zero2-bf16", tmp_path)  # rank 1 from a save made after eval(): another moment of the run
    shutil.copy(DS / "zero2-bf16-after-eval" / tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", ckpt / tag)
    assert_refused(run("convert", ckpt, out), out, "does not belong with", "train_mode")

    ckpt = _copy("zero3-fp32", tmp_path)  # rank 1 of a ZeRO-1 run
    shutil.copy(DS / "zero1-fp32" / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt", ckpt / tag)
    assert_refused(run("convert", ckpt, out), out, "is ZeRO stage 1 but rank 0 is stage 3")

    ckpt = _copy("zero3-bf16", tmp_path)  # one rank too many
    shutil.copy(ckpt / tag / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                ckpt / tag / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt")
    assert_refused(run("convert", ckpt, out), out, "the run had 2 data-parallel ranks but 3 rank files")

    ckpt = _copy("zero3-fp32-after-eval", tmp_path)
    (ckpt / tag / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    assert_refused(run("convert", ckpt, out), out, "zero_pp_rank_1_mp_rank_00_model_states.pt is missing")

    ckpt = _copy("bf16-optimizer", tmp_path)
    (ckpt / "latest").write_text("global_step9")
    assert_refused(run("convert", ckpt, out), out, "names tag 'global_step9'")
    assert_refused(run("inspect", ckpt), out, "names tag 'global_step9'")
    (ckpt / "global_step9").mkdir()
    assert_refused(run("convert", ckpt, out), out, "global_step9: no DeepSpeed rank files")


DAMAGE = {
    "a short flat partition": ("zero3-bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                               lambda o: o["optimizer_state_dict"]["fp32_flat_groups"].__setitem__(0, torch.zeros(3)),
                               "sub-group 0 holds 3 elements but its parameters need 79"),
    "z on one rank only": ("zero3-bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                           lambda o: o["optimizer_state_dict"]["optimizer_state_dict"]["state"].pop(0),
                           "has no z for flat group 0, but rank 0 has"),
    "a frozen slice missing": ("zero3-fp32", "zero_pp_rank_1_mp_rank_00_model_states.pt",
                               lambda o: o["frozen_param_fragments"].pop("frozen.weight"),
                               "rank 1 holds no slice of frozen parameter 'frozen.weight'"),
    "param_shapes of another model": ("zero2-fp32", "mp_rank_00_model_states.pt",
                                      lambda o: o["param_shapes"][0].__setitem__("fc1.weight", (13, 8)),
                                      "group 0's parameters take 169 elements but the ranks hold 156"),
    "groups that are not dicts": ("bf16-optimizer", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  lambda o: o["optimizer_state_dict"]["base_optimizer_state"].__setitem__("param_groups", [1, 2]),
                                  "param_groups[0] has no 'params' list"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_rank_files_are_refused(damage, run, tmp_path):
    case, file, change, message = DAMAGE[damage]
    ckpt = _copy(case, tmp_path)
    path = ckpt / "global_step3" / file
    obj = torch.load(path, weights_only=False)  # written by this test suite's own fixtures script
    change(obj)
    torch.save(obj, path)
    out = tmp_path / "x.safetensors"
    assert_refused(run("convert", ckpt, out), out, message)


def test_parameters_are_read_one_at_a_time(monkeypatch):
    """Loading one parameter touches only its slices, not the whole model."""
    from sfckpt.readers import deepspeed_folder

    loaded = []
    original = deepspeed_folder._gather

    def spy(parts, numel, shape):
        loaded.append(shape)
        return original(parts, numel, shape)

    monkeypatch.setattr(deepspeed_folder, "_gather", spy)
    ckpt = sfckpt.load(DS / "zero3-fp32")
    assert loaded == []  # nothing read by load()
    ckpt.weights["fc2.bias"].load()
    assert loaded == [(5,)]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_fixtures_regenerate(tmp_path):
    """Real DeepSpeed, two CPU ranks: the script still makes the committed cases (same names, dtypes, shapes),
    and sfckpt converts each fresh one to exactly that run's truth.

    Values are not compared with the committed ones: two DeepSpeed runs on a shared machine need not
    give the same bits (seen in CI), and the truth of each run is what sfckpt must match."""
    result = subprocess.run([sys.executable, str(FIXTURES / "make_deepspeed_fixtures.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == CASES
    for case in CASES:
        fresh = torch.load(tmp_path / case / "expected.pt", weights_only=True)
        committed = torch.load(DS / case / "expected.pt", weights_only=True)
        assert fresh["meta"] == committed["meta"]
        assert {k: (v.dtype, v.shape) for k, v in fresh.items() if k != "meta"} == \
            {k: (v.dtype, v.shape) for k, v in committed.items() if k != "meta"}
        for dtype in (None, "float32"):
            assert_identical(reconstruct(sfckpt.load(tmp_path / case), dtype=dtype).state_dict(),
                             expected_output(tmp_path / case, dtype))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_hf_trainer_deepspeed_zero2_to_release_folder(run, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    result = subprocess.run([sys.executable, SCRIPTS / "hf_trainer_deepspeed.py", tmp_path], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt, expected = tmp_path / "checkpoint-3", torch.load(tmp_path / "expected_x.pt")
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "global_step3").is_dir()
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "deepspeed" and [g["weight_decay"] for g in report["groups"]] == [0.1, 0.0]
    release = tmp_path / "release"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    assert "lm_head.weight" not in read(release / "model.safetensors")  # named as save_pretrained names it
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_identical(model.state_dict(), expected)
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("check", ckpt / "model.safetensors", "--ckpt", ckpt).exit_code == 1  # the Trainer's own weights are y


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_accelerate_deepspeed_save_state(run, tmp_path):
    pytest.importorskip("accelerate")
    result = subprocess.run([sys.executable, SCRIPTS / "accelerate_deepspeed.py", tmp_path], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "state" / "pytorch_model").is_dir()
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "state", out)
    assert result.exit_code == 0, result.stderr
    assert_identical(read(out), torch.load(tmp_path / "expected_x.pt"))


# ---- DeepSpeed: fields of the rank files checked where they are read ----------------------------------------

def _rank0(ckpt):
    return next((ckpt / "global_step3").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def _every_rank(ckpt):
    return sorted((ckpt / "global_step3").glob("*_optim_states.pt"))


def _paddings(value):
    return lambda o: o["optimizer_state_dict"].__setitem__("param_alignment_paddings", value)


def _base_groups(change):
    return lambda o: [change(g) for g in o["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]]


def _z_to(dtype):
    def change(o):
        state = o["optimizer_state_dict"]["base_optimizer_state"]["state"]
        for entry in state.values():
            entry["z"] = entry["z"].to(dtype)
    return change


DEEPSPEED = {
    "paddings NaN": ("zero2-aligned-bf16", _every_rank, _paddings([[float("nan"), 0], [3, 0]]), "param_alignment_paddings"),
    "paddings 5, -5": ("zero2-aligned-bf16", _every_rank, _paddings([[5, -5], [3, 0]]), "param_alignment_paddings"),
    "paddings text": ("zero2-aligned-bf16", _every_rank, _paddings([["5", 0], [3, 0]]), "param_alignment_paddings"),
    "params [[0]]": ("zero2-fp32", _every_rank, _base_groups(lambda g: g.__setitem__("params", [[0]])), "params"),
    "params [0.5]": ("zero2-fp32", _every_rank, _base_groups(lambda g: g.__setitem__("params", [0.5])), "params"),
    "partition_count []": ("zero2-fp32", _every_rank,
                           lambda o: o["optimizer_state_dict"].__setitem__("partition_count", []), "partition_count"),
    "partition_count [0]": ("zero2-fp32", _every_rank,
                            lambda o: o["optimizer_state_dict"].__setitem__("partition_count", [0, 0]), "partition_count"),
    "z bfloat16": ("zero2-fp32", _every_rank, _z_to(torch.bfloat16), "float32"),
    "z bfloat16 at ZeRO-3": ("zero3-fp32", _every_rank, lambda o: [e.__setitem__("z", e["z"].to(torch.bfloat16)) for e in
                             o["optimizer_state_dict"]["optimizer_state_dict"]["state"].values()], "float32"),
    "group_paddings NaN": ("bf16-optimizer", _every_rank,
                           lambda o: o["optimizer_state_dict"].__setitem__("group_paddings", [float("nan")]), "group_paddings"),
}


@pytest.mark.parametrize("damage", sorted(DEEPSPEED))
def test_deepspeed_fields_are_checked_where_read(damage, run, tmp_path):
    case, files, change, fragment = DEEPSPEED[damage]
    ckpt = tmp_path / case
    shutil.copytree(DS / case, ckpt)
    for path in files(ckpt):
        obj = torch.load(path, weights_only=False)  # written by this test suite's own fixtures script
        change(obj)
        torch.save(obj, path)
    out = tmp_path / "x.safetensors"
    for args in (("convert", ckpt, out), ("inspect", ckpt), ("diff", ckpt)):
        result = run(*args)
        assert_clean(result, out)
        assert fragment in result.stderr
