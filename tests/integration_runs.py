"""Trainer runs with sfckpt's callback under FSDP2 (2 processes, gloo) and DeepSpeed ZeRO-2, on CPU.

Run as `python integration_runs.py OUT CASE`. Each case trains with `SfckptCallback` (the Trainer
saves at its last step), then calls the optimizer's own eval() and writes the full state dict it
gives as `expected.pt`: the x the release of that checkpoint must equal. FSDP on CPU is set up as
in scripts/fsdp_runs.py (Accelerate's shared state set to FSDP); DeepSpeed as in test_readers_deepspeed.py.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    return LlamaForCausalLM(config), data


def fsdp_case(out: Path, rank: int) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
    from fsdp_runs import _fsdp_state, _full
    from sfckpt.integrations.transformers import SfckptCallback

    model, data = _llama()
    fsdp_config = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT",
                   "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    args = TrainingArguments(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=2, max_steps=3, save_steps=3, report_to=[], logging_steps=100,
                             lr_scheduler_type="constant", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
                             fsdp=True, fsdp_config=fsdp_config)
    _fsdp_state(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SfckptCallback()])
    assert trainer.is_fsdp_enabled
    trainer.train()
    trainer.optimizer.eval()
    full = _full(trainer.model_wrapped)
    if rank == 0:
        torch.save(full, out / "expected.pt")


def deepspeed_case(out: Path) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of DeepSpeed's shm all-reduce
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import Trainer, TrainingArguments

    from sfckpt.integrations.transformers import SfckptCallback

    model, data = _llama()
    ds_config = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    args = TrainingArguments(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], logging_steps=100,
                             lr_scheduler_type="constant", deepspeed=ds_config, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SfckptCallback()])
    trainer.train()
    engine = trainer.model_wrapped
    engine.optimizer.optimizer.eval()  # schedulefree's own eval() on DeepSpeed's fp32 master partitions
    x = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters(remove_duplicate=False)}
    torch.save(x, out / "expected.pt")


def _env(rank: int, world: int, port: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)


def _fsdp_worker(rank: int, world: int, out: str, port: str) -> None:
    _env(rank, world, port)
    os.environ["ACCELERATE_USE_CPU"] = "true"
    fsdp_case(Path(out), rank)


def main(out: str, case: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    Path(out).mkdir(parents=True, exist_ok=True)
    if case == "fsdp":
        mp.spawn(_fsdp_worker, args=(2, out, port), nprocs=2)
    else:
        _env(0, 1, port)
        deepspeed_case(Path(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
