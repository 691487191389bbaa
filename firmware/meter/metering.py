# The metering core: RMS current, RMS voltage, power from blocks of ADC codes.
#
# Pure arithmetic, no hardware: it runs the same on a board, in the simulator
# and in the tests.
#
# Arithmetic that holds on the targets (31-bit small ints, float32):
#  * codes are taken relative to the nominal bias code, so deviations stay
#    within +-4095 and a square within 2**24;
#  * integer sums run over at most one mains cycle (<= 255 samples, so a sum
#    of squares stays below 2**30) and are then folded into float sums;
#  * the DC offset is removed at the end of the block from the sums
#    themselves (var = E[x^2] - E[x]^2), so there is no settling filter and no
#    settling bias;
#  * the ADC's own noise variance is subtracted in quadrature.

from math import sqrt

from micropython import const

_MAX_CHUNK = const(255)


class BlockResult:
    def __init__(self):
        self.n = 0
        self.dt_s = 0.0
        self.irms = 0.0
        self.vrms = 0.0
        self.p_w = 0.0
        self.voltage_measured = False


class Metering:
    """Turns blocks of samples into RMS values and power.

    a_per_count / v_per_count: amperes (volts at the mains) per ADC count.
    v_nominal: the configured mains voltage, used for apparent power when no
    voltage channel is fitted.
    """

    def __init__(self, sample_hz, mains_hz, mid_code, a_per_count, v_per_count,
                 v_nominal, noise_var=0.0):
        self.sample_hz = sample_hz
        chunk = sample_hz // mains_hz
        if chunk > _MAX_CHUNK:
            chunk = _MAX_CHUNK
        self.chunk = chunk
        self.mid = mid_code
        self.a_per_count = a_per_count
        self.v_per_count = v_per_count
        self.v_nominal = v_nominal
        self.noise_var = noise_var
        self.result = BlockResult()

    def process(self, bi, bv, off, n):
        mid = self.mid
        chunk = self.chunk
        fx = 0.0
        fxx = 0.0
        fy = 0.0
        fyy = 0.0
        fxy = 0.0
        k = off
        end = off + n
        while k < end:
            stop = k + chunk
            if stop > end:
                stop = end
            sx = 0
            sxx = 0
            if bv is None:
                while k < stop:
                    d = bi[k] - mid
                    sx += d
                    sxx += d * d
                    k += 1
            else:
                sy = 0
                syy = 0
                sxy = 0
                while k < stop:
                    d = bi[k] - mid
                    e = bv[k] - mid
                    sx += d
                    sxx += d * d
                    sy += e
                    syy += e * e
                    sxy += d * e
                    k += 1
                fy += sy
                fyy += syy
                fxy += sxy
            fx += sx
            fxx += sxx
        r = self.result
        r.n = n
        r.dt_s = n / self.sample_hz
        mx = fx / n
        var_i = fxx / n - mx * mx - self.noise_var
        if var_i < 0.0:
            var_i = 0.0
        r.irms = sqrt(var_i) * self.a_per_count
        if bv is None:
            r.voltage_measured = False
            r.vrms = self.v_nominal
            r.p_w = r.irms * self.v_nominal
        else:
            r.voltage_measured = True
            my = fy / n
            var_v = fyy / n - my * my
            if var_v < 0.0:
                var_v = 0.0
            r.vrms = sqrt(var_v) * self.v_per_count
            r.p_w = (fxy / n - mx * my) * self.a_per_count * self.v_per_count
        return r


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
