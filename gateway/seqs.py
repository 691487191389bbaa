"""Which sequence numbers of one device the gateway has accepted, and the gaps between them.

A device's accepted readings are kept as sorted, disjoint ranges of seq. The
space between two ranges is a gap: readings the meter closed and signed but
that have not arrived (a lost uplink, a fragment set that never completed).
Each range remembers, for the gap just below it, since when that gap has been
open and how many `resend` requests it has had, so the gateway asks for a gap
only once it is old enough and gives up on one the meter never answers.

Nothing below the lowest range is a gap. The daemon starts a device's ranges
with one covering seq 0 (never a reading: a meter counts from 1) up to what
the ledger already holds, so a lost first bundle is a gap while a gateway that
starts afresh beside an established meter does not ask for its history. The
number of ranges per device is bounded (`MAX_RANGES`); past it the lowest range
is forgotten, and its gap with it. Forgotten seqs are simply unknown again: a
bundle from there is passed on and the ledger, idempotent on (device, seq),
decides.

No I/O; gateway.outbox persists the ranges, in the same transaction as the
bundle that changed them.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_RANGES = 64


@dataclass
class SeqRange:
    lo: int
    hi: int
    gap_since: float  # when the gap below this range opened (unused for the lowest)
    asked: int = 0  # resend requests made for the gap below this range


@dataclass(frozen=True)
class Gap:
    first: int
    last: int
    since: float
    asked: int

    @property
    def count(self) -> int:
        return self.last - self.first + 1


class SeqRanges:
    __slots__ = ("ranges",)

    def __init__(self, ranges: list[SeqRange] | None = None):
        self.ranges = sorted(ranges or [], key=lambda r: r.lo)

    def copy(self) -> "SeqRanges":
        return SeqRanges([SeqRange(r.lo, r.hi, r.gap_since, r.asked) for r in self.ranges])

    def __bool__(self) -> bool:
        return bool(self.ranges)

    @property
    def highest(self) -> int | None:
        return self.ranges[-1].hi if self.ranges else None

    def accepted(self, lo: int, hi: int) -> int:
        """How many of the seqs lo..hi are accepted."""
        n = 0
        for r in self.ranges:
            a, b = max(lo, r.lo), min(hi, r.hi)
            if a <= b:
                n += b - a + 1
        return n

    def all_accepted(self, lo: int, hi: int) -> bool:
        return self.accepted(lo, hi) == hi - lo + 1

    def add(self, lo: int, hi: int, now: float) -> None:
        """Mark lo..hi accepted, merging with touching ranges."""
        out: list[SeqRange] = []
        merged: SeqRange | None = None  # the range lo..hi becomes part of
        placed = False
        for r in self.ranges:
            if r.hi + 1 < lo:
                out.append(r)
            elif r.lo > hi + 1:
                if not placed:
                    if merged is None:
                        # A new range inside the gap below r: it splits that
                        # gap, and the lower part is as old as the whole was.
                        merged = SeqRange(lo, hi, r.gap_since, r.asked)
                    out.append(merged)
                    placed = True
                out.append(r)
            elif merged is None:
                # The lowest range it touches keeps the gap below it as it was.
                merged = SeqRange(min(lo, r.lo), max(hi, r.hi), r.gap_since, r.asked)
            else:
                merged.hi = max(merged.hi, r.hi)
        if not placed:
            out.append(merged if merged is not None else SeqRange(lo, hi, now))
        self.ranges = out

    def gaps(self) -> list[Gap]:
        """The gaps, oldest seq first."""
        return [Gap(a.hi + 1, b.lo - 1, b.gap_since, b.asked)
                for a, b in zip(self.ranges, self.ranges[1:])]

    def missing(self) -> int:
        return sum(g.count for g in self.gaps())

    def mark_asked(self, first: int, last: int) -> None:
        """One more resend request covered the gaps inside first..last."""
        for a, b in zip(self.ranges, self.ranges[1:]):
            if first <= a.hi + 1 and b.lo - 1 <= last:
                b.asked += 1

    def trim(self, max_ranges: int = MAX_RANGES) -> int:
        """Forget the lowest ranges beyond max_ranges; returns how many gaps
        were given up with them."""
        dropped = max(0, len(self.ranges) - max_ranges)
        if dropped:
            del self.ranges[:dropped]
        return dropped


def plan_resend(ranges: SeqRanges, now: float, after_s: float, max_asks: int,
                max_count: int = 0xFFFF) -> tuple[int, int] | None:
    """(first_seq, count) for the next `resend` request, or None.

    Starts at the oldest gap open for at least after_s that has had fewer
    than max_asks requests. Later such gaps join the same request while the
    readings already held between them are no more than the ones missing:
    a downlink costs more than resending a few bundles (The Things Network
    allows ten a day, acknowledgements included)."""
    ripe = [g for g in ranges.gaps() if now - g.since >= after_s and g.asked < max_asks]
    if not ripe:
        return None
    first = ripe[0].first
    last = min(ripe[0].last, first + max_count - 1)
    missing = last - first + 1
    for g in ripe[1:]:
        span_last = g.last
        if span_last - first + 1 > max_count:
            break
        held = ranges.accepted(last + 1, g.first - 1)
        if held > missing:
            break
        last = span_last
        missing += g.count
    return first, last - first + 1
