# Per-meter calibration: what one-point calibration with a known load found
# for this unit, on top of the clamp model's nominal table.
#
# Stored in cal.json on the meter's flash (atomically). The technician's CLI
# calls `Calibrator` through the app: switch on a known load (a 2 kW kettle
# is ideal: resistive, steady), give its power (or current), wait a few
# seconds of metering, save.

import json

from meter import store

PATH = "cal.json"

DEFAULTS = {"gain_i": 1.0, "gain_v": 1.0, "phase_deg": 0.0, "noise_var": -1.0}


def load(path=PATH):
    cal = dict(DEFAULTS)
    if store.exists(path):
        d = json.loads(store.read(path))
        for k in DEFAULTS:
            if k in d:
                cal[k] = float(d[k])
    return cal


def save(cal, path=PATH):
    store.write_atomic(path, json.dumps(cal).encode())


class CalibrationError(ValueError):
    pass


class Calibrator:
    """Collects metering windows while a known load runs, then computes the
    new gains. Feed it every window (`add`); `result()` when enough time has
    passed.

    known_w: the load's real power (W). With a voltage channel the current
    gain is set so measured real power matches; without one, so that
    apparent power at the configured voltage matches.
    known_a: alternatively, the load's current (A) from a reference meter.
    known_v: with a voltage channel, the mains voltage from a reference meter
    (sets the voltage gain).
    resistive: the load's power factor is 1, so any measured phase angle is
    a phase error of this unit and is calibrated out (voltage channel only).
    """

    def __init__(self, cal, known_w=0.0, known_a=0.0, known_v=0.0, resistive=True):
        if known_w <= 0.0 and known_a <= 0.0:
            raise CalibrationError("give the known load's power (W) or current (A)")
        self.cal = cal
        self.known_w = known_w
        self.known_a = known_a
        self.known_v = known_v
        self.resistive = resistive
        self.t = 0.0
        self.si = 0.0
        self.sv = 0.0
        self.sp = 0.0
        self.sq = 0.0
        self.status = 0

    def add(self, w, has_v):
        self.t += w.dt_s
        self.si += w.irms * w.dt_s
        self.sv += w.vrms * w.dt_s
        self.sp += w.p_w * w.dt_s
        self.sq += w.q_var * w.dt_s
        self.status |= w.status
        self.has_v = has_v

    def result(self):
        from math import atan2, degrees
        if self.t <= 0.0:
            raise CalibrationError("no metering data collected")
        if self.status:
            raise CalibrationError("the input was faulty during calibration (status 0x%02x)"
                                   % self.status)
        i = self.si / self.t
        v = self.sv / self.t
        p = self.sp / self.t
        q = self.sq / self.t
        if i <= 0.0:
            raise CalibrationError("no current measured: is the load on and the clamp plugged in?")
        cal = dict(self.cal)
        gain_v = 1.0
        if self.has_v and self.known_v > 0.0:
            gain_v = self.known_v / v
            cal["gain_v"] = cal["gain_v"] * gain_v
        if self.has_v and self.resistive:
            cal["phase_deg"] = cal["phase_deg"] + degrees(atan2(q, p))
        if self.known_a > 0.0:
            gain_i = self.known_a / i
        elif self.has_v:
            s = (p * p + q * q) ** 0.5 * gain_v
            # With the phase calibrated out, the known real power is the apparent power.
            gain_i = self.known_w / (s if self.resistive else p * gain_v)
        else:
            gain_i = self.known_w / (i * v)
        if not 0.8 < gain_i < 1.25:
            raise CalibrationError("current gain %.3f is more than 20 %% off: wrong clamp model, "
                                   "burden or known load?" % gain_i)
        cal["gain_i"] = cal["gain_i"] * gain_i
        return cal
