"""Benchmark `sfckpt convert` on every container against its floor and the tools people use today.

    python benchmarks/bench_containers.py --workdir /tmp/sfcont [--size 64] [--rounds 3] [--only dcp zero2]

Checkpoints are made by the real frameworks on CPU, with `schedulefree.AdamWScheduleFree` taking
one step on random gradients (a `--size` MB float32 model: y; the checkpoint also holds z and
exp_avg_sq):

- torch:   `torch.save({"model", "optimizer"})` of a stack of Linear(1024, 1024) layers;
- trainer: a Hugging Face `Trainer` run of a Llama model (`checkpoint-1/`: model.safetensors,
           optimizer.pt);
- dcp:     FSDP2 (`fully_shard`) on 2 ranks (gloo), `dcp.save(get_state_dict(model, opt))`;
- zero2, zero3: DeepSpeed ZeRO stage 2 and 3 on 2 ranks, `engine.save_checkpoint`.

For each, in interleaved rounds, each run after `sync` (no run pays for another's writeback):

- sfckpt:  `sfckpt convert CKPT out.safetensors` (a folder for the Trainer);
- sfckpt-w2: `--workers 2` into a folder of two shards, beside `sfckpt-shards` (the same, 1 worker);
- floor:   `import torch`, read exactly as many bytes of the checkpoint's files as y and z hold,
           write x's bytes and fsync them (what any converter must at least do);
- peers:   torch: `torch.load` (and with `mmap=True`), lerp, `save_file`; dcp: torch's
           `dcp_to_torch_save`, and `dcp.load` + lerp + `save_file` by hand; zero2/zero3:
           DeepSpeed's `zero_to_fp32.py --safe_serialization` (gives y: it reads no z).

Wall time (median) and peak anonymous memory (max over rounds) are printed as a markdown table
with the ratios to the floor. Memory is Pss_Anon (from /proc/PID/smaps_rollup; RssAnon where the
kernel has no smaps_rollup) summed over the process tree, sampled every 25 ms: a page that forked
workers share with their parent counts once in all, where RssAnon would count it once per process.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SIDE = 1024
CONTAINERS = ("torch", "trainer", "dcp", "zero2", "zero3")

GENERATE = textwrap.dedent(
    """
    import os, sys, socket, torch, schedulefree
    kind, out, layers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    SIDE = 1024

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(SIDE, SIDE, bias=False) for _ in range(layers)])

    def step(opt, params):
        opt.train()
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2
        opt.step()

    def torch_save():
        m = model()
        opt = schedulefree.AdamWScheduleFree(m.parameters(), lr=1e-3)
        step(opt, list(m.parameters()))
        torch.save({"model": m.state_dict(), "optimizer": opt.state_dict(), "step": 1}, out)

    def trainer():
        from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
        data = [{"input_ids": torch.randint(0, 1024, (8,)), "labels": torch.randint(0, 1024, (8,))} for _ in range(2)]
        args = TrainingArguments(output_dir=out, optim="schedule_free_adamw", learning_rate=1e-3, max_steps=1,
                                 save_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
                                 lr_scheduler_type="constant", logging_steps=100)
        Trainer(model=LlamaForCausalLM(config), args=args, train_dataset=data).train()

    def ranks(work):
        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        mp.spawn(work, args=(port,), nprocs=2)

    def dcp_work(rank, port):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.fsdp import fully_shard
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        dist.init_process_group("gloo", rank=rank, world_size=2)
        m = model()
        for layer in m:
            fully_shard(layer)
        fully_shard(m)
        opt = schedulefree.AdamWScheduleFree(m.parameters(), lr=1e-3)
        opt.train()
        m(torch.randn(2, SIDE)).pow(2).mean().backward()
        opt.step()
        msd, osd = get_state_dict(m, opt)
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=out)
        dist.destroy_process_group()

    def zero_work(rank, port, stage):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port, DS_ACCELERATOR="cpu")
        import deepspeed, deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no C++ build: gloo is enough
        deepspeed.init_distributed(dist_backend="gloo")
        m = model()
        opt = schedulefree.AdamWScheduleFree(m.parameters(), lr=1e-3)
        config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        engine, _, _, _ = deepspeed.initialize(model=m, optimizer=opt, config=config)
        opt.train()
        engine.backward(engine(torch.randn(1, SIDE)).pow(2).mean())
        engine.step()
        engine.save_checkpoint(out, tag="global_step1")
        import torch.distributed as dist
        dist.barrier()
        os._exit(0)

    if __name__ == "__main__":
        if kind == "torch":
            torch_save()
        elif kind == "trainer":
            trainer()
        elif kind == "dcp":
            ranks(dcp_work)
        else:
            import functools
            ranks(functools.partial(zero_work, stage=int(kind[-1])))
    """
)

# Peers: what people run today.
PLAIN = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    ckpt = torch.load(sys.argv[1], weights_only=True, mmap=sys.argv[3] == "mmap")
    sd, osd = ckpt["model"], ckpt["optimizer"]
    beta = osd["param_groups"][0]["betas"][0]
    x = {n: torch.lerp(sd[n], osd["state"][i]["z"], 1 - 1 / beta) for i, n in enumerate(sd)}
    save_file(x, sys.argv[2])
    """
)
DCP_TO_TORCH = "import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; " \
               "dcp_to_torch_save(sys.argv[1], sys.argv[2])"
DCP_BY_HAND = textwrap.dedent(
    """
    import sys, warnings, torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from safetensors.torch import save_file
    warnings.simplefilter("ignore")
    reader = dcp.FileSystemReader(sys.argv[1])
    md = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.items()
          if isinstance(v, TensorStorageMetadata) and (k.startswith("model.") or k.endswith(".z"))}
    dcp.load(sd, storage_reader=reader, no_dist=True)
    x = {k[len("model."):]: torch.lerp(v, sd[f"optimizer.state.{k[len('model.'):]}.z"], 1 - 1 / 0.9)
         for k, v in sd.items() if k.startswith("model.")}
    save_file(x, sys.argv[2])
    """
)
FLOOR = textwrap.dedent(
    """
    import os, sys, torch
    files, need, out, x_bytes = sys.argv[1].split(os.pathsep), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    for name in sorted(files, key=os.path.getsize, reverse=True):
        with open(name, "rb", buffering=0) as f:
            while need > 0:
                got = f.readinto(view[:min(len(buf), need)])
                if not got:
                    break
                need -= got
    with open(out, "wb", buffering=0) as f:
        zeros = bytes(1 << 20)
        for start in range(0, x_bytes, 1 << 20):
            f.write(zeros[:min(1 << 20, x_bytes - start)])
        os.fsync(f.fileno())
    """
)


def generate(kind: str, path: Path, size_mb: int) -> Path:
    """Make the checkpoint of `kind` with its real framework; the path sfckpt converts."""
    layers = max(1, size_mb * 2**20 // (SIDE * SIDE * 4)) if kind != "trainer" else max(1, size_mb // 10)
    target = {"torch": path / "ckpt.pt", "trainer": path / "run" / "checkpoint-1"}.get(kind, path / "ckpt")
    if not target.exists():
        path.mkdir(parents=True, exist_ok=True)
        out = path / "run" if kind == "trainer" else target
        script = path / "generate.py"  # a file: torch.multiprocessing.spawn imports the workers from it
        script.write_text(GENERATE)
        result = subprocess.run([sys.executable, str(script), kind, str(out), str(layers)], capture_output=True, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0:
            raise SystemExit(f"making the {kind} checkpoint failed: {result.stderr[-3000:]}")
        print(f"generated {kind}: {target} ({tree_bytes(target) / 1e9:.2f} GB)", flush=True)
    return target


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def y_z_x_bytes(ckpt: Path) -> tuple[list[str], int, int]:
    """The checkpoint's data files, the bytes of y and z in them, and x's bytes (from sfckpt's own plan)."""
    import sfckpt

    recon = sfckpt.reconstruct(sfckpt.load(ckpt))
    x = sum(t.nbytes for t in recon.tensors)
    z = sum(t.z.nbytes for t in recon.tensors if t.z is not None)
    files = [str(ckpt)] if ckpt.is_file() else [str(p) for p in ckpt.rglob("*") if p.is_file()]
    return files, sum(t.ref.nbytes for t in recon.tensors) + z, x


def _field_kib(path: Path, name: str) -> int | None:
    for line in path.read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def anon_kib(pid: int) -> int:
    """Anonymous memory of a process and all its descendants, in KiB: the sum of their Pss_Anon
    (each shared page split among the processes sharing it), or of their RssAnon without smaps_rollup."""
    total = 0
    try:
        try:
            own = _field_kib(Path(f"/proc/{pid}/smaps_rollup"), "Pss_Anon")
        except FileNotFoundError:
            own = None
        total += own if own is not None else _field_kib(Path(f"/proc/{pid}/status"), "RssAnon") or 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += anon_kib(int(child))
    except OSError:
        pass
    return total


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak anonymous MiB) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, anon_kib(proc.pid))
        # Reading smaps_rollup of every thread's children walks page tables: every 5 ms it took half a
        # core of the two, slowing what it measured; memory peaks here last far longer than 25 ms
        time.sleep(0.025)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 1024


def approaches(kind: str, ckpt: Path, out: Path) -> dict[str, list[str]]:
    """The commands to time for one container (each writes under `out`)."""
    files, yz, x = y_z_x_bytes(ckpt)
    py, sf = sys.executable, [sys.executable, "-m", "sfckpt", "convert", str(ckpt)]
    single = f"{out}/" if kind == "trainer" else str(out / "x.safetensors")
    half = str(x // 2 + 1)
    cmds = {
        "sfckpt": sf + [single, "--quiet", "--force"],
        "sfckpt-shards": sf + [f"{out}/shards/", "--max-shard-size", f"{half}B", "--quiet", "--force"],
        "sfckpt-w2": sf + [f"{out}/shards/", "--max-shard-size", f"{half}B", "--workers", "2", "--quiet", "--force"],
        "floor": [py, "-c", FLOOR, os.pathsep.join(files), str(yz), str(out / "floor.bin"), str(x)],
    }
    if kind == "torch":
        cmds["torch.load+lerp+save_file"] = [py, "-c", PLAIN, str(ckpt), str(out / "p.safetensors"), "load"]
        cmds["same, mmap=True"] = [py, "-c", PLAIN, str(ckpt), str(out / "p.safetensors"), "mmap"]
    if kind == "dcp":
        cmds["dcp_to_torch_save"] = [py, "-c", DCP_TO_TORCH, str(ckpt), str(out / "p.pt")]
        cmds["dcp.load+lerp+save_file"] = [py, "-c", DCP_BY_HAND, str(ckpt), str(out / "p.safetensors")]
    if kind in ("zero2", "zero3"):
        script = ckpt / "zero_to_fp32.py"
        cmds["zero_to_fp32.py --safe_serialization"] = [py, str(script), str(ckpt), str(out / "zero"),
                                                        "--safe_serialization"]
    cmds["sfckpt inspect"] = [py, "-m", "sfckpt", "inspect", str(ckpt), "--json"]
    return cmds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sfckpt-containers"))
    parser.add_argument("--size", type=int, default=64, help="MB of float32 parameters (800 for the 0.8 GB case)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=CONTAINERS, help="only these containers")
    args = parser.parse_args()
    kinds = args.only or CONTAINERS
    plans = {}
    for kind in kinds:
        ckpt = generate(kind, args.workdir / f"{kind}-{args.size}", args.size)
        out = args.workdir / f"out-{kind}"
        out.mkdir(parents=True, exist_ok=True)
        plans[kind] = (ckpt, approaches(kind, ckpt, out))
        subprocess.run(["cat", *([str(ckpt)] if ckpt.is_file() else [str(p) for p in ckpt.rglob("*") if p.is_file()])],
                       stdout=subprocess.DEVNULL, check=True)  # the same page-cache state for every approach
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for kind, (ckpt, cmds) in plans.items():
            for name, cmd in cmds.items():
                subprocess.run(["sync"], check=True)
                wall, peak = measure(cmd)
                results.setdefault((kind, name), []).append((wall, peak))
                print(f"round {r + 1} {kind:7s} {name:40s} {wall:7.2f} s {peak:7.0f} MiB", flush=True)
    load = os.getloadavg()[0]
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, load average "
          f"{load:.1f} at the end, {args.rounds} rounds (median wall, max peak anonymous memory)\n")
    print("| checkpoint | approach | wall (s) | / floor | sfckpt / this | peak anon (MiB) |")
    print("|---|---|---|---|---|---|")
    for kind, (ckpt, cmds) in plans.items():
        med = {n: statistics.median(w for w, _ in results[(kind, n)]) for n in cmds}
        for name in cmds:
            peak = max(p for _, p in results[(kind, name)])
            print(f"| {kind} ({tree_bytes(ckpt) / 1e9:.2f} GB) | {name} | {med[name]:.2f} | "
                  f"{med[name] / med['floor']:.2f} | {med['sfckpt'] / med[name]:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
