"""`python hf_trainer_one_step.py OUT`: the Hugging Face Trainer takes one step (lr 1e-3) on a Llama of
hidden size 64 and saves OUT/checkpoint-1; OUT/expected_x.pt is the optimizer's own eval(). Each z
still lies nearest its own tensor, so content alone places every optimizer entry."""
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

out = Path(sys.argv[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)
model = LlamaForCausalLM(config)
data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.randint(0, 64, (8,))} for _ in range(4)]
args = TrainingArguments(output_dir=str(out), optim="schedule_free_adamw", learning_rate=1e-3, weight_decay=0.1,
                         per_device_train_batch_size=4, max_steps=1, save_steps=1, report_to=[], use_cpu=True,
                         logging_steps=100, lr_scheduler_type="constant")
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
trainer.optimizer.eval()
torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "expected_x.pt")
