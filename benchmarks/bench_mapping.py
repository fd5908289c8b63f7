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

Prints wall and CPU time (user + system of the child process) per round and the medians; on a
shared machine CPU time is the steadier figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
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


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of a command that must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr.decode()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sfckpt-mapbench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=["A", "B"], help="run only these cases")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    a, b = args.workdir / "a_2000x25_shuffled.pt", args.workdir / "b_1000_llrd.pt"
    out = args.workdir / "out.safetensors"
    cases = {
        "A": (a, (2000, (*range(16, 28), 16), "shuffled", 1), [sys.executable, "-c", MAP_ONLY, str(a)], 30.0),
        "B": (b, (1000, (16, 16), "deepest first", 2),
              [sys.executable, "-m", "sfckpt", "convert", str(b), str(out), "--quiet", "--force"], 10.0),
    }
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only}
    for path, spec, _, _ in cases.values():
        if not path.exists():
            generate(path, *spec)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for r in range(args.rounds):
        for name, (_, _, cmd, _) in cases.items():
            results[name].append(measure(cmd))
            wall, cpu = results[name][-1]
            print(f"round {r + 1} case {name}  wall {wall:7.2f} s  cpu {cpu:7.2f} s", flush=True)
    out.unlink(missing_ok=True)
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}, {args.rounds} rounds (medians)")
    print("| case | wall (s) | CPU (s) | target (s) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | < {cases[name][3]:.0f} |")


if __name__ == "__main__":
    main()
