"""Benchmark `sfckpt convert` against the plain approach and the floor.

    python benchmarks/bench_convert.py --workdir /tmp/sfbench [--scale 1] [--rounds 3]

1. Generates a checkpoint with the real AdamWScheduleFree on a stack of
   Linear(2048, 2048) layers (63 layers, 264M float32 parameters, ~3.2 GB
   with y, z and exp_avg_sq; --scale 4 makes it 4x larger).
2. Runs, alternately, each for --rounds rounds:
   - sfckpt:      `sfckpt convert CKPT OUT.safetensors --quiet`
   - plain:       torch.load, lerp every parameter, safetensors.torch.save_file
   - plain-mmap:  the same with torch.load(mmap=True)
   - floor:       `python -c "import torch"; cat CKPT > /dev/null; head -c BYTES /dev/zero > OUT && sync OUT`
   - inspect:     `sfckpt inspect CKPT --json` (reads samples for the mapping)
   measuring wall time and peak anonymous memory (RssAnon of the process tree,
   sampled every 5 ms; page cache of memory-mapped files does not count).
3. Prints a markdown table (medians) and the ratios the targets are about.
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

LAYERS, SIDE = 63, 2048

PLAIN = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    ckpt = torch.load(sys.argv[1], weights_only=True, mmap=sys.argv[3] == "mmap")
    sd, osd = ckpt["model"], ckpt["optimizer"]
    beta = osd["param_groups"][0]["betas"][0]
    names = list(sd)
    x = {n: torch.lerp(sd[n], osd["state"][i]["z"], 1 - 1 / beta) for i, n in enumerate(names)}
    save_file(x, sys.argv[2])
    """
)


def generate(path: Path, scale: int) -> None:
    import schedulefree
    import torch

    torch.manual_seed(0)
    layers = LAYERS * scale
    model = torch.nn.Sequential(*[torch.nn.Linear(SIDE, SIDE, bias=False) for _ in range(layers)])
    opt = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-3)
    opt.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2  # a real optimizer step on random gradients
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1}, path)
    print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB, {layers * SIDE * SIDE / 1e6:.0f}M parameters)", flush=True)


def rss_anon_kib(pid: int) -> int:
    """RssAnon of a process and its children, in KiB."""
    total = 0
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak anonymous MiB) of a command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_anon_kib(proc.pid))
        time.sleep(0.005)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, peak / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sfckpt-bench"))
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="run only these approaches")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / f"adamw_x{args.scale}.pt"
    if not ckpt.exists():
        generate(ckpt, args.scale)
    out = args.workdir / "out.safetensors"
    x_bytes = LAYERS * args.scale * SIDE * SIDE * 4
    sfckpt = [sys.executable, "-m", "sfckpt", "convert", str(ckpt), str(out), "--quiet", "--force"]
    approaches = {
        "sfckpt": sfckpt,
        "plain": [sys.executable, "-c", PLAIN, str(ckpt), str(out), "load"],
        "plain-mmap": [sys.executable, "-c", PLAIN, str(ckpt), str(out), "mmap"],
        # The floor makes x's bytes durable too (sfckpt's atomic write fsyncs before the rename).
        "floor": ["bash", "-c", f'{sys.executable} -c "import torch"; cat {ckpt} > /dev/null; '
                                f"head -c {x_bytes} /dev/zero > {out} && sync {out}"],
    }
    approaches["inspect"] = [sys.executable, "-m", "sfckpt", "inspect", str(ckpt), "--json"]
    if args.only:
        approaches = {k: v for k, v in approaches.items() if k in args.only}
    subprocess.run(["cat", str(ckpt)], stdout=subprocess.DEVNULL, check=True)  # same page-cache state for all
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in approaches}
    for r in range(args.rounds):
        for name, cmd in approaches.items():
            out.unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)  # no run pays for the previous one's writeback
            results[name].append(measure(cmd))
            wall, peak = results[name][-1]
            print(f"round {r + 1} {name:11s} {wall:7.2f} s  {peak:8.0f} MiB anon", flush=True)
    out.unlink(missing_ok=True)
    med = {k: (statistics.median(w for w, _ in v), max(p for _, p in v)) for k, v in results.items()}
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
          f"checkpoint {ckpt.stat().st_size / 1e9:.2f} GB, x {x_bytes / 1e9:.2f} GB, {args.rounds} rounds (median wall, max peak)")
    print("| approach | wall (s) | peak anonymous memory (MiB) |")
    print("|---|---|---|")
    for k, (w, p) in med.items():
        print(f"| {k} | {w:.2f} | {p:.0f} |")
    if "sfckpt" in med and "floor" in med:
        print(f"\nsfckpt / floor: {med['sfckpt'][0] / med['floor'][0]:.2f}")
    if "inspect" in med:
        print(f"sfckpt inspect: {med['inspect'][0]:.2f} s (target < 0.5 s)")
    if "sfckpt" in med and "plain" in med:
        print(f"sfckpt / plain: {med['sfckpt'][0] / med['plain'][0]:.2f}")
    if "sfckpt" in med and "plain-mmap" in med:
        print(f"sfckpt / plain-mmap: {med['sfckpt'][0] / med['plain-mmap'][0]:.2f}")


if __name__ == "__main__":
    main()
