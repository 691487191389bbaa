# Simulated meter hardware, MicroPython side: the clock, the trace, the
# current clamp and voltage module front ends, the ADCs, the timers, and the
# CPU time the firmware spends.
#
# The `machine` shim (sim_machine.py) is a thin facade over this module;
# boards_sim.py builds the parts below from hardware/designs.json. The
# simulation has its own hardware clock. It advances when the firmware waits
# for hardware (`machine.idle()`): to the next timer deadline, whose callback
# then runs as the interrupt would. With the CPU model on, each `idle()` first
# charges the host time the firmware used since it last waited, multiplied by
# the board's slowdown factor, and fires the timers that fell due meanwhile at
# their own instants: processing that is too slow for the board shows up as
# double-buffer overruns, as it would on the board. With `speed` > 0 the clock
# is held back to `speed` times real time (the demo runs in real time or a
# multiple of it so the modem and gateway see a realistic pace).
#
# Signal chain of one channel, from the trace to the ADC code:
#   trace row -> anti-alias RC (first-order IIR, exact for the linear
#   interpolation between rows, run once per row) -> clamp or voltage module
#   (gain and phase lead as a time advance, updated once per mains cycle from
#   the primary current's RMS) -> saturation -> bias -> ADC transfer -> noise.
# The RC is linear and time-invariant, so it commutes with the gains and time
# shifts that follow; only the clamp's saturation, which is nonlinear, comes
# after the RC here instead of before it (a difference only above 130 % of
# the clamp's rating).
#
# Everything here runs in the MicroPython unix port; nothing here is firmware.

import gc
from array import array
from micropython import const
from math import atan, exp, pi, sqrt
import time as _rtime

_NOISE_TABLE = const(4093)  # prime, so the noise does not lock to the mains period
_HEAP_PROBE_IDLES = const(200000)
_RING = const(64)  # trace rows kept for look-back (channels read at different instants)
_MASK = const(63)
_FAR = 1e30
_HOLD_US = 1000.0  # reads this long after the trace's last row still see it

# The firmware's processing is timed with the host's microsecond ticks, but
# never counted above the interpreter's own CPU time (the unix port's
# time.clock(), in steps of _CPU_STEP_US): time the host gives to other
# processes is not charged to the board. Without time.clock(), ticks alone.
_CPU_STEP_US = 1000.0
try:
    _cpu_s = _rtime.clock
except AttributeError:
    _cpu_s = None


class TraceEnd(BaseException):
    """The trace is exhausted: the simulated power goes off.

    A BaseException so the firmware's `except Exception` handlers cannot
    swallow the end of the simulation."""


# ---------------------------------------------------------------- the clock

class Clock:
    def __init__(self):
        self.now_us = 0
        self.speed = 0.0  # 0: as fast as possible; else sim seconds per real second
        self._real0 = _rtime.ticks_us()
        self._real_acc = 0  # real microseconds accumulated (ticks wrap-safe)
        self._last_real = self._real0

    def _real_elapsed_us(self):
        r = _rtime.ticks_us()
        self._real_acc += _rtime.ticks_diff(r, self._last_real)
        self._last_real = r
        return self._real_acc

    def advance_to(self, t_us):
        if t_us > self.now_us:
            self.now_us = t_us
        if self.speed > 0:
            ahead = int(self.now_us / self.speed) - self._real_elapsed_us()
            # Sleep in chunks of at least 2 ms: finer sleeping costs more real
            # time in system calls than it saves.
            if ahead > 2000:
                _rtime.sleep_us(ahead)

    def advance(self, dt_us):
        self.advance_to(self.now_us + dt_us)


clock = Clock()


def ticks_us():
    """The board's microsecond counter: the simulated clock plus the CPU time
    the firmware has spent since it last waited (charged at its next idle).
    A `time` shim built on this keeps the firmware's own time slicing in
    board time rather than host time."""
    return clock.now_us + hw.pending_cpu_us()


def ticks_ms():
    return ticks_us() // 1000


# ------------------------------------------------------------ trace source

class TraceSource:
    """Streams a CSV trace `t_s,current_a[,voltage_v]` (any sample rate).

    Rows are read on demand into a ring of the last _RING rows, in
    microseconds of simulated time (0 = the first row). Each channel reads the
    trace through its own cursor (`_Cursor`), at its own instant: a clamp
    leads, the voltage is sampled a little after the current. Memory stays
    constant whatever the trace length.

    While rows are read, the anti-alias RC of each column is applied
    (`set_filters`) and the current's RMS over each mains cycle is handed to
    `on_cycle(irms)` (the clamp's ratio error and phase depend on it)."""

    def __init__(self, path, loop=False, t_offset=0.0):
        self.path = path
        self.loop = loop
        self._f = None
        self.has_voltage = False
        self.rows = 0
        self.duration_s = None
        self._rt = array("d", bytes(8 * _RING))
        self._ri = array("d", bytes(8 * _RING))
        self._rv = array("d", bytes(8 * _RING))
        self._n = 0  # rows in the ring so far (index of the next row, not wrapped)
        self.tau_i_us = 0.0
        self.tau_v_us = 0.0
        self._filtered = False
        self._h = -1.0  # row spacing the filter coefficients were computed for
        self.on_cycle = None
        self.cycle_us = 20000.0
        self.end_us = None  # time of the last row, once the file is exhausted
        self._open()
        t, i, v = self._next_row()
        if t is None:
            raise ValueError("%s: a trace needs at least two rows" % self.path)
        self.start_s = t
        # Simulation time 0 is the trace's first row (shifted by t_offset s).
        # Row time in us = trace seconds * 1e6 + _shift_us (grows by the
        # trace's period at each pass when looping).
        self._shift_us = -(t + t_offset) * 1000000.0
        self._append(t * 1000000.0 + self._shift_us, i, v)
        if not self._peek_second_row():
            raise ValueError("%s: a trace needs at least two rows" % self.path)
        self._ci = _Cursor(self, self._ri)
        self._cv = _Cursor(self, self._rv)

    # -- file

    def _open(self):
        if self._f is not None:
            self._f.close()
        self._f = open(self.path)
        self._line = 1
        header = self._f.readline().strip().replace(" ", "")
        if header == "t_s,current_a,voltage_v":
            self.has_voltage = True
        elif header == "t_s,current_a":
            self.has_voltage = False
        else:
            raise ValueError("%s line 1: header must be 't_s,current_a' or "
                             "'t_s,current_a,voltage_v', got %r" % (self.path, header))

    def _next_row(self):
        """(t_s, current_a, voltage_v) of the next row, (None, 0, 0) at the end."""
        while True:
            line = self._f.readline()
            if not line:
                return None, 0.0, 0.0
            self._line += 1
            parts = line.split(",")
            try:
                t = float(parts[0])
                i = float(parts[1])
                v = float(parts[2]) if self.has_voltage else 0.0
            except (ValueError, IndexError):
                if not line.strip():
                    continue  # a blank line
                raise self._bad(line)
            self.rows += 1
            return t, i, v

    def _bad(self, line):
        return ValueError("%s line %d: expected numbers, got %r"
                          % (self.path, self._line, line.strip()))

    def _peek_second_row(self):
        t, i, v = self._next_row()
        if t is None:
            return False
        self._push(t, i, v)
        return True

    # -- configuration

    def set_filters(self, tau_i_us, tau_v_us):
        """First-order low-pass (the anti-alias RC, tau = R*C) on each column.
        Call before the first read; rows already in the ring stay unfiltered."""
        self.tau_i_us = float(tau_i_us)
        self.tau_v_us = float(tau_v_us)
        self._h = -1.0
        if (self.tau_i_us > 0.0) != (self.tau_v_us > 0.0):
            raise ValueError("anti-alias filter: both channels or neither")
        self._filtered = self.tau_i_us > 0.0

    def set_cycle(self, mains_hz, on_cycle):
        self.cycle_us = 1000000.0 / mains_hz
        self.on_cycle = on_cycle
        self._cyc_start = self._rt[(self._n - 1) & _MASK]
        self._cyc_end = self._cyc_start + self.cycle_us
        self._cyc_acc = 0.0

    # -- rows

    def _append(self, t_us, i, v):
        k = self._n & _MASK
        self._rt[k] = t_us
        self._ri[k] = i
        self._rv[k] = v
        self._xi = i  # unfiltered last row, for the filter
        self._xv = v
        self._n += 1

    def _push(self, t, i, v):
        """Add a row (t in trace seconds) to the ring: filtered columns, and the
        current's RMS per mains cycle."""
        t_us = t * 1000000.0 + self._shift_us
        n = self._n
        last = (n - 1) & _MASK
        k = n & _MASK
        rt = self._rt
        h = t_us - rt[last]
        if h <= 0.0:
            raise ValueError("%s line %d: time %r does not increase"
                             % (self.path, self._line, t))
        rt[k] = t_us
        if self._filtered:
            d = h - self._h
            if d > 0.001 or d < -0.001:
                self._coefficients(h)
            # Exact response of dy/dt = (x - y)/tau to x rising linearly from
            # x0 to x1 over h: y1 = a*(y0 - x0) + x1 - (x1 - x0)*tau*(1 - a)/h.
            x0 = self._xi
            self._ri[k] = self._ai * (self._ri[last] - x0) + i - (i - x0) * self._ki
            if self.has_voltage:
                x0 = self._xv
                self._rv[k] = self._av * (self._rv[last] - x0) + v - (v - x0) * self._kv
                self._xv = v
        else:
            self._ri[k] = i
            self._rv[k] = v
        self._n = n + 1
        self._xi = i
        if self.on_cycle is not None:
            self._cyc_acc += i * i * h
            if t_us >= self._cyc_end:
                self.on_cycle(sqrt(self._cyc_acc / (t_us - self._cyc_start)))
                self._cyc_start = t_us
                self._cyc_end = t_us + self.cycle_us
                self._cyc_acc = 0.0

    def _coefficients(self, h):
        self._h = h
        a = exp(-h / self.tau_i_us)
        self._ai = a
        self._ki = self.tau_i_us * (1.0 - a) / h
        a = exp(-h / self.tau_v_us)
        self._av = a
        self._kv = self.tau_v_us * (1.0 - a) / h

    def load(self):
        """Read one more row into the ring (wrapping when looping); False at
        the end of the trace. The hot path: one row per call."""
        if self.end_us is not None:
            return False
        t, i, v = self._next_row()
        if t is not None:
            self._push(t, i, v)
            return True
        if not self.loop:
            self.end_us = self._rt[(self._n - 1) & _MASK]
            self.duration_s = self.end_us / 1000000.0
            return False
        # Wrap: the trace repeats with its own period; its first row falls on
        # the instant of the last one and is not repeated.
        last_t = (self._rt[(self._n - 1) & _MASK] - self._shift_us) / 1000000.0
        self._shift_us += (last_t - self.start_s) * 1000000.0
        self._open()
        self._next_row()
        return self.load()

    def at(self, t):
        """(current_a, voltage_v) at simulation time t (seconds), after the
        anti-alias filter when one is set."""
        t_us = t * 1000000.0
        return self._ci.at(t_us), self._cv.at(t_us)


class _Cursor:
    """Reads one column of a TraceSource by linear interpolation at increasing
    (or slightly decreasing: within the ring) instants in microseconds. The
    current segment is cached, so a read inside it costs two comparisons and
    one multiply-add."""

    adv_us = 0.0  # how far ahead of the sampling instant this reader looks

    def __init__(self, src, col):
        self.src = src
        self.col = col
        self.k = 0
        self.t0 = _FAR
        self.t1 = -_FAR
        self.y0 = 0.0
        self.slope = 0.0

    def at(self, t):
        if t > self.t1 or t < self.t0:
            self._seek(t)
        return self.y0 + (t - self.t0) * self.slope

    def _seek(self, t):
        src = self.src
        rt = src._rt
        col = self.col
        k = self.k
        oldest = src._n - _RING
        if k < oldest:
            k = oldest if oldest > 0 else 0
        while True:
            if k + 1 >= src._n:
                if src.load():
                    continue
                # Past the last row. The power goes off when the next timer
                # interrupt falls after it (Hardware.idle); until then, and
                # for a reader that looks ahead (a leading clamp), the last
                # value holds. Reads long after it end the run here.
                if t - self.adv_us > src.end_us + _HOLD_US:
                    raise TraceEnd()
                self.k = k
                self.t0 = rt[k & _MASK]
                self.t1 = src.end_us + _HOLD_US + self.adv_us
                self.y0 = col[k & _MASK]
                self.slope = 0.0
                return
            if t > rt[(k + 1) & _MASK]:
                k += 1
                continue
            break
        while t < rt[k & _MASK]:
            if k == 0:
                # Before the first row: its value holds.
                self.k = 0
                self.t0 = -_FAR
                self.t1 = rt[0]
                self.y0 = col[0]
                self.slope = 0.0
                return
            if k - 1 < src._n - _RING:
                raise ValueError("trace %s: rows too dense for the simulator's look-back "
                                 "(%d rows); resample the trace" % (src.path, _RING))
            k -= 1
        self.k = k
        a = k & _MASK
        b = (k + 1) & _MASK
        self.t0 = rt[a]
        self.t1 = rt[b]
        self.y0 = col[a]
        self.slope = (col[b] - col[a]) / (rt[b] - rt[a])


# ------------------------------------------------------ analog front end

def interp(table, x, col):
    """Linear interpolation of column `col` of a table of rows sorted by the
    first column; flat beyond the ends (the firmware reads the same tables
    the same way)."""
    if x <= table[0][0]:
        return table[0][col]
    for k in range(1, len(table)):
        r = table[k]
        if x <= r[0]:
            p = table[k - 1]
            return p[col] + (r[col] - p[col]) * (x - p[0]) / (r[0] - p[0])
    return table[-1][col]


class CtChannel(_Cursor):
    """A current clamp into its burden (or a voltage-output clamp), riding on
    the bias: volts at the ADC pin for the primary current in the trace.

    v_per_a: volts at the pin per primary ampere, this unit (burden and gain
    tolerances included), before the ratio error. table: rows (primary A rms,
    ratio error % (reads low), phase lead degrees at table_hz). The lead in
    degrees scales as 1/f (it comes from the magnetising inductance); the
    ratio error is taken as independent of frequency. Saturation: above
    knee_a (peak primary amperes) the secondary bends over softly and never
    exceeds (1 + soft) times the knee."""

    def __init__(self, src, bias_v, v_per_a, table, table_hz, mains_hz, knee_a, soft):
        _Cursor.__init__(self, src, src._ri)
        self.bias = bias_v
        self.v_per_a = v_per_a
        self.table = table
        self.table_hz = table_hz
        self.mains_hz = mains_hz
        self.knee = knee_a * v_per_a
        self.soft = soft * self.knee
        self.irms = 0.0
        self.gain = 0.0
        self.adv_us = 0.0
        self.on_cycle(0.0)

    def on_cycle(self, irms):
        f = self.mains_hz
        self.irms = irms
        self.gain = self.v_per_a * (1.0 - interp(self.table, irms, 1) / 100.0)
        lead = interp(self.table, irms, 2) * self.table_hz / f
        self.adv_us = lead / (360.0 * f) * 1000000.0

    def volts(self, t):
        t += self.adv_us
        if t > self.t1 or t < self.t0:
            self._seek(t)
        s = (self.y0 + (t - self.t0) * self.slope) * self.gain
        if s > self.knee or s < -self.knee:
            s = self._saturate(s)
        return self.bias + s

    def _saturate(self, s):
        k = self.knee
        w = self.soft
        d = (s if s > 0 else -s) - k
        y = k + w * d / (w + d)
        return y if s > 0 else -y


class VtChannel(_Cursor):
    """A voltage module (ZMPT101B style), AC-coupled onto the bias: gain and
    phase lead of the module and of the coupling high-pass, applied at the
    mains frequency as a gain and a time advance."""

    def __init__(self, src, bias_v, v_per_v, lead_deg, table_hz, mains_hz,
                 couple_r_ohm=0.0, couple_c_f=0.0):
        _Cursor.__init__(self, src, src._rv)
        w = 2.0 * pi * mains_hz
        hp_lead = 0.0
        hp_gain = 1.0
        if couple_r_ohm > 0.0 and couple_c_f > 0.0:
            x = 1.0 / (w * couple_r_ohm * couple_c_f)
            hp_lead = atan(x) * 180.0 / pi
            hp_gain = 1.0 / sqrt(1.0 + x * x)
        self.bias = bias_v
        self.gain = v_per_v * hp_gain
        self.lead_deg = lead_deg * table_hz / mains_hz + hp_lead
        self.adv_us = self.lead_deg / (360.0 * mains_hz) * 1000000.0

    def volts(self, t):
        t += self.adv_us
        if t > self.t1 or t < self.t0:
            self._seek(t)
        return self.bias + (self.y0 + (t - self.t0) * self.slope) * self.gain


class Grounded(_Cursor):
    """A pin held at 0 V: the clamp's switched jack with no plug in it. The
    trace still runs (its end is the end of the simulation)."""

    def __init__(self, src):
        _Cursor.__init__(self, src, src._ri)

    def volts(self, t):
        if t > self.t1 or t < self.t0:
            self._seek(t)
        return 0.0


# ------------------------------------------------------------------- ADCs

def _noise_table(noise_lsb, seed):
    # A fixed table of approximately gaussian values (Irwin-Hall sums of 3
    # uniforms from a Park-Miller generator, variance noise_lsb**2):
    # deterministic, one index step per conversion.
    rng = seed & 0x7FFFFFFF or 1
    table = array("f", bytes(4 * _NOISE_TABLE))
    for k in range(_NOISE_TABLE):
        acc = 0.0
        for _ in range(3):
            rng = (rng * 48271) % 0x7FFFFFFF
            acc += rng / 0x7FFFFFFF
        table[k] = (acc - 1.5) * 2.0 * noise_lsb
    return table


class _Esp32Range:
    """One attenuation of the ESP32 ADC, for one chip (its true Vref and
    offset): the voltage-to-code transfer and the eFuse calibration."""

    def __init__(self, m, a, vref_mv, offset_err_mv, efuse_vref_mv):
        self.name = a["name"]
        scale = a["scale"]
        self.lsb_mv = vref_mv * scale / 65536.0 / 4096.0
        self.off_mv = a["offset_mv"] + offset_err_mv
        self.k = 1000.0 / self.lsb_mv  # codes per volt
        self.c = -self.off_mv / self.lsb_mv
        self.lo_mv = a["linear_mv"][0]
        self.zero_mv = a["zero_mv"]
        self.x_lo = (self.lo_mv - self.off_mv) / self.lsb_mv
        # Between zero_mv and the linear range the code rises as a power of
        # the input that meets the line with the same value and slope.
        self.knee_p = (self.lo_mv - self.zero_mv) / (self.lo_mv - self.off_mv)
        self.lut = a["lut"]
        if self.lut:
            self.x_hi = float(m["lut_raw_start"])
            self.top = self._top_curve(m, vref_mv, offset_err_mv)
        else:
            self.x_hi = 4095.0
            self.top = None
        # Calibration, as ESP-IDF computes it (integer arithmetic), from the
        # eFuse Vref and the nominal offset.
        self.cal_a = int(efuse_vref_mv) * scale // 4096
        self.cal_b = int(a["offset_mv"])
        self.efuse_vref = int(efuse_vref_mv)
        self.m = m
        self._mv = None

    def _top_curve(self, m, vref_mv, offset_err_mv):
        # This chip's raw -> mV above the linear range: ESP-IDF's table for its
        # Vref, blended from the line over the first step, shifted by the chip's
        # own offset error. Piecewise linear in raw; kept as (mV, raw) points.
        start = m["lut_raw_start"]
        step = m["lut_raw_step"]
        v0, v1 = m["lut_vref_mv"]
        w = (vref_mv - v0) / (v1 - v0)
        pts = [(self.off_mv + start * self.lsb_mv, float(start))]
        lo = m["lut_low_mv"]
        hi = m["lut_high_mv"]
        for i in range(1, len(lo)):
            mv = lo[i] + (hi[i] - lo[i]) * w + offset_err_mv
            pts.append((mv, float(start + i * step)))
        return pts

    def ends(self, x):
        """Code for a linear-model position x outside the linear range."""
        mv = self.off_mv + x * self.lsb_mv
        if mv <= self.zero_mv:
            return 0
        if mv < self.lo_mv:
            c = self.x_lo * ((mv - self.zero_mv) / (self.lo_mv - self.zero_mv)) ** self.knee_p
            return int(c + 0.5)
        if self.top is None:
            return 4095 if x >= 4095.0 else int(x + 0.5)
        pts = self.top
        for k in range(1, len(pts)):
            if mv < pts[k][0]:
                m0, r0 = pts[k - 1]
                m1, r1 = pts[k]
                c = r0 + (mv - m0) * (r1 - r0) / (m1 - m0)
                return 4095 if c >= 4095.0 else int(c + 0.5)
        return 4095

    def mv_table(self):
        """code_to_mv for every code (built on first use: the calibration is a
        fixed function of the code)."""
        if self._mv is None:
            tab = array("H", bytes(2 * 4096))
            for c in range(4096):
                tab[c] = self.code_to_mv(c)
            self._mv = tab
        return self._mv

    def code_to_mv(self, code):
        """ESP-IDF esp_adc_cal_raw_to_voltage for this attenuation."""
        lin = (self.cal_a * code + 32768) // 65536 + self.cal_b
        if not self.lut or code < self.m["lut_raw_start"]:
            return lin
        m = self.m
        start = m["lut_raw_start"]
        step = m["lut_raw_step"]
        v0, v1 = int(m["lut_vref_mv"][0]), int(m["lut_vref_mv"][1])
        i = (code - start) // step
        if i + 1 >= len(m["lut_low_mv"]):
            i = len(m["lut_low_mv"]) - 2
        x2 = v1 - self.efuse_vref
        x1 = self.efuse_vref - v0
        y2 = (i + 1) * step + start - code
        y1 = code - (i * step + start)
        lo = m["lut_low_mv"]
        hi = m["lut_high_mv"]
        v = lo[i] * x2 * y2 + hi[i] * x1 * y2 + lo[i + 1] * x2 * y1 + hi[i + 1] * x1 * y1
        v = (v + (v1 - v0) * step // 2) // ((v1 - v0) * step)
        if code <= start + step:
            d = code - start
            return (lin * step + v * d - lin * d + step // 2) // step
        return v


class Esp32Adc:
    """ESP32 (classic) ADC1, 12 bits, per attenuation (ADC.ATTN_*): the
    chip's true transfer (its own Vref and offset: the gain and offset error
    of this unit) with a zero clip and a bend at the bottom, the non-linear
    top at 11 dB, and input noise. read_uv applies ESP-IDF's calibration
    from the eFuse Vref (7 mV steps, so a residual remains) and returns
    whole millivolts times 1000, as MicroPython's ESP32 port does."""

    u16_scaled = False

    def __init__(self, m, vref_mv, offset_err_mv=0.0, noise_lsb=None, seed=1):
        step = m["efuse_vref_step_mv"]
        nominal = m["vref_mv"]
        efuse = nominal + step * int((vref_mv - nominal) / step + (0.5 if vref_mv >= nominal else -0.5))
        self.vref_mv = vref_mv
        self.efuse_vref_mv = efuse
        self.ranges = [_Esp32Range(m, a, vref_mv, offset_err_mv, efuse) for a in m["atten"]]
        self.noise_lsb = m["noise_lsb"] if noise_lsb is None else noise_lsb
        self._noise = _noise_table(self.noise_lsb, seed)
        self._ni = 0
        self.max_code = 4095

    def convert(self, volts, atten=0):
        r = self.ranges[atten]
        x = volts * r.k + r.c + self._noise[self._ni]
        ni = self._ni + 1
        self._ni = ni if ni < _NOISE_TABLE else 0
        if r.x_lo <= x <= r.x_hi:
            return int(x + 0.5)
        return r.ends(x)

    def read_uv(self, code, atten=0):
        return self.ranges[atten].mv_table()[code] * 1000


class Rp2040Adc:
    """RP2040 ADC: 12 bits against the 3.3 V reference, input noise, an
    offset, and the wide codes of erratum RP2040-E11 (each of dnl_codes spans
    1 + dnl_width LSB of input, so every code above it reads that much low).
    read_u16 scales as the rp2 port does (raw * 65535 // 4095). The rp2 port
    has no read_uv."""

    u16_scaled = True

    def __init__(self, m, vref_v, offset_lsb=None, noise_lsb=None, dnl_width=None, seed=1):
        self.vref_v = vref_v
        self.offset_lsb = m["offset_lsb"] if offset_lsb is None else offset_lsb
        self.noise_lsb = m["noise_lsb"] if noise_lsb is None else noise_lsb
        self.dnl_width = m["dnl_width_lsb"] if dnl_width is None else dnl_width
        self.dnl_codes = tuple(m["dnl_codes"])
        self.k = 4096.0 / vref_v
        self.c = self.offset_lsb + 0.5  # + 0.5: round to the nearest input step
        n = 4096 + len(self.dnl_codes) * self.dnl_width
        lut = array("H", bytes(2 * n))
        j = 0
        for code in range(4096):
            w = 1 + self.dnl_width if code in self.dnl_codes else 1
            for _ in range(w):
                lut[j] = code
                j += 1
        self._map = lut
        self._n = n
        self._noise = _noise_table(self.noise_lsb, seed)
        self._ni = 0
        self.max_code = 4095

    def convert(self, volts, atten=0):
        x = volts * self.k + self.c + self._noise[self._ni]
        ni = self._ni + 1
        self._ni = ni if ni < _NOISE_TABLE else 0
        if x < 0.0:
            return 0
        i = int(x)
        if i >= self._n:
            return 4095
        return self._map[i]

    def read_uv(self, code, atten=0):
        raise AttributeError("'ADC' object has no attribute 'read_uv' (rp2 port)")


class StuckAdc:
    """A failed ADC that returns one code whatever its input."""

    def __init__(self, inner, code):
        self.inner = inner
        self.code = code
        self.u16_scaled = inner.u16_scaled
        self.max_code = inner.max_code

    def convert(self, volts, atten=0):
        return self.code

    def read_uv(self, code, atten=0):
        return self.inner.read_uv(code, atten)


# ----------------------------------------------------------------- board

class Hardware:
    """The simulated board: pin -> channel map, one ADC, one trace, the timers
    the firmware started, and the CPU-time model."""

    def __init__(self):
        self.trace = None
        self.adc_model = None  # the board's ADC, set by configure()
        self.pins = {}  # pin id -> channel (volts(t_us))
        self.timers = []
        self.adc_reads = 0
        self.idle_calls = 0
        self.unique_id = b"\x00\x00\x00\x00\x00\x01"
        self.rtc_epoch = 1767225600  # 2026-01-01T00:00:00Z unless set
        self.max_sim_s = 0  # 0: until the trace ends
        self.heap_live_peak = 0  # bytes live after a collection, highest seen
        self.read_us = 0  # board time one ADC read takes (the channel pair delay)
        # CPU model: 0 = off (the firmware's processing takes no board time).
        self.cpu_slowdown = 0.0
        self._ret_us = None  # host ticks when idle() last returned (CPU model on)
        self._ret_s = 0.0  # and the interpreter's CPU seconds then
        self.cpu_us = 0  # board time charged for the firmware's processing
        self.busy_fired = 0  # timer callbacks that interrupted processing
        self.late_fired = 0  # callbacks that ran after their due instant
        self.late_max_us = 0

    def reset(self):
        """Power-on state: clock at 0, no timers, counters cleared (for running
        several boards one after another in one interpreter)."""
        clock.now_us = 0
        self.timers = []
        self.adc_reads = 0
        self.idle_calls = 0
        self._ret_us = None
        self.cpu_us = 0
        self.busy_fired = 0
        self.late_fired = 0
        self.late_max_us = 0

    def configure(self, trace, adc_model, pins, rtc_epoch=None, unique_id=None,
                  cpu_slowdown=None, read_us=None):
        self.trace = trace
        self.adc_model = adc_model
        self.pins = pins
        if rtc_epoch is not None:
            self.rtc_epoch = rtc_epoch
        if unique_id is not None:
            self.unique_id = unique_id
        if cpu_slowdown is not None:
            self.cpu_slowdown = float(cpu_slowdown)
        self.read_us = read_us or 0

    def read_code(self, pin_id, atten=0):
        self.adc_reads += 1
        ch = self.pins.get(pin_id)
        # A pin with nothing simulated on it reads 0 V.
        code = self.adc_model.convert(ch.volts(clock.now_us) if ch is not None else 0.0, atten)
        if self.read_us:
            clock.now_us += self.read_us
        return code

    def read_uv(self, pin_id, atten=0):
        self.adc_reads += 1
        ch = self.pins.get(pin_id)
        m = self.adc_model
        code = m.convert(ch.volts(clock.now_us) if ch is not None else 0.0, atten)
        if self.read_us:
            clock.now_us += self.read_us
        return m.read_uv(code, atten)

    def probe_heap(self):
        gc.collect()
        a = gc.mem_alloc()
        if a > self.heap_live_peak:
            self.heap_live_peak = a

    # -- time

    def pending_cpu_us(self):
        """Board time the firmware has used since idle() last returned, not
        yet charged to the clock."""
        if self._ret_us is None or not self.cpu_slowdown:
            return 0
        return self._busy_us()

    def _busy_us(self):
        us = _rtime.ticks_diff(_rtime.ticks_us(), self._ret_us)
        if _cpu_s is not None:
            cap = (_cpu_s() - self._ret_s) * 1000000.0 + _CPU_STEP_US
            if us > cap:
                us = cap
        return int(us * self.cpu_slowdown)

    def _mark(self):
        self._ret_us = _rtime.ticks_us()
        if _cpu_s is not None:
            self._ret_s = _cpu_s()

    def _earliest(self):
        best = None
        for t in self.timers:
            if t.active and (best is None or t.due_us < best.due_us):
                best = t
        return best

    def _check_end(self, due_us):
        tr = self.trace
        if tr is not None and tr.end_us is not None and due_us > tr.end_us:
            raise TraceEnd()

    def _fire(self, t):
        late = clock.now_us - t.due_us
        if late > 0:
            self.late_fired += 1
            if late > self.late_max_us:
                self.late_max_us = late
        if t.periodic:
            t.due_us += t.period_us
        else:
            t.active = False
        if t.callback is not None:
            t.callback(t.owner)

    def _charge(self, busy_us):
        """The firmware computed for busy_us of board time: interrupts that
        fell due meanwhile ran at their instants, each delaying the rest of
        the work by its own duration."""
        self.cpu_us += busy_us
        end = clock.now_us + busy_us
        while True:
            t = self._earliest()
            if t is None or t.due_us > end:
                break
            self._check_end(t.due_us)
            if t.due_us > clock.now_us:
                clock.advance_to(t.due_us)
            t0 = clock.now_us
            self.busy_fired += 1
            self._fire(t)
            end += clock.now_us - t0
        clock.advance_to(end)

    def idle(self):
        """Wait for the next interrupt: charge the processing done since the
        last wait, then advance to the earliest timer and fire it."""
        if self._ret_us is not None:
            busy = self._busy_us()
            if busy > 0:
                self._charge(busy)
        self.idle_calls += 1
        if self.idle_calls % _HEAP_PROBE_IDLES == 0:
            self.probe_heap()
        if self.max_sim_s and clock.now_us >= self.max_sim_s * 1000000:
            raise TraceEnd()
        best = self._earliest()
        if best is None:
            clock.advance(1000)
        else:
            self._check_end(best.due_us)
            clock.advance_to(best.due_us)
            self._fire(best)
        if self.cpu_slowdown:
            self._mark()


hw = Hardware()


def true_unix():
    """The true (UTC) unix time now, as the world outside the board sees it:
    the board's counter runs `hw.clock_ppm` fast, so true elapsed time is its
    reading divided by (1 + ppm). The network's DeviceTimeAns answers with
    this, not with the host clock. Both attributes are optional on `hw`
    (defaults: the RTC's boot epoch, a perfect crystal)."""
    epoch = getattr(hw, "true_epoch", hw.rtc_epoch)
    ppm = getattr(hw, "clock_ppm", 0)
    return epoch + ticks_us() / 1000000.0 / (1.0 + ppm * 1e-6)


class SimTimer:
    def __init__(self, owner):
        self.owner = owner
        self.active = False
        self.periodic = True
        self.period_us = 0
        self.due_us = 0
        self.callback = None

    def start(self, period_us, periodic, callback):
        self.period_us = period_us
        self.periodic = periodic
        self.callback = callback
        self.due_us = clock.now_us + period_us
        self.active = True
        if self not in hw.timers:
            hw.timers.append(self)

    def stop(self):
        self.active = False
        if self in hw.timers:
            hw.timers.remove(self)
