"""`python lightning_fsdp.py OUT one|two`: Lightning's Trainer on two CPU processes with
`FSDPStrategy(state_dict_type="sharded")` trains trainers.MLP 3 steps (one AdamWScheduleFree, or with `two`
AdamW on fc1 and SGD on fc2) and saves OUT/last.ckpt; OUT/expected_x.pt is the optimizers' own eval()
(see tests/test_readers_lightning_fsdp.py for what differs from a GPU run, and why)."""
import sys
from pathlib import Path

import lightning as L
import schedulefree
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: trainers.py
from trainers import MLP  # noqa: E402

out, two = Path(sys.argv[1]), sys.argv[2] == "two"
torch.set_num_threads(1)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"width": 16})
        self.automatic_optimization = not two  # several optimizers need manual optimization
        self.model = None

    def configure_model(self):
        if self.model is None:
            torch.manual_seed(0)
            # one FSDP unit per layer, so that each optimizer holds whole units
            self.model = FullyShardedDataParallel(MLP(), device_id=torch.device("cpu"), use_orig_params=True,
                                                  auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))

    def training_step(self, batch, _):
        loss = self.model(batch[0]).pow(2).mean()
        if two:
            opts = self.optimizers()
            for opt in opts:
                opt.zero_grad()
            self.manual_backward(loss)
            for opt in opts:
                opt.step()
        return loss

    def configure_optimizers(self):
        if two:
            return [schedulefree.AdamWScheduleFree(self.model.fc1.parameters(), lr=0.02, betas=(0.85, 0.999)),
                    schedulefree.SGDScheduleFree(self.model.fc2.parameters(), lr=0.5, momentum=0.8)]
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02, betas=(0.85, 0.999), weight_decay=0.01)

    def on_train_start(self):
        for opt in self.trainer.optimizers:
            opt.train()


class CPUFSDPStrategy(FSDPStrategy):
    pass


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(state_dict_type="sharded"), max_steps=3,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=out)
trainer.fit(Module(), data)
trainer.save_checkpoint(out / "last.ckpt")
for opt in trainer.optimizers:
    opt.eval()
inner = trainer.lightning_module.model
with FullyShardedDataParallel.summon_full_params(inner, writeback=False):
    x = {f"model.{k}": v.detach().clone() for k, v in inner.state_dict().items()}
if trainer.global_rank == 0:
    torch.save(x, out / "expected_x.pt")
