"""Content evidence: which model tensor an optimizer entry's z lies next to.

Schedule-Free keeps y = (1-β)·z + β·x, so a parameter's own z lies close to its
y: ‖y − z‖ = β·‖x − z‖, small next to the weights themselves. Another tensor
of the same shape, trained from another initialisation, lies about as far
from z as two unrelated tensors do. Comparing a sample of each z with a
sample of each same-shape y therefore tells most parameters apart; tensors
that start equal and barely move (LayerNorm gains, zero-initialised tensors)
cannot be told apart, and are reported as such rather than guessed.

A pair (entry, tensor) is *confirmed* only with a margin: the distance must be
MARGIN times smaller than the distance from that z to every other candidate
and from that y to every other entry's z; with no other tensor of that shape,
smaller than the y's own spread around its mean (so that a lone candidate is
confirmed only when z really lies next to it, not merely because nothing
else has its shape). The same margin rules pairs out: a candidate MARGIN
times farther from z than the closest one is not z's parameter.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Sequence

from .errors import InputError
from .tensors import TensorRef

MARGIN = 4.0
SAMPLE_ELEMENTS = 4096  # per tensor: half from the start, half from the middle of the data
WORK_BUDGET = 100_000_000  # entries x candidates x sample elements per shape class
MIN_SAMPLE = 64
MIN_CONTENT_ELEMENTS = 8  # below this, distances are too noisy to confirm or rule out anything
# Below this, ruling a candidate out because another lies MARGIN times closer to the z is not proof:
# among hundreds of look-alikes of 8 or 16 elements (LayerNorm biases after a few Adam steps move by
# about ±lr per element, so their sign patterns repeat) one lands MARGIN times closer to a z than its
# own y. Such rule-outs are dropped where keeping them leaves no placement at all.
CLOSER_MIN_ELEMENTS = 32
# A float32/float64 y that is one constant c while z is not rules the pair out, but y = (1-β)·z + β·x
# rounds to x's value wherever (1-β)·|z - x| is under half a spacing: up to 500 spacings for β = 0.999.
# Where the rule leaves no placement, it is dropped for z within this many spacings of c.
ROUNDING_ULPS = 1024
UNRELATED = 0.9  # d² / (‖y‖² + ‖z‖²) above this looks like two independent tensors...
UNRELATED_FACTOR = 10.0  # ...when it is also this many times the ratio of the shape's confirmed pairs
UNRELATED_MIN_ELEMENTS = 256  # and the sample is large enough for that ratio to be steady
# Every pair that is used, however it was found (names, order, shape), is checked on its samples:
# unrelated when d² / (‖y‖² + ‖z‖²) exceeds UNRELATED_FLOOR (a cosine under about 0.25; a
# zero-initialised head at lr 2.0 reaches 0.56 in the tests, independent tensors about 1), what
# independent tensors reach by chance (1 - NOISE_SIGMAS/√n: their cosine is about N(0, 1/n)), and
# UNRELATED_FACTOR times the median of the confirmed pairs of the entry's group (how closely y and z
# track in this run).
UNRELATED_FLOOR = 0.75
NOISE_SIGMAS = 3.0
VERIFY_MIN_ELEMENTS = 32  # below this, chance alone brings independent tensors too close to tell
# A candidate shares z's history when their centred samples are as close as a parameter and its
# own z (the centred ratio below SHARED, a cosine of about 0.75 or more) and beyond chance
# (HISTORY_SIGMAS standard deviations). Tensors trained from independent initialisations reach
# 0.5-1.3 (training gives same-shape layers a common structure, cosines up to ±0.4 in the tests);
# a copy, or a tower trained from the same initialisation along z's path, stays below 0.01.
SHARED = 0.25
HISTORY_SIGMAS = 6.0

# The samples cover only the start and the middle of a tensor, so a tensor replaced in part — a head
# re-initialised except the rows the samples read — passes the test above. As x is computed (y and z
# are read whole then anyway), every block of PART_BLOCK elements gets it again (see PartCheck).
PART_BLOCK = 256
PART_FACTOR = 2.0  # ...and over twice the lower quartile of the tensor's own blocks (see PartCheck)


@dataclass(frozen=True)
class Match:
    """The closest candidate for one entry, and how clearly it is the closest."""

    candidate: int  # column index into the candidates given to `evidence`
    distance: float
    runner_up: float  # the smallest competing distance (other candidate, other entry; else the spread)

    @property
    def confirmed(self) -> bool:
        return self.distance * MARGIN < self.runner_up


@dataclass
class ClassEvidence:
    """What the samples of one shape class show: each z's closest y, and which pairs content rules out.

    Computed a block of entries at a time (BLOCK_CELLS distances), keeping per entry only its closest
    candidates and per candidate its two closest entries: memory grows with the class, not with the
    square of it (a class of 30,000 experts). Other distances are computed from the samples when asked."""

    matches: list[Match]
    z: object  # numpy, entries x size: the samples (scaled together, see _without_overflow)
    y: object  # numpy, candidates x size
    y_constant: object  # per candidate: every sampled value equal (still as a constant initialisation)
    z_constant: object
    informative: bool  # enough elements for distances to mean anything
    unrelated_above: float | None  # a ratio above this looks independent (see possible_rows), or None
    history: list  # per entry: the candidates sharing its z's history (see sharing_history)
    near: list = field(default_factory=list)  # per entry: the candidates within MARGIN of its closest (None: all)
    y_value: object = None  # per candidate: its first sampled value
    z_range: object = None  # per entry: the smallest and largest sampled z value
    y_ulp: object = None  # per candidate: the spacing of its dtype at its first sampled value
    _possible: dict = field(default_factory=dict, repr=False)

    @property
    def size(self) -> int:
        """Sample elements per tensor."""
        return self.z.shape[1]

    def distance(self, i: int, j: int) -> float:
        """‖z_i − y_j‖ on the samples, element by element."""
        diff = self.z[i] - self.y[j]
        return float(diff @ diff) ** 0.5

    def ratio(self, i: int, j: int) -> float:
        """d² / (‖y‖² + ‖z‖²): 0 for identical samples, about 1 for independent ones."""
        norms = float(self.z[i] @ self.z[i] + self.y[j] @ self.y[j])
        return self.distance(i, j) ** 2 / norms if norms > 0 else 0.0

    def possible_rows(self, relaxed: bool = False) -> list:
        """Per entry, the candidates that could be its parameter (see `_allowed` for the form). Not one whose y
        is one constant value everywhere while z is not (y = (1-β)·z + β·x could then only be constant
        by an exact cancellation); not one MARGIN times farther from z than the closest; not one as far
        from z as independent tensors while this shape's confirmed pairs are all far closer
        (UNRELATED). `relaxed` drops the first rule where z lies within rounding of y's constant and
        the second on samples under CLOSER_MIN_ELEMENTS elements, where chance and rounding can break
        them. Computed once, from the candidates `_closest` kept near each z."""
        if relaxed not in self._possible:
            self._possible[relaxed] = [self._allowed(i, relaxed) for i in range(len(self.z))]
        return self._possible[relaxed]

    def _allowed(self, i: int, relaxed: bool):
        """possible_rows for entry i: its allowed columns, or a mask over all columns where every
        candidate was in question (no closer rule, or z equal to one of them)."""
        import numpy as np

        closer = self.informative and (not relaxed or self.size >= CLOSER_MIN_ELEMENTS)
        dense = not closer or self.near[i] is None
        cols = np.arange(len(self.y)) if dense else self.near[i]
        y_constant = np.asarray(self.y_constant, dtype=bool)[cols]
        ok = ~y_constant if not self.z_constant[i] else np.ones(len(cols), dtype=bool)
        if relaxed and self.z_range is not None:
            reach = np.maximum(self.z_range[1][i] - self.y_value[cols], self.y_value[cols] - self.z_range[0][i])
            # y is one constant c and every sampled z lies within ROUNDING_ULPS spacings of c: y = (1-β)·z + β·x
            # can round to c without any cancellation (a float32 gain at 1.0 whose z moved by one ulp)
            ok |= y_constant & (reach <= ROUNDING_ULPS * self.y_ulp[cols])
        if self.informative and self.unrelated_above is not None:
            d2 = ((self.z[i] - self.y[cols]) ** 2).sum(axis=1)
            ok &= ~(d2 > self.unrelated_above * ((self.z[i] @ self.z[i]) + (self.y[cols] ** 2).sum(axis=1)))
        return ok if dense else cols[ok]  # a row of every candidate stays a mask: a byte per candidate

    def relaxing_adds(self) -> bool:
        """Does `possible_rows(relaxed=True)` allow any pair the strict rows rule out? (It only adds.)"""
        return any(_count(a) > _count(b) for a, b in zip(self.possible_rows(True), self.possible_rows()))

    def looks_unrelated(self, i: int, j: int, reference: float) -> bool:
        """Are entry i's z and candidate j as far apart as independent tensors, while pairs that
        belong together in this file (`reference`: their median ratio) are far closer? Near-zero
        tensors, shared means (norm gains) and small samples are "cannot tell": False."""
        if self.size < VERIFY_MIN_ELEMENTS:
            return False
        return bool(self.ratio(i, j) > unrelated_limit(self.size, reference))

    def sharing_history(self, i: int) -> list[int]:
        """Candidates whose centred samples are aligned with entry i's z beyond chance: the pair's own
        tensor, and any copy of it or tensor trained along the same path. The limit follows the sample
        size (HISTORY_SIGMAS standard deviations of chance), so samples the work budget shrank for a
        class of thousands of tensors still count; none below VERIFY_MIN_ELEMENTS."""
        return [int(j) for j in self.history[i]]


def _count(allowed) -> int:
    """How many columns a row of `ClassEvidence.possible_rows` allows."""
    return int(allowed.sum()) if allowed.dtype == bool else len(allowed)


class PossibleRow(AbstractSet):
    """The candidates one entry may belong to, as a read-only set of names backed by its row of
    `ClassEvidence.possible_rows()` (a mask over the class's columns, or the allowed columns): not a
    Python set of up to m names."""

    def __init__(self, allowed, names: Sequence[str], column: Mapping[str, int], positions) -> None:
        self.allowed = allowed  # numpy: bool per column, or the allowed columns (sorted int)
        self.names = names  # the class's tensor names, one per column
        self.column = column  # name -> column
        self.positions = positions  # numpy int, per column: the tensor's index among the mapping's candidates

    @classmethod
    def _from_iterable(cls, it) -> set:
        return set(it)

    def __contains__(self, name: object) -> bool:
        import numpy as np

        j = self.column.get(name) if isinstance(name, str) else None
        if j is None:
            return False
        if self.allowed.dtype == bool:
            return bool(self.allowed[j])
        k = int(np.searchsorted(self.allowed, j))
        return k < len(self.allowed) and int(self.allowed[k]) == j

    def __iter__(self) -> Iterator[str]:
        cols = self.allowed.nonzero()[0] if self.allowed.dtype == bool else self.allowed
        return (self.names[j] for j in cols.tolist())

    def __len__(self) -> int:
        return _count(self.allowed)


class Sampler:
    """Samples of tensors as float64 numpy arrays, read once each (a few pages, not the tensor)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int], object] = {}

    def sample(self, ref: TensorRef, n: int):
        import numpy as np

        key = (id(ref), n)
        if key not in self._cache:
            out = ref.sample(n)
            if not np.isfinite(out).all():  # the check is cheap; nan_to_num's call is not, on thousands of samples
                out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
            self._cache[key] = out
        return self._cache[key]


def evidence(zs: Sequence[TensorRef], ys: Sequence[TensorRef], sampler: Sampler) -> ClassEvidence:
    """For each z (same shape as every y), its closest y and the clearest competitor."""
    import numpy as np

    n, m = len(zs), len(ys)
    size = max(MIN_SAMPLE, min(SAMPLE_ELEMENTS, WORK_BUDGET // max(1, n * m)))
    size = min(size, max(1, zs[0].numel if zs else 1))
    z = np.stack([sampler.sample(r, size) for r in zs]) if n else np.zeros((0, size))
    y = np.stack([sampler.sample(r, size) for r in ys]) if m else np.zeros((0, size))
    z, y = _without_overflow(z, y)
    # Rounding can pin a 16-bit y to one value (bfloat16 gains at exactly 1.0) while z moves; not float32.
    exact = np.array([r.dtype in ("float32", "float64") for r in ys], dtype=bool)
    y_constant = (y == y[:, :1]).all(axis=1) & (y.shape[1] > 1) & exact
    z_constant = (z == z[:, :1]).all(axis=1) | (z.shape[1] <= 1)
    spacing = [np.spacing(np.float32(v)) if r.dtype == "float32" else np.spacing(v) for r, v in zip(ys, y[:, 0])] if y.shape[1] else []
    ev = ClassEvidence([], z, y, y_constant, z_constant, size >= MIN_CONTENT_ELEMENTS, None, [],
                       y_value=y[:, 0] if y.shape[1] else np.zeros(m),
                       z_range=(z.min(axis=1, initial=np.inf), z.max(axis=1, initial=-np.inf)),
                       y_ulp=np.array(spacing, dtype=np.float64) if len(spacing) else np.zeros(m))
    _closest(ev)
    confirmed = [i for i, match in enumerate(ev.matches) if match.confirmed]
    if confirmed and ev.size >= UNRELATED_MIN_ELEMENTS:
        median = float(np.median([ev.ratio(i, ev.matches[i].candidate) for i in confirmed]))
        ev.unrelated_above = max(UNRELATED, UNRELATED_FACTOR * median)
    return ev


BLOCK_CELLS = 1 << 21  # distances computed at a time: 16 MiB of float64 per temporary


def _row_blocks(ev: ClassEvidence, visit):
    """visit(rows, d2) for blocks of entries, d2 their squared distances to every candidate
    (by matrix products, then element by element for each entry's closest two, so that a distance of 0
    is 0 and near-ties are not noise). Every step works on the block in place: a class of 30,000
    tensors makes 900 million distances."""
    import numpy as np

    n, m = len(ev.z), len(ev.y)
    yy = (ev.y * ev.y).sum(axis=1)
    step = max(1, BLOCK_CELLS // max(1, m))
    for lo in range(0, n, step):
        rows = slice(lo, min(n, lo + step))
        zb = ev.z[rows]
        d2 = zb @ ev.y.T if m else np.zeros((len(zb), 0))
        d2 *= -2.0
        d2 += yy[None, :]
        d2 += (zb * zb).sum(axis=1)[:, None]
        np.maximum(d2, 0.0, out=d2)
        if m:
            near = _two_smallest(d2)
            exact = ((zb[:, None, :] - ev.y[near]) ** 2).sum(axis=2)
            np.put_along_axis(d2, near, exact, axis=1)
        yield visit(rows, d2)


def _two_smallest(d2):
    """Per row, the columns of its two smallest values (one column when there is one)."""
    import numpy as np

    first = d2.argmin(axis=1)
    if d2.shape[1] == 1:
        return first[:, None]
    r = np.arange(len(d2))
    kept = d2[r, first]
    d2[r, first] = np.inf
    second = d2.argmin(axis=1)
    d2[r, first] = kept
    return np.stack([first, second], axis=1)


def _closest(ev: ClassEvidence) -> None:
    """Fill ev.matches (each entry's closest candidate and clearest competitor) and ev.history."""
    import numpy as np

    n, m = len(ev.z), len(ev.y)
    best_col, best, second = np.zeros(n, dtype=np.int64), np.zeros(n), np.full(n, np.inf)
    col_d2 = np.full((2, m), np.inf)  # each candidate's two closest entries so far
    col_row = np.full((2, m), -1, dtype=np.int64)
    history_limit = min(SHARED, 1.0 - HISTORY_SIGMAS / ev.size ** 0.5) if ev.size >= VERIFY_MIN_ELEMENTS else None
    centred_below = _centring(ev)

    def visit(rows, d2):
        count = rows.stop - rows.start
        if m:
            two = _two_smallest(d2)
            vals = np.take_along_axis(d2, two, axis=1)
            swap = vals[:, -1] < vals[:, 0]  # the exact values may reorder the two
            two[swap], vals[swap] = two[swap][:, ::-1], vals[swap][:, ::-1]
            best_col[rows], best[rows] = two[:, 0], vals[:, 0]
            if m > 1:
                second[rows] = vals[:, 1]
            _merge_columns(col_d2, col_row, d2, rows.start)
        # The candidates not MARGIN times farther than the closest (all of them where the closest is at 0)
        limit = np.where(best[rows] > 0, MARGIN ** 2 * best[rows], -1.0)
        near = [c if b > 0 else None for c, b in zip(_split_rows((d2 <= limit[:, None]).nonzero(), count), best[rows])]
        if history_limit is None:
            return near, [np.zeros(0, dtype=np.int64)] * count
        return near, _split_rows(centred_below(rows, d2, history_limit), count)

    found = list(_row_blocks(ev, visit))
    ev.near = [c for near, _ in found for c in near]
    ev.history = [c for _, history in found for c in history]
    for r in range(2):  # each candidate's two closest entries, element by element, in order
        ok = col_row[r] >= 0
        col_d2[r, ok] = ((ev.z[col_row[r, ok]] - ev.y[ok]) ** 2).sum(axis=1)
    swap = col_d2[1] < col_d2[0]
    col_d2[:, swap], col_row[:, swap] = col_d2[::-1, swap], col_row[::-1, swap]
    spread = np.linalg.norm(ev.y - ev.y.mean(axis=1, keepdims=True), axis=1)
    ev.matches = [_match(ev, i, int(best_col[i]), best[i], second[i], col_d2, col_row, spread) for i in range(n)]


def _split_rows(pairs, n_rows: int) -> list:
    """(row indices, column indices) of a block's marked cells -> per row, its columns (sorted)."""
    import numpy as np

    rows, cols = pairs
    return np.split(cols, np.searchsorted(rows, np.arange(1, n_rows)))


def _merge_columns(col_d2, col_row, d2, first_row: int) -> None:
    """Keep, per candidate, the two smallest squared distances (and their entries) seen so far. Column
    minima are taken by `min` and located by equality, which numpy does far faster than by `argmin`
    along the columns."""
    import numpy as np

    cols = np.arange(d2.shape[1])
    found = []
    for _ in range(min(2, len(d2))):
        low = d2.min(axis=0)
        r, c = (d2 == low[None, :]).nonzero()
        at = np.full(len(cols), -1, dtype=np.int64)
        at[c[::-1]] = r[::-1]  # the first row holding the minimum, for each column
        found.append((low, at + first_row, d2[at, cols]))
        d2[at, cols] = np.inf
    for low, at, kept in found:
        d2[at - first_row, cols] = kept
    vals = np.concatenate([col_d2] + [f[0][None, :] for f in found])
    where = np.concatenate([col_row] + [f[1][None, :] for f in found])
    keep = np.argsort(vals, axis=0, kind="stable")[:2]
    col_d2[:] = np.take_along_axis(vals, keep, axis=0)
    col_row[:] = np.take_along_axis(where, keep, axis=0)


def _centring(ev: ClassEvidence):
    """A function (rows, d2, limit) -> the cells of that block whose centred ratio (d² / (‖y‖² + ‖z‖²)
    with each sample's mean removed) is below `limit`, as (rows, columns), from the same sums:
    ‖(y-ȳ) - (z-z̄)‖² = d² - n·(ȳ-z̄)², ‖y-ȳ‖² = ‖y‖² - n·ȳ²; cells of two constant samples have none."""
    import numpy as np

    n_el = ev.size
    zm, ym = ev.z.mean(axis=1), ev.y.mean(axis=1)
    z_spread = (ev.z * ev.z).sum(axis=1) - n_el * zm ** 2
    y_spread = (ev.y * ev.y).sum(axis=1) - n_el * ym ** 2

    def below(rows, d2, limit: float):
        # d² - n·(z̄-ȳ)² - limit·(spreads) < 0, with n·(z̄-ȳ)² expanded around the rank-one term 2n·z̄·ȳ
        t = np.multiply.outer(2.0 * n_el * zm[rows], ym)
        t += d2
        t -= (n_el * zm[rows] ** 2 + limit * z_spread[rows])[:, None]
        t -= (n_el * ym ** 2 + limit * y_spread)[None, :]
        r, c = (t < 0).nonzero()
        keep = (z_spread[rows][r] + y_spread[c]) > 0
        return r[keep], c[keep]

    return below


def _match(ev: ClassEvidence, i: int, j: int, best2: float, second2: float, col_d2, col_row, spread) -> Match:
    """Entry i's closest candidate j and the clearest competitor: the next candidate, the closest other
    entry to j, or (nothing else of the shape) j's own spread around its mean."""
    others = [second2 ** 0.5] if len(ev.y) > 1 else []
    if len(ev.z) > 1:
        others.append(col_d2[1, j] ** 0.5 if col_row[0, j] == i else col_d2[0, j] ** 0.5)
    if not others:
        others.append(float(spread[j]))
    runner = float(min(others))
    if (ev.y_constant[j] and not ev.z_constant[i]) or not ev.informative:
        runner = 0.0  # never confirmed: see ClassEvidence.possible_rows; a handful of numbers tells nothing
    return Match(j, float(best2) ** 0.5, runner)


SAFE_EXPONENT = 480  # |v| <= 2**480: sums of squares of SAMPLE_ELEMENTS such values stay finite in float64


def _without_overflow(z, y):
    """z and y scaled by one power of two (exact: ratios, ties and zeros stay what they were) when a
    float64 tensor holds values so large (±1e308) that their squares would overflow to inf and every
    distance and ratio would turn into NaN, which is no evidence at all."""
    import numpy as np

    peak = max(float(np.abs(z).max(initial=0.0)), float(np.abs(y).max(initial=0.0)))
    if not peak > 2.0 ** SAFE_EXPONENT or not np.isfinite(peak):
        return z, y
    shift = int(np.frexp(peak)[1]) - SAFE_EXPONENT
    return np.ldexp(z, -shift), np.ldexp(y, -shift)


def identical(a: TensorRef, b: TensorRef, sampler: Sampler) -> bool:
    """Bit-identical data: compared on samples first, then on all bytes (reads both tensors)."""
    import numpy as np

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not np.array_equal(sampler.sample(a, SAMPLE_ELEMENTS), sampler.sample(b, SAMPLE_ELEMENTS)):
        return False
    raw_a, raw_b = a.raw_bytes(), b.raw_bytes()
    if raw_a is not None and raw_b is not None:
        return bool(np.array_equal(raw_a, raw_b))
    import torch

    ta, tb = a.load().reshape(-1), b.load().reshape(-1)
    if ta.numel() == 0:
        return True
    return bool(torch.equal(ta.view(torch.uint8), tb.view(torch.uint8)))


def unrelated_limit(n: int, reference: float) -> float:
    """The ratio d² / (‖y‖² + ‖z‖²) above which n elements of y and z look independent: the floor, what
    chance gives independent tensors (their cosine is about N(0, 1/n)), and UNRELATED_FACTOR times how
    closely the confirmed pairs of the run track (`reference`, their median ratio)."""
    return max(UNRELATED_FLOOR, 1.0 - NOISE_SIGMAS / n ** 0.5, UNRELATED_FACTOR * reference)


@dataclass(frozen=True)
class PartCheck:
    """The unrelated-content test on every block of one pair's data, applied while x is computed.

    A block of PART_BLOCK elements (the tensor's last, shorter one too, from VERIFY_MIN_ELEMENTS) is
    unrelated when its ratio d² / (‖y‖² + ‖z‖²) exceeds `unrelated_limit` for its size and also
    PART_FACTOR times the lower quartile of the tensor's own blocks: a replaced part stands out from the
    rest, while a true pair whose y and z drifted apart evenly (a zero-initialised head at a high lr,
    0.8 in every block) does not. NaN and Inf make no ratio: the finiteness check reports them."""

    name: str
    label: str  # the optimizer entry, as errors name it
    reference: float  # median ratio of the confirmed pairs of the entry's group (0 when none)

    def blocks(self) -> BlockRatios:
        """An accumulator for the slices of one computation of x: `add` each, then `verify`."""
        return BlockRatios(self)

    def __call__(self, y, z) -> None:
        """Check whole tensors."""
        blocks = self.blocks()
        blocks.add(y, z, 0)
        blocks.verify()


class BlockRatios:
    """The ratio of every block of a pair, gathered slice by slice (one float per PART_BLOCK elements)."""

    def __init__(self, check: PartCheck) -> None:
        self.check = check
        self.full: list = []  # float32 tensors: ratios of whole blocks, in order
        self.tail: tuple[float, int, int] | None = None  # (ratio, first element, elements) of a shorter last block
        self.per_element = 1  # numbers per element (2 for complex)

    def add(self, y, z, start: int) -> None:
        """Flat slices of y and z starting at element `start` (a multiple of PART_BLOCK, as slices are)."""
        import torch

        if y.is_complex():  # as the samples read it: real and imaginary parts in turn
            y, z, self.per_element = torch.view_as_real(y), torch.view_as_real(z), 2
        y, z, start = y.reshape(-1), z.reshape(-1), start * self.per_element
        step = PART_BLOCK * 1024  # bounds the temporaries of a whole tensor added at once
        for lo in range(0, y.numel(), step):
            part_y, part_z = y[lo:lo + step], z[lo:lo + step]
            full = part_y.numel() // PART_BLOCK * PART_BLOCK
            if full:
                self.full.append(_ratios(part_y[:full].view(-1, PART_BLOCK), part_z[:full].view(-1, PART_BLOCK)))
            if part_y.numel() - full >= VERIFY_MIN_ELEMENTS:
                rest = part_y.numel() - full
                ratio = _ratios(part_y[full:].view(1, -1), part_z[full:].view(1, -1))
                self.tail = (float(ratio[0]), start + lo + full, rest)

    def verify(self) -> None:
        """Refuse the first block that looks unrelated while the tensor's own blocks track closely."""
        import torch

        ratios = torch.cat(self.full) if self.full else torch.zeros(0)
        own = float(torch.kthvalue(ratios, max(1, len(ratios) // 4)).values) if len(ratios) else 0.0
        check = self.check
        limit = max(unrelated_limit(PART_BLOCK, check.reference), PART_FACTOR * own)
        bad = (ratios > limit).nonzero()
        if len(bad):
            k = int(bad[0, 0])
            self._refuse(float(ratios[k]), limit, k * PART_BLOCK, PART_BLOCK)
        if self.tail is not None:
            ratio, first, n = self.tail
            limit = max(unrelated_limit(n, check.reference), PART_FACTOR * own)
            if ratio > limit:
                self._refuse(ratio, limit, first, n)

    def _refuse(self, ratio: float, limit: float, first: int, n: int) -> None:
        check, per = self.check, self.per_element
        raise InputError(
            f"{check.label} is paired with '{check.name}', but in part its z is unrelated to that tensor: elements "
            f"{first // per:,} to {(first + n) // per - 1:,} give d²/(‖y‖²+‖z‖²) = {ratio:.2f} (over {limit:.2f}), "
            f"as for independent tensors, where the rest of the tensor tracks closely: the optimizer state belongs "
            f"in part to a different tensor — part of '{check.name}' was replaced or re-initialised after the "
            "optimizer was built",
            "save the model together with the optimizer that trains it (build the optimizer after replacing "
            "layers or rows)",
        )


def _ratios(y, z):
    """Blocks x elements -> d² / (‖y‖² + ‖z‖²) per block, float32 (0 where both are zero; NaN and Inf,
    which the finiteness check reports, give 0)."""
    import torch

    work = torch.float64 if y.dtype == torch.float64 else torch.float32
    if work == torch.float64:
        y, z = _scaled_for_squares(y, z)
    yy = torch.linalg.vector_norm(y, dim=1, dtype=work) ** 2
    zz = torch.linalg.vector_norm(z, dim=1, dtype=work) ** 2
    dd = torch.linalg.vector_norm(y - z, dim=1, dtype=work) ** 2
    return torch.nan_to_num(dd / (yy + zz), nan=0.0, posinf=0.0).float()


def _scaled_for_squares(y, z):
    """float64 blocks scaled by one power of two when their values are so large (±1e300) that squares
    would overflow: the ratio is unchanged and stays finite."""
    import torch

    peak = max(float(y.abs().max()) if y.numel() else 0.0, float(z.abs().max()) if z.numel() else 0.0)
    if not peak > 2.0 ** SAFE_EXPONENT or peak == float("inf"):
        return y, z
    import math

    shift = math.frexp(peak)[1] - SAFE_EXPONENT
    return torch.ldexp(y, torch.tensor(-shift, dtype=torch.float64)), torch.ldexp(z, torch.tensor(-shift, dtype=torch.float64))
