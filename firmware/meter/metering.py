# The metering core: samples in, RMS current and voltage, real or apparent
# power, power factor and energy out. Pure arithmetic, no hardware: it runs
# the same on a board, in the simulator and in the tests.
#
# Whole mains cycles. Windows hold an integer number of cycles of the mains
# frequency as it is now: positive-going crossings of the reference channel
# (the voltage when fitted, else the current when it is strong enough) give
# the period; each window's length in samples is recomputed from it, so the
# windows track 45-65 Hz. Every sample belongs to exactly one window: energy
# is integrated over all of them (continuous metering), the window only sets
# what RMS and power are computed over.
#
# Arithmetic that holds on the targets (31-bit small ints, float32):
#  * samples are taken relative to the nominal bias, so a deviation is at most
#    `max_dev` units and its square at most max_dev**2;
#  * integer sums run over chunks short enough that chunk * max_dev**2 stays
#    below 2**30 (so they stay small ints on a 32-bit port), then fold into
#    float sums;
#  * the float sums of one window hold at most a few thousand chunks, so
#    float32's 24-bit mantissa keeps their relative error near 1e-6
#    (tests/firmware/test_metering.py checks this under emulated float32);
#  * the DC offset is removed at the end of each window from the sums
#    themselves (var = E[x^2] - E[x]^2): no settling filter, no settling bias;
#  * the ADC's own noise variance is subtracted in quadrature.
#
# Phase. Current and voltage are not sampled at the same instant, the clamp
# advances the current (a few degrees, more at low current) and the voltage
# module shifts its output. With the zero-lag and one-sample-lag products
# C0 = mean(i[k] v[k]) = A cos(phi) and C1 = mean(i[k] v[k-1]) = A cos(phi + wT)
# the power at any corrected angle is exact for the fundamental:
#     P = C0 cos(theta) + sin(theta) (C0 cos(wT) - C1) / sin(wT).

from math import cos, pi, sin, sqrt

from micropython import const

_I30 = const(0x3FFFFFFF)
_MAX_CHUNK = const(255)
_MID_TRACK = const(256)  # how far the centre may follow the input's mean

# Status bits (the frame's flag bits use the same values; see meter/frame.py).
ST_CLIPPED = const(0x10)  # samples beyond the ADC's linear range, or the clamp over range
ST_FREQ_RANGE = const(0x20)  # mains frequency outside +-5 % of nominal
ST_ADC_FAULT = const(0x40)  # ADC stuck (no variation at all)
ST_CT_MISSING = const(0x02)  # input far from the bias: no clamp plugged in
ST_CT_REVERSED = const(0x04)  # real power negative on a meter not expecting export


def interp(table, x):
    """Linear interpolation in a table of (x, y) pairs sorted by x; flat beyond the ends."""
    if x <= table[0][0]:
        return table[0][1]
    for k in range(1, len(table)):
        x1, y1 = table[k]
        if x <= x1:
            x0, y0 = table[k - 1]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return table[-1][1]


class Window:
    """The latest whole-cycles window."""

    def __init__(self):
        self.n = 0
        self.dt_s = 0.0
        self.irms = 0.0
        self.vrms = 0.0
        self.p_w = 0.0
        self.q_var = 0.0
        self.s_va = 0.0
        self.pf = 1.0
        self.hz = 0.0
        self.status = 0


class Metering:
    """Turns a stream of sample blocks into windows, energy and interval sums.

    Units: samples are ADC units (board-specific); a_per_unit / v_per_unit
    convert to amperes at the clamp's primary / volts at the mains, before the
    clamp's ratio-error table and the calibration gains.
    """

    def __init__(self, sample_hz, mains_hz, mid_i, mid_v, a_per_unit, v_per_unit,
                 v_nominal, noise_var, max_dev, lin_lo, lin_hi, cycles=10,
                 ct_table=None, table_hz=50, pair_us=0, vt_lead_deg=0.0, phase_cal_deg=0.0,
                 gain_i=1.0, gain_v=1.0, i_start=0.0, expect_export=True, i_max=0.0):
        self.fs = sample_hz
        self.f_nom = mains_hz
        self.f_est = float(mains_hz)
        self.cycles = cycles
        self.mid_i = mid_i
        self.mid_v = mid_v
        self._nom_i = mid_i
        self._nom_v = mid_v
        self.a_per_unit = a_per_unit
        self.v_per_unit = v_per_unit
        self.v_nominal = v_nominal
        self.noise_var = noise_var
        self.lin_lo = lin_lo
        self.lin_hi = lin_hi
        # (amps, ratio error %, phase lead degrees), from the clamp model.
        self.ct_table = ct_table or ((0.0, 0.0, 0.0),)
        self._ratio_tab = [(r[0], r[1]) for r in self.ct_table]
        self._lead_tab = [(r[0], r[2]) for r in self.ct_table]
        # Phase: the clamp's lead (table, at table_hz) and the voltage
        # module's lead come from magnetising inductance and scale as 1/f;
        # the delay between the current and the voltage sample is a time.
        self.table_hz = table_hz
        self.pair_us = pair_us
        self.vt_lead_deg = vt_lead_deg
        self.phase_cal_deg = phase_cal_deg
        self.gain_i = gain_i
        self.gain_v = gain_v
        self.i_start = i_start
        self.i_max = i_max  # above it the clamp saturates: flagged as clipped
        self.expect_export = expect_export
        max_dev += _MID_TRACK
        chunk = _I30 // (max_dev * max_dev)
        self.chunk = chunk if chunk < _MAX_CHUNK else _MAX_CHUNK
        self.window = Window()
        self._win_len = self._length()
        self._reset_window()
        # Crossing detector on the reference channel.
        self._below = False
        self._hyst = 0  # 0: detector off until a window shows enough signal
        self._ref_mid = mid_v
        self._prev_e = 0
        self.reset_interval()
        self.windows = 0
        self.on_window = None  # e.g. a Calibrator while one runs

    def _track(self, mid, mean, nominal):
        m = int(mid + mean + (0.5 if mean >= 0.0 else -0.5))
        if m > nominal + _MID_TRACK:
            return nominal + _MID_TRACK
        if m < nominal - _MID_TRACK:
            return nominal - _MID_TRACK
        return m

    def _length(self):
        n = int(self.cycles * self.fs / self.f_est + 0.5)
        return n if n > 1 else 2

    def _reset_window(self):
        self._n = 0
        self._fx = 0.0
        self._fxx = 0.0
        self._fy = 0.0
        self._fyy = 0.0
        self._fxy = 0.0
        self._fxy1 = 0.0
        self._lo = 1 << 20
        self._hi = -(1 << 20)
        self._zc_first = -1
        self._zc_last = -1
        self._zc_n = 0

    def reset_interval(self):
        self.iv_t = 0.0
        self.iv_i2 = 0.0
        self.iv_v2 = 0.0
        self.iv_p = 0.0
        self.iv_s = 0.0
        self.iv_hz = 0.0
        self.iv_status = 0

    # -------------------------------------------------------------- samples

    def process(self, bi, bv, off, n, registers):
        """Consume n samples from offset off; close every window that fills;
        add each window's energy to `registers`."""
        k = off
        end = off + n
        while k < end:
            stop = k + self.chunk
            left = self._win_len - self._n
            if stop - k > left:
                stop = k + left
            if stop > end:
                stop = end
            if bv is None:
                self._chunk_i(bi, k, stop)
            else:
                self._chunk_iv(bi, bv, k, stop)
            self._n += stop - k
            k = stop
            if self._n >= self._win_len:
                self._close_window(registers, bv is not None)

    # The per-sample loops below are the meter's hot path: each variant does
    # only what its case needs (with or without the crossing detector, with
    # or without the voltage channel) rather than testing per sample.

    def _chunk_i(self, bi, k, stop):
        mid = self.mid_i
        sx = 0
        sxx = 0
        lo = self._lo
        hi = self._hi
        h = self._hyst
        base = self._n - k
        if h:
            ref = self._ref_mid
            up = ref + h
            down = ref - h
            below = self._below
            while k < stop:
                x = bi[k]
                d = x - mid
                sx += d
                sxx += d * d
                if x < lo:
                    lo = x
                if x > hi:
                    hi = x
                if below:
                    if x > up:
                        below = False
                        self._crossing(base + k)
                elif x < down:
                    below = True
                k += 1
            self._below = below
        else:
            while k < stop:
                x = bi[k]
                d = x - mid
                sx += d
                sxx += d * d
                if x < lo:
                    lo = x
                if x > hi:
                    hi = x
                k += 1
        self._lo = lo
        self._hi = hi
        self._fx += sx
        self._fxx += sxx

    def _chunk_iv(self, bi, bv, k, stop):
        mid_i = self.mid_i
        mid_v = self.mid_v
        sx = 0
        sxx = 0
        sy = 0
        syy = 0
        sxy = 0
        sxy1 = 0
        lo = self._lo
        hi = self._hi
        pe = self._prev_e
        base = self._n - k
        h = self._hyst if self._hyst else 1 << 20
        up = self._ref_mid + h
        down = self._ref_mid - h
        below = self._below
        while k < stop:
            x = bi[k]
            d = x - mid_i
            y = bv[k]
            e = y - mid_v
            sx += d
            sxx += d * d
            sy += e
            syy += e * e
            sxy += d * e
            sxy1 += d * pe
            pe = e
            if x < lo:
                lo = x
            if x > hi:
                hi = x
            if below:
                if y > up:
                    below = False
                    self._crossing(base + k)
            elif y < down:
                below = True
            k += 1
        self._below = below
        self._prev_e = pe
        self._lo = lo
        self._hi = hi
        self._fx += sx
        self._fxx += sxx
        self._fy += sy
        self._fyy += syy
        self._fxy += sxy
        self._fxy1 += sxy1

    def _crossing(self, pos):
        if self._zc_first < 0:
            self._zc_first = pos
        self._zc_last = pos
        self._zc_n += 1

    # --------------------------------------------------------------- window

    def _close_window(self, registers, has_v):
        n = self._n
        w = self.window
        status = 0
        mx = self._fx / n
        var_i = self._fxx / n - mx * mx
        # Frequency from the crossings seen in this window (at least two
        # full periods), smoothed; a window without enough crossings keeps
        # the previous estimate.
        if self._zc_n >= 3:
            period = (self._zc_last - self._zc_first) / (self._zc_n - 1)
            if period > 0:
                f = self.fs / period
                if 0.7 * self.f_nom < f < 1.4 * self.f_nom:
                    d = f - self.f_est
                    # A step (first lock, or a real jump) is taken at once;
                    # small differences are smoothed against crossing jitter.
                    self.f_est = f if d > 0.3 or d < -0.3 else self.f_est + 0.3 * d
        if not 0.95 * self.f_nom <= self.f_est <= 1.05 * self.f_nom:
            status |= ST_FREQ_RANGE
        # Faults on the current input.
        if self._lo == self._hi:
            status |= ST_ADC_FAULT
        elif self._lo <= self.lin_lo or self._hi >= self.lin_hi:
            status |= ST_CLIPPED
        off = self.mid_i + mx - self._nom_i
        if off > 0.25 * self._nom_i or off < -0.25 * self._nom_i:
            status |= ST_CT_MISSING
        # RMS current, noise removed in quadrature, clamp ratio error and
        # calibration applied.
        v2 = var_i - self.noise_var
        irms = sqrt(v2) * self.a_per_unit * self.gain_i if v2 > 0.0 else 0.0
        ct_gain = 1.0 / (1.0 - interp(self._ratio_tab, irms) / 100.0)
        irms *= ct_gain
        if irms < self.i_start or status & (ST_CT_MISSING | ST_ADC_FAULT):
            irms = 0.0
        elif self.i_max and irms > self.i_max:
            status |= ST_CLIPPED
        # Crossing detector for the next window: on the voltage when fitted,
        # else on the current when it is well above the noise.
        if has_v:
            my = self._fy / n
            var_v = self._fyy / n - my * my
            amp = sqrt(var_v) if var_v > 0.0 else 0.0
            self._ref_mid = int(my + self.mid_v)
        else:
            my = 0.0
            var_v = 0.0
            amp = sqrt(var_i) if var_i > 0.0 else 0.0
            self._ref_mid = int(mx + self.mid_i)
        self._hyst = int(amp * 0.35) if amp > 12.0 else 0
        if has_v:
            vrms = sqrt(var_v) * self.v_per_unit * self.gain_v if var_v > 0.0 else 0.0
            if irms > 0.0:
                c0 = self._fxy / n - mx * my
                c1 = self._fxy1 / n - mx * my
                wt = 2.0 * pi * self.f_est / self.fs
                # The current looks early by the clamp's lead; it looks late
                # by the module's lead and by the pair delay (the voltage is
                # read after it).
                f = self.f_est
                deg = ((interp(self._lead_tab, irms) - self.vt_lead_deg) * self.table_hz / f
                       - 360.0 * f * self.pair_us / 1000000 + self.phase_cal_deg)
                theta = deg * (pi / 180.0)
                a_sin = (c0 * cos(wt) - c1) / sin(wt)
                scale = self.a_per_unit * self.v_per_unit * self.gain_i * self.gain_v * ct_gain
                ct = cos(theta)
                st = sin(theta)
                p = (c0 * ct + a_sin * st) * scale
                q = (a_sin * ct - c0 * st) * scale
            else:
                p = 0.0
                q = 0.0
            s = vrms * irms
            if p < -5.0 and not self.expect_export:
                status |= ST_CT_REVERSED
        else:
            vrms = self.v_nominal
            s = irms * vrms
            p = s
            q = 0.0
        dt = n / self.fs
        w.n = n
        w.dt_s = dt
        w.irms = irms
        w.vrms = vrms
        w.p_w = p
        w.q_var = q
        w.s_va = s
        w.pf = p / s if s > 0.0 else 1.0
        w.hz = self.f_est
        w.status = status
        registers.add(p, dt)
        self.iv_t += dt
        self.iv_i2 += irms * irms * dt
        self.iv_v2 += vrms * vrms * dt
        self.iv_p += p * dt
        self.iv_s += s * dt
        self.iv_hz += self.f_est * dt
        self.iv_status |= status
        # Centre the next window's integer sums on this window's mean, so
        # E[x^2] - E[x]^2 never cancels large numbers (float32 keeps ~7
        # digits); bounded so the integer sums keep their proven range.
        self.mid_i = self._track(self.mid_i, mx, self._nom_i)
        if has_v:
            self.mid_v = self._track(self.mid_v, my, self._nom_v)
        self.windows += 1
        if self.on_window is not None:
            self.on_window(w)
        self._win_len = self._length()
        self._reset_window()


class EnergyRegisters:
    """Cumulative import and export energy in 0.1 Wh with the fraction
    carried forward, so nothing is lost to rounding however small the
    steps. The registers only ever grow."""

    def __init__(self, import_dwh=0, export_dwh=0, carry_imp=0.0, carry_exp=0.0):
        self.import_dwh = import_dwh
        self.export_dwh = export_dwh
        self.carry_imp = carry_imp
        self.carry_exp = carry_exp

    def add(self, p_w, dt_s):
        e = p_w * dt_s / 360.0  # W*s -> 0.1 Wh
        if e >= 0.0:
            c = self.carry_imp + e
            whole = int(c)
            self.import_dwh += whole
            self.carry_imp = c - whole
        else:
            c = self.carry_exp - e
            whole = int(c)
            self.export_dwh += whole
            self.carry_exp = c - whole

    def import_wh(self):
        return (self.import_dwh + self.carry_imp) / 10

    def export_wh(self):
        return (self.export_dwh + self.carry_exp) / 10
