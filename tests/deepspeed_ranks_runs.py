"""The Trainer with sfckpt's callback under DeepSpeed ZeRO-2 on 2 CPU processes (gloo).

Run as `python deepspeed_ranks_runs.py OUT [bare]`; `bare` trains the same run without the callback
and without taking x, for comparing what training computes. The run trains the tiny Llama of integration_runs.py
4 steps and saves at steps 2 and 4. At each save every rank takes the x that schedulefree's own
eval() gives on DeepSpeed's fp32 master partitions, then puts the partitions' bits and the mode
back as they were, so training goes on undisturbed; rank 0 writes them as `expected-N.pt`.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from integration_runs import _env, _llama  # noqa: E402


def _x_now(engine) -> dict[str, torch.Tensor]:
    """The full x of schedulefree's eval() at this step, leaving the optimizer exactly as it was."""
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = engine.optimizer.optimizer  # schedulefree's, on the fp32 master partitions
    before = [[p.detach().clone() for p in g["params"]] for g in optimizer.param_groups]
    modes = [g["train_mode"] for g in optimizer.param_groups]
    optimizer.eval()
    x = {n: safe_get_full_fp32_param(p).detach().clone()  # a collective: every rank calls it
         for n, p in engine.module.named_parameters(remove_duplicate=False)}
    for group, saved, mode in zip(optimizer.param_groups, before, modes):
        for p, data in zip(group["params"], saved):
            p.data.copy_(data)
        group["train_mode"] = mode
    return x


def _capture(out: Path, rank: int):
    """A callback that records x at every save (built here: transformers is imported in the worker)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        trainer = None

        def on_save(self, args, state, control, **kwargs):
            x = _x_now(self.trainer.model_wrapped)
            if rank == 0:
                torch.save(x, out / f"expected-{state.global_step}.pt")

    return Capture()


def _worker(rank: int, world: int, out: str, port: str, bare: bool) -> None:
    _env(rank, world, port)
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no JIT build of DeepSpeed's shm all-reduce
    from accelerate import PartialState
    from transformers import Trainer, TrainingArguments

    from sfckpt.integrations.transformers import SfckptCallback

    # Without a GPU, the state TrainingArguments makes for DeepSpeed has no backend and counts one
    # process although DeepSpeed runs two: every rank would act as the main one and read all the data.
    # A state made beforehand with gloo counts both, and the Trainer takes it (use_configured_state).
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    model, data = _llama()
    ds_config = {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                 "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    args = TrainingArguments(output_dir=out, optim="schedule_free_adamw", learning_rate=1e-2, weight_decay=0.1,
                             per_device_train_batch_size=1, max_steps=4, save_steps=2, report_to=[], logging_steps=100,
                             lr_scheduler_type="constant", deepspeed=ds_config, disable_tqdm=True,
                             accelerator_config={"use_configured_state": True})
    capture = _capture(Path(out), rank)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[] if bare else [capture, SfckptCallback()])
    capture.trainer = trainer
    trainer.train()
    assert trainer.args.world_size == 2 and trainer.state.is_world_process_zero == (rank == 0)


def main(out: str, bare: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    Path(out).mkdir(parents=True, exist_ok=True)
    os.environ["DS_ACCELERATOR"] = "cpu"
    mp.spawn(_worker, args=(2, out, port, bare), nprocs=2)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] == ["bare"])
