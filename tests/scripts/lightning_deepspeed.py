"""`python lightning_deepspeed.py OUT`: Lightning's DeepSpeed ZeRO-2 strategy on two CPU processes (gloo)
trains trainers.MLP 4 steps with AdamWScheduleFree and SfckptModelCheckpoint saving at steps 2 and 4; at each
of those steps rank 0 writes OUT/expected-N.pt, the x of schedulefree's own eval() taken without disturbing
the run (deepspeed_ranks_runs._x_now). Run with MASTER_ADDR and MASTER_PORT set; Lightning starts rank 1."""
import os
import sys
from pathlib import Path

os.environ["DS_ACCELERATOR"] = "cpu"
import deepspeed.ops

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of DeepSpeed's shm all-reduce
import lightning as L
import schedulefree
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: trainers.py
from deepspeed_ranks_runs import _x_now  # noqa: E402
from trainers import MLP  # noqa: E402
from sfckpt.integrations.lightning import SfckptModelCheckpoint  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP()

    def training_step(self, batch, _):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return schedulefree.AdamWScheduleFree(self.parameters(), lr=0.02, betas=(0.85, 0.999), weight_decay=0.01)

    def on_train_start(self):
        self.trainer.optimizers[0].optimizer.train()


class Capture(L.Callback):
    """x at the steps the checkpoint callback saves (it runs after this one), leaving the run undisturbed."""

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step % 2 == 0:
            x = _x_now(trainer.strategy.deepspeed_engine)
            if trainer.global_rank == 0:
                torch.save(x, out / f"expected-{trainer.global_step}.pt")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy refuses accelerators other than CUDA and wants CUDA device indices;
    DeepSpeed itself runs on CPU."""

    def setup_environment(self):
        DDPStrategy.setup_environment(self)

    def setup_distributed(self):
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self):
        return torch.device("cpu", 0)  # DeepSpeed's engine takes the index as the device rank; CPU has one


torch.manual_seed(0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=2)
strategy = CPUDeepSpeedStrategy(stage=2, process_group_backend="gloo")
trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False,
                    callbacks=[Capture(), SfckptModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=2,
                                                                save_top_k=-1, strip_prefix="model.")],
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
trainer.fit(Module(), data)
