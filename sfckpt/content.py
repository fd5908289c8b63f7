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
    """Distances between the z's and y's of one shape class, and what they rule in and out."""

    matches: list[Match]
    distance: object  # numpy array, entries x candidates
    y_constant: object  # per candidate: every sampled value equal (still as a constant initialisation)
    z_constant: object
    unrelated: object  # entries x candidates: True where z and y look independent while confirmed pairs do not
    informative: bool  # enough elements for distances to mean anything
    size: int = 0  # sample elements per tensor
    ratio: object = None  # entries x candidates: d² / (‖y‖² + ‖z‖²), 0 for identical, about 1 for independent
    centred: object = None  # the same ratio with each sample's mean removed (look-alike gains differ only there)
    y_value: object = None  # per candidate: its first sampled value
    z_range: object = None  # per entry: the smallest and largest sampled z value
    y_ulp: object = None  # per candidate: the spacing of its dtype at its first sampled value
    _possible: object = field(default=None, repr=False)

    def possible(self, i: int, j: int) -> bool:
        """Could candidate j be entry i's parameter? (See `possible_matrix`.)"""
        return bool(self.possible_matrix()[i, j])

    def possible_matrix(self, relaxed: bool = False):
        """Entries x candidates: could candidate j be entry i's parameter? No when y is one constant
        value everywhere but z is not (y = (1-β)·z + β·x could then only be constant by an exact
        cancellation); no when another candidate lies MARGIN times closer to its z; no when z and y
        are as far apart as independent tensors while this shape's confirmed pairs are all far closer
        (UNRELATED). `relaxed` drops the first rule where z lies within rounding of y's constant and
        the second on samples under CLOSER_MIN_ELEMENTS elements, where chance and rounding can break
        them. Computed once, for the whole class at a time (a class can hold thousands)."""
        import numpy as np

        if self._possible is None:
            self._possible = {}
        if relaxed not in self._possible:
            closer = not relaxed or self.size >= CLOSER_MIN_ELEMENTS
            ok = ~(np.asarray(self.y_constant, dtype=bool)[None, :] & ~np.asarray(self.z_constant, dtype=bool)[:, None])
            if relaxed and self.z_range is not None:
                ok |= self._rounds_to_constant()
            if self.informative:
                ok &= ~np.asarray(self.unrelated, dtype=bool)
                if closer:
                    best = np.array([m.distance for m in self.matches], dtype=np.float64)[:, None]
                    ok &= ~((best > 0) & (self.distance > MARGIN * best))
            self._possible[relaxed] = ok
        return self._possible[relaxed]

    def _rounds_to_constant(self):
        """Entries x candidates: y is one constant c and every sampled z lies within ROUNDING_ULPS
        spacings of c, so y = (1-β)·z + β·x can round to c without any cancellation (a float32 gain
        at 1.0 whose z moved by one ulp)."""
        import numpy as np

        lo, hi = np.asarray(self.z_range[0])[:, None], np.asarray(self.z_range[1])[:, None]
        c = np.asarray(self.y_value)[None, :]
        reach = np.maximum(hi - c, c - lo)
        return np.asarray(self.y_constant, dtype=bool)[None, :] & (reach <= ROUNDING_ULPS * np.asarray(self.y_ulp)[None, :])

    def relaxing_adds(self) -> bool:
        """Does `possible_matrix(relaxed=True)` allow any pair the strict matrix rules out?"""
        import numpy as np

        return bool(np.any(self.possible_matrix(True) & ~self.possible_matrix()))

    def looks_unrelated(self, i: int, j: int, reference: float) -> bool:
        """Are entry i's z and candidate j as far apart as independent tensors, while pairs that
        belong together in this file (`reference`: their median ratio) are far closer? Near-zero
        tensors, shared means (norm gains) and small samples are "cannot tell": False."""
        if self.size < VERIFY_MIN_ELEMENTS:
            return False
        return bool(self.ratio[i, j] > unrelated_limit(self.size, reference))

    def sharing_history(self, i: int) -> list[int]:
        """Candidates whose centred samples are aligned with entry i's z beyond chance: the pair's own
        tensor, and any copy of it or tensor trained along the same path. The limit follows the sample
        size (HISTORY_SIGMAS standard deviations of chance), so samples the work budget shrank for a
        class of thousands of tensors still count; none below VERIFY_MIN_ELEMENTS."""
        if self.size < VERIFY_MIN_ELEMENTS:
            return []
        limit = min(SHARED, 1.0 - HISTORY_SIGMAS / self.size ** 0.5)
        return [int(j) for j in (self.centred[i] < limit).nonzero()[0]]


class PossibleRow(AbstractSet):
    """The candidates one entry may belong to, as a read-only set of names backed by its row of
    `ClassEvidence.possible_matrix()`: a shape class of n entries and m tensors costs one n x m
    boolean mask, not n Python sets of up to m names."""

    def __init__(self, mask, names: Sequence[str], column: Mapping[str, int], positions) -> None:
        self.mask = mask  # numpy bool, one per column
        self.names = names  # the class's tensor names, one per column
        self.column = column  # name -> column
        self.positions = positions  # numpy int, per column: the tensor's index among the mapping's candidates

    @classmethod
    def _from_iterable(cls, it) -> set:
        return set(it)

    def __contains__(self, name: object) -> bool:
        j = self.column.get(name) if isinstance(name, str) else None
        return j is not None and bool(self.mask[j])

    def __iter__(self) -> Iterator[str]:
        return (self.names[j] for j in self.mask.nonzero()[0].tolist())

    def __len__(self) -> int:
        return int(self.mask.sum())


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
    spread = np.linalg.norm(y - y.mean(axis=1, keepdims=True), axis=1)
    # Rounding can pin a 16-bit y to one value (bfloat16 gains at exactly 1.0) while z moves; not float32.
    exact = np.array([r.dtype in ("float32", "float64") for r in ys], dtype=bool)
    y_constant = (y == y[:, :1]).all(axis=1) & (y.shape[1] > 1) & exact
    z_constant = (z == z[:, :1]).all(axis=1) | (z.shape[1] <= 1)
    d = _distances(z, y)
    # d² / (‖y‖² + ‖z‖²): about 1 for independent zero-mean tensors, near 0 for a parameter and its z.
    norms = (z * z).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :]
    ratio = np.divide(d ** 2, norms, out=np.zeros_like(d), where=norms > 0)
    informative = size >= MIN_CONTENT_ELEMENTS
    rows = np.arange(n)
    best_col = d.argmin(axis=1)
    best = d[rows, best_col]
    second = np.partition(d, 1, axis=1)[:, 1] if m > 1 else np.full(n, np.inf)
    col_sorted = np.partition(d, 1, axis=0)[:2] if n > 1 else None  # each column's two smallest, in order
    matches = []
    for i in range(n):
        j = int(best_col[i])
        others = [float(second[i])] if m > 1 else []
        if n > 1:  # the best other entry for this candidate
            others.append(float(col_sorted[1, j] if col_sorted[0, j] == d[i, j] else col_sorted[0, j]))
        if not others:  # nothing else has this shape: z must lie close next to the tensor's own size
            others.append(float(spread[j]))
        runner = min(others)
        if (y_constant[j] and not z_constant[i]) or not informative:
            runner = 0.0  # never confirmed: see ClassEvidence.possible; a handful of numbers tells nothing
        matches.append(Match(j, float(best[i]), runner))
    confirmed = [ratio[i, m.candidate] for i, m in enumerate(matches) if m.confirmed]
    if confirmed and size >= UNRELATED_MIN_ELEMENTS:
        unrelated = ratio > max(UNRELATED, UNRELATED_FACTOR * float(np.median(confirmed)))
    else:
        unrelated = np.zeros_like(d, dtype=bool)
    # The centred ratio from the same sums: ‖(y-ȳ) - (z-z̄)‖² = d² - n·(ȳ-z̄)², ‖y-ȳ‖² = ‖y‖² - n·ȳ².
    n_el = z.shape[1]
    zm, ym = z.mean(axis=1), y.mean(axis=1)
    spread2 = ((z * z).sum(axis=1) - n_el * zm ** 2)[:, None] + ((y * y).sum(axis=1) - n_el * ym ** 2)[None, :]
    dc2 = np.maximum(d ** 2 - n_el * (zm[:, None] - ym[None, :]) ** 2, 0.0)
    centred = np.divide(dc2, spread2, out=np.ones_like(d), where=spread2 > 0)
    spacing = [np.spacing(np.float32(v)) if r.dtype == "float32" else np.spacing(v) for r, v in zip(ys, y[:, 0])] if y.shape[1] else []
    z_range = (z.min(axis=1, initial=np.inf), z.max(axis=1, initial=-np.inf))
    return ClassEvidence(matches, d, y_constant, z_constant, unrelated, informative, n_el, ratio, centred,
                         y_value=y[:, 0] if y.shape[1] else np.zeros(m), z_range=z_range,
                         y_ulp=np.array(spacing, dtype=np.float64) if len(spacing) else np.zeros(m))


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


def _distances(z, y):
    """Euclidean distances, entries x candidates: by matrix products, then exactly (element by element)
    for each row's and column's two closest, so that a distance of 0 is 0 and near-ties are not noise."""
    import numpy as np

    n, m = len(z), len(y)
    # One matrix-vector product per entry: as fast as a matrix product here, and free of the thread
    # start-up that makes small BLAS matrix products slow on some machines.
    cross = np.stack([y @ row for row in z]) if n and m else np.zeros((n, m))
    d2 = (z * z).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * cross
    np.maximum(d2, 0.0, out=d2)
    pairs = set()
    if m:
        k = min(2, m)
        for i, cols in enumerate(np.argpartition(d2, k - 1, axis=1)[:, :k]):
            pairs.update((i, int(j)) for j in cols)
    if n:
        k = min(2, n)
        for j, rows in enumerate(np.argpartition(d2, k - 1, axis=0)[:k].T):
            pairs.update((int(i), j) for i in rows)
    for i, j in pairs:
        diff = z[i] - y[j]
        d2[i, j] = float(diff @ diff)
    return np.sqrt(d2)


def identical(a: TensorRef, b: TensorRef, sampler: Sampler) -> bool:
    """Bit-identical data: compared on samples first, then on all bytes (reads both tensors)."""
    import numpy as np
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not np.array_equal(sampler.sample(a, SAMPLE_ELEMENTS), sampler.sample(b, SAMPLE_ELEMENTS)):
        return False
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
