"""LoRA adapters trained by the Hugging Face Trainer (optim="schedule_free_adamw") with peft.

The checkpoint holds only the adapter (adapter_model.safetensors, adapter_config.json) and the
Trainer's optimizer.pt over the adapter's parameters. The release is an adapter folder that
PeftModel.from_pretrained(base, folder) loads to exactly the x the optimizer's eval() gives.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_equal_tensors, read

pytest.importorskip("peft")
pytest.importorskip("transformers")

TRAIN = textwrap.dedent(
    """
    import os, sys, torch
    from pathlib import Path
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    out = Path(sys.argv[1])
    os.chdir(out)  # the adapter config records the base model's path as given: relative, like most runs
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained("base")
    base = LlamaForCausalLM.from_pretrained("base")
    # modules_to_save: a trained copy of the final norm, saved under the base name and in the Trainer's
    # no-decay group, beside the LoRA matrices in the decay group
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                      modules_to_save=["norm"], lora_dropout=0.0)
    model = get_peft_model(base, lora)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    args = TrainingArguments(output_dir="run", optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], use_cpu=True,
                             logging_steps=100, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()  # saves run/checkpoint-3 after the last step
    trainer.optimizer.eval()
    torch.save({k: v.clone() for k, v in get_peft_model_state_dict(model).items()}, "expected_x.pt")
    # what a user writes for --param-order: the adapter's trainable names as PEFT saves them, in optimizer order
    saved = {id(p): k for k, p in get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True)).items()}
    decay = set(trainer.get_decay_parameter_names(model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    order = [saved[id(p)] for n, p in named if n in decay] + [saved[id(p)] for n, p in named if n not in decay]
    Path("order.txt").write_text("\\n".join(order) + "\\n")
    """
)
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    result = subprocess.run([sys.executable, "-c", TRAIN, str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, torch.load(out / "expected_x.pt")


def test_checkpoint_holds_only_the_adapter(lora_run):
    out, expected = lora_run
    names = {p.name for p in (out / "run" / "checkpoint-3").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt"} <= names
    assert "model.safetensors" not in names and "config.json" not in names
    assert any(".lora_" in k for k in expected) and "base_model.model.model.norm.weight" in expected


def test_adapter_folder_loads_to_x(lora_run, run, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import LlamaForCausalLM

    out, expected = lora_run
    ckpt = out / "run" / "checkpoint-3"
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "peft-adapter"
    release = tmp_path / "adapter"
    result = run("convert", ckpt, release)
    assert result.exit_code == 0, result.stderr
    assert {p.name for p in release.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    assert_equal_tensors(read(release / "adapter_model.safetensors"), expected)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(out / "base")), str(release))
    assert_equal_tensors(get_peft_model_state_dict(model), expected)
    assert any(not torch.equal(v, read(ckpt / "adapter_model.safetensors")[k]) for k, v in expected.items())


def test_check_and_diff_on_the_adapter_folder(lora_run, run, tmp_path):
    out, _ = lora_run
    ckpt = out / "run" / "checkpoint-3"
    release = tmp_path / "adapter"
    assert run("convert", ckpt, release).exit_code == 0
    assert run("check", release, "--ckpt", ckpt).exit_code == 0
    result = run("check", ckpt / "adapter_model.safetensors", "--ckpt", ckpt)
    assert result.exit_code == 1
    assert run("diff", ckpt).exit_code == 0
    assert run("diff", release, ckpt).exit_code == 0


def test_without_the_base_model_param_order_gives_the_order(lora_run, run, tmp_path):
    """The adapter file lists names sorted; without the base model's config the order comes from --param-order
    (or from content alone, when it tells every tensor apart): never a guess."""
    import shutil

    out, expected = lora_run
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(out / "run" / "checkpoint-3", ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "no/such-model-anywhere"
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    result = run("convert", ckpt, tmp_path / "a")
    if result.exit_code == 0:
        assert_equal_tensors(read(tmp_path / "a" / "adapter_model.safetensors"), expected)
    else:
        assert result.exit_code == 2 and "--param-order" in result.stderr and not (tmp_path / "a").exists()
    result = run("convert", ckpt, tmp_path / "b", "--param-order", out / "order.txt")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "b" / "adapter_model.safetensors"), expected)
