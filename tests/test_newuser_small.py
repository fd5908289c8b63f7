"""Smaller things new users tripped over (issue #24), each from the command line: shard sizes need
a unit, --dtype's short names, BatchNorm counted the same by convert and check, --bn-mode momentum,
Trainer folders saved without the optimizer, tables, help, model-key candidates, progress."""
import copy
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.optim.swa_utils import update_bn

import trainers
from conftest import FIXTURES, read, save_checkpoint
from test_reconstruct_batchnorm import MODEL_FILE


def test_max_shard_size_without_a_unit_is_refused(run, tmp_path):
    result = run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "release", "--max-shard-size", "100")
    assert result.exit_code == 2
    assert result.stderr == "error: --max-shard-size '100' has no unit; write it with one: 100MB, 100GB (or 100B for bytes)\n"
    assert not (tmp_path / "release").exists()


@pytest.mark.parametrize("alias, name", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_dtype_short_names_write_what_the_long_names_write(alias, name, run, tmp_path):
    assert run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "a.safetensors", "--dtype", alias).exit_code == 0
    assert run("convert", FIXTURES / "adamw_mlp.pt", tmp_path / "b.safetensors", "--dtype", name).exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert {t.dtype for t in read(tmp_path / "a.safetensors").values()} == {getattr(torch, name)}


@pytest.fixture
def convbn(tmp_path):
    """A ConvBN checkpoint trained with SGDScheduleFree, calibration data, and the model's code."""
    torch.manual_seed(0)
    model = trainers.ConvBN()
    opt = trainers.train(model, "sgd", steps=6)
    ckpt = save_checkpoint(tmp_path / "c.pt", model, opt)
    torch.manual_seed(5)
    data = torch.randn(64, 3, 5, 5)
    torch.save(data, tmp_path / "calib.pt")
    (tmp_path / "model_def.py").write_text(MODEL_FILE.format(tests=str(Path(__file__).parent)))
    return ckpt, model, opt, data


def test_batchnorm_is_counted_in_layers_by_convert_and_check(convbn, run, tmp_path):
    ckpt = convbn[0]
    plain = run("convert", ckpt, tmp_path / "y-stats.safetensors")
    assert "warning: the BatchNorm statistics of 1 layer were gathered at y, not x" in plain.stderr
    calibrated = run("convert", ckpt, tmp_path / "release", "--bn-calib", tmp_path / "calib.pt",
                     "--model", f"{tmp_path / 'model_def.py'}:build")
    assert calibrated.exit_code == 0, calibrated.stderr
    checked = run("check", tmp_path / "release", "--ckpt", ckpt)
    assert checked.exit_code == 0
    assert "(the BatchNorm statistics of 1 layer re-estimated at x by `convert --bn-calib`" in checked.stdout


def test_bn_mode_momentum_is_the_schedule_free_recipe(convbn, run, tmp_path):
    """The schedule_free README: model.train(); optimizer.eval(); forward passes over up to 50 training
    batches without a reset; model.eval()."""
    ckpt, model, opt, data = convbn
    ref_model, ref_opt = copy.deepcopy((model, opt))
    ref_model.train()
    ref_opt.eval()
    with torch.no_grad():
        for batch in data.split(8)[:3]:
            ref_model(batch)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out, "--bn-calib", tmp_path / "calib.pt", "--model",
                 f"{tmp_path / 'model_def.py'}:build", "--bn-batch-size", 8, "--bn-batches", 3, "--bn-mode", "momentum")
    assert result.exit_code == 0, result.stderr
    got, expected = read(out), ref_model.state_dict()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_bn_mode_momentum_uses_at_most_50_batches(convbn, run, tmp_path):
    ckpt, model, opt, _ = convbn
    torch.save(torch.randn(60, 3, 5, 5), tmp_path / "many.pt")
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out, "--bn-calib", tmp_path / "many.pt", "--model",
                 f"{tmp_path / 'model_def.py'}:build", "--bn-batch-size", 1, "--bn-mode", "momentum")
    assert result.exit_code == 0, result.stderr
    assert read(out)["bn.num_batches_tracked"].item() == trainers.ConvBN().bn.num_batches_tracked.item() + 6 * 1 + 50


def test_bn_mode_reset_is_update_bn(convbn, run, tmp_path):
    ckpt, model, opt, data = convbn
    ref_model, ref_opt = copy.deepcopy((model, opt))
    ref_opt.eval()
    update_bn(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8), ref_model)
    out = tmp_path / "x.safetensors"
    result = run("convert", ckpt, out, "--bn-calib", tmp_path / "calib.pt", "--model",
                 f"{tmp_path / 'model_def.py'}:build", "--bn-batch-size", 8, "--bn-mode", "reset")
    assert result.exit_code == 0, result.stderr
    torch.testing.assert_close(read(out)["bn.running_var"], ref_model.state_dict()["bn.running_var"], rtol=1e-6, atol=1e-7)


def test_numeric_module_names_are_left_aligned(run, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ckpt = save_checkpoint(tmp_path / "seq.pt", model, trainers.train(model, "adamw", steps=3))
    lines = run("diff", ckpt).stdout.splitlines()
    modules = lines[lines.index(next(line for line in lines if line.startswith("module"))) + 2:]
    assert sorted(line.split()[0] for line in modules) == ["0", "2"]
    assert all(line.startswith(("0 ", "2 ")) for line in modules)
    rows = [line for line in lines if line.startswith(("0.", "2."))]
    assert len(rows) == 4


def test_did_you_mean_has_no_doubled_punctuation(run):
    result = run("convert", FIXTURES / "adamw_mlp.pt", "x.safetensors", "--forc")
    assert result.stderr == ("error: No such option '--forc'. Did you mean '--force'? Try 'sfckpt convert --help'\n")


@pytest.mark.parametrize("command", ["inspect", "convert", "diff", "check"])
def test_help_points_at_the_repositorys_documentation(command, run):
    text = run(command, "--help").stdout
    assert "Documentation: https://github.com/sfckpt/sfckpt/tree/main/docs" in text
    assert "docs/" not in text.replace("sfckpt/tree/main/docs", "")


@pytest.mark.slow  # a Lightning fit
def test_averaging_state_is_not_a_model_key_candidate(run, tmp_path):
    lightning_wa = pytest.importorskip("test_readers_lightning")
    ckpt, _, _ = lightning_wa.fit(tmp_path, lightning_wa.EMAWeightAveraging())
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert "averaging_state" in report["keys"]["top_level"]
    assert report["keys"]["model_candidates"] == ["current_model_state", "state_dict"]


TRAIN_MODEL_ONLY = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(8)]
    args = TrainingArguments(output_dir=sys.argv[1], optim="schedule_free_adamw", learning_rate=1e-2, max_steps=2,
                             save_steps=2, save_only_model=True, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True)
    Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=data).train()
""")


@pytest.mark.slow
def test_trainer_folder_saved_with_save_only_model_says_how_to_keep_x(run, tmp_path):
    pytest.importorskip("transformers")
    made = subprocess.run([sys.executable, "-c", TRAIN_MODEL_ONLY, str(tmp_path / "run")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    folder = tmp_path / "run" / "checkpoint-2"
    assert not (folder / "optimizer.pt").exists() and (folder / "trainer_state.json").is_file()
    result = run("convert", folder, tmp_path / "release")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {folder}: a Hugging Face Trainer checkpoint saved with save_only_model=True: it holds the training "
        "weights y but no optimizer.pt, so x cannot be rebuilt from it (x needs the optimizer's z); train with "
        "TrainingArguments(save_only_model=False), the default, so that every checkpoint-N/ keeps optimizer.pt, and "
        "convert one of those folders\n")


def test_a_big_checkpoint_says_what_it_is_doing_before_the_first_tensor(tmp_path):
    from test_cli_progress import run_on_terminal

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 512), *[torch.nn.Linear(512, 512) for _ in range(4)])
    ckpt = save_checkpoint(tmp_path / "c.pt", model, trainers.train(model, "sgd", steps=1))
    code, _, terminal = run_on_terminal(["convert", ckpt, tmp_path / "x.safetensors"])
    assert code == 0, terminal
    lines = [s.strip() for s in re.split(r"[\r\n]", terminal) if s.strip()]
    assert lines[0] == f"reading {ckpt} and planning x..."
    assert lines[1].startswith("writing x [") and "  0%" in lines[1]
