"""`python hf_trainer.py OUT OPTIM train|eval`: the Hugging Face Trainer trains the tiny Llama 3 steps with
`optim=OPTIM` (evaluating at step 3 with `eval`) and saves OUT/checkpoint-3; OUT/expected_x.pt is the
optimizer's own eval() after training."""
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import tiny_llama

out, optim, do_eval = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "eval"
torch.manual_seed(0)
model = LlamaForCausalLM(tiny_llama.config())
tok = tiny_llama.tokenizer()
data = tiny_llama.data()
args = TrainingArguments(output_dir=str(out), optim=optim, learning_rate=1e-2, weight_decay=0.1,
                         per_device_train_batch_size=4, max_steps=3, save_steps=3, report_to=[], use_cpu=True,
                         logging_steps=100, lr_scheduler_type="constant", eval_strategy="steps" if do_eval else "no",
                         eval_steps=3, per_device_eval_batch_size=4)
trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4] if do_eval else None,
                  processing_class=tok)
trainer.train()
trainer.optimizer.eval()
torch.save({k: v.clone() for k, v in model.state_dict().items()}, out / "expected_x.pt")
