"""The other Lightning writers of the sharded `NAME.ckpt/` folder (DCP + `meta.pt`), made by Lightning itself.

One script (scripts/lightning_fsdp_writers.py), run as two CPU processes over gloo, trains a tiny model for 3 steps with
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

import pytest
import torch

from conftest import assert_equal_tensors, free_port, read, SCRIPTS

pytestmark = pytest.mark.slow  # every test here reads a two-process Lightning run

WRITERS = ("trainer-model-parallel", "fabric-fsdp", "fabric-model-parallel")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{writer: (ckpt folder, y, x)} for the three writers, from one two-process run."""
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("lightning-more")
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "NODE_RANK": "0",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, SCRIPTS / "lightning_fsdp_writers.py", root], cwd=root, env=env,
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
