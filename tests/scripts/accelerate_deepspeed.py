import os, socket, sys, torch
from pathlib import Path

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
import deepspeed.ops
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
import schedulefree
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from deepspeed.utils import safe_get_full_fp32_param

out = Path(sys.argv[1])
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 5))
opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=0.05, betas=(0.85, 0.999))
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 7)), batch_size=4)
plugin = DeepSpeedPlugin(hf_ds_config={"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                                       "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                                       "steps_per_print": 10**9})
accelerator = Accelerator(deepspeed_plugin=plugin)
engine, prepared, data = accelerator.prepare(model, opt, data)
opt.train()  # after prepare: before, it would key state by parameters DeepSpeed then replaces
for (x,) in data:
    accelerator.backward(engine(x).pow(2).mean())
    prepared.step()
    prepared.zero_grad()
accelerator.save_state(str(out / "state"))
opt.eval()  # the client optimizer's own eval() on DeepSpeed's fp32 master partitions
x = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()}
torch.save(x, out / "expected_x.pt")
