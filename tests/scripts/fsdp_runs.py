"""Make FSDP checkpoints the way Accelerate and the Hugging Face Trainer save them, on CPU, 2 processes (gloo).

Run as `python fsdp_runs.py OUT` (the tests do, once per session). For every case it
writes the folder the framework saves, and `expected_*.pt`: the full state dict after
the optimizer's own eval(), gathered from the shards with
torch.distributed.checkpoint.state_dict.get_model_state_dict.

The frameworks' own code does the saving: `Accelerator.prepare` + `Accelerator.save_state`
(accelerate/accelerator.py, which calls `save_fsdp_model` / `save_fsdp_optimizer` in
accelerate/utils/fsdp_utils.py) and `Trainer.train` (transformers/trainer.py, `_save_checkpoint`,
which calls the same two functions). One thing is changed: Accelerate sets its distributed
type to FSDP only for GPU-like devices (accelerate/state.py, `AcceleratorState.__init__`),
so on CPU the shared state is created first and its distributed type set to FSDP; FSDP2
(`fully_shard`) itself runs on CPU with gloo. FSDP1 models are wrapped here with
`FullyShardedDataParallel(device_id=cpu, use_orig_params=True)` (Accelerate's own FSDP1
wrapping asks for an indexed device), then prepared and saved by Accelerate as above.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _fsdp_state(plugin):
    """An Accelerator whose shared state is FSDP with `plugin`, on CPU (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=True)
    acc.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def _full(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _mlp(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 5)).to(dtype)


def accelerate_case(out: Path, rank: int, *, version: int, state_dict_type: str, n_pairs: int = 1,
                    dtype=torch.float32) -> None:
    import schedulefree
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version, state_dict_type=state_dict_type)
    acc = _fsdp_state(plugin)
    pairs = []
    for i in range(n_pairs):
        torch.manual_seed(i)
        model = _mlp(dtype)
        if version == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.05, betas=(0.85 - 0.1 * i, 0.999),
                                             weight_decay=0.01)
        pairs.append(acc.prepare(model, opt))
    for model, opt in pairs:
        opt.train()
        for step in range(3):
            torch.manual_seed(100 * rank + step)
            opt.zero_grad()
            acc.backward(model(torch.randn(4, 7, dtype=dtype)).float().pow(2).mean())
            opt.step()
    acc.save_state(str(out))
    for i, (model, opt) in enumerate(pairs):
        opt.eval()
        if version == 1:  # gathering a full FSDP1 state dict crashes on CPU; torch's dcp_to_torch_save gathers it
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save(get_model_state_dict(model), checkpoint_id=out.parent / f"{out.name}-expected_{i}")
            continue
        full = _full(model)
        if rank == 0:
            torch.save(full, out / f"expected_{i}.pt")


def trainer_case(out: Path, rank: int, *, state_dict_type: str, lora: bool = False) -> None:
    """`Trainer.train` with FSDP2; with `lora`, a PEFT LoRA model (and modules_to_save) as the Trainer's
    `_save_checkpoint` saves it: `save_fsdp_model(..., adapter_only=True)` via `get_fsdp_ckpt_kwargs`."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    fsdp_config = {"version": 2, "state_dict_type": state_dict_type, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    if lora:
        from peft import LoraConfig, get_peft_model

        if rank == 0:
            model.save_pretrained(out / "base")  # the base model a user loads the adapter onto
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["norm"], lora_dropout=0.0, init_lora_weights=False))
        fsdp_config["use_orig_params"] = True
    data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(12)]
    args = TrainingArguments(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=2, max_steps=3, save_steps=3, report_to=[], logging_steps=100,
                             lr_scheduler_type="constant", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
                             fsdp=True, fsdp_config=fsdp_config)
    _fsdp_state(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args))
    trainer = Trainer(model=model, args=args, train_dataset=data)
    assert trainer.is_fsdp_enabled
    trainer.train()
    trainer.optimizer.eval()
    full = _full(trainer.model_wrapped)
    if rank == 0 and lora:
        from peft import get_peft_model_state_dict

        # the adapter's x under the names PEFT saves, as PEFT itself selects and renames them
        torch.save(get_peft_model_state_dict(model, state_dict=full), out / "expected_0.pt")
        model.peft_config["default"].save_pretrained(out / "adapter_config")  # what a user copies (sharded)
    elif rank == 0:
        config.save_pretrained(out / "config")  # what a user copies into a release of a sharded checkpoint
        torch.save(full, out / "expected_0.pt")


CASES = {
    "accelerate-fsdp2-sharded-2pairs": lambda out, rank: accelerate_case(
        out, rank, version=2, state_dict_type="SHARDED_STATE_DICT", n_pairs=2),
    "accelerate-fsdp2-full-bf16": lambda out, rank: accelerate_case(
        out, rank, version=2, state_dict_type="FULL_STATE_DICT", dtype=torch.bfloat16),
    "accelerate-fsdp1-sharded": lambda out, rank: accelerate_case(
        out, rank, version=1, state_dict_type="SHARDED_STATE_DICT"),
    "trainer-fsdp2-sharded": lambda out, rank: trainer_case(out, rank, state_dict_type="SHARDED_STATE_DICT"),
    "trainer-fsdp2-full": lambda out, rank: trainer_case(out, rank, state_dict_type="FULL_STATE_DICT"),
    "trainer-fsdp2-lora-sharded": lambda out, rank: trainer_case(out, rank, state_dict_type="SHARDED_STATE_DICT",
                                                                 lora=True),
    "trainer-fsdp2-lora-full": lambda out, rank: trainer_case(out, rank, state_dict_type="FULL_STATE_DICT", lora=True),
}


def work(rank: int, world: int, root: str, port: str, names: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port, ACCELERATE_USE_CPU="true")
    import warnings

    warnings.simplefilter("ignore")
    for name in names:
        out = Path(root) / name
        out.mkdir(parents=True, exist_ok=True)
        CASES[name](out, rank)
        torch.distributed.barrier()


def main(root: str, names: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    mp.spawn(work, args=(2, root, port, names or list(CASES)), nprocs=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
