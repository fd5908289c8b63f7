"""The order search behind the mapping: place entries so that each chain's keys increase.

Each entry has a domain (the candidate tensors it may belong to, small non-negative integers);
each chain (an optimizer group) lists entries whose candidates' keys must strictly increase; no
candidate may serve two entries. Propagation narrows the domains until stable — each chain's
lower and upper bounds, then a candidate held by a decided entry leaves every other domain — and
a depth-first search branches where propagation leaves choices open.

The rules and their order are those the mapping has always applied (every chain forward and
back, then the decided entries, then their removal from the others), so the fixpoint, the
solutions, the search's node count and the entry a failure is reported on stay the same. Only
work that cannot change anything is skipped: a domain is its initial sorted list with two
bounds, narrowed by bisection, with removed candidates skipped when they reach a bound; a chain
is re-narrowed only from the first to past the last entry whose bounds moved; entries that share
a domain (look-alikes) share its sorted list. The work then grows with the total size of the
domains instead of the number of passes times the number of entries.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Any, Callable, Hashable, Mapping, Sequence


class _State:
    """Where each domain stands: bounds into its sorted list, its value once decided, who holds what."""

    __slots__ = ("lo", "hi", "single", "holder")

    def __init__(self, lo: list[int], hi: list[int], single: list[Any], holder: dict[int, int]) -> None:
        self.lo, self.hi, self.single, self.holder = lo, hi, single, holder

    def copy(self) -> "_State":
        return _State(list(self.lo), list(self.hi), list(self.single), dict(self.holder))


class _Problem:
    """Chains and domains, indexed once; `_State`s are narrowed against it."""

    def __init__(self, chains: Sequence[Sequence[Hashable]], domains: Mapping[Hashable, Sequence[int]],
                 key: Callable[[int], Any]) -> None:
        self.ids = list(domains)
        index = {ident: k for k, ident in enumerate(self.ids)}
        self.chains = [[index[i] for i in chain] for chain in chains]
        self.chain_of = [-1] * len(self.ids)
        self.place = [-1] * len(self.ids)  # position within its chain
        for c, chain in enumerate(self.chains):
            for j, k in enumerate(chain):
                self.chain_of[k], self.place[k] = c, j
        # Look-alike entries (norm gains) often share one domain: sort and index each distinct one once.
        distinct = {id(d): d for d in domains.values()}.values()
        top = max((max(d) for d in distinct if d), default=-1)
        rank = [key(c) for c in range(top + 1)]  # candidates are small integers: look keys up, don't call
        by_rank = rank.__getitem__
        shared: dict[tuple[int, ...], int] = {}
        by_object: dict[int, int] = {}  # id of a domain list -> its distinct domain: a shared list is read once
        self.base, self.keys = [], []
        self.members: list[list[int]] = []  # distinct domain -> the entries that have it
        kinds: list[tuple[list[int], list[Any]]] = []
        for k, ident in enumerate(self.ids):
            d = by_object.get(id(domains[ident]))
            if d is None:
                t = tuple(domains[ident])
                d = shared.get(t)
                if d is None:
                    d = shared[t] = len(kinds)
                    b = sorted(t, key=by_rank)
                    kinds.append((b, list(map(by_rank, b))))
                    self.members.append([])
                by_object[id(domains[ident])] = d
            self.members[d].append(k)
            self.base.append(kinds[d][0])
            self.keys.append(kinds[d][1])
        # candidate -> (distinct domain, position in it): who loses it when another entry holds it
        self.where: dict[int, list[tuple[int, int]]] = {}
        for d, (b, _) in enumerate(kinds):
            for p, c in enumerate(b):
                self.where.setdefault(c, []).append((d, p))

    def root(self) -> tuple[_State, int | None, list[int]]:
        """The initial state, the first empty domain (entry index) if any, and the decided entries."""
        lo = [0] * len(self.base)
        hi = [len(b) for b in self.base]
        single = [b[0] if len(b) == 1 else None for b in self.base]
        empty = next((k for k, b in enumerate(self.base) if not b), None)
        return _State(lo, hi, single, {}), empty, [k for k, s in enumerate(single) if s is not None]

    def size(self, st: _State, k: int) -> int:
        held = st.holder
        return sum(1 for c in self.base[k][st.lo[k]:st.hi[k]] if c not in held)

    def values(self, st: _State, k: int) -> list[int]:
        held = st.holder
        return [c for c in self.base[k][st.lo[k]:st.hi[k]] if c not in held]

    def everything(self) -> dict[int, tuple[int, int]]:
        """Every chain, whole: what a first pass narrows."""
        return {c: (0, len(chain) - 1) for c, chain in enumerate(self.chains) if chain}

    def propagate(self, st: _State, dirty: dict[int, tuple[int, int]], fresh: list[int]) -> int | None:
        """Narrow `st` in place until stable; the entry index left with no candidate, or None.

        `dirty`: per chain whose domains changed since it was last narrowed, the first and last
        positions changed; `fresh`: entries decided since decided entries were last collected."""
        while True:
            for c in sorted(dirty):
                first, last = dirty[c]
                failed = self._narrow_up(st, self.chains[c], first, last, fresh)
                if failed is None:
                    failed = self._narrow_down(st, self.chains[c], first, last, fresh)
                if failed is not None:
                    return failed
            by_value: dict[int, list[int]] = {}
            for k in fresh:
                by_value.setdefault(st.single[k], []).append(k)
            failed = _held_twice(by_value, st.holder)
            if failed is not None:
                return failed
            affected = self._hold(st, by_value)
            if not affected:
                return None
            fresh, dirty = [], {}
            failed = self._release(st, affected, fresh, dirty)
            if failed is not None:
                return failed

    def _narrow_up(self, st: _State, chain: list[int], first: int, last: int, fresh: list[int]) -> int | None:
        """Raise each lower bound of the chain above its predecessor's; the entry left empty (or placed
        at or below its predecessor), or None. Entries decided on the way go to `fresh`."""
        base, keys = self.base, self.keys
        lo, hi, single, holder = st.lo, st.hi, st.single, st.holder
        # Entries before the first changed one are as the last pass left them, and a pass that
        # leaves an entry past the last changed one as it was leaves the rest of the chain too.
        low = keys[chain[first - 1]][lo[chain[first - 1]]] if first else None
        for j in range(first, len(chain)):
            k = chain[j]
            moved = False
            if low is not None:
                if single[k] is not None:
                    if keys[k][lo[k]] <= low:
                        return k
                else:
                    new = bisect_right(keys[k], low, lo[k], hi[k])
                    if new != lo[k]:
                        b, h = base[k], hi[k]
                        while new < h and b[new] in holder:
                            new += 1
                        lo[k] = new
                        moved = True
                        if new >= h:
                            return k
                        if new == h - 1:
                            single[k] = b[new]
                            fresh.append(k)
            if j > last and not moved:
                break
            low = keys[k][lo[k]]
        return None

    def _narrow_down(self, st: _State, chain: list[int], first: int, last: int, fresh: list[int]) -> int | None:
        """Lower each upper bound of the chain below its successor's: `_narrow_up` run backwards."""
        base, keys = self.base, self.keys
        lo, hi, single, holder = st.lo, st.hi, st.single, st.holder
        high = keys[chain[last + 1]][hi[chain[last + 1]] - 1] if last + 1 < len(chain) else None
        for j in range(last, -1, -1):
            k = chain[j]
            moved = False
            if high is not None:
                if single[k] is not None:
                    if keys[k][lo[k]] >= high:
                        return k
                else:
                    new = bisect_left(keys[k], high, lo[k], hi[k])
                    if new != hi[k]:
                        b, low_k = base[k], lo[k]
                        while new > low_k and b[new - 1] in holder:
                            new -= 1
                        hi[k] = new
                        moved = True
                        if new <= low_k:
                            return k
                        if new == low_k + 1:
                            single[k] = b[low_k]
                            fresh.append(k)
            if j < first and not moved:
                break
            high = keys[k][hi[k] - 1]
        return None

    def _hold(self, st: _State, by_value: dict[int, list[int]]) -> set[int]:
        """Record who holds each newly decided candidate; return the open entries whose domains hold it."""
        single, lo, hi, members = st.single, st.lo, st.hi, self.members
        affected: set[int] = set()
        for v, (k_v,) in by_value.items():
            st.holder[v] = k_v
            for d, p in self.where.get(v, ()):
                for k in members[d]:
                    if single[k] is None and lo[k] <= p < hi[k]:
                        affected.add(k)
        return affected

    def _release(self, st: _State, affected: set[int], fresh: list[int],
                 dirty: dict[int, tuple[int, int]]) -> int | None:
        """Move the bounds of the affected entries past held candidates; the entry left empty, or None.
        Entries decided go to `fresh`, and the chain positions whose bounds moved to `dirty`."""
        base, lo, hi, single, holder = self.base, st.lo, st.hi, st.single, st.holder
        for k in sorted(affected):
            b, new_lo, new_hi = base[k], lo[k], hi[k]
            while new_lo < new_hi and b[new_lo] in holder:
                new_lo += 1
            while new_hi > new_lo and b[new_hi - 1] in holder:
                new_hi -= 1
            if (new_lo, new_hi) == (lo[k], hi[k]):
                continue  # a candidate left from inside the domain: its bounds, all a chain looks at, stay
            lo[k], hi[k] = new_lo, new_hi
            if new_lo >= new_hi:
                return k
            if new_lo == new_hi - 1:
                single[k] = b[new_lo]
                fresh.append(k)
            c = self.chain_of[k]
            if c >= 0:
                j = self.place[k]
                first, last = dirty.get(c, (j, j))
                dirty[c] = (min(first, j), max(last, j))
        return None


def _held_twice(by_value: dict[int, list[int]], holder: dict[int, int]) -> int | None:
    """The entry a candidate decided for two entries fails on: the later of the two (in entry order),
    the first such over all candidates; or None."""
    failed = None
    for v, ks in by_value.items():
        if v in holder:
            ks = ks + [holder[v]]
        if len(ks) > 1:
            second = sorted(ks)[1]
            failed = second if failed is None else min(failed, second)
    return failed


def propagate(chains: Sequence[Sequence[Hashable]], domains: Mapping[Hashable, Sequence[int]],
              key: Callable[[int], Any]) -> tuple[Hashable | None, dict[Hashable, int | None]]:
    """Narrow the domains until stable.

    Returns the entry left with no candidate (or None) and, per entry, its one remaining
    candidate (None where several remain)."""
    problem = _Problem(chains, domains, key)
    st, empty, fresh = problem.root()
    if empty is not None:
        return problem.ids[empty], {}
    failed = problem.propagate(st, problem.everything(), fresh)
    if failed is not None:
        return problem.ids[failed], {}
    return None, dict(zip(problem.ids, st.single))


def solve(chains: Sequence[Sequence[Hashable]], domains: Mapping[Hashable, Sequence[int]],
          key: Callable[[int], Any], budget: int) -> tuple[list[dict[Hashable, int]], bool]:
    """Up to two assignments where each chain's keys strictly increase and no candidate is used twice.

    Returns (solutions, budget_exhausted); the search visits at most `budget` nodes, branching on
    the open entry with the fewest candidates (the first such in entry order)."""
    problem = _Problem(chains, domains, key)
    st, empty, fresh = problem.root()
    if empty is not None:
        return [], False
    solutions: list[dict[Hashable, int]] = []
    stack = [(st, problem.everything(), fresh)]
    nodes = 0
    while stack and len(solutions) < 2:
        nodes += 1
        if nodes > budget:
            return solutions, True
        st, dirty, fresh = stack.pop()
        if problem.propagate(st, dirty, fresh) is not None:
            continue
        open_ks = [k for k, s in enumerate(st.single) if s is None]
        if not open_ks:
            solutions.append(dict(zip(problem.ids, st.single)))
            continue
        pick = min(open_ks, key=lambda k: problem.size(st, k))
        c, j = problem.chain_of[pick], problem.place[pick]
        for value in reversed(problem.values(st, pick)):
            child = st.copy()
            p = bisect_left(problem.keys[pick], key(value), st.lo[pick], st.hi[pick])
            child.lo[pick], child.hi[pick], child.single[pick] = p, p + 1, value
            stack.append((child, {c: (j, j)} if c >= 0 else {}, [pick]))
    return solutions, False
