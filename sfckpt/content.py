"""Content evidence: which model tensor an optimizer entry's z lies next to.

Schedule-Free keeps y = (1-β)·z + β·x, so a parameter's own z lies close to its
y: ‖y − z‖ = β·‖x − z‖, small next to the weights themselves. Another tensor
of the same shape, trained from another initialisation, lies about as far
from z as two unrelated tensors do. Comparing a sample of each z with a
sample of each same-shape y therefore tells most parameters apart; tensors
that start equal and barely move (LayerNorm gains, zero-initialised tensors)
cannot be told apart, and are reported as such rather than guessed.

A pair (entry, tensor) is *confirmed* only with a margin: the distance must be
MARGIN times smaller than the distance from that z to every other candidate,
from that y to every other entry's z, and from that y to its own mean (so that
a lone candidate is confirmed only when z is really close to it, not merely
because nothing else has its shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

from .tensors import TensorRef

MARGIN = 4.0
SAMPLE_ELEMENTS = 4096  # per tensor: half from the start, half from the middle of the data
WORK_BUDGET = 400_000_000  # entries x candidates x sample elements per shape class
MIN_SAMPLE = 64


@dataclass(frozen=True)
class Match:
    """The closest candidate for one entry, and how clearly it is the closest."""

    candidate: int  # column index into the candidates given to `evidence`
    distance: float
    runner_up: float  # the smallest competing distance (other candidate, other entry, or the spread)

    @property
    def confirmed(self) -> bool:
        return self.distance * MARGIN < self.runner_up

    @property
    def ratio(self) -> float:
        return float("inf") if self.distance == 0 else self.runner_up / self.distance


class Sampler:
    """Samples of tensors, read once each (memory-mapped files read only the sampled pages)."""

    def __init__(self) -> None:
        self._cache: dict[int, object] = {}

    def sample(self, ref: TensorRef, n: int):
        import torch

        key = (id(ref), n)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        t = ref.load()
        flat = t.reshape(-1)
        if flat.numel() > n:
            half = n // 2
            mid = flat.numel() // 2
            flat = torch.cat([flat[:half], flat[mid:mid + n - half]])
        out = flat.to(torch.float64)
        if not torch.isfinite(out).all():
            out = torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        self._cache[key] = out
        return out


def evidence(zs: Sequence[TensorRef], ys: Sequence[TensorRef], sampler: Sampler) -> list[Match]:
    """For each z (same shape as every y), its closest y and the clearest competitor."""
    import torch

    n, m = len(zs), len(ys)
    if n == 0 or m == 0:
        return []
    numel = max(1, zs[0].numel)
    size = max(MIN_SAMPLE, min(SAMPLE_ELEMENTS, WORK_BUDGET // max(1, n * m)))
    size = min(size, numel)
    z = torch.stack([sampler.sample(r, size) for r in zs])
    y = torch.stack([sampler.sample(r, size) for r in ys])
    spread = (y - y.mean(dim=1, keepdim=True)).norm(dim=1)
    inf = float("inf")
    row_best = torch.full((n,), inf, dtype=torch.float64)
    row_arg = torch.zeros(n, dtype=torch.long)
    row_second = torch.full((n,), inf, dtype=torch.float64)
    col_best = torch.full((m,), inf, dtype=torch.float64)
    col_arg = torch.full((m,), -1, dtype=torch.long)
    col_second = torch.full((m,), inf, dtype=torch.float64)
    block = max(1, 4_000_000 // max(1, m))
    for start in range(0, n, block):
        d = torch.cdist(z[start:start + block], y)  # rows: entries, columns: candidates
        k = min(2, m)
        vals, args = d.topk(k, dim=1, largest=False)
        row_best[start:start + len(d)] = vals[:, 0]
        row_arg[start:start + len(d)] = args[:, 0]
        if k == 2:
            row_second[start:start + len(d)] = vals[:, 1]
        # Merge this block's two smallest per column with those seen so far.
        kc = min(2, len(d))
        cvals, cargs = d.topk(kc, dim=0, largest=False)
        merged = torch.cat([torch.stack([col_best, col_second]), cvals])
        merged_arg = torch.cat([torch.stack([col_arg, torch.full((m,), -1, dtype=torch.long)]), cargs + start])
        order = merged.argsort(dim=0)[:2]
        col_best = merged.gather(0, order[:1])[0]
        col_arg = merged_arg.gather(0, order[:1])[0]
        col_second = merged.gather(0, order[1:2])[0]
    matches = []
    for i in range(n):
        j = int(row_arg[i])
        # The competitor in the column: the best other entry for this candidate.
        other_entry = float(col_second[j]) if int(col_arg[j]) == i else float(col_best[j])
        runner = min(float(row_second[i]), other_entry, float(spread[j]))
        matches.append(Match(j, float(row_best[i]), runner))
    return matches


def identical(a: TensorRef, b: TensorRef) -> bool:
    """Bit-identical data (reads both tensors)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    ta, tb = a.load(), b.load()
    return bool(torch.equal(ta.reshape(-1).view(torch.uint8) if ta.dtype.is_floating_point and ta.numel() else ta,
                            tb.reshape(-1).view(torch.uint8) if tb.dtype.is_floating_point and tb.numel() else tb))


def classes(items: Sequence[tuple[Hashable, TensorRef]]) -> dict[tuple, list[Hashable]]:
    """Group items by (shape, dtype): the tensors that could be interchanged."""
    out: dict[tuple, list[Hashable]] = {}
    for key, ref in items:
        out.setdefault((ref.shape, ref.dtype), []).append(key)
    return out
