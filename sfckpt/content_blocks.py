"""The content test on all of a pair's data, applied while x is computed (y and z are read whole then anyway).

The mapping's samples cover only the start and the middle of a tensor, so a tensor replaced in part — a
head re-initialised except the rows the samples read, input features (columns) of a Linear re-initialised
across every row — passes the pair test (content.unrelated_limit on the samples). Here every block of
PART_BLOCK consecutive elements gets that test again, against how closely the pair tracks elsewhere: the
lower quartile of its blocks, or its ratio on the samples the pair test accepted where that is smaller (a
part replaced in more than three quarters of the blocks sets no bar of its own). A true pair whose y and z
drifted apart evenly (a zero-initialised head at a high lr) tracks the same everywhere, samples included; a
replaced part does not. Groups of adjacent columns (the last dimension) of PART_BLOCK elements or more get
it too, where they also moved far more than the tensor's columns do (see COLUMN_DRIFT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .content import SAFE_EXPONENT, VERIFY_MIN_ELEMENTS, RunScale, unrelated_limit, within_drift
from .errors import InputError

PART_BLOCK = 256
PART_FACTOR = 2.0  # a part is unrelated only over twice how closely the rest of the pair tracks
# Columns are tested where a column holds at least this many rows: fewer make groups of many columns that
# the blocks already cover, and the per-column sums (three float64 per column) would outgrow x itself.
COLUMN_MIN_ROWS = 16
# A column group must also move far more than the tensor's columns do: d² per column over COLUMN_DRIFT times
# the median of the groups' (of those that moved). Columns of a zero-initialised head legitimately look
# unrelated one by one (a tenth of them, even where its blocks track within 0.03), but they moved at most 19
# times that median in the tests (tests/test_mapping_columns.py keeps the worst); a column re-initialised among
# trained ones brings a whole tensor's worth of difference, tens to hundreds of times it.
COLUMN_DRIFT = 40.0
_CHUNK = PART_BLOCK * 1024  # elements squared at a time: bounds the temporaries of a whole tensor


@dataclass(frozen=True)
class PartCheck:
    """The unrelated-content test on every block and column group of one pair's data.

    A part is unrelated when its ratio d² / (‖y‖² + ‖z‖²) exceeds `unrelated_limit` for its size and also
    PART_FACTOR times how closely the pair tracks elsewhere: the lower quartile of its blocks, or its ratio
    on the mapping's samples (`sampled`) where smaller. A column group must also lie under 2 minus that
    limit (independent, not anti-aligned) and have moved COLUMN_DRIFT times the median column group. Blocks
    whose y and z are both zero, and NaN and Inf (the finiteness check reports them), make no ratio. A tensor
    smaller than one block within the run's drift passes, as on the samples (content.within_drift)."""

    name: str
    label: str  # the optimizer entry, as errors name it
    run: RunScale  # how closely the confirmed pairs of the entry's group track (ratio, drift)
    sampled: float | None = None  # the pair's ratio on the mapping's samples; None: not sampled, or all zero

    def blocks(self, shape: Sequence[int]) -> BlockRatios:
        """An accumulator for the slices of one computation of x of this shape: `add` each, then `verify`."""
        return BlockRatios(self, tuple(shape))

    def __call__(self, y, z) -> None:
        """Check whole tensors (any shape, y's)."""
        blocks = self.blocks(y.shape)
        blocks.add(y, z, 0)
        blocks.verify()


class BlockRatios:
    """The sums of a pair gathered slice by slice: one ratio per PART_BLOCK elements, and d², ‖y‖², ‖z‖²
    per column (the last dimension) of a tensor of COLUMN_MIN_ROWS rows or more."""

    def __init__(self, check: PartCheck, shape: tuple[int, ...]) -> None:
        self.check = check
        self.full: list = []  # float32 tensors: ratios of whole blocks, in order
        self.tail: tuple[float, int, int] | None = None  # (ratio, first element, elements) of a shorter last block
        self.small_within_drift = False  # a tensor shorter than one block, within the run's drift
        self.per_element = 1  # numbers per element (2 for complex)
        self.columns = None  # float64 (3, columns): d², ‖y‖², ‖z‖² summed over the rows; None: not tested
        self.column_count = shape[-1] if len(shape) >= 2 else 0
        self.rows = math.prod(shape) // self.column_count if self.column_count else 0

    def add(self, y, z, start: int) -> None:
        """Flat slices of y and z starting at element `start` (a multiple of PART_BLOCK, as slices are)."""
        import torch

        if y.is_complex():  # as the samples read it: real and imaginary parts in turn
            y, z, self.per_element = torch.view_as_real(y), torch.view_as_real(z), 2
        y, z, start = y.reshape(-1), z.reshape(-1), start * self.per_element
        if start == 0 and y.numel() < PART_BLOCK:  # the whole tensor: the drift allowance is for small tensors only
            work = torch.float64 if y.dtype == torch.float64 else torch.float32
            self.small_within_drift = within_drift(y.to(work), z.to(work), self.check.run.drift)
        if self.columns is None and self.rows >= COLUMN_MIN_ROWS and self.column_count >= 2:
            self.columns = torch.zeros(3, self.column_count * self.per_element, dtype=torch.float64)
        for lo in range(0, y.numel(), _CHUNK):
            squares, scaled = _squares(y[lo:lo + _CHUNK], z[lo:lo + _CHUNK])
            self._add_blocks(squares, start + lo)
            if scaled:  # sums of differently scaled chunks would not add up: cannot tell by columns
                self.column_count = 0
            if self.columns is not None and self.column_count:
                _add_columns(self.columns, squares, start + lo)

    def _add_blocks(self, squares, first: int) -> None:
        """The ratio of every whole block of one chunk, and of a shorter last one of VERIFY_MIN_ELEMENTS or more."""
        import torch

        n = squares[0].numel()
        full = n // PART_BLOCK * PART_BLOCK
        if full:
            self.full.append(_ratio(torch.stack([t[:full].view(-1, PART_BLOCK).sum(dim=1) for t in squares])))
        if n - full >= VERIFY_MIN_ELEMENTS:
            sums = torch.stack([t[full:].sum().view(1) for t in squares])
            self.tail = (float(_ratio(sums)[0]), first + full, n - full)

    def verify(self) -> None:
        """Refuse the first block, then the first column group, that looks unrelated while the pair tracks
        closely elsewhere."""
        import torch

        ratios = torch.cat(self.full) if self.full else torch.zeros(0)
        own = _lower_quartile(ratios)
        bar = PART_FACTOR * (own if self.check.sampled is None else min(own, self.check.sampled))
        limit = max(unrelated_limit(PART_BLOCK), bar)
        bad = (ratios > limit).nonzero()
        if len(bad):
            k = int(bad[0, 0])
            self._refuse(f"elements {self._elements(k * PART_BLOCK, PART_BLOCK)}", float(ratios[k]), limit)
        if self.tail is not None:
            ratio, first, n = self.tail
            limit = max(unrelated_limit(n), bar)
            if ratio > limit and not (self.small_within_drift and not len(ratios)):
                self._refuse(f"elements {self._elements(first, n)}", ratio, limit)
        groups = self._column_groups()
        if groups is not None:
            self._verify_columns(*groups, bar)

    def _column_groups(self):
        """(ratio per group of adjacent columns, first column of each, columns in each, d² per column of
        each) — groups of at least PART_BLOCK elements — or None where columns are not tested."""
        import torch

        if self.columns is None or not self.column_count:
            return None
        count = self.columns.shape[1]
        per = self.per_element
        width = max(1, -(-PART_BLOCK // (self.rows * per))) * per
        firsts = torch.arange(0, count, width)
        if len(firsts) < 2:
            return None  # one group is the whole tensor: the pair test's, on the samples
        sums = torch.zeros(3, len(firsts), dtype=torch.float64).index_add_(1, torch.arange(count) // width, self.columns)
        widths = torch.clamp(count - firsts, max=width)
        return _ratio(sums), firsts, widths, sums[0] / widths

    def _verify_columns(self, ratios, firsts, widths, drift, bar: float) -> None:
        """Refuse the first column group over its limit that also moved COLUMN_DRIFT times more than the
        tensor's columns do (a last, narrower group from VERIFY_MIN_ELEMENTS)."""
        moved = drift[drift > 0]
        usual = float(moved.median()) if len(moved) else 0.0
        for k in ((ratios > bar) & (drift > COLUMN_DRIFT * usual)).nonzero().flatten().tolist():
            n = int(widths[k]) * self.rows  # numbers, as for blocks (two per complex element)
            limit = max(unrelated_limit(n), bar)
            # as far from related as independent tensors: not anti-aligned either (2 − limit), which columns of
            # a zero-initialised head whose path turned back are (y ≈ −z, a ratio near 2)
            if n >= VERIFY_MIN_ELEMENTS and limit < float(ratios[k]) < 2.0 - limit:
                lo, per = int(firsts[k]) // self.per_element, self.per_element
                hi = lo + int(widths[k]) // per - 1
                where = f"columns {lo:,} to {hi:,}" if hi > lo else f"column {lo:,}"
                self._refuse(f"{where} of the last dimension (across all {self.rows:,} rows)", float(ratios[k]), limit,
                             "give" if hi > lo else "gives")

    def _elements(self, first: int, n: int) -> str:
        per = self.per_element
        return f"{first // per:,} to {(first + n) // per - 1:,}"

    def _refuse(self, where: str, ratio: float, limit: float, verb: str = "give") -> None:
        check = self.check
        raise InputError(
            f"{check.label} is paired with '{check.name}', but in part its z is unrelated to that tensor: {where} "
            f"{verb} d²/(‖y‖²+‖z‖²) = {ratio:.2f} (over {limit:.2f}), as for independent tensors, where the rest of "
            f"the tensor tracks closely: the optimizer state belongs in part to a different tensor — part of "
            f"'{check.name}' was replaced or re-initialised after the optimizer was built",
            "save the model together with the optimizer that trains it (build the optimizer after replacing "
            "layers, rows or columns)",
        )


def _squares(y, z):
    """Flat y and z -> (((y − z)², y², z²) per element, scaled or not): float64 for float64 data (scaled by one
    power of two where squares would overflow), else float32."""
    import torch

    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    y, z = y.to(work), z.to(work)
    scaled = False
    if work == torch.float64:
        y, z, scaled = _scaled_for_squares(y, z)
    return ((y - z).square_(), y * y, z * z), scaled


def _add_columns(columns, squares, start: int) -> None:
    """Add a chunk's squares (flat elements from `start`) to the per-column sums: a partial first row, whole
    rows, a partial last row."""
    count, n = columns.shape[1], squares[0].numel()
    at, i = start % count, 0
    if at:
        i = min(count - at, n)
        for row, t in zip(columns, squares):
            row[at:at + i] += t[:i]
    whole = (n - i) // count * count
    if whole:
        for row, t in zip(columns, squares):
            row += t[i:i + whole].view(-1, count).sum(dim=0)
        i += whole
    if i < n:
        for row, t in zip(columns, squares):
            row[:n - i] += t[i:]


def _ratio(sums):
    """(3, k) sums of d², ‖y‖², ‖z‖² -> k ratios d² / (‖y‖² + ‖z‖²), float32; NaN where both are zero or
    the data was not finite (no ratio: never over a limit, not in a quartile)."""
    import torch

    ratio = sums[0] / (sums[1] + sums[2])
    ratio[~torch.isfinite(ratio) | ~torch.isfinite(sums).all(dim=0)] = float("nan")
    return ratio.float()


def _lower_quartile(ratios) -> float:
    """The lower quartile of the ratios that exist (0 when none: no self-reference)."""
    import torch

    known = ratios[~torch.isnan(ratios)]
    return float(torch.kthvalue(known, max(1, len(known) // 4)).values) if len(known) else 0.0


def _scaled_for_squares(y, z):
    """float64 data scaled by one power of two when its values are so large (±1e300) that squares would
    overflow: each ratio is unchanged and stays finite. Returns (y, z, scaled)."""
    import torch

    peak = max(float(y.abs().max()) if y.numel() else 0.0, float(z.abs().max()) if z.numel() else 0.0)
    if not peak > 2.0 ** SAFE_EXPONENT or peak == float("inf"):
        return y, z, False
    shift = torch.tensor(SAFE_EXPONENT - math.frexp(peak)[1], dtype=torch.float64)
    return torch.ldexp(y, shift), torch.ldexp(z, shift), True
