"""`python peft_lora.py OUT`: a LoRA adapter on the tiny Llama (saved to OUT/base), trained 3 steps by the
Hugging Face Trainer with `schedule_free_adamw`; saves OUT/run/checkpoint-3, OUT/expected_x.pt (the
optimizer's own eval() of the adapter's tensors) and OUT/order.txt (their names in optimizer order)."""
import os, sys, torch
from pathlib import Path
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import tiny_llama

out = Path(sys.argv[1])
os.chdir(out)  # the adapter config records the base model's path as given: relative, like most runs
torch.manual_seed(0)
LlamaForCausalLM(tiny_llama.config()).save_pretrained("base")
base = LlamaForCausalLM.from_pretrained("base")
# modules_to_save: a trained copy of the final norm, saved under the base name and in the Trainer's
# no-decay group, beside the LoRA matrices in the decay group
lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                  modules_to_save=["norm"], lora_dropout=0.0)
model = get_peft_model(base, lora)
data = tiny_llama.data()
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
Path("order.txt").write_text("\n".join(order) + "\n")
