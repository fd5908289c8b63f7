"""`python hf_trainer_deepspeed.py OUT`: the Hugging Face Trainer with `deepspeed=` (ZeRO stage 2, one CPU
rank) trains the tiny Llama 3 steps with `schedule_free_adamw` and saves OUT/checkpoint-3; OUT/expected_x.pt
is schedulefree's own eval() on DeepSpeed's fp32 master partitions."""
import os, socket, sys, torch
from pathlib import Path

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
import deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of DeepSpeed's shm all-reduce
from deepspeed.utils import safe_get_full_fp32_param
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import tiny_llama

out = Path(sys.argv[1])
torch.manual_seed(0)
model = LlamaForCausalLM(tiny_llama.config())
tok = tiny_llama.tokenizer()
data = tiny_llama.data()
ds_config = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
             "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
args = TrainingArguments(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                         per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], logging_steps=100,
                         lr_scheduler_type="constant", deepspeed=ds_config)
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok)
trainer.train()
engine = trainer.model_wrapped
engine.optimizer.optimizer.eval()  # schedulefree's own eval() on DeepSpeed's fp32 master partitions
x = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters(remove_duplicate=False)}
torch.save(x, out / "expected_x.pt")
