"""FSDP checkpoints saved by Accelerate (`save_state`) and the Hugging Face Trainer, on CPU with 2 processes.

The folders are made by the frameworks' own saving code (tests/scripts/fsdp_runs.py says how,
and the one thing changed to run FSDP without a GPU); x is compared with the optimizer's
own eval() by torch.equal, tensor by tensor.
"""
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import assert_equal_tensors, assert_one_error_line, Evil, read, SCRIPTS

pytestmark = pytest.mark.slow  # every test here reads the folders of a two-process FSDP run (scripts/fsdp_runs.py)

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    result = subprocess.run([sys.executable, SCRIPTS / "fsdp_runs.py", root], capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0 and "gloo" in result.stderr.lower() and "not available" in result.stderr.lower():
        pytest.skip("gloo backend unavailable")
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _convert(run, src, out, *args):
    result = run("convert", src, out, *args)
    assert result.exit_code == 0, result.stderr
    return result


def test_accelerate_sharded_with_two_models(runs, run, tmp_path):
    """pytorch_model_fsdp_0/ + optimizer_0/ (and _1/): DCP folders keyed by parameter names; one pair per index."""
    folder = runs / "accelerate-fsdp2-sharded-2pairs"
    assert (folder / "pytorch_model_fsdp_1" / ".metadata").is_file() and (folder / "optimizer_1").is_dir()
    report = json.loads(run("inspect", folder, "--json").stdout)
    assert report["container"] == "accelerate-fsdp"
    assert report["keys"]["model_candidates"] == ["model", "model_1"]
    assert report["keys"]["optimizer_candidates"] == ["optimizer", "optimizer_1"]
    assert report["mapping"]["evidence"] == {"names": 6}  # the first pair only, by saved names
    assert any("converting model with optimizer" in n for n in report["notes"])
    _convert(run, folder, tmp_path / "x0.safetensors")
    assert_equal_tensors(read(tmp_path / "x0.safetensors"), torch.load(folder / "expected_0.pt"))
    _convert(run, folder, tmp_path / "x1.safetensors", "--model-key", "model_1", "--optimizer-key", "optimizer_1")
    assert_equal_tensors(read(tmp_path / "x1.safetensors"), torch.load(folder / "expected_1.pt"))


def test_accelerate_full_state_dict_bf16(runs, run, tmp_path):
    """pytorch_model_fsdp.bin + optimizer.bin, both gathered and keyed by names; bf16 parameters stay bf16."""
    folder = runs / "accelerate-fsdp2-full-bf16"
    assert (folder / "pytorch_model_fsdp.bin").is_file() and (folder / "optimizer.bin").is_file()
    _convert(run, folder, tmp_path / "x.safetensors")
    got, want = read(tmp_path / "x.safetensors"), torch.load(folder / "expected_0.pt")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    assert_equal_tensors(got, want)


def test_accelerate_fsdp1_sharded(runs, run, tmp_path):
    """FSDP1 (use_orig_params) sharded state dicts: ShardedTensor shards in the same DCP layout."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = runs / "accelerate-fsdp1-sharded"
    dcp_to_torch_save(runs / "accelerate-fsdp1-sharded-expected_0", tmp_path / "expected.pt")
    _convert(run, folder, tmp_path / "x.safetensors")
    assert_equal_tensors(read(tmp_path / "x.safetensors"), torch.load(tmp_path / "expected.pt"))


def test_trainer_sharded_release_loads_with_from_pretrained(runs, run, tmp_path):
    """The Trainer saves no config.json with SHARDED_STATE_DICT: the release says so, and loads once it is copied.
    The tied lm_head is a separate copy in the DCP data; it gets the embedding's x (and a warning)."""
    from transformers import AutoModelForCausalLM

    ckpt = runs / "trainer-fsdp2-sharded" / "checkpoint-3"
    assert (ckpt / "pytorch_model_fsdp_0").is_dir() and not (ckpt / "config.json").exists()
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "huggingface-trainer-fsdp" and report["groups"][0]["step"] == 3
    assert any("no config.json" in n for n in report["notes"])
    assert [g["weight_decay"] for g in report["groups"]] == [0.1, 0.0]
    release = tmp_path / "release"
    result = _convert(run, ckpt, release)
    assert "copy your model's config.json" in result.stderr and "tied weight" in result.stderr
    shutil.copy(runs / "trainer-fsdp2-sharded" / "config" / "config.json", release)
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_equal_tensors(model.state_dict(), torch.load(runs / "trainer-fsdp2-sharded" / "expected_0.pt"))
    assert run("check", release, "--ckpt", ckpt).exit_code == 0


def test_trainer_full_state_dict_release(runs, run, tmp_path):
    """FULL_STATE_DICT: the Trainer also writes model.safetensors (y) and config.json; the release loads as is."""
    from transformers import AutoModelForCausalLM

    ckpt = runs / "trainer-fsdp2-full" / "checkpoint-3"
    assert (ckpt / "pytorch_model_fsdp.bin").is_file() and (ckpt / "model.safetensors").is_file()
    release = tmp_path / "release"
    result = _convert(run, ckpt, release)
    assert "config.json" not in result.stderr.split("wrote")[0]
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert_equal_tensors(model.state_dict(), torch.load(runs / "trainer-fsdp2-full" / "expected_0.pt"))
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("check", ckpt / "model.safetensors", "--ckpt", ckpt).exit_code == 1  # the Trainer's own weights: y


def _copy(runs, tmp_path, case="accelerate-fsdp2-sharded-2pairs"):
    dst = tmp_path / "ckpt"
    shutil.copytree(runs / case, dst)
    return dst


def test_per_rank_files_are_refused(runs, run, tmp_path):
    """use_dcp=False / LOCAL_STATE_DICT write one torch.save per rank of DTensor/ShardedTensor objects."""
    folder = _copy(runs, tmp_path)
    shutil.rmtree(folder / "pytorch_model_fsdp_0")
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model_fsdp_0_rank0.bin")
    assert_one_error_line(run("convert", folder, tmp_path / "x.safetensors"), "per-rank", "use_dcp=True")
    assert not (tmp_path / "x.safetensors").exists()


def test_incomplete_optimizer_folder_is_refused(runs, run, tmp_path):
    folder = _copy(runs, tmp_path)
    (folder / "optimizer_0" / ".metadata").unlink()
    assert_one_error_line(run("convert", folder, tmp_path / "x.safetensors"), "optimizer_0", "no .metadata")
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_shard_is_refused(runs, run, tmp_path):
    folder = _copy(runs, tmp_path)
    (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").unlink()
    assert_one_error_line(run("inspect", folder), "__1_0.distcp")



def test_crafted_metadata_runs_nothing(runs, run, tmp_path):
    folder = _copy(runs, tmp_path)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    assert_one_error_line(run("inspect", folder), "cannot read DCP metadata")
    assert not marker.exists()


def test_optimizer_folder_holding_something_else_is_refused(runs, run, tmp_path):
    """optimizer_0/ must hold {'optimizer': ...} as save_fsdp_optimizer writes it."""
    import torch.distributed.checkpoint as dcp

    folder = _copy(runs, tmp_path)
    shutil.rmtree(folder / "optimizer_0")
    dcp.save({"weights": {"a": torch.zeros(3)}}, checkpoint_id=folder / "optimizer_0", no_dist=True)
    assert_one_error_line(run("inspect", folder), "expected one 'optimizer' entry")


def test_a_folder_holding_a_sharded_and_a_full_save_is_refused(runs, run, tmp_path):
    """Two save_state calls into one folder, first sharded then full: which one is newer cannot be told."""
    folder = _copy(runs, tmp_path)
    shutil.copy(runs / "accelerate-fsdp2-full-bf16" / "pytorch_model_fsdp.bin", folder)
    shutil.copy(runs / "accelerate-fsdp2-full-bf16" / "optimizer.bin", folder)
    assert_one_error_line(run("convert", folder, tmp_path / "x.safetensors"), "two saves")
    assert not (tmp_path / "x.safetensors").exists()


def _lora_release_loads(runs, case, release, tmp_path):
    """PeftModel.from_pretrained(base, release) holds exactly the adapter's x (get_peft_model_state_dict)."""
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    expected = torch.load(runs / case / "expected_0.pt")
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(runs / case / "base")), str(release))
    assert_equal_tensors(get_peft_model_state_dict(model), expected)


def test_trainer_lora_sharded_release_is_an_adapter_folder(runs, run, tmp_path):
    """save_fsdp_model(adapter_only=True) writes PEFT's names in the DCP folder, the optimizer keeps the model's
    (`lora_A.default.weight`, `norm.modules_to_save.default.weight`): matched by name, written as an adapter."""
    pytest.importorskip("peft")
    case = "trainer-fsdp2-lora-sharded"
    ckpt = runs / case / "checkpoint-3"
    assert not (ckpt / "adapter_config.json").exists()
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "peft-adapter-fsdp"
    # every entry by name (how many the run trains depends on peft's version: 13 with 0.21, 9 with 0.22)
    assert report["mapping"]["evidence"] == {"names": report["mapping"]["entries_with_z"]} != {"names": 0}
    assert not any("strip-prefix" in h for h in report.get("hints", []))
    release = tmp_path / "release"
    result = _convert(run, ckpt, release)
    assert "peft_config.save_pretrained" in result.stderr and "config.json (and tokenizer" not in result.stderr
    assert {p.name for p in release.iterdir()} == {"adapter_model.safetensors"}
    # an adapter_config.json found in a sharded folder is not the save's own (the Trainer writes none): not copied
    stale = _copy(runs, tmp_path, case) / "checkpoint-3"
    shutil.copy(runs / "trainer-fsdp2-lora-full" / "checkpoint-3" / "adapter_config.json", stale)
    result = _convert(run, stale, tmp_path / "from-stale")
    assert "peft_config.save_pretrained" in result.stderr
    assert {p.name for p in (tmp_path / "from-stale").iterdir()} == {"adapter_model.safetensors"}
    shutil.copy(runs / case / "adapter_config" / "adapter_config.json", release)
    _lora_release_loads(runs, case, release, tmp_path)
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("diff", release, ckpt).exit_code == 0


def test_trainer_lora_full_release_is_an_adapter_folder(runs, run, tmp_path):
    """FULL_STATE_DICT: pytorch_model_fsdp.bin holds the model's names (and a frozen tied lm_head); the Trainer's
    adapter_model.safetensors (y) says PEFT's names. The release is an adapter folder with its adapter_config.json."""
    pytest.importorskip("peft")
    case = "trainer-fsdp2-lora-full"
    ckpt = runs / case / "checkpoint-3"
    release = tmp_path / "release"
    result = _convert(run, ckpt, release)
    assert "config.json" not in result.stderr.split("wrote")[0]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in release.iterdir()}
    _lora_release_loads(runs, case, release, tmp_path)
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("check", ckpt / "adapter_model.safetensors", "--ckpt", ckpt).exit_code == 1  # the Trainer's: y


def test_lora_names_that_do_not_match_are_refused(runs, run, tmp_path):
    """An adapter file whose names the optimizer's cannot be turned into is refused, not matched by guess."""
    pytest.importorskip("peft")
    from safetensors.torch import save_file

    folder = _copy(runs, tmp_path, "trainer-fsdp2-lora-full")
    adapter = read(folder / "checkpoint-3" / "adapter_model.safetensors")
    save_file({k.replace("lora_A", "lora_X"): v for k, v in adapter.items()},
              str(folder / "checkpoint-3" / "adapter_model.safetensors"))
    assert_one_error_line(run("convert", folder / "checkpoint-3", tmp_path / "out"), "do not match")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["adapter-in-subfolder", "adapter-files-missing"])
def test_lora_full_save_without_the_default_adapter_files_is_refused(how, runs, run, tmp_path):
    """PEFT saves an adapter not named 'default' (or each of several) in a subfolder, none at the top: then
    pytorch_model_fsdp.bin would pass for a whole model under PEFT's internal names. Refused, as is a FULL save
    whose adapter files are gone. (A review reproduced both with real runs: adapter_name="mine", and two adapters.)"""
    pytest.importorskip("peft")
    ckpt = _copy(runs, tmp_path, "trainer-fsdp2-lora-full") / "checkpoint-3"
    if how == "adapter-in-subfolder":
        (ckpt / "mine").mkdir()
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (ckpt / name).rename(ckpt / "mine" / name)
    else:
        (ckpt / "adapter_model.safetensors").unlink()
        (ckpt / "adapter_config.json").unlink()
    assert_one_error_line(run("convert", ckpt, tmp_path / "out"), "PEFT model saved under FSDP")
    assert not (tmp_path / "out").exists()
