"""`python lightning_fsdp_writers.py OUT`, as one of two processes torchrun would start: the Trainer with
ModelParallelStrategy, Fabric with FSDPStrategy and Fabric with ModelParallelStrategy each train trainers.MLP
3 steps and save OUT/NAME.ckpt; OUT/NAME-y.pt and OUT/NAME-x.pt are y before and x after the optimizer's
own eval() (see tests/test_readers_lightning_fsdp_writers.py)."""
import os
import sys
from pathlib import Path

import lightning as L
import schedulefree
import torch
from lightning.fabric.strategies import FSDPStrategy as FabricFSDPStrategy
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: trainers.py
from trainers import MLP  # noqa: E402

out = Path(sys.argv[1])
rank = int(os.environ["RANK"])
torch.set_num_threads(1)
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model, mesh):
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def optimizer(params):
    return schedulefree.AdamWScheduleFree(params, lr=0.02, betas=(0.85, 0.999), weight_decay=0.01)


def gather_fsdp1(module):
    with FullyShardedDataParallel.summon_full_params(module, writeback=False):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def keep(name, which, tensors):
    if rank == 0:
        torch.save(tensors, out / f"{name}-{which}.pt")


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP()

    def configure_model(self):
        shard(self.model, self.device_mesh["data_parallel"])

    def training_step(self, batch, _):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return optimizer(self.parameters())

    def on_train_start(self):
        for opt in self.trainer.optimizers:
            opt.train()


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=2,
                    strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), max_steps=3,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=out)
trainer.fit(Module(), data)
trainer.save_checkpoint(out / "trainer-model-parallel.ckpt")
keep("trainer-model-parallel", "y", get_model_state_dict(trainer.lightning_module, options=FULL))
for opt in trainer.optimizers:
    opt.eval()
keep("trainer-model-parallel", "x", get_model_state_dict(trainer.lightning_module, options=FULL))


class CPUFabricFSDPStrategy(FabricFSDPStrategy):
    pass


def fabric_run(strategy, module, name, gather):
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = fabric.setup_module(module)
    opt = fabric.setup_optimizers(optimizer(model.parameters()))
    opt.train()
    torch.manual_seed(1)
    for batch in torch.randn(12, 8).split(4):
        opt.zero_grad()
        fabric.backward(model(batch).pow(2).mean())
        opt.step()
    fabric.save(out / f"{name}.ckpt", {"model": model, "optimizer": opt, "step": 3})
    keep(name, "y", gather())
    opt.eval()
    keep(name, "x", gather())


torch.manual_seed(0)
wrapped = FullyShardedDataParallel(MLP(), device_id=torch.device("cpu"), use_orig_params=True,
                                   auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))
fabric_run(CPUFabricFSDPStrategy(state_dict_type="sharded"), wrapped, "fabric-fsdp", lambda: gather_fsdp1(wrapped))

torch.manual_seed(0)
mlp = MLP()
fabric_run(FabricModelParallelStrategy(lambda m, mesh: shard(m, mesh["data_parallel"]), data_parallel_size=2,
                                       tensor_parallel_size=1),
           mlp, "fabric-model-parallel", lambda: get_model_state_dict(mlp, options=FULL))
