"""Checkpoints where they live: Hugging Face Trainer folders, Lightning .ckpt, torch.distributed.checkpoint."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trainers
from conftest import assert_equal_tensors, Evil, free_port, read

HERE = Path(__file__).resolve().parent


# ---- Hugging Face Trainer ---------------------------------------------------------------------

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


# ---- Lightning -----------------------------------------------------------------------------

def test_lightning_model_checkpoint(run, tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    import schedulefree

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"width": 16, "lr": 0.02})
            self.model = trainers.ConvBN()

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02)

        def on_train_epoch_start(self):
            self.optimizers().optimizer.train()

    torch.manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 5, 5)), batch_size=4)
    module = Module()
    trainer = L.Trainer(max_steps=3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpts", save_last=True)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path)
    trainer.fit(module, data)
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    expected = trainers.eval_x(module.model, trainer.optimizers[0])
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning" and report["keys"]["optimizer"] == "optimizer_states.0"
    result = run("convert", ckpt, tmp_path / "x.safetensors", "--strip-prefix", "model.")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), expected)


# ---- torch.distributed.checkpoint ------------------------------------------------------------

def test_dcp_single_process(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    expected = trainers.eval_x(model, opt)
    report = json.loads(run("inspect", tmp_path / "dcp", "--json").stdout)
    assert report["container"] == "torch.distributed.checkpoint" and report["mapping"]["evidence"] == {"names": 3}
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0
    got = read(tmp_path / "x.safetensors")
    assert_equal_tensors(got, {k: v for k, v in expected.items() if k in got})


def test_dcp_tied_copy_is_named_in_a_warning(run, tmp_path):
    """DCP saves a tied weight as a copy: it gets the trained tensor's x, and a warning says so and how to undo it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.TiedLM()
    opt = trainers.train(model, "adamw")
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    result = run("convert", tmp_path / "dcp", tmp_path / "x.safetensors")
    assert result.exit_code == 0, result.stderr
    assert "'head.weight' is byte-identical to 'embed.weight'" in result.stderr and "--twins frozen" in result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


def test_dcp_frozen_copy_of_a_network_needs_twins(run, tmp_path):
    """A target network hard-copied before dcp.save: copies of several trained tensors are not taken for ties."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    class OnlineTarget(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.online, self.target = trainers.MLP(), trainers.MLP()
            self.target.requires_grad_(False)

        def forward(self, x):
            return self.online(x)

    model = OnlineTarget()
    opt = trainers.train(model.online, "adamw", param_groups=model.online.parameters())
    model.target.load_state_dict(model.online.state_dict())
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    out = tmp_path / "x.safetensors"
    result = run("convert", tmp_path / "dcp", out)
    assert result.exit_code == 2 and "--twins" in result.stderr and not out.exists()
    result = run("convert", tmp_path / "dcp", out, "--twins", "frozen")
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(out), trainers.eval_x(model, opt))


def test_dcp_bare_model_optimizer_pair(run, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    msd, osd = get_state_dict(model, opt)
    dcp.save({**msd, "optimizer": osd}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0, run("inspect", tmp_path / "dcp").stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), trainers.eval_x(model, opt))


FSDP_TRAIN = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    sys.path.insert(0, sys.argv[3])

    def work(rank, world, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        import schedulefree, trainers
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
        from torch.distributed.fsdp import fully_shard
        torch.manual_seed(0)
        model = trainers.MLP(width=16)
        fully_shard(model.fc1); fully_shard(model.fc2); fully_shard(model)
        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.02)
        opt.train()
        for _ in range(3):
            torch.manual_seed(rank)
            opt.zero_grad(); model(torch.randn(4, 8)).pow(2).mean().backward(); opt.step()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=out)
        opt.eval()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save(full, os.path.join(out, "..", "expected.pt"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(work, args=(2, sys.argv[1], sys.argv[2]), nprocs=2)
    """
)



def test_dcp_from_fsdp2_two_ranks(run, tmp_path):
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_TRAIN)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "dcp"), free_port(), str(HERE)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "gloo" in result.stderr.lower() and "not available" in result.stderr.lower():
        pytest.skip("gloo backend unavailable")
    assert result.returncode == 0, result.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "dcp").glob("*.distcp"))
    assert len(shards) == 2
    assert run("convert", tmp_path / "dcp", tmp_path / "x.safetensors").exit_code == 0
    assert_equal_tensors(read(tmp_path / "x.safetensors"), torch.load(tmp_path / "expected.pt"))


def test_dcp_metadata_with_foreign_class_is_refused(run, tmp_path):
    import pickle

    import torch.distributed.checkpoint as dcp

    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    dcp.save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=tmp_path / "dcp", no_dist=True)
    marker = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil(str(marker))))
    result = run("inspect", tmp_path / "dcp")
    assert result.exit_code == 2 and "cannot read DCP metadata" in result.stderr
    assert not marker.exists()



def test_unknown_schedule_free_state_names_what_was_found(run, tmp_path):
    model = trainers.MLP()
    opt = trainers.train(model, "sgd")
    osd = opt.state_dict()
    for g in osd["param_groups"]:
        g.pop("train_mode"), g.pop("weight_lr_power"), g.pop("weight_sum")
    torch.save({"model": model.state_dict(), "optimizer": osd}, tmp_path / "c.pt")
    result = run("convert", tmp_path / "c.pt", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert "has a z but matches no known Schedule-Free family" in result.stderr
    assert "--optimizer" in result.stderr and "--beta" in result.stderr and "--params-are" in result.stderr


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
