"""Hugging Face Trainer `checkpoint-N/` folders, made by a real Trainer run, to release folders `from_pretrained` loads."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_equal_tensors, read

HF_TRAIN = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

    out, optim, do_eval = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "eval"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0",
                                  pad_token="t1")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    args = TrainingArguments(output_dir=str(out), optim=optim, learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], use_cpu=True,
                             logging_steps=100, lr_scheduler_type="constant", eval_strategy="steps" if do_eval else "no",
                             eval_steps=3, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4] if do_eval else None,
                      processing_class=tok)
    trainer.train()
    trainer.optimizer.eval()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "expected_x.pt")
    """
)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    pytest.importorskip("transformers")

    def make(optim="schedule_free_adamw", evaluate=False):
        out = tmp_path_factory.mktemp(f"hf-{optim}-{evaluate}")
        result = subprocess.run([sys.executable, "-c", HF_TRAIN, str(out), optim, "eval" if evaluate else "train"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        return out / "checkpoint-3", torch.load(out / "expected_x.pt")

    return make


@pytest.mark.parametrize("optim", ["schedule_free_adamw", "schedule_free_sgd"])
def test_hf_trainer_folder_to_release_folder(optim, hf_run, run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt, expected = hf_run(optim)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "huggingface-trainer"
    assert "Hugging Face Trainer" in report["mapping"]["method"] and report["mapping"]["untrained_parameters"] == []
    assert [g["weight_decay"] for g in report["groups"]] == [0.1, 0.0]
    release = tmp_path / "release"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in release.iterdir())
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(names)
    model = AutoModelForCausalLM.from_pretrained(str(release))
    assert_equal_tensors(model.state_dict(), expected)  # tied lm_head restored by transformers
    assert AutoTokenizer.from_pretrained(str(release)) is not None
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    assert run("check", ckpt / "model.safetensors", "--ckpt", ckpt).exit_code == 1  # the folder's own weights are y
    assert run("check", ckpt, "--ckpt", ckpt).exit_code == 1  # WEIGHTS are judged as they are, never reconstructed


def test_hf_checkpoint_after_evaluation_holds_x(hf_run, run, tmp_path):
    ckpt, expected = hf_run(evaluate=True)
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["params_hold"] == "x"
    assert run("convert", ckpt, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_hf_sharded_release_and_output_inside_input(hf_run, run, tmp_path):
    ckpt, expected = hf_run()
    assert run("convert", ckpt, tmp_path / "rel", "--max-shard-size", "10KB").exit_code == 0
    from transformers import AutoModelForCausalLM

    assert_equal_tensors(AutoModelForCausalLM.from_pretrained(str(tmp_path / "rel")).state_dict(), expected)
    result = run("convert", ckpt, ckpt / "release")
    assert result.exit_code == 2 and "inside the input folder" in result.stderr
    assert not (ckpt / "release").exists()


def test_hf_without_transformers_names_the_extra(hf_run, run, tmp_path, monkeypatch):
    ckpt, _ = hf_run()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    result = run("convert", ckpt, tmp_path / "x.safetensors")
    assert result.exit_code == 2 and "sfckpt[hf]" in result.stderr


def test_hf_folder_with_pytorch_model_bin(hf_run, run, tmp_path):
    import shutil

    from safetensors.torch import load_file

    ckpt, expected = hf_run()
    folder = tmp_path / "checkpoint-3"
    shutil.copytree(ckpt, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert run("convert", folder, tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_diff_of_a_trainer_folder_uses_its_x(hf_run, run, tmp_path):
    ckpt, _ = hf_run()
    assert run("convert", ckpt, tmp_path / "rel").exit_code == 0
    same = json.loads(run("diff", tmp_path / "rel", ckpt, "--json").stdout)["summary"]
    assert same["differ"] == 0 and same["compared"] > 0
    gap = json.loads(run("diff", ckpt, "--json").stdout)["summary"]
    assert gap["differ"] > 0
