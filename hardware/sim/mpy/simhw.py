# Simulated meter hardware, MicroPython side: the clock, the current clamp and
# voltage transformer front end, the ADC, and timers.
#
# The `machine` shim (sim_machine.py) is a thin facade over this module. The
# simulation has its own hardware clock: it advances only when the firmware
# waits for hardware (`machine.idle()`), by exactly one timer period at a time,
# and fires the timer callback as the interrupt would. So a meter simulated
# for an hour runs in seconds, deterministically, and the firmware cannot tell:
# on a board `idle()` also returns at the next interrupt. With `speed` > 0 the
# clock is held back to `speed` times real time (the demo runs in real time or
# a multiple of it so the modem and gateway see a realistic pace).
#
# Everything here runs in the MicroPython unix port; nothing here is firmware.

import gc
from array import array
import time as _rtime

_NOISE_TABLE = 4093  # prime, so the noise does not lock to the mains period
_HEAP_PROBE_IDLES = 200000


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


# ------------------------------------------------------------ trace source

class TraceSource:
    """Streams a CSV trace `t_s,current_a[,voltage_v]` (any sample rate) and
    answers the instantaneous value at any later instant by linear
    interpolation between the two surrounding rows. Memory stays constant
    whatever the trace length: only two rows are held."""

    def __init__(self, path, loop=False, t_offset=0.0):
        self.path = path
        self.loop = loop
        self.t_offset = t_offset
        self._f = None
        self.has_voltage = False
        self.rows = 0
        self._open()
        # Simulation time 0 is the trace's first row.
        self.t_offset = t_offset + self.start_s

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
        self._t0, self._i0, self._v0 = self._next_row()
        self._t1, self._i1, self._v1 = self._next_row()
        if self._t1 is None:
            raise ValueError("%s: a trace needs at least two rows" % self.path)
        self.start_s = self._t0
        self.duration_s = None

    def _next_row(self):
        line = self._f.readline()
        while line and not line.strip():
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
            raise ValueError("%s line %d: expected numbers, got %r"
                             % (self.path, self._line, line.strip()))
        self.rows += 1
        return t, i, v

    def at(self, t):
        """(current_a, voltage_v) at trace time t (seconds)."""
        t -= self.t_offset
        while t > self._t1:
            t2, i2, v2 = self._next_row()
            if t2 is None:
                if not self.loop:
                    raise TraceEnd()
                # Wrap: the trace repeats with its own period.
                period = self._t1 - self.start_s
                self.t_offset += period
                t -= period
                self._open()
                continue
            if t2 <= self._t1:
                raise ValueError("%s line %d: time %r does not increase"
                                 % (self.path, self._line, t2))
            self._t0, self._i0, self._v0 = self._t1, self._i1, self._v1
            self._t1, self._i1, self._v1 = t2, i2, v2
        if t <= self._t0:
            return self._i0, self._v0
        w = (t - self._t0) / (self._t1 - self._t0)
        return (self._i0 + (self._i1 - self._i0) * w,
                self._v0 + (self._v1 - self._v0) * w)


# ------------------------------------------------------ analog front end

class FrontEnd:
    """What the ADC pin sees: sensor output in volts riding on a DC bias.

    kind 'ct': a current transformer with burden, volts = amps * v_per_a.
    kind 'vt': a voltage transformer module, volts = mains volts * v_per_v.
    """

    def __init__(self, kind, gain, bias_v):
        self.kind = kind
        self.gain = gain
        self.bias_v = bias_v


class AdcModel:
    """A 12-bit successive-approximation ADC: full-scale voltage, gaussian-ish
    noise (sum of uniforms), clipping, optional dead zone near 0 V (ESP32)."""

    def __init__(self, bits=12, vfs=3.3, noise_lsb=0.5, dead_v=0.0, seed=1):
        self.bits = bits
        self.max_code = (1 << bits) - 1
        self.vfs = vfs
        self.noise_lsb = noise_lsb
        self.dead_v = dead_v
        self.conversion_us = 0
        # Noise comes from a fixed table of approximately gaussian values
        # (Irwin-Hall sums of 3 uniforms from a Park-Miller generator):
        # deterministic, and one index step per conversion.
        rng = seed & 0x7FFFFFFF or 1
        table = array("f", bytes(4 * _NOISE_TABLE))
        for k in range(_NOISE_TABLE):
            acc = 0.0
            for _ in range(3):
                rng = (rng * 48271) % 0x7FFFFFFF
                acc += rng / 0x7FFFFFFF
            table[k] = (acc - 1.5) * 2.0 * noise_lsb
        self._noise = table
        self._ni = 0

    def convert(self, volts):
        if volts <= self.dead_v:
            return 0
        x = volts / self.vfs * self.max_code
        if self.noise_lsb:
            x += self._noise[self._ni]
            self._ni = (self._ni + 1) % _NOISE_TABLE
        code = int(x + 0.5)
        if code < 0:
            return 0
        if code > self.max_code:
            return self.max_code
        return code


class Hardware:
    """The simulated board: pin -> (front end, channel) map, one ADC model,
    one trace, and the timers the firmware started."""

    def __init__(self):
        self.trace = None
        self.adc_model = AdcModel()
        self.pins = {}  # pin id -> FrontEnd
        self.timers = []
        self.adc_reads = 0
        self.idle_calls = 0
        self.unique_id = b"\x00\x00\x00\x00\x00\x01"
        self.rtc_epoch = 1767225600  # 2026-01-01T00:00:00Z unless set
        self.max_sim_s = 0  # 0: until the trace ends
        self.heap_live_peak = 0  # bytes live after a collection, highest seen

    def configure(self, trace, adc_model, pins, rtc_epoch=None, unique_id=None):
        self.trace = trace
        self.adc_model = adc_model
        self.pins = pins
        if rtc_epoch is not None:
            self.rtc_epoch = rtc_epoch
        if unique_id is not None:
            self.unique_id = unique_id

    def read_code(self, pin_id):
        fe = self.pins.get(pin_id)
        self.adc_reads += 1
        if fe is None:
            # An unconnected pin floats near the bias of nothing: read noise at 0 V.
            return self.adc_model.convert(0.0)
        t = clock.now_us / 1000000
        i, v = self.trace.at(t)
        x = i if fe.kind == "ct" else v
        code = self.adc_model.convert(fe.bias_v + x * fe.gain)
        if self.adc_model.conversion_us:
            clock.advance(self.adc_model.conversion_us)
        return code

    def code_to_uv(self, code):
        return int(code * self.adc_model.vfs / self.adc_model.max_code * 1000000)

    def probe_heap(self):
        gc.collect()
        a = gc.mem_alloc()
        if a > self.heap_live_peak:
            self.heap_live_peak = a

    def idle(self):
        """Wait for the next interrupt: advance to the earliest timer and fire it."""
        self.idle_calls += 1
        if self.idle_calls % _HEAP_PROBE_IDLES == 0:
            self.probe_heap()
        if self.max_sim_s and clock.now_us >= self.max_sim_s * 1000000:
            raise TraceEnd()
        best = None
        for t in self.timers:
            if t.active and (best is None or t.due_us < best.due_us):
                best = t
        if best is None:
            clock.advance(1000)
            return
        clock.advance_to(best.due_us)
        if best.periodic:
            best.due_us += best.period_us
        else:
            best.active = False
        if best.callback is not None:
            best.callback(best.owner)


hw = Hardware()


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
