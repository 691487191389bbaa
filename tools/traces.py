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

- idle (alias noload): no load, zero current.
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
- smps: electronics only (router, laptop, TV, a desktop PC whose load steps,
  LED lights, a charger), each a switch-mode supply drawing one narrow pulse
  per half cycle (crest factor 3, power factor about 0.63), switching on and
  off.
- dimmer: a halogen lamp on a leading-edge dimmer whose knob is turned in
  steps (firing angle 30-150 degrees), a heater on a second dimmer at 90
  degrees switching on and off, and a small standby load.
- day: one weekday of a home, TIME-COMPRESSED: duration_s holds all 24
  hours (1440 s = one minute per hour; a real day at 4 kHz would be 346
  million rows). Each hour's mean power follows the January weekday column
  of the apartment block's hourly profile in seed paper 002, Table II,
  divided by 46.5 homes (0.54 kW on average); a fridge, four kettle boils,
  an oven, a TV, lights and always-on electronics run on top, their
  durations compressed alike (the fridge's 0.15 s starting surge is not).
  The rest of each hour's mean is drawn by resistive loads and electronics
  whose power steps at the hour boundaries. Energy comparisons are against
  the same file's reference energy, so the compression does not flatter a
  meter: it sees every event and transition at the real power levels, only
  closer together.

Appliance cycles are compressed in time (a fridge cycles in minutes, not in
tens of minutes) so that a ten-minute trace shows every event. The mains
frequency wanders within +-0.1 % of nominal (49.95-50.05 Hz), the voltage
within about +-1.5 % plus the drop that the home's own current causes across
the grid's impedance; the voltage carries a little 5th harmonic, as on
European grids. Loads switch at cycle boundaries. Everything is a function
of the seed. smps, dimmer and day need 30 samples per mains cycle (their
pulses reach the 13th harmonic), the other kinds 20.

Steady loads (`generate_steady`) are for accuracy sweeps: one load of a
given true RMS current and power factor (or current shape: sine, smps,
dimmer, motor) on an ideal supply at any frequency from 45 to 65 Hz, with an
optional linear frequency drift and voltage harmonics. Over whole cycles the
reference energy of the file matches the analytic figures within 0.025 %
for sine and smps at 2 kHz (0.003 % at 4 kHz), for the dimmer within
0.055 % up to a firing angle of 120 degrees at 2 kHz and 0.05 % up to 150
degrees at 4 kHz. Beyond that the conduction is a few samples long and the
corner where it ends falls between samples: 1.6 % at 160 degrees, 65 Hz,
2 kHz (docs/traces.md has the table).

The dimmer's current jumps at the firing angle. Sampled plainly, the
trapezoidal integrals of v*i and i^2 would be off by up to half a sample
interval of the jump, every half cycle; so the two samples that straddle
each jump are set so that both integrals equal those of the continuous
waveform (the sample before the jump is then not quite zero).
"""

from __future__ import annotations

import argparse
import bisect
import cmath
import json
import math
import random
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

HEADER_I = "t_s,current_a"
HEADER_IV = "t_s,current_a,voltage_v"
KINDS = ("idle", "noload", "kettle", "fridge", "home", "pv", "smps", "dimmer", "day")
SHAPES = ("sine", "smps", "dimmer", "motor")

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

    def describe(self, t_end: float) -> dict:
        return {"name": self.name, "on": [(a, min(b, t_end)) for a, b in self.on]}


def _level(levels: tuple[float, ...], step_s: float, t: float) -> float:
    """levels[k] holds from k*step_s to (k+1)*step_s; the last one holds on."""
    return levels[max(0, min(int(t // step_s), len(levels) - 1))]


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
class SteppedResistive(Resistive):
    """Resistive loads whose total rating changes every `step_s` seconds
    (watts per step in `levels`): the appliances a load profile holds but a
    trace does not model one by one."""
    levels: tuple[float, ...] = (0.0,)
    step_s: float = 60.0

    def current(self, t, since, volts):
        watts = _level(self.levels, self.step_s, t)
        if watts <= 0.0:
            return {}
        ohms = self.v_nominal ** 2 / watts
        return {h: v / ohms for h, v in volts.items()}


@dataclass
class Sinusoid(Load):
    """A sinusoidal current of fixed RMS and displacement from the
    fundamental voltage (radians, positive lags): the load of an accuracy
    test bench."""
    irms: float = 1.0
    lag: float = 0.0

    def current(self, t, since, volts):
        return {1: cmath.rect(self.irms * SQRT2, cmath.phase(volts[1]) - self.lag)}


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

    def surge_j(self) -> float:
        """Energy a start draws beyond the running power: the integral of
        watts * (scale * pf(t) / pf - 1) over the decay."""
        r, k = self.inrush - 1.0, (self.inrush_pf - self.pf) / self.pf
        return self.watts * self.tau_s * (r + k + r * k / 2)


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


# ---------------------------------------------------------------- time-domain loads
#
# Loads whose current is written sample by sample as a function of the mains
# phase, because a sum of a few harmonics cannot draw it: a narrow pulse with
# nothing between pulses, or a current that jumps at a firing angle. The
# voltage phasors these loads see are real (sine phase), as both supplies in
# this module make them.

# A capacitor-input rectifier charges its capacitor only near the voltage
# peak: one pulse per half cycle, shaped sin^4 over PULSE_WIDTH and centred
# a little before the peak (the capacitor starts charging as the rising
# voltage overtakes it). 73 degrees of sin^4 is a pulse about 27 degrees
# wide at half height with a crest factor of 3.00; its harmonics fall below
# 3 % of the fundamental above the 11th, so 30 samples per cycle carry it.
PULSE_CENTRE = math.radians(80.0)
PULSE_WIDTH = math.radians(73.0)
_PULSE_LO = PULSE_CENTRE - PULSE_WIDTH / 2
_PULSE_HI = PULSE_CENTRE + PULSE_WIDTH / 2
_PULSE_K = math.pi / PULSE_WIDTH


def _pulse(x: float) -> float:
    """Per-unit rectifier current at mains phase x (radians): peak 1,
    positive in the positive half cycle, negative in the negative one."""
    y = x % TWO_PI
    if y >= math.pi:
        y -= math.pi
        if _PULSE_LO < y < _PULSE_HI:
            return -math.sin(_PULSE_K * (y - _PULSE_LO)) ** 4
        return 0.0
    if _PULSE_LO < y < _PULSE_HI:
        return math.sin(_PULSE_K * (y - _PULSE_LO)) ** 4
    return 0.0


# Gauss-Legendre, 5 points on [-1, 1]: exact for polynomials up to degree 9.
_GL5 = ((-0.9061798459386640, 0.2369268850561891), (-0.5384693101056831, 0.4786286704993665),
        (0.0, 0.5688888888888889), (0.5384693101056831, 0.4786286704993665),
        (0.9061798459386640, 0.2369268850561891))


def _integrate(fn: Callable[[float], float], a: float, b: float, max_piece: float = 0.02) -> float:
    """Integral of fn over [a, b], fn smooth inside (split at any corner or
    step before calling)."""
    if b <= a:
        return 0.0
    pieces = max(1, math.ceil((b - a) / max_piece))
    h = (b - a) / pieces
    total = 0.0
    for k in range(pieces):
        mid = a + (k + 0.5) * h
        total += sum(wt * fn(mid + 0.5 * h * x) for x, wt in _GL5)
    return 0.5 * h * total


def _pulse_integrals():
    """(rms of the per-unit pulse, {h: mean of pulse*sin(h x)}) over a cycle."""
    breaks = (_PULSE_LO, _PULSE_HI)
    i2 = 2 * _integrate(lambda x: _pulse(x) ** 2, *breaks)
    ks = {h: 2 * _integrate(lambda x, h=h: _pulse(x) * math.sin(h * x), *breaks) / TWO_PI
          for h in range(1, 40, 2)}
    return math.sqrt(i2 / TWO_PI), ks


_PULSE_RMS, _PULSE_SIN = _pulse_integrals()


@dataclass
class WaveLoad(Load):
    """A load written in the time domain (see above)."""


@dataclass
class Pulsed(WaveLoad):
    """Switch-mode supply drawing constant real power in one pulse per half
    cycle (crest factor 3, power factor about 0.63 on a sine supply).
    With `levels`, the power steps every `step_s` seconds instead."""
    watts: float = 100.0
    levels: tuple[float, ...] = ()
    step_s: float = 60.0

    def peak(self, t: float, volts: dict[int, complex]) -> float:
        watts = _level(self.levels, self.step_s, t) if self.levels else self.watts
        unit = sum(v.real * _PULSE_SIN.get(h, 0.0) for h, v in volts.items())
        return watts / unit if unit > 0 else 0.0


@dataclass
class PhaseCut(WaveLoad):
    """Resistive load (lamp, heater) behind a leading-edge (triac) dimmer:
    no current in each half cycle until the firing angle, then v/ohms until
    the current, and the voltage, cross zero. `firing` holds (from_s,
    degrees) in time order: the knob's positions."""
    ohms: float = 52.9
    firing: list[tuple[float, float]] = field(default_factory=lambda: [(0.0, 90.0)])

    def angle(self, t: float) -> float:
        deg = self.firing[0][1]
        for start, d in self.firing:
            if start <= t:
                deg = d
        return math.radians(deg)

    def describe(self, t_end):
        d = super().describe(t_end)
        d["firing"] = [(min(a, t_end), deg) for a, deg in self.firing]
        return d


FIRING_MIN_DEG, FIRING_MAX_DEG = 20.0, 160.0


def _fix_edge(cur: list[float], ths: list[float], j: int, edge: float,
              cur_fn: Callable[[float], float], vol_fn: Callable[[float], float]) -> None:
    """Adjust cur[j] and cur[j+1], the samples either side of a step at
    phase `edge`, so that the trapezoidal sums of v*i and of i^2 equal the
    integrals of the continuous current (plain samples would be off by up to
    half an interval of the step's full height, every half cycle).

    Over the three sample intervals around the step the sums must give what
    the trapezoidal rule gives for a smooth function: the integral plus
    h^2/12 * (f'(end) - f'(start)) (Euler-Maclaurin), which is what the
    smooth stretches either side leave over at their ends. Two unknowns, two
    conditions: a line (energy) and a circle (i^2) in the plane of
    (cur[j], cur[j+1]); of the two crossings, the one nearer the plain
    samples."""
    h = ths[j + 1] - ths[j]
    t0, t3 = ths[j] - h, ths[j + 1] + h
    ep = eq = 0.0
    for a, b in ((t0, edge), (edge, t3)):
        pieces = max(1, math.ceil((b - a) / h))
        w = (b - a) / pieces
        for k in range(pieces):
            mid = a + (k + 0.5) * w
            for x, wt in _GL5:
                y = mid + 0.5 * w * x
                c = cur_fn(y)
                ep += 0.5 * w * wt * vol_fn(y) * c
                eq += 0.5 * w * wt * c * c
    dx = 1e-4 * h
    for y, sign in ((t0 - dx, 1), (t0 + dx, -1), (t3 - dx, -1), (t3 + dx, 1)):
        # h^2/12 * (f'(t3) - f'(t0)), the slopes by central differences.
        c = cur_fn(y)
        ep += sign * h * h / 12 * vol_fn(y) * c / (2 * dx)
        eq += sign * h * h / 12 * c * c / (2 * dx)
    xa, xd = cur_fn(t0), cur_fn(t3)
    va, vb, vc, vd = vol_fn(t0), vol_fn(ths[j]), vol_fn(ths[j + 1]), vol_fn(t3)
    lin = ep / h - 0.5 * (va * xa + vd * xd)
    quad = eq / h - 0.5 * (xa * xa + xd * xd)
    norm = math.hypot(vb, vc)
    if norm < 1e-9:
        return
    ub, uc = vb / norm, vc / norm
    d = lin / norm
    s = math.sqrt(max(0.0, quad - d * d))
    if -uc * cur[j] + ub * cur[j + 1] < 0:
        s = -s
    cur[j] = d * ub - s * uc
    cur[j + 1] = d * uc + s * ub


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


# Seed paper 002 (Lazaroiu and Roscia, "New approach for Smart Community Grid
# through Blockchain and smart charging infrastructure of EVs"), Table II,
# "Hour Profile weekdays for Midrise Apartment at 2020", column "gennaio"
# (January): the block's mean load in kW for hours 0 to 23.
TABLE2_JANUARY_KW = (17.92, 17.45, 17.24, 17.16, 19.26, 23.77, 29.02, 27.17, 25.45, 22.49, 19.41, 19.40,
                     18.98, 18.58, 18.38, 19.73, 30.04, 38.43, 40.46, 39.55, 39.18, 33.82, 27.08, 21.38)
# The block averages 25.59 kW over the year (the paper's Table I); one home
# averaging about 0.55 kW makes it 46.5 homes. January weekdays average
# 25.06 kW, so the day trace's home averages 0.539 kW (12.9 kWh a day).
HOMES_PER_BLOCK = 46.5


def _day_hourly_w() -> list[float]:
    return [kw * 1000.0 / HOMES_PER_BLOCK for kw in TABLE2_JANUARY_KW]


def _day(rng: random.Random, d: float, vrms: float) -> list[Load]:
    """A compressed weekday (see the module docstring): the named appliances
    on their schedules, and 'other' loads that make up each hour's profile
    mean."""
    hour = d / 24.0
    minute = hour / 60.0  # one minute of the real day

    def at(h: float, m: float, jitter_min: float = 5.0) -> float:
        return (h * 60.0 + m + rng.uniform(-jitter_min, jitter_min)) * minute

    def boil(start: float) -> tuple[float, float]:
        return start, start + rng.uniform(3.0, 4.0) * minute

    oven_on = at(17, 45, 3.0)
    heated = oven_on + 12.0 * minute
    named: list[Load] = [
        Pulsed("router+standby", [(0.0, math.inf)], watts=rng.uniform(35, 45)),
        Resistive("standby-resistive", [(0.0, math.inf)], watts=rng.uniform(8, 12), v_nominal=vrms),
        Motor("fridge", _cycles(rng, rng.uniform(0.0, 20.0) * minute, d, (12 * minute, 18 * minute),
                                (20 * minute, 30 * minute), True)),
        Resistive("kettle", [boil(at(6, 40)), boil(at(7, 50)), boil(at(17, 20)), boil(at(20, 30))],
                  watts=2000.0, v_nominal=vrms),
        # Heat-up, then the thermostat cycles the element until dinner is out.
        Resistive("oven", [(oven_on, heated)] + _cycles(rng, heated + 4 * minute, at(18, 45, 3.0),
                                                        (2 * minute, 4 * minute), (5 * minute, 7 * minute),
                                                        True),
                  watts=2000.0, v_nominal=vrms),
        Pulsed("tv", [(at(19, 0), at(22, 30))], watts=rng.uniform(90, 110)),
        Pulsed("led-lights", [(at(6, 30), at(8, 0)), (at(16, 45), at(23, 15))], watts=rng.uniform(35, 45)),
    ]
    # What the named loads average in each hour at their rated power, with
    # the fridge's starting surges (they last their real 0.15 s however much
    # the day is compressed); the supply's wander is left to the trace.
    explained = [0.0] * 24
    for ld in named:
        watts = ld.watts
        for start, stop in ld.on:
            if isinstance(ld, Motor) and start < d:
                explained[min(int(start // hour), 23)] += ld.surge_j() / hour
            for h in range(24):
                lo, hi = max(start, h * hour), min(stop, (h + 1) * hour)
                if hi > lo:
                    explained[h] += watts * (hi - lo) / hour
    other = [max(0.0, target - got) for target, got in zip(_day_hourly_w(), explained)]
    # The rest of the home: mostly heating and hot water (resistive), some
    # electronics. Their power steps at the hour boundaries: the profile
    # holds hourly means, and a step is what a meter sees when loads switch.
    return named + [
        SteppedResistive("other-resistive", [(0.0, math.inf)], v_nominal=vrms,
                         levels=tuple(0.7 * w for w in other), step_s=hour),
        Pulsed("other-electronics", [(0.0, math.inf)], levels=tuple(0.3 * w for w in other), step_s=hour),
    ]


def _loads(kind: str, rng: random.Random, duration: float, vrms: float) -> list[Load]:
    d = duration
    if kind in ("idle", "noload"):
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
    if kind == "smps":
        pc_on = (rng.uniform(0.1, 0.2) * d, rng.uniform(0.7, 0.85) * d)
        return [
            Pulsed("router+standby", [(0.0, math.inf)], watts=rng.uniform(15, 25)),
            Pulsed("laptop", _cycles(rng, rng.uniform(0.02, 0.1) * d, d, (0.15 * d, 0.3 * d),
                                     (0.1 * d, 0.2 * d), True), watts=rng.uniform(45, 65)),
            Pulsed("tv", [(rng.uniform(0.05, 0.3) * d, rng.uniform(0.6, 0.95) * d)],
                   watts=rng.uniform(90, 140)),
            # Idle, busy, idle...: the supply's power steps while it stays on.
            Pulsed("desktop-pc", [pc_on], levels=tuple(rng.choice((60.0, 150.0, 220.0)) for _ in range(10)),
                   step_s=0.1 * d),
            Pulsed("led-lights", [(rng.uniform(0.3, 0.4) * d, d)], watts=rng.uniform(30, 50)),
            Pulsed("charger", _cycles(rng, rng.uniform(0.0, 0.2) * d, d, (0.05 * d, 0.1 * d),
                                      (0.1 * d, 0.3 * d), True), watts=10.0),
        ]
    if kind == "dimmer":
        lamp_on, lamp_off = rng.uniform(0.05, 0.15) * d, rng.uniform(0.85, 0.95) * d
        # The knob turned five times: each position a firing-angle step.
        angles = rng.sample([30.0, 60.0, 90.0, 120.0, 150.0], 5)
        knob = [(lamp_on + k * (lamp_off - lamp_on) / 5, a) for k, a in enumerate(angles)]
        return [
            Pulsed("router+standby", [(0.0, math.inf)], watts=rng.uniform(15, 25)),
            Resistive("standby-resistive", [(0.0, math.inf)], watts=rng.uniform(8, 15), v_nominal=vrms),
            PhaseCut("halogen-dimmer", [(lamp_on, lamp_off)], ohms=vrms ** 2 / 400.0, firing=knob),
            PhaseCut("heater-dimmer", _cycles(rng, rng.uniform(0.2, 0.3) * d, d, (0.1 * d, 0.2 * d),
                                              (0.05 * d, 0.15 * d), True),
                     ohms=vrms ** 2 / 1000.0, firing=[(0.0, 90.0)]),
        ]
    if kind == "day":
        return _day(rng, d, vrms)
    raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}")


# ---------------------------------------------------------------- supplies


@dataclass
class _Mains:
    """Slow, bounded wander of frequency and voltage."""
    hz: float
    vrms: float
    rng: random.Random

    # Voltage harmonics relative to the fundamental, sine phase; a negative
    # 5th flattens the tops, as rectifier loads do on European grids.
    harmonics = ((5, -0.02),)

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


@dataclass
class _SteadySupply:
    """An ideal supply for accuracy tests: fixed fundamental voltage, the
    frequency moving linearly from hz_start to hz_stop over the trace (it is
    set at each cycle's start, so each cycle is one clean period)."""
    hz_start: float
    hz_stop: float
    duration: float
    vrms: float
    harmonics: tuple[tuple[int, float], ...] = ()

    def frequency(self, t: float) -> float:
        t = min(max(t, 0.0), self.duration)
        return self.hz_start + (self.hz_stop - self.hz_start) * t / self.duration

    def voltage(self, t: float) -> float:
        return self.vrms


GRID_OHMS = 0.3  # source impedance seen from a home's meter
V5_REL = -_Mains.harmonics[0][1]  # 5th harmonic of the supply voltage, relative to the fundamental


def _time_format(rate_hz: float) -> str:
    # Enough decimals that consecutive sample times never print the same,
    # and, where the sample interval has a short decimal expansion
    # (1/3200 s = 0.0003125 s), enough to print every time exactly.
    decimals = max(5, math.ceil(math.log10(rate_hz)) + 2)
    for d in range(decimals, 10):
        if (10 ** d / rate_hz).is_integer():
            decimals = d
            break
    return "%%.%df" % decimals


def _check_rate(rate_hz: float, hz_max: float, per_cycle: int) -> None:
    if rate_hz < per_cycle * hz_max:
        raise ValueError(f"rate_hz={rate_hz:g} is too low: at least {per_cycle * hz_max:g} "
                         f"samples per second ({per_cycle} per cycle) for {hz_max:g} Hz mains")


# Samples per mains cycle a kind or shape needs. Below 20 the 9th harmonic
# of the electronics' current aliases; the time-domain loads' pulses reach
# the 13th.
_PER_CYCLE = {"smps": 30, "dimmer": 30, "day": 30}


# ---------------------------------------------------------------- writer


@dataclass
class _Written:
    rows: int
    # Energies worked out from the phasor loads' figures cycle by cycle (the
    # time-domain loads are not included): real J, and J of V_rms * I_rms.
    real_j: float = 0.0
    apparent_j: float = 0.0


def _write(path, loads: list[Load], mains, duration_s: float, rate_hz: float, with_voltage: bool,
           grid_ohms: float, i_decimals: int = 4, v_decimals: int = 2, phase0: float = 0.0) -> _Written:
    """Write samples at t = n/rate_hz for n = 0..duration_s*rate_hz, cycle by
    cycle: each cycle starts at a positive-going zero crossing of the
    fundamental voltage; its frequency, voltage and load currents hold for
    that cycle. The first cycle starts phase0 radians before t = 0."""
    n_last = round(duration_s * rate_hz)
    dt = 1.0 / rate_hz
    t_end = n_last * dt
    tfmt = _time_format(rate_hz)
    i_fmt, v_fmt = ",%%.%df" % i_decimals, ",%%.%df" % v_decimals
    row = (tfmt + i_fmt + v_fmt + "\n") if with_voltage else (tfmt + i_fmt + "\n")
    sin = math.sin
    pi = math.pi
    phasor = [ld for ld in loads if not isinstance(ld, WaveLoad)]
    pulsed = [ld for ld in loads if isinstance(ld, Pulsed)]
    cut = [ld for ld in loads if isinstance(ld, PhaseCut)]
    vh = tuple(mains.harmonics)
    out = _Written(n_last + 1)

    drop = 0.0  # in-phase fundamental current of the previous cycle (A rms)
    t_cycle = -phase0 / (TWO_PI * mains.frequency(0.0)) if phase0 else 0.0
    n = 0
    with open(path, "w", newline="\n") as fh:
        fh.write((HEADER_IV if with_voltage else HEADER_I) + "\n")
        while n <= n_last:
            f = mains.frequency(t_cycle)
            t_next = t_cycle + 1.0 / f
            v1 = (mains.voltage(t_cycle) - grid_ohms * drop) * SQRT2
            volts = {1: complex(v1, 0.0)}
            for h, rel in vh:
                volts[h] = complex(rel * v1, 0.0)
            amps: dict[int, complex] = {}
            for load in phasor:
                since = load.active(t_cycle)
                if since is not None:
                    for h, a in load.current(t_cycle, since, volts).items():
                        amps[h] = amps.get(h, 0j) + a
            drop = (amps.get(1, 0j).real) / SQRT2  # v1 has phase 0: real part is in phase
            span = min(t_next, t_end) - max(t_cycle, 0.0)
            if span > 0:
                p = sum((volts[h] * a.conjugate()).real for h, a in amps.items() if h in volts) / 2
                i2 = sum(abs(a) ** 2 for a in amps.values()) / 2
                v2 = sum(abs(v) ** 2 for v in volts.values()) / 2
                out.real_j += p * span
                out.apparent_j += math.sqrt(v2 * i2) * span

            n_stop = min(n_last + 1, max(n + 1, math.ceil(t_next * rate_hz - 1e-9)))
            w = TWO_PI * f
            ths = [w * (k * dt - t_cycle) for k in range(n, n_stop)]
            cur = [0.0] * len(ths)
            terms = []
            for h, a in amps.items():
                mag, ph = abs(a), cmath.phase(a)
                if mag > 1e-7:
                    terms.append((h, mag, ph))
                    cur = [c + mag * sin(h * x + ph) for c, x in zip(cur, ths)]

            vol = None
            if with_voltage or cut:
                if not vh:
                    vol = [v1 * sin(x) for x in ths]
                elif len(vh) == 1:
                    h5, a5 = vh[0][0], volts[vh[0][0]].real
                    vol = [v1 * sin(x) + a5 * sin(h5 * x) for x in ths]
                else:
                    vol = [v1 * sin(x) for x in ths]
                    for h, rel in vh:
                        a = volts[h].real
                        vol = [u + a * sin(h * x) for u, x in zip(vol, ths)]

            peak = 0.0
            for load in pulsed:
                if load.active(t_cycle) is not None:
                    peak += load.peak(t_cycle, volts)
            if peak > 0.0:
                cur = [c + peak * _pulse(x) for c, x in zip(cur, ths)]
                drop += SQRT2 * _PULSE_SIN[1] * peak
            cuts = []
            for load in cut:
                if load.active(t_cycle) is not None:
                    alpha, ohms = load.angle(t_cycle), load.ohms
                    cuts.append((alpha, ohms))
                    cur = [c + (u / ohms if x % pi >= alpha else 0.0) for c, u, x in zip(cur, vol, ths)]
                    # Real power over the fundamental's RMS: the in-phase fundamental.
                    g = ((pi - alpha) + sin(2 * alpha) / 2) / pi
                    drop += (v1 * v1 / 2 / ohms * g) / (v1 / SQRT2)
            if cuts and len(ths) > 1:
                vfun = [(h, abs(v), cmath.phase(v)) for h, v in volts.items()]

                def vol_fn(x):
                    u = 0.0
                    for h, m, ph in vfun:
                        u += m * sin(h * x + ph)
                    return u

                def cur_fn(x):
                    c = peak * _pulse(x) if peak else 0.0
                    for h, m, ph in terms:
                        c += m * sin(h * x + ph)
                    half = x % pi
                    for alpha, ohms in cuts:
                        if half >= alpha:
                            c += vol_fn(x) / ohms
                    return c

                # Each edge's correction takes its neighbours as plainly
                # sampled: two dimmers firing within three samples of each
                # other come out close, not exact.
                for edge in sorted({e for alpha, _ in cuts for e in (alpha, pi + alpha)}):
                    j = bisect.bisect_left(ths, edge) - 1
                    if 0 <= j and j + 1 < len(ths) and n + j >= 1 and n + j + 2 <= n_last:
                        _fix_edge(cur, ths, j, edge, cur_fn, vol_fn)

            if with_voltage:
                fh.write("".join([row % ((n + k) * dt, c, v)
                                  for k, (c, v) in enumerate(zip(cur, vol))]))
            else:
                fh.write("".join([row % ((n + k) * dt, c) for k, c in enumerate(cur)]))
            n = n_stop
            t_cycle = t_next
    return out


# ---------------------------------------------------------------- generate


def generate(path, kind: str, duration_s: float, rate_hz: float = 4000, seed: int = 0,
             mains_hz: float = 50.0, vrms: float = 230.0, with_voltage: bool = False,
             grid_ohms: float = GRID_OHMS) -> dict:
    """Write a trace of `kind` (see KINDS) to `path`: samples at t = n/rate_hz
    for n = 0..duration_s*rate_hz, so the trace lasts exactly duration_s.

    For "day", duration_s holds the whole compressed day (1440 s is one
    minute per hour); the summary then also has hour_s and hourly_w, the
    profile's mean power for each hour.

    Returns a summary: rows, duration and the loads with their on-times."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}; known: {', '.join(KINDS)}")
    if kind == "pv" and not with_voltage:
        raise ValueError("kind 'pv' needs with_voltage=True: without a voltage column "
                         "exported energy cannot be told from imported")
    if not duration_s > 0 or not rate_hz > 0:
        raise ValueError("duration_s and rate_hz must be positive")
    _check_rate(rate_hz, mains_hz, _PER_CYCLE.get(kind, 20))
    rng = random.Random(seed)
    mains = _Mains(mains_hz, vrms, rng)
    loads = _loads(kind, rng, duration_s, vrms)
    written = _write(path, loads, mains, duration_s, rate_hz, with_voltage, grid_ohms)
    t_end = (written.rows - 1) * (1.0 / rate_hz)
    info = {
        "path": str(path), "kind": kind, "rows": written.rows, "duration_s": t_end,
        "rate_hz": rate_hz, "seed": seed, "with_voltage": with_voltage,
        "loads": [ld.describe(t_end) for ld in loads],
    }
    if kind == "day":
        info["hour_s"] = duration_s / 24.0
        info["hourly_w"] = _day_hourly_w()
    return info


# ---------------------------------------------------------------- steady loads


MOTOR_PF = 0.7


def generate_steady(path, irms_a: float, pf: float = 1.0, duration_s: float = 4.0, rate_hz: float = 4000,
                    mains_hz: float = 50.0, vrms: float = 230.0, with_voltage: bool = False,
                    shape: str = "sine", lagging: bool = True, seed: int = 0, drift_hz: float = 0.0,
                    v_harmonics: dict[int, float] | None = None, firing_deg: float = 90.0) -> dict:
    """Write one constant load to `path` for accuracy sweeps (samples at
    t = n/rate_hz as `generate` writes them), on an ideal supply: `vrms` is
    the fundamental's RMS voltage; `v_harmonics` maps an order (2..) to its
    amplitude relative to the fundamental, in sine phase (-0.02 for 5 gives
    the flattened tops of `generate`); the frequency moves linearly from
    mains_hz - drift_hz/2 to mains_hz + drift_hz/2 (both within 45..65 Hz).

    irms_a is the true RMS of the current, all harmonics included. Shapes:
    - "sine": a sinusoid at power factor pf (-1..1; negative is export),
      lagging or leading. pf is cos(phi) of the fundamental, which is the
      true power factor on a sinusoidal supply; with v_harmonics the true
      one is a little lower (see the result's pf).
    - "smps": capacitor-input rectifier, one pulse per half cycle near the
      voltage peak: crest factor 3.0, power factor about 0.63.
    - "dimmer": resistive load behind a leading-edge dimmer firing at
      firing_deg (20..160): zero until then in each half cycle, then v/R.
    - "motor": power factor 0.7 lagging with a starting surge (6 times the
      current at power factor 0.4, decaying in 0.15 s) at t = 0; irms_a is
      the running current.
    pf and lagging apply to "sine" only.

    seed 0 starts the trace at a positive-going zero crossing of the
    voltage; another seed starts it at a phase drawn from the seed.

    Returns the load's figures in the steady state: irms_a, vrms_v (true
    RMS, harmonics included), real_w, apparent_va, pf (real/apparent),
    crest_factor; and what an ideal meter registers over the trace:
    real_wh (with a voltage column) and apparent_wh (vrms_v * I_rms * t;
    without a voltage column pass vrms_nominal=vrms_v and mains_hz to
    reference_energy). These are exact over whole cycles; `cycles` says how
    many the trace holds."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if not (math.isfinite(irms_a) and irms_a >= 0):
        raise ValueError(f"irms_a must be a finite number >= 0, got {irms_a!r}")
    if not -1.0 <= pf <= 1.0:
        raise ValueError(f"pf must be within -1..1, got {pf!r}")
    if shape != "sine" and (pf != 1.0 or not lagging):
        raise ValueError(f"pf and lagging apply to shape 'sine' only; {shape!r} sets its own "
                         f"power factor (see the result's pf)")
    if not duration_s > 0 or not vrms > 0:
        raise ValueError("duration_s and vrms must be positive")
    hz_start, hz_stop = mains_hz - drift_hz / 2, mains_hz + drift_hz / 2
    for hz in (mains_hz, hz_start, hz_stop):
        if not 45.0 <= hz <= 65.0:
            raise ValueError(f"mains frequency {hz:g} Hz is outside 45..65 Hz "
                             f"(mains_hz={mains_hz:g}, drift_hz={drift_hz:g})")
    hz_max = max(hz_start, hz_stop)
    _check_rate(rate_hz, hz_max, 30 if shape in ("smps", "dimmer") else 20)
    harmonics = tuple(sorted((v_harmonics or {}).items()))
    for h, rel in harmonics:
        if not (isinstance(h, int) and h >= 2 and abs(rel) <= 0.2):
            raise ValueError(f"v_harmonics: order {h!r} must be an integer >= 2 and its "
                             f"relative amplitude {rel!r} within -0.2..0.2")
        if h * hz_max >= rate_hz / 2:
            raise ValueError(f"v_harmonics: order {h} at {hz_max:g} Hz is above half the sample rate")
    if shape == "dimmer" and not FIRING_MIN_DEG <= firing_deg <= FIRING_MAX_DEG:
        raise ValueError(f"firing_deg must be within {FIRING_MIN_DEG:g}..{FIRING_MAX_DEG:g}, "
                         f"got {firing_deg!r}")

    v1 = vrms * SQRT2
    vfun = [(1, v1)] + [(h, rel * v1) for h, rel in harmonics]

    def vol_fn(x):
        return sum(a * math.sin(h * x) for h, a in vfun)

    vrms_v = vrms * math.sqrt(1.0 + sum(rel * rel for _, rel in harmonics))
    always = [(-1.0, math.inf)]  # on before the first sample
    loads: list[Load] = []
    if shape in ("sine", "motor"):
        fpf = pf if shape == "sine" else MOTOR_PF
        lag = math.acos(fpf) * (1.0 if lagging else -1.0)
        real_w = vrms * irms_a * fpf
        crest = SQRT2
        if irms_a > 0:
            loads = [Sinusoid("sine", always, irms=irms_a, lag=lag) if shape == "sine" else
                     Motor("motor", [(0.0, math.inf)], watts=real_w, pf=MOTOR_PF)]
    elif shape == "smps":
        peak = irms_a / _PULSE_RMS
        real_w = peak * sum(a * _PULSE_SIN.get(h, 0.0) for h, a in vfun)
        crest = 1.0 / _PULSE_RMS
        if irms_a > 0:
            loads = [Pulsed("smps", always, watts=real_w)]
    else:
        alpha = math.radians(firing_deg)
        # Mean of v^2 over the conducting parts of a cycle; both halves alike.
        v2 = 2 * _integrate(lambda x: vol_fn(x) ** 2, alpha, math.pi) / TWO_PI
        ohms = math.sqrt(v2) / irms_a if irms_a > 0 else math.inf
        real_w = v2 / ohms
        top = max(abs(vol_fn(alpha + (math.pi - alpha) * k / 2000)) for k in range(2001))
        crest = top / math.sqrt(v2)
        if irms_a > 0:
            loads = [PhaseCut("dimmer", always, ohms=ohms, firing=[(0.0, firing_deg)])]

    phase0 = 0.0 if seed == 0 else random.Random(seed).uniform(0.0, TWO_PI)
    supply = _SteadySupply(hz_start, hz_stop, duration_s, vrms, harmonics)
    written = _write(path, loads, supply, duration_s, rate_hz, with_voltage, 0.0,
                     i_decimals=6, v_decimals=3, phase0=phase0)
    t_end = (written.rows - 1) * (1.0 / rate_hz)
    apparent_va = vrms_v * irms_a
    if shape in ("sine", "motor"):
        real_wh, apparent_wh = written.real_j / J_PER_WH, written.apparent_j / J_PER_WH
    else:
        real_wh, apparent_wh = real_w * t_end / J_PER_WH, apparent_va * t_end / J_PER_WH
    return {
        "path": str(path), "shape": shape, "rows": written.rows, "duration_s": t_end,
        "rate_hz": rate_hz, "seed": seed, "with_voltage": with_voltage,
        "mains_hz": mains_hz, "drift_hz": drift_hz, "cycles": mains_hz * t_end,
        "firing_deg": firing_deg if shape == "dimmer" else None,
        "v_harmonics": dict(harmonics),
        "irms_a": irms_a, "vrms_v": vrms_v, "real_w": real_w, "apparent_va": apparent_va,
        "pf": real_w / apparent_va if apparent_va > 0 else None, "crest_factor": crest,
        "real_wh": real_wh, "apparent_wh": apparent_wh,
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


def _harmonic(text: str) -> tuple[int, float]:
    try:
        h, rel = text.split(":")
        return int(h), float(rel)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ORDER:RELATIVE such as 5:-0.02, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.traces", description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write a synthetic trace")
    g.add_argument("out", help="CSV file to write")
    g.add_argument("--kind", choices=KINDS, required=True)
    g.add_argument("--duration", type=float, required=True,
                   help="seconds (for --kind day the whole compressed day: 1440 is a minute per hour)")
    g.add_argument("--rate", type=float, default=4000, help="samples per second (default 4000)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mains-hz", type=float, default=50.0)
    g.add_argument("--vrms", type=float, default=230.0)
    g.add_argument("--voltage", action="store_true", help="add the voltage_v column")
    s = sub.add_parser("steady", help="write one constant load for accuracy tests")
    s.add_argument("out", help="CSV file to write")
    s.add_argument("--irms", type=float, required=True, help="true RMS current, amperes")
    s.add_argument("--pf", type=float, default=1.0, help="power factor of shape sine, -1..1 (default 1)")
    s.add_argument("--leading", action="store_true", help="current leads the voltage (shape sine)")
    s.add_argument("--shape", choices=SHAPES, default="sine")
    s.add_argument("--firing-deg", type=float, default=90.0, help="dimmer firing angle (default 90)")
    s.add_argument("--duration", type=float, default=4.0, help="seconds (default 4)")
    s.add_argument("--rate", type=float, default=4000, help="samples per second (default 4000)")
    s.add_argument("--mains-hz", type=float, default=50.0, help="45..65 (default 50)")
    s.add_argument("--drift-hz", type=float, default=0.0,
                   help="frequency change over the trace, centred on --mains-hz (default 0)")
    s.add_argument("--vrms", type=float, default=230.0, help="fundamental RMS voltage (default 230)")
    s.add_argument("--vh", type=_harmonic, action="append", default=[], metavar="ORDER:REL",
                   help="a voltage harmonic relative to the fundamental, e.g. 5:-0.02 (repeatable)")
    s.add_argument("--seed", type=int, default=0, help="0 starts at a voltage zero crossing")
    s.add_argument("--voltage", action="store_true", help="add the voltage_v column")
    s.add_argument("--json", action="store_true", help="print the load's figures as JSON")
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
        if args.cmd == "steady":
            info = generate_steady(args.out, args.irms, pf=args.pf, duration_s=args.duration,
                                   rate_hz=args.rate, mains_hz=args.mains_hz, vrms=args.vrms,
                                   with_voltage=args.voltage, shape=args.shape, lagging=not args.leading,
                                   seed=args.seed, drift_hz=args.drift_hz, v_harmonics=dict(args.vh),
                                   firing_deg=args.firing_deg)
            if args.json:
                print(json.dumps(info))
            else:
                print(f"{info['path']}: {info['shape']}, {info['rows']} rows, {info['duration_s']:g} s, "
                      f"{info['irms_a']:g} A, {info['real_w']:.3f} W, pf {info['pf'] or 0:.4f}, "
                      f"crest factor {info['crest_factor']:.3f}")
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
