"""Content evidence: which model tensor an optimizer entry's z lies next to.

Schedule-Free keeps y = (1-β)·z + β·x, so a parameter's own z lies close to its
y: ‖y − z‖ = β·‖x − z‖, small next to the weights themselves. Another tensor
of the same shape, trained from another initialisation, lies about as far
from z as two unrelated tensors do. Comparing a sample of each z with a
sample of each same-shape y therefore tells most parameters apart; tensors
that start equal and barely move (LayerNorm gains, zero-initialised tensors)
cannot be told apart, and are reported as such rather than guessed.

A pair (entry, tensor) is *confirmed* only with a margin: the distance must be
MARGIN (LARGE_MARGIN on large samples no other candidate shares) times smaller
than the distance from that z to every other candidate and from that y to
every other entry's z; with no other tensor of that shape,
smaller than the y's own spread around its mean (so that a lone candidate is
confirmed only when z really lies next to it, not merely because nothing
else has its shape). The same margin rules pairs out: a candidate MARGIN
times farther from z than the closest one is not z's parameter.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Sequence

from .tensors import TensorRef

MARGIN = 4.0
# On samples of LARGE_SAMPLE elements or more, a pair is confirmed with LARGE_MARGIN where its tensor is the
# one candidate that shares z's history (see sharing_history): chance brings another tensor that close to a z
# only among few numbers (a tensor independent of z lies at d² = ‖y‖² + ‖z‖² to within about 3/√n). Where
# another candidate shares it too (copies, EMA teachers, a tower trained along z's path, layers copied from
# one another), or none does (look-alikes whose centred content is noise), or the shape has a tensor no entry
# trains (which can be the one sharing z's history: see _match), MARGIN still applies. Linear layers of 1,024 elements
# under big weight decay lie 3x closer to their own y than to each other's (under MARGIN, over
# LARGE_MARGIN). Ruling pairs out keeps MARGIN.
LARGE_SAMPLE = 1024
LARGE_MARGIN = 2.0
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
# independent tensors reach by chance (1 - NOISE_SIGMAS/√n: their cosine is about N(0, 1/n)); see
# unrelated_limit for why not how far the run's pairs drift.
UNRELATED_FLOOR = 0.75
NOISE_SIGMAS = 3.0
# ...unless, on a sample of fewer than DRIFT_MAX_ELEMENTS, y and z lie within DRIFT_FACTOR times the run's
# drift of each other (the RMS of y − z of the confirmed pairs of the entry's group: one lr, step count and
# β). A zero-initialised tensor's y and z both stay that small, and with noisy gradients barely aligned (a
# BatchNorm beta of 32 after 6 steps gives 0.86 at 0.44 times the drift), while a fresh tensor put in a
# trained one's place lies its initialisation scale away (11 to 160 times the drift in the tests). On
# larger samples the scale is not used: a fresh head initialised near zero (N(0, 0.02)) in the place of a
# zero-initialised one trained 300 steps at lr 0.03 lies 1.7 times the drift away, as close as true pairs.
# A y of one value while z is not (a fresh tensor of zeros) is never within drift: a true y moves with z.
DRIFT_FACTOR = 2.0
DRIFT_MAX_ELEMENTS = 256
VERIFY_MIN_ELEMENTS = 32  # below this, chance alone brings independent tensors too close to tell
# A candidate shares z's history when their centred samples are as close as a parameter and its
# own z (the centred ratio below SHARED, a cosine of about 0.75 or more) and beyond chance
# (HISTORY_SIGMAS standard deviations). Tensors trained from independent initialisations reach
# 0.5-1.3 (training gives same-shape layers a common structure, cosines up to ±0.4 in the tests);
# a copy, or a tower trained from the same initialisation along z's path, stays below 0.01.
SHARED = 0.25
HISTORY_SIGMAS = 6.0

@dataclass(frozen=True)
class RunScale:
    """How closely y and z of a run's true pairs track: the median ratio d² / (‖y‖² + ‖z‖²) and the
    median RMS of y − z of the confirmed pairs of a group (else of the file); 0 where none is known."""

    ratio: float = 0.0
    drift: float = 0.0


def within_drift(y, z, drift: float) -> bool:
    """Do the flat samples y and z (numpy or torch) lie within DRIFT_FACTOR times the run's drift of each
    other, with y not one value where z is not? Never where the drift is unknown (0), nor on
    DRIFT_MAX_ELEMENTS or more."""
    if drift <= 0 or len(y) >= DRIFT_MAX_ELEMENTS:
        return False
    diff = y - z
    one_value = bool((y == y[0]).all()) and not bool((z == z[0]).all())
    return not one_value and float((diff * diff).mean()) ** 0.5 <= DRIFT_FACTOR * drift


@dataclass(frozen=True)
class Match:
    """The closest candidate for one entry, and how clearly it is the closest."""

    candidate: int  # column index into the candidates given to `evidence`
    distance: float
    runner_up: float  # the smallest competing distance (other candidate, other entry; else the spread)
    margin: float = MARGIN  # how many times closer than the runner-up confirms (see LARGE_MARGIN)

    @property
    def confirmed(self) -> bool:
        return self.distance * self.margin < self.runner_up


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
    scale: float = 1.0  # the samples are the data divided by this (see _without_overflow)
    _possible: dict = field(default_factory=dict, repr=False)
    _yy: object = field(default=None, repr=False)

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
            # Masks over every candidate are shared between the entries that have the same one: a class of
            # 30,000 look-alikes holds one or two masks, not 30,000 (900 MB)
            shared: dict[bytes, object] = {}
            self._possible[relaxed] = [_shared_mask(self._allowed(i, relaxed), shared) for i in range(len(self.z))]
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
            # ...or z varies by so little that (1-β)·z's variation rounds away in y (a zero-initialised head
            # whose elements all get one gradient: z holds two values one ulp apart, y one)
            ok |= y_constant & (self.z_range[1][i] - self.z_range[0][i] <= ROUNDING_ULPS * self.y_ulp[cols])
        if self.informative and self.unrelated_above is not None:
            # ‖z − y‖² from the norms and one matrix-vector product: only far pairs are in question here, where
            # the expansion loses nothing, and a row of every candidate would otherwise cost a pass per entry
            yy, zz = self._y_squares()[cols], float(self.z[i] @ self.z[i])
            d2 = zz + yy - 2.0 * (self.y[cols] @ self.z[i])
            ok &= ~(d2 > self.unrelated_above * (zz + yy))
        return ok if dense else cols[ok]  # a row of every candidate stays a mask: a byte per candidate

    def _y_squares(self):
        """‖y‖² of every candidate's samples, computed once."""
        if self._yy is None:
            self._yy = (self.y * self.y).sum(axis=1)
        return self._yy

    def relaxing_adds(self) -> bool:
        """Does `possible_rows(relaxed=True)` allow any pair the strict rows rule out? (It only adds.)"""
        return any(_count(a) > _count(b) for a, b in zip(self.possible_rows(True), self.possible_rows()))

    def drift(self, i: int, j: int) -> float:
        """The RMS of z_i − y_j on the samples, in the data's units."""
        return self.distance(i, j) / self.size ** 0.5 * self.scale

    def looks_unrelated(self, i: int, j: int, run: RunScale) -> bool:
        """Are entry i's z and candidate j as far apart as independent tensors, while pairs that
        belong together in this file (`run`) are far closer and drift less? Near-zero tensors, shared
        means (norm gains) and small samples are "cannot tell": False."""
        if self.size < VERIFY_MIN_ELEMENTS or self.ratio(i, j) <= unrelated_limit(self.size):
            return False
        # The drift allowance needs content's own word for the pair: a fresh tensor initialised near zero in a
        # zero-initialised one's place is as small as the run's drift too, but no closer to z than the others
        confirmed = self.matches[i].candidate == j and self.matches[i].confirmed
        return not (confirmed and within_drift(self.y[j], self.z[i], run.drift / self.scale))

    def sharing_history(self, i: int) -> list[int]:
        """Candidates whose centred samples are aligned with entry i's z beyond chance: the pair's own
        tensor, and any copy of it or tensor trained along the same path. The limit follows the sample
        size (HISTORY_SIGMAS standard deviations of chance), so samples the work budget shrank for a
        class of thousands of tensors still count; none below VERIFY_MIN_ELEMENTS."""
        return [int(j) for j in self.history[i]]


def _shared_mask(allowed, shared: dict):
    """A row of `possible_rows`: a mask equal to one already in `shared` is that one (read-only), else added."""
    if allowed.dtype != bool:
        return allowed
    kept = shared.setdefault(allowed.tobytes(), allowed)
    kept.flags.writeable = False
    return kept


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
    if z.shape[1] == 0 or y.shape[1] == 0:  # 0-element tensors: one zero each, which tells nothing (see informative)
        z, y = np.zeros((n, 1)), np.zeros((m, 1))
    z, y, scale = _without_overflow(z, y)
    # Rounding can pin a 16-bit y to one value (bfloat16 gains at exactly 1.0) while z moves; not float32.
    exact = np.array([r.dtype in ("float32", "float64") for r in ys], dtype=bool)
    y_constant = (y == y[:, :1]).all(axis=1) & (y.shape[1] > 1) & exact
    z_constant = (z == z[:, :1]).all(axis=1) | (z.shape[1] <= 1)
    spacing = [np.spacing(np.float32(v)) if r.dtype == "float32" else np.spacing(v) for r, v in zip(ys, y[:, 0])] if y.shape[1] else []
    ev = ClassEvidence([], z, y, y_constant, z_constant, size >= MIN_CONTENT_ELEMENTS, None, [],
                       y_value=y[:, 0] if y.shape[1] else np.zeros(m),
                       z_range=(z.min(axis=1, initial=np.inf), z.max(axis=1, initial=-np.inf)),
                       y_ulp=np.array(spacing, dtype=np.float64) if len(spacing) else np.zeros(m), scale=scale)
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
        # The candidates not MARGIN times farther than the closest (all of them where the closest is at 0); none
        # kept where the samples are too small to rule anything out (every row is then a mask, see _allowed): a
        # class of thousands of look-alikes would hold entries x candidates indices
        limit = np.where(best[rows] > 0, MARGIN ** 2 * best[rows], -1.0)
        near = [c if b > 0 else None for c, b in zip(_split_rows((d2 <= limit[:, None]).nonzero(), count), best[rows])] \
            if ev.informative else [None] * count
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
    alone = [int(k) for k in ev.history[i]] == [j]  # j shares z's history, and no other candidate does
    # ...and every tensor of the shape has an entry: beside a tensor no entry trains (a tower trained by plain
    # Adam along z's path, a frozen identity an adapter is pulled towards), the one sharing z's history can be
    # that tensor, 2-2.4x closer to z than the pair's own y, which long training moved off z's path
    square = len(ev.y) == len(ev.z)
    large = ev.size >= LARGE_SAMPLE and alone and square
    return Match(j, float(best2) ** 0.5, runner, LARGE_MARGIN if large else MARGIN)


SAFE_EXPONENT = 480  # |v| <= 2**480: sums of squares of SAMPLE_ELEMENTS such values stay finite in float64


def _without_overflow(z, y):
    """z and y scaled by one power of two (exact: ratios, ties and zeros stay what they were) when a
    float64 tensor holds values so large (±1e308) that their squares would overflow to inf and every
    distance and ratio would turn into NaN, which is no evidence at all."""
    import numpy as np

    peak = max(float(np.abs(z).max(initial=0.0)), float(np.abs(y).max(initial=0.0)))
    if not peak > 2.0 ** SAFE_EXPONENT or not np.isfinite(peak):
        return z, y, 1.0
    shift = int(np.frexp(peak)[1]) - SAFE_EXPONENT
    return np.ldexp(z, -shift), np.ldexp(y, -shift), float(np.ldexp(1.0, shift))


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


def unrelated_limit(n: int) -> float:
    """The ratio d² / (‖y‖² + ‖z‖²) above which n elements of y and z look independent: the floor, and what
    chance gives independent tensors (their cosine is about N(0, 1/n)). Not scaled by how far the run's
    pairs drift: ten times their median (0.12 in a run at lr 1e-2) passed 1, which no independent tensor
    can exceed, and a layer or embedding re-initialised after the optimizer was built went through."""
    return max(UNRELATED_FLOOR, 1.0 - NOISE_SIGMAS / n ** 0.5)
