"""The other Lightning writers of the sharded `NAME.ckpt/` folder (DCP + `meta.pt`), made by Lightning itself.

One script, run as two CPU processes over gloo, trains a tiny model for 3 steps with
`schedulefree.AdamWScheduleFree` (weight decay 0.01) under three writers in turn, each saving with
its own `save_checkpoint`:

* `trainer-model-parallel.ckpt`: `Trainer(strategy=ModelParallelStrategy(data_parallel_size=2,
  tensor_parallel_size=1))`, FSDP2 (`fully_shard` per `Linear` and on the MLP, in `configure_model`),
  `trainer.save_checkpoint` (lightning/pytorch/strategies/model_parallel.py): DCP of
  `{'state_dict', 'optimizer_0'}` plus `meta.pt` (epoch, global_step, ...);
* `fabric-fsdp.ckpt`: `Fabric(strategy=FSDPStrategy(state_dict_type="sharded"))`,
  `fabric.save(path, {'model', 'optimizer', 'step'})` (lightning/fabric/strategies/fsdp.py):
  DCP of `{'model', 'optimizer'}` plus `meta.pt` = `{'step': 3}`;
* `fabric-model-parallel.ckpt`: `Fabric(strategy=ModelParallelStrategy(parallelize_fn, ...))`, FSDP2,
  the same `fabric.save` (lightning/fabric/strategies/model_parallel.py, `_save_checkpoint`).

What differs from a GPU run, and why (none of it touches what is saved):

* the two processes are started by this test, not by Lightning's launcher, with the variables
  torchrun would set (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `NODE_RANK`, `MASTER_ADDR/PORT`), so that
  one process group serves all three writers in one run (Lightning then takes the processes as
  created externally, `LightningEnvironment.creates_processes_externally`);
* Fabric's `FSDPStrategy` is a subclass that overrides nothing (Fabric refuses FSDP without a GPU
  only by `type(strategy) is FSDPStrategy`, lightning/fabric/connector.py), and the model is wrapped
  before `fabric.setup_module` with `FullyShardedDataParallel(..., device_id=cpu,
  use_orig_params=True)`, one unit per `Linear` (Fabric wraps with `device_id=root_device.index`,
  None on CPU, which FSDP refuses without an accelerator; it leaves a wrapped model as it is).
  Both `ModelParallelStrategy`s run on CPU unchanged.

x is the optimizer's own `eval()` in the same run, after the save, gathered on rank 0 with
`get_model_state_dict(full_state_dict=True, cpu_offload=True)` (FSDP2) or `FSDP.summon_full_params`
(FSDP1); y is gathered the same way before `eval()`. Compared by torch.equal.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import assert_equal_tensors, free_port, read

WRITERS = ("trainer-model-parallel", "fabric-fsdp", "fabric-model-parallel")

TRAIN = textwrap.dedent(
    """
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

    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))


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
    """
)



@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{writer: (ckpt folder, y, x)} for the three writers, from one two-process run."""
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("lightning-more")
    script = root / "train.py"
    script.write_text(TRAIN)
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": "0",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), str(root)], cwd=root, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outputs.append(proc.communicate()[0])
    for proc, output in zip(procs, outputs):
        if proc.returncode != 0 and "gloo" in output.lower() and "not available" in output.lower():
            pytest.skip("gloo backend unavailable")
        assert proc.returncode == 0, output[-3000:]
    return {name: (root / f"{name}.ckpt", torch.load(root / f"{name}-y.pt"), torch.load(root / f"{name}-x.pt"))
            for name in WRITERS}


@pytest.mark.parametrize("writer, model_key, optimizer_key, progress, prefix", [
    ("trainer-model-parallel", "state_dict", "optimizer_0", "epoch 2, global_step 3", "model."),
    ("fabric-fsdp", "model", "optimizer", "step 3", ""),
    ("fabric-model-parallel", "model", "optimizer", "step 3", ""),
])
def test_converts_to_eval_weights(folders, run, tmp_path, writer, model_key, optimizer_key, progress, prefix):
    ckpt, y, expected = folders[writer]
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    assert sorted(expected) == sorted(f"{prefix}{n}" for n in ("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"))
    assert any(not torch.equal(y[k], expected[k]) for k in expected)  # eval() moved the weights: x is not y
    report = json.loads(run("inspect", ckpt, "--json").stdout)
    assert report["container"] == "lightning-fsdp"
    assert report["keys"]["model"] == model_key and report["keys"]["optimizer"] == optimizer_key
    assert report["notes"][-1] == f"Lightning FSDP sharded checkpoint: 2 shard files; meta.pt: {progress}"
    assert [g["step"] for g in report["groups"]] == [3] and report["params_hold"] == "y"
    assert any("--strip-prefix model." in h for h in report["hints"]) == bool(prefix)
    args = ["--strip-prefix", prefix] if prefix else []
    result = run("convert", ckpt, tmp_path / "x.safetensors", *args)
    assert result.exit_code == 0, result.stderr
    assert_equal_tensors(read(tmp_path / "x.safetensors"), {k.removeprefix(prefix): v for k, v in expected.items()})
    assert run("check", tmp_path / "x.safetensors", "--ckpt", ckpt, *args).exit_code == 0
    if prefix:
        assert run("convert", ckpt, tmp_path / "prefixed.safetensors").exit_code == 0  # names as saved
        assert_equal_tensors(read(tmp_path / "prefixed.safetensors"), expected)
