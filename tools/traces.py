"""Current/voltage traces of homes, and the energy an ideal meter registers from them.

A trace is what the clamp (and, where fitted, the voltage channel) sees: the
simulator plays it into the meter's ADC, the benchmarks compare what the
meter reported against `reference_energy` of the same file.

Trace CSV format (this module owns it; docs/traces.md says the same):

    t_s,current_a                  or    t_s,current_a,voltage_v
    0.000000,0.0123                      0.000000,0.0123,1.52
    0.000250,0.4561                      0.000250,0.4561,25.83
    ...

- The header is exactly one of the two lines above.
- Each row holds instantaneous values: seconds since the start of the trace,
  amperes, volts. Plain decimal numbers, finite, no empty cells.
- Time only grows (strictly), at any constant or varying sample rate.
- current_a is positive when current flows from the grid into the home (the
  clamp's arrow towards the load); with a voltage column, power v*i > 0 is
  import and v*i < 0 is export.
- Lines end in LF (CRLF is accepted); no blank lines, no comments.

Reference energy (`reference_energy`, `reference_intervals`):

- With a voltage column the trace is cut into whole mains cycles at the
  positive-going zero crossings of v (crossing times interpolated linearly
  between samples). Each cycle's real energy is the trapezoidal integral of
  p = v*i over its samples; a positive cycle counts as import, a negative one
  as export (as a bidirectional meter registers them). The partial cycles
  before the first and after the last crossing count the same way, so the
  registers add up to the integral over the whole trace.
- Without a voltage column a meter can only report apparent energy: the
  trace is cut into windows of one nominal mains period, each window's RMS
  current comes from the trapezoidal integral of i^2, and its energy is
  vrms_nominal * I_rms * window length. All of it is import.
- The trapezoidal rule over whole periods is exact for a sampled periodic
  signal below the Nyquist frequency, so a pure sine gives its textbook
  energy to within rounding of the CSV values.

Generated kinds (`generate`), built from BRIEF sections 1-3 and 10:

- idle: no load, zero current.
- kettle: a 2 kW (at the nominal voltage) resistive element switched on and off.
- fridge: a compressor of about 120 W at power factor 0.7 lagging, cycling
  on and off, each start drawing about 6 times its running current that
  decays over a few tenths of a second.
- home: a base load (standby electronics, router, LED lights: distorted
  current), the fridge, a kettle, an oven whose thermostat cycles a 2.5 kW
  element, and a TV whose capacitor-input supply draws current pulses at the
  voltage peaks (3rd to 9th harmonics).
- pv: a home with a 3 kW inverter exporting through passing clouds; the net
  current is in antiphase with the voltage throughout. Needs with_voltage:
  without a voltage channel export cannot be told from import.

Appliance cycles are compressed in time (a fridge cycles in minutes, not in
tens of minutes) so that a ten-minute trace shows every event. The mains
frequency wanders within +-0.1 % of nominal (49.95-50.05 Hz), the voltage
within about +-1.5 % plus the drop that the home's own current causes across
the grid's impedance; the voltage carries a little 5th harmonic, as on
European grids. Loads switch at cycle boundaries. Everything is a function
of the seed.
"""

from __future__ import annotations

import argparse
import cmath
import json
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Iterator

HEADER_I = "t_s,current_a"
HEADER_IV = "t_s,current_a,voltage_v"
KINDS = ("idle", "kettle", "fridge", "home", "pv")

SQRT2 = math.sqrt(2.0)
TWO_PI = 2.0 * math.pi
J_PER_WH = 3600.0


class TraceError(ValueError):
    """A trace file that does not follow the format; `line` is 1-based."""

    def __init__(self, path, line: int, message: str):
        super().__init__(f"{path}, line {line}: {message}")
        self.path = str(path)
        self.line = line


# ---------------------------------------------------------------- loads
#
# Harmonic phasors use the sine convention: a component h with complex peak
# amplitude A is Im(A * exp(j*h*theta)) = |A| sin(h*theta + arg A), theta the
# mains phase. The mean of v*i over a cycle is then sum_h Re(V_h conj(I_h))/2.


@dataclass
class Load:
    name: str
    on: list[tuple[float, float]] = field(default_factory=list)  # [start, stop) seconds

    def active(self, t: float) -> float | None:
        """Seconds since this load last switched on, or None when off."""
        for start, stop in self.on:
            if start <= t < stop:
                return t - start
        return None

    def current(self, t: float, since: float, volts: dict[int, complex]) -> dict[int, complex]:
        raise NotImplementedError


@dataclass
class Resistive(Load):
    """Heating element: current follows voltage, harmonics included. Rated
    `watts` at `v_nominal`."""
    watts: float = 2000.0
    v_nominal: float = 230.0

    def current(self, t, since, volts):
        ohms = self.v_nominal ** 2 / self.watts
        return {h: v / ohms for h, v in volts.items()}


@dataclass
class Motor(Load):
    """Induction motor (compressor): constant real power at a lagging power
    factor, with a starting surge at a poorer power factor."""
    watts: float = 120.0
    pf: float = 0.7
    inrush: float = 6.0  # starting current / running current
    tau_s: float = 0.15
    inrush_pf: float = 0.4

    def current(self, t, since, volts):
        v1 = volts[1]
        vrms = abs(v1) / SQRT2
        decay = math.exp(-since / self.tau_s)
        scale = 1.0 + (self.inrush - 1.0) * decay
        pf = self.pf + (self.inrush_pf - self.pf) * decay
        irms = self.watts / (vrms * self.pf) * scale
        lag = math.acos(pf)
        return {1: cmath.rect(irms * SQRT2, cmath.phase(v1) - lag)}


# Relative harmonic amplitudes of a capacitor-input rectifier (the shape of
# the current of most electronics: narrow pulses at the voltage peaks).
_RECTIFIER = ((1, 1.0), (3, 0.80), (5, 0.58), (7, 0.36), (9, 0.18))


@dataclass
class Rectifier(Load):
    """Switch-mode supply: constant real power drawn in pulses at the voltage
    peaks; the fundamental is in phase, the harmonics carry (almost) no
    power, so the power factor is about 0.6."""
    watts: float = 100.0

    def current(self, t, since, volts):
        v1 = volts[1]
        vrms = abs(v1) / SQRT2
        i1 = self.watts / vrms * SQRT2
        ph = cmath.phase(v1)
        # Each harmonic peaks at the voltage peak (theta = 90 deg): its phase
        # is h*(ph) + 90 - h*90 degrees.
        return {h: cmath.rect(i1 * rel, h * ph + (1 - h) * math.pi / 2)
                for h, rel in _RECTIFIER}


@dataclass
class Inverter(Load):
    """Grid-tied PV inverter: exports real power (current in antiphase with
    the voltage) with a little 5th harmonic; output follows the clouds."""
    peak_watts: float = 3000.0
    clouds: list[tuple[float, float, float]] = field(default_factory=list)  # (centre s, width s, depth 0..1)

    def output(self, t: float) -> float:
        shade = 1.0
        for centre, width, depth in self.clouds:
            shade -= depth * math.exp(-((t - centre) / width) ** 2)
        return self.peak_watts * max(0.05, shade)

    def current(self, t, since, volts):
        v1 = volts[1]
        vrms = abs(v1) / SQRT2
        i1 = self.output(t) / vrms * SQRT2
        ph = cmath.phase(v1)
        return {1: cmath.rect(-i1, ph), 5: cmath.rect(0.02 * i1, 5 * ph)}


# ---------------------------------------------------------------- schedules


def _cycles(rng: random.Random, start: float, stop: float, on_s: tuple[float, float],
            off_s: tuple[float, float], start_on: bool) -> list[tuple[float, float]]:
    """Alternating on/off periods with random lengths between start and stop."""
    spans, t, is_on = [], start, start_on
    while t < stop:
        length = rng.uniform(*(on_s if is_on else off_s))
        if is_on:
            spans.append((t, min(t + length, stop)))
        t += length
        is_on = not is_on
    return spans


def _fridge(rng: random.Random, duration: float) -> Motor:
    # Compressed: real compressors run 10-20 min per half hour.
    first = rng.uniform(0.0, 0.3) * min(duration, 300.0)
    return Motor("fridge", _cycles(rng, first, duration, (90.0, 150.0), (120.0, 240.0), True))


def _base(rng: random.Random, vrms: float) -> list[Load]:
    return [Resistive("standby-resistive", [(0.0, math.inf)], watts=rng.uniform(30, 50), v_nominal=vrms),
            Rectifier("electronics", [(0.0, math.inf)], watts=rng.uniform(60, 110))]


def _loads(kind: str, rng: random.Random, duration: float, vrms: float) -> list[Load]:
    d = duration
    if kind == "idle":
        return []
    if kind == "kettle":
        # Off, on, off, on, off: two boils with a pause, as steps.
        a, b = rng.uniform(0.05, 0.15) * d, rng.uniform(0.35, 0.45) * d
        c, e = rng.uniform(0.55, 0.65) * d, rng.uniform(0.80, 0.90) * d
        return [Resistive("kettle", [(a, b), (c, e)], watts=2000.0, v_nominal=vrms)]
    if kind == "fridge":
        return [_fridge(rng, d)]
    if kind == "home":
        kettle_start = rng.uniform(0.08, 0.2) * d
        oven_start, oven_stop = rng.uniform(0.4, 0.5) * d, rng.uniform(0.85, 0.95) * d
        return _base(rng, vrms) + [
            _fridge(rng, d),
            Resistive("kettle", [(kettle_start, kettle_start + min(150.0, 0.15 * d))], watts=2200.0,
                      v_nominal=vrms),
            # Heat-up, then the thermostat cycles the element.
            Resistive("oven", _cycles(rng, oven_start, oven_stop, (0.06 * d, 0.1 * d),
                                      (0.03 * d, 0.06 * d), True), watts=2500.0, v_nominal=vrms),
            Rectifier("tv", [(rng.uniform(0.02, 0.1) * d, rng.uniform(0.75, 1.0) * d)],
                      watts=rng.uniform(90, 140)),
        ]
    if kind == "pv":
        clouds = [(rng.uniform(0, d), rng.uniform(0.02, 0.08) * d, rng.uniform(0.2, 0.5))
                  for _ in range(3)]
        return _base(rng, vrms) + [
            _fridge(rng, d),
            Inverter("pv", [(0.0, math.inf)], peak_watts=3000.0, clouds=clouds),
        ]
    raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}")


# ---------------------------------------------------------------- generate


@dataclass
class _Mains:
    """Slow, bounded wander of frequency and voltage."""
    hz: float
    vrms: float
    rng: random.Random

    def __post_init__(self):
        r = self.rng
        self.fp = [(r.uniform(40, 80), r.uniform(0, TWO_PI)), (r.uniform(10, 25), r.uniform(0, TWO_PI))]
        self.vp = [(r.uniform(60, 120), r.uniform(0, TWO_PI)), (r.uniform(15, 30), r.uniform(0, TWO_PI))]

    def frequency(self, t: float) -> float:
        (p1, a1), (p2, a2) = self.fp
        return self.hz * (1.0 + 0.0007 * math.sin(TWO_PI * t / p1 + a1)
                          + 0.0003 * math.sin(TWO_PI * t / p2 + a2))

    def voltage(self, t: float) -> float:
        (p1, a1), (p2, a2) = self.vp
        return self.vrms * (1.0 + 0.01 * math.sin(TWO_PI * t / p1 + a1)
                            + 0.004 * math.sin(TWO_PI * t / p2 + a2))


GRID_OHMS = 0.3  # source impedance seen from a home's meter
V5_REL = 0.02  # 5th harmonic of the supply voltage, relative to the fundamental


def _time_format(rate_hz: float) -> str:
    # Enough decimals that consecutive sample times never print the same.
    decimals = max(5, math.ceil(math.log10(rate_hz)) + 2)
    return "%%.%df" % decimals


def generate(path, kind: str, duration_s: float, rate_hz: float = 4000, seed: int = 0,
             mains_hz: float = 50.0, vrms: float = 230.0, with_voltage: bool = False,
             grid_ohms: float = GRID_OHMS) -> dict:
    """Write a trace of `kind` (see KINDS) to `path`: samples at t = n/rate_hz
    for n = 0..duration_s*rate_hz, so the trace lasts exactly duration_s.

    Returns a summary: rows, duration and the loads with their on-times."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "pv" and not with_voltage:
        raise ValueError("kind 'pv' needs with_voltage=True: without a voltage column "
                         "exported energy cannot be told from imported")
    if not duration_s > 0 or not rate_hz > 0:
        raise ValueError("duration_s and rate_hz must be positive")
    if rate_hz < 20 * mains_hz:
        # Below this the 9th harmonic of the electronics' current aliases.
        raise ValueError(f"rate_hz={rate_hz:g} is too low: at least {20 * mains_hz:g} "
                         f"samples per second for {mains_hz:g} Hz mains")
    rng = random.Random(seed)
    mains = _Mains(mains_hz, vrms, rng)
    loads = _loads(kind, rng, duration_s, vrms)

    n_last = round(duration_s * rate_hz)
    dt = 1.0 / rate_hz
    tfmt = _time_format(rate_hz)
    row = (tfmt + ",%.4f,%.2f\n") if with_voltage else (tfmt + ",%.4f\n")
    sin = math.sin

    drop = 0.0  # in-phase fundamental current of the previous cycle (A rms)
    t_cycle, n = 0.0, 0
    with open(path, "w", newline="\n") as fh:
        fh.write((HEADER_IV if with_voltage else HEADER_I) + "\n")
        while n <= n_last:
            f = mains.frequency(t_cycle)
            t_next = t_cycle + 1.0 / f
            v1 = (mains.voltage(t_cycle) - grid_ohms * drop) * SQRT2
            volts = {1: complex(v1, 0.0), 5: complex(-V5_REL * v1, 0.0)}
            amps: dict[int, complex] = {}
            for load in loads:
                since = load.active(t_cycle)
                if since is not None:
                    for h, a in load.current(t_cycle, since, volts).items():
                        amps[h] = amps.get(h, 0j) + a
            drop = (amps.get(1, 0j).real) / SQRT2  # v1 has phase 0: real part is in phase

            n_stop = min(n_last + 1, max(n + 1, math.ceil(t_next * rate_hz - 1e-9)))
            w = TWO_PI * f
            ths = [w * (k * dt - t_cycle) for k in range(n, n_stop)]
            cur = [0.0] * len(ths)
            for h, a in amps.items():
                mag, ph = abs(a), cmath.phase(a)
                if mag > 1e-7:
                    cur = [c + mag * sin(h * x + ph) for c, x in zip(cur, ths)]
            if with_voltage:
                m5 = V5_REL * v1
                vol = [v1 * sin(x) - m5 * sin(5 * x) for x in ths]
                fh.write("".join([row % ((n + k) * dt, c, v)
                                  for k, (c, v) in enumerate(zip(cur, vol))]))
            else:
                fh.write("".join([row % ((n + k) * dt, c) for k, c in enumerate(cur)]))
            n = n_stop
            t_cycle = t_next
    return {
        "path": str(path), "kind": kind, "rows": n_last + 1, "duration_s": n_last * dt,
        "rate_hz": rate_hz, "seed": seed, "with_voltage": with_voltage,
        "loads": [{"name": ld.name, "on": [(a, min(b, n_last * dt)) for a, b in ld.on]}
                  for ld in loads],
    }


# ---------------------------------------------------------------- read


def read_samples(path) -> tuple[bool, Iterator[tuple[float, float, float | None]]]:
    """(has_voltage, iterator of (t, i, v or None)). The iterator raises
    TraceError for the first malformed line it reaches."""
    fh = open(path, newline="")
    try:
        header = fh.readline()
        if not header:
            raise TraceError(path, 1, f"empty file; expected the header {HEADER_I!r} or {HEADER_IV!r}")
        header = header.rstrip("\r\n")
        if header not in (HEADER_I, HEADER_IV):
            raise TraceError(path, 1, f"bad header {header!r}; expected {HEADER_I!r} or {HEADER_IV!r}")
    except BaseException:
        fh.close()
        raise
    has_v = header == HEADER_IV
    return has_v, _rows(path, fh, 3 if has_v else 2)


def _rows(path, fh, ncols: int) -> Iterator[tuple[float, float, float | None]]:
    names = HEADER_IV.split(",")
    isfinite = math.isfinite
    with fh:
        t_prev = -math.inf
        lineno = 1
        for lineno, line in enumerate(fh, start=2):
            cells = line.rstrip("\r\n").split(",")
            if len(cells) != ncols:
                if cells == [""]:
                    raise TraceError(path, lineno, "empty line")
                raise TraceError(path, lineno, f"{len(cells)} cells, expected {ncols}")
            try:
                vals = [float(c) for c in cells]
            except ValueError:
                for name, c in zip(names, cells):
                    try:
                        float(c)
                    except ValueError:
                        raise TraceError(path, lineno, f"{name} {c!r} is not a number") from None
                raise
            for name, x in zip(names, vals):
                if not isfinite(x):
                    raise TraceError(path, lineno, f"{name} {x!r} is not finite")
            t = vals[0]
            if not t > t_prev:
                raise TraceError(path, lineno, f"time {t!r} does not increase (previous {t_prev!r})")
            t_prev = t
            yield t, vals[1], (vals[2] if ncols == 3 else None)
        if lineno < 3:
            raise TraceError(path, lineno, "a trace needs at least two samples")


# ---------------------------------------------------------------- reference energy


@dataclass
class Cycle:
    t_start: float
    t_end: float
    energy_j: float  # real (signed) with voltage, apparent (>= 0) without
    i2_int: float  # integral of i^2 dt (A^2 s)
    v2_int: float  # integral of v^2 dt (V^2 s), 0 without voltage

    @property
    def seconds(self) -> float:
        return self.t_end - self.t_start


def cycles(path, vrms_nominal: float = 230.0, mains_hz: float = 50.0) -> tuple[bool, Iterator[Cycle]]:
    """(has_voltage, the trace cut into cycles, see the module docstring)."""
    has_v, rows = read_samples(path)
    return has_v, (_voltage_cycles(rows) if has_v else _current_windows(rows, vrms_nominal, mains_hz))


def _voltage_cycles(rows) -> Iterator[Cycle]:
    t0, i0, v0 = next(rows)
    start = t0
    e = i2 = v2 = 0.0
    p0 = v0 * i0
    for t1, i1, v1 in rows:
        p1 = v1 * i1
        h = t1 - t0
        if v0 < 0.0 <= v1:
            # Split at the interpolated crossing, where v (and so p) is 0.
            tc = t0 + h * (-v0) / (v1 - v0)
            ic = i0 + (i1 - i0) * (tc - t0) / h
            a, b = tc - t0, t1 - tc
            e += 0.5 * a * p0
            i2 += 0.5 * a * (i0 * i0 + ic * ic)
            v2 += 0.5 * a * v0 * v0
            if tc > start:
                yield Cycle(start, tc, e, i2, v2)
            start = tc
            e = 0.5 * b * p1
            i2 = 0.5 * b * (ic * ic + i1 * i1)
            v2 = 0.5 * b * v1 * v1
        else:
            e += 0.5 * h * (p0 + p1)
            i2 += 0.5 * h * (i0 * i0 + i1 * i1)
            v2 += 0.5 * h * (v0 * v0 + v1 * v1)
        t0, i0, v0, p0 = t1, i1, v1, p1
    if t0 > start:
        yield Cycle(start, t0, e, i2, v2)


def _current_windows(rows, vrms_nominal: float, mains_hz: float) -> Iterator[Cycle]:
    period = 1.0 / mains_hz
    t0, i0, _ = next(rows)
    origin = start = t0
    k = 1
    edge = origin + period
    i2 = 0.0

    def close(t_end: float, i2: float) -> Cycle:
        secs = t_end - start
        return Cycle(start, t_end, vrms_nominal * math.sqrt(i2 / secs) * secs, i2, 0.0)

    for t1, i1, _ in rows:
        while t1 >= edge:
            # Interpolate i at the window edge and close the window there.
            ie = i0 + (i1 - i0) * (edge - t0) / (t1 - t0)
            i2 += 0.5 * (edge - t0) * (i0 * i0 + ie * ie)
            yield close(edge, i2)
            start, t0, i0, i2 = edge, edge, ie, 0.0
            k += 1
            edge = origin + k * period
        if t1 > t0:
            i2 += 0.5 * (t1 - t0) * (i0 * i0 + i1 * i1)
        t0, i0 = t1, i1
    if t0 > start:
        yield close(t0, i2)


class _Totals:
    def __init__(self, has_v: bool):
        self.has_v = has_v
        self.imp = self.exp = 0.0
        self.seconds = 0.0
        self.irms_s = 0.0  # sum of cycle I_rms * cycle seconds
        self.vrms_s = 0.0
        self.n = 0

    def add(self, c: Cycle) -> None:
        if c.energy_j >= 0:
            self.imp += c.energy_j
        else:
            self.exp -= c.energy_j
        s = c.seconds
        self.seconds += s
        self.irms_s += math.sqrt(c.i2_int * s)  # = I_rms * s
        self.vrms_s += math.sqrt(c.v2_int * s)
        self.n += 1

    def as_dict(self) -> dict:
        s = self.seconds or 1.0
        return {
            "import_wh": self.imp / J_PER_WH,
            "export_wh": self.exp / J_PER_WH,
            "duration_s": self.seconds,
            "irms_mean_a": self.irms_s / s,
            "vrms_mean_v": (self.vrms_s / s) if self.has_v else None,
            "cycles": self.n,
            "has_voltage": self.has_v,
        }


def reference_energy(path, vrms_nominal: float = 230.0, mains_hz: float = 50.0) -> dict:
    """What an ideal meter registers over the whole trace:
    {"import_wh", "export_wh", "duration_s", "irms_mean_a", "vrms_mean_v",
     "cycles", "has_voltage"}. irms_mean_a (and vrms_mean_v) is the
    time-weighted mean of the per-cycle RMS values; vrms_mean_v is None
    without a voltage column. export_wh is >= 0."""
    has_v, it = cycles(path, vrms_nominal, mains_hz)
    tot = _Totals(has_v)
    for c in it:
        tot.add(c)
    return tot.as_dict()


def reference_intervals(path, interval_s: float, vrms_nominal: float = 230.0,
                        mains_hz: float = 50.0) -> list[dict]:
    """reference_energy per interval of interval_s seconds from the first
    sample; each cycle counts in the interval that holds its midpoint (whole
    cycles, as a meter reports them). Each dict also has t_start and t_end."""
    if not interval_s > 0:
        raise ValueError("interval_s must be positive")
    has_v, it = cycles(path, vrms_nominal, mains_hz)
    buckets: dict[int, _Totals] = {}
    origin = None
    for c in it:
        if origin is None:
            origin = c.t_start
        k = int(((c.t_start + c.t_end) / 2 - origin) // interval_s)
        buckets.setdefault(k, _Totals(has_v)).add(c)
    if origin is None:
        return []
    out = []
    # An interval with no cycle (only possible across a gap in the samples)
    # still appears, empty, so the list indexes intervals.
    for k in range(max(buckets) + 1):
        d = buckets.get(k, _Totals(has_v)).as_dict()
        d["t_start"] = origin + k * interval_s
        d["t_end"] = origin + (k + 1) * interval_s
        out.append(d)
    return out


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.traces", description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a synthetic trace")
    g.add_argument("out", help="CSV file to write")
    g.add_argument("--kind", choices=KINDS, required=True)
    g.add_argument("--duration", type=float, required=True, help="seconds")
    g.add_argument("--rate", type=float, default=4000, help="samples per second (default 4000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mains-hz", type=float, default=50.0)
    g.add_argument("--vrms", type=float, default=230.0)
    g.add_argument("--voltage", action="store_true", help="add the voltage_v column")
    e = sub.add_parser("energy", help="reference energy of a trace")
    e.add_argument("file")
    e.add_argument("--vrms-nominal", type=float, default=230.0,
                   help="volts assumed for a trace without voltage (default 230)")
    e.add_argument("--mains-hz", type=float, default=50.0)
    e.add_argument("--interval", type=float, help="also list energy per interval of this many seconds")
    e.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "generate":
            info = generate(args.out, args.kind, args.duration, rate_hz=args.rate, seed=args.seed,
                            mains_hz=args.mains_hz, vrms=args.vrms, with_voltage=args.voltage)
            print(f"{info['path']}: {info['kind']}, {info['rows']} rows, {info['duration_s']:g} s")
            return 0
        ref = reference_energy(args.file, args.vrms_nominal, args.mains_hz)
        if args.interval:
            ref["intervals"] = reference_intervals(args.file, args.interval, args.vrms_nominal,
                                                   args.mains_hz)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(ref))
    else:
        kind = "real" if ref["has_voltage"] else f"apparent at {args.vrms_nominal:g} V"
        print(f"{args.file}: {ref['duration_s']:.3f} s, {ref['cycles']} cycles, {kind}")
        print(f"  import {ref['import_wh']:.4f} Wh  export {ref['export_wh']:.4f} Wh  "
              f"mean Irms {ref['irms_mean_a']:.4f} A"
              + (f"  mean Vrms {ref['vrms_mean_v']:.2f} V" if ref["has_voltage"] else ""))
        for iv in ref.get("intervals", []):
            print(f"  {iv['t_start']:9.2f}-{iv['t_end']:9.2f} s  import {iv['import_wh']:.4f} Wh  "
                  f"export {iv['export_wh']:.4f} Wh  Irms {iv['irms_mean_a']:.3f} A")
    return 0


if __name__ == "__main__":
    sys.exit(main())
