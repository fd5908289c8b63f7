"""Benchmark the parameter mapping on many tensors and many parameter groups.

    python benchmarks/bench_mapping.py --workdir /tmp/sfmapbench [--rounds 3] [--only A B]

Builds two checkpoints with the real AdamWScheduleFree (tiny tensors, one parameter group per
block) and times, for --rounds rounds each:

- A: 2,000 blocks of 25 small tensors (50,000 tensors: a LayerNorm and a chain of 12 Linear
     layers of distinct widths), one group per block, groups in shuffled order, one step
     (content places 49,266 tensors, the groups' order the 734 LayerNorm tensors); mapping only
     (`sfckpt.load` + `sfckpt.reconstruct` in a fresh process, nothing written). Target < 30 s.
- B: 1,000 blocks of LayerNorm(16) + Linear(16, 16), one group per block, deepest first
     (layer-wise lr decay), two steps (the 1,999 LayerNorm tensors are placed by order);
     `sfckpt convert CKPT OUT --quiet --force`. Target < 10 s.
- C: 30,000 experts Linear(16, 16) without bias (DeepSeek-V3-like: one shape class of 30,000
     tensors) and their router, one parameter group, two steps; mapping only, as A. Target < 30 s
     and peak memory well under 2 GB (content used to hold dense 30,000 x 30,000 distance matrices).

Prints wall and CPU time (user + system of the child process) and its peak resident memory per
round, and the medians; on a shared machine CPU time is the steadier figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAP_ONLY = (
    "import sys, sfckpt\n"
    "recon = sfckpt.reconstruct(sfckpt.load(sys.argv[1]))\n"
    "print(recon.mapping.method)\n"
)


def generate(path: Path, blocks: int, widths: tuple[int, ...], order: str, steps: int) -> None:
    """A checkpoint of `blocks` residual blocks (LayerNorm(16), then Linear layers through `widths`; the
    last without bias when it narrows back to 16), trained `steps` steps with one parameter group per
    block, groups deepest first or shuffled."""
    import schedulefree
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.layers = nn.ModuleList(nn.Linear(a, b, bias=a <= b) for a, b in zip(widths, widths[1:]))

        def forward(self, x):
            h = self.norm(x)
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return x + h

    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(blocks)])
    ids = list(range(blocks))
    if order == "shuffled":
        random.Random(0).shuffle(ids)
    else:
        ids.reverse()
    groups = [{"params": list(model[i].parameters()), "lr": 1e-2 * 0.99 ** depth} for depth, i in enumerate(ids)]
    opt = schedulefree.AdamWScheduleFree(groups, lr=1e-2)
    opt.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    n = sum(1 for _ in model.parameters())
    print(f"generated {path} ({n} tensors in {blocks} groups, {path.stat().st_size / 1e6:.0f} MB)", flush=True)


def generate_experts(path: Path, experts: int, steps: int) -> None:
    """A checkpoint of `experts` Linear(16, 16) experts without bias beside their router (every expert
    weighted by a softmax), trained `steps` steps with one parameter group."""
    import schedulefree
    import torch
    from torch import nn

    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(16, experts)
            self.experts = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(experts))

        def forward(self, x):
            w = self.router(x).softmax(-1) * experts
            return sum(w[:, i:i + 1] * torch.tanh(e(x)) for i, e in enumerate(self.experts)) / experts

    torch.manual_seed(0)
    model = MoE()
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2)
    opt.train()
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 16)).pow(2).mean().backward()
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    print(f"generated {path} ({experts + 2} tensors in 1 group, {path.stat().st_size / 1e6:.0f} MB)", flush=True)


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak resident MiB) of a command that must succeed, from its own rusage."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{cmd[:4]} failed: {err.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sfckpt-mapbench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["A", "B", "C"], help="run only these cases")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, b = args.workdir / "a_2000x25_shuffled.pt", args.workdir / "b_1000_llrd.pt"
    c = args.workdir / "c_30000_experts.pt"
    out = args.workdir / "out.safetensors"
    cases = {
        "A": (a, lambda: generate(a, 2000, (*range(16, 28), 16), "shuffled", 1),
              [sys.executable, "-c", MAP_ONLY, str(a)], 30.0),
        "B": (b, lambda: generate(b, 1000, (16, 16), "deepest first", 2),
              [sys.executable, "-m", "sfckpt", "convert", str(b), str(out), "--quiet", "--force"], 10.0),
        "C": (c, lambda: generate_experts(c, 30_000, 2), [sys.executable, "-c", MAP_ONLY, str(c)], 30.0),
    }
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    for path, make, _, _ in cases.values():
        if not path.exists():
            make()
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, (_, _, cmd, _) in cases.items():
            results[name].append(measure(cmd))
            wall, cpu, peak = results[name][-1]
            print(f"round {r + 1} case {name}  wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak {peak:7.0f} MiB", flush=True)
    out.unlink(missing_ok=True)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds (medians)")
    print("| case | wall (s) | CPU (s) | peak memory (MiB) | target (s) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        wall, cpu, peak = (statistics.median(run[k] for run in runs) for k in range(3))
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {peak:.0f} | < {cases[name][3]:.0f} |")


if __name__ == "__main__":
    main()
