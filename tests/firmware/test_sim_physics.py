"""The simulated hardware (hardware/sim/mpy), measured the way a bench would measure a board:
known signals go into the trace, the simulated ADC's output comes back, and the clamp, the
filters and the ADCs must show the behaviour hardware/designs.json describes. Expected values
come from designs.json and first principles (circuit formulas, linear interpolation of the
clamp's table), never from the simulator's own output."""

import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DESIGNS = json.loads((REPO / "hardware" / "designs.json").read_text())

# A bench in MicroPython: set up one board from designs.json with overrides, sample pins with
# a timer at a chosen rate, and fit the fundamental.
BENCH = r"""
import json, sys
from array import array
from math import sin, cos, pi, sqrt, atan2
import simhw, boards_sim, sim_machine

def board(name, trace, over):
    simhw.hw.reset()
    hwc = boards_sim.hardware_for(name, over)
    boards_sim.setup(simhw.hw, hwc, simhw.TraceSource(trace))
    return hwc

def sample(pins, hz, n, atten=3, uv=False):
    adcs = [sim_machine.ADC(sim_machine.Pin(p), atten=atten) for p in pins]
    reads = [a.read_uv if uv else a.read_u16 for a in adcs]
    bufs = [array("i", bytes(4 * n)) for _ in pins]
    times = array("d", bytes(8 * n))
    state = [0]
    def isr(_):
        k = state[0]
        if k >= n:
            return
        times[k] = simhw.clock.now_us
        for j in range(len(reads)):
            bufs[j][k] = reads[j]() if uv else reads[j]() >> 4
        state[0] = k + 1
    t = sim_machine.Timer(-1)
    t.init(freq=hz, callback=isr)
    while state[0] < n:
        sim_machine.idle()
    t.deinit()
    return bufs, times

def fit(x, times, f, first, count):
    # Least squares over whole cycles: x = m + a sin(wt) + b cos(wt);
    # amplitude sqrt(a^2 + b^2), phase atan2(b, a) (degrees, + = leads sin(wt)).
    w = 2 * pi * f
    m = sum(x[first:first + count]) / count
    sa = sb = 0.0
    for k in range(first, first + count):
        t = times[k] * 1e-6
        sa += (x[k] - m) * sin(w * t)
        sb += (x[k] - m) * cos(w * t)
    a = 2 * sa / count
    b = 2 * sb / count
    return m, sqrt(a * a + b * b), atan2(b, a) * 180 / pi

def out(obj):
    print(json.dumps(obj))
"""

LSB_PICO = 3.3 / 4096  # RP2040 reference over 4096 steps (the unit's reference error set to 0)
IDEAL = {  # this unit without tolerances, so the clamp's own model is what is measured
    "ct_gain_error_pct": 0.0, "burden_error_pct": 0.0, "adc_ref_error_pct": 0.0,
    "adc_offset_mv": 0.0, "bias_error_pct": 0.0, "vt_gain_error_pct": 0.0,
}
NO_CPU = {"cpu_model": False}  # the bench's own loop is not firmware: no board time for it
IDEAL.update(NO_CPU)


def write_sine(path, seconds, amps=0.0, volts=0.0, f=50.0, rate=20000, phase_deg=0.0):
    """A clean sine trace, written here from first principles."""
    ph = math.radians(phase_deg)
    with open(path, "w") as fh:
        fh.write("t_s,current_a,voltage_v\n")
        for k in range(int(seconds * rate) + 1):
            t = k / rate
            s = math.sin(2 * math.pi * f * t + ph)
            fh.write(f"{t:.7f},{amps * math.sqrt(2) * s:.6f},{volts * math.sqrt(2) * s:.5f}\n")
    return str(path)


def run(mpy, code):
    return [json.loads(x) for x in mpy(BENCH + code, timeout=180).splitlines() if x.strip()]


def table_interp(table, amps, col):
    """Linear interpolation in the clamp's table, flat beyond the ends (the documented model)."""
    if amps <= table[0][0]:
        return table[0][col]
    for p, r in zip(table, table[1:]):
        if amps <= r[0]:
            return p[col] + (r[col] - p[col]) * (amps - p[0]) / (r[0] - p[0])
    return table[-1][col]


# ----------------------------------------------------------------- the clamp

CT = DESIGNS["ct_models"]["SCT013-000"]


@pytest.mark.parametrize("amps", [0.5, 1.0, 3.0, 20.0, 60.0, 100.0, 120.0])
def test_clamp_ratio_error_and_phase_lead_follow_its_table(mpy, tmp_path, amps):
    # Pick the burden so the ADC sees about 0.5 V rms whatever the current: the clamp's
    # errors, not the ADC's resolution, decide the result. No anti-alias filter, no DNL.
    burden = 0.5 * CT["turns"] / amps
    trace = write_sine(tmp_path / "t.csv", 0.6, amps=amps)
    over = dict(IDEAL, burden_ohm=burden, aa_r_ohm=0.0, dnl_width_lsb=0)
    (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(ci,), times = sample([hwc["pin_ct"]], 10000, 5000)
m, amp, ph = fit(ci, times, 50.0, 1000, 4000)
out({{"amp_v": amp * {LSB_PICO!r}, "phase": ph}})
""")
    ideal_peak_v = amps * math.sqrt(2) / CT["turns"] * burden
    ratio = r["amp_v"] / ideal_peak_v
    assert ratio == pytest.approx(1 - table_interp(CT["table"], amps, 1) / 100, abs=0.0005)
    assert r["phase"] == pytest.approx(table_interp(CT["table"], amps, 2), abs=0.03)


def test_phase_lead_scales_with_the_mains_period(mpy, tmp_path):
    """The table holds degrees at 50 Hz; the lead comes from the magnetising inductance, so at
    60 Hz it is 50/60 of the table's degrees."""
    trace = write_sine(tmp_path / "t.csv", 0.7, amps=20.0, f=60.0)
    over = dict(IDEAL, burden_ohm=50.0, aa_r_ohm=0.0, dnl_width_lsb=0, mains_hz=60)
    (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(ci,), times = sample([hwc["pin_ct"]], 10000, 6000)
m, amp, ph = fit(ci, times, 60.0, 1000, 5000)
out({{"phase": ph}})
""")
    assert r["phase"] == pytest.approx(table_interp(CT["table"], 20.0, 2) * 50 / 60, abs=0.03)


def test_clamp_saturates_softly_above_its_rating(mpy, tmp_path):
    knee_a = CT["saturation_knee_pct"] / 100 * CT["rated_a"]
    results = {}
    for amps in (120.0, 160.0):
        trace = write_sine(tmp_path / f"t{amps:.0f}.csv", 0.4, amps=amps)
        over = dict(IDEAL, burden_ohm=4.0, aa_r_ohm=0.0, dnl_width_lsb=0)
        (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(ci,), times = sample([hwc["pin_ct"]], 10000, 3000)
m, amp, ph = fit(ci, times, 50.0, 1000, 2000)
out({{"amp_v": amp * {LSB_PICO!r}, "top_v": (max(ci[1000:]) - m) * {LSB_PICO!r}}})
""")
        results[amps] = r
    v_per_a = 4.0 / CT["turns"]
    # 120 % of the rating peaks below the knee: only the table's ratio error.
    r = results[120.0]
    assert r["amp_v"] / (120.0 * math.sqrt(2) * v_per_a) == pytest.approx(
        1 - table_interp(CT["table"], 120.0, 1) / 100, abs=0.001)
    # 160 % peaks well above it: the fundamental falls short and the peaks are flattened,
    # never above the soft limit.
    r = results[160.0]
    assert r["amp_v"] / (160.0 * math.sqrt(2) * v_per_a) < 1 - table_interp(CT["table"], 160.0, 1) / 100 - 0.01
    soft = 1 + CT["saturation_soft_pct"] / 100
    assert r["top_v"] < soft * knee_a * math.sqrt(2) * v_per_a
    assert r["top_v"] < 0.97 * 160.0 * math.sqrt(2) * v_per_a


# --------------------------------------------------- filters and the voltage module

def test_anti_alias_rc_attenuates_and_delays_as_a_first_order_low_pass(mpy, tmp_path):
    """A 550 Hz current (a high harmonic) through the pico's RC, against the same build without
    the RC: the ratio of the two is the RC's response, 1/(1 + j w R C)."""
    f = 550.0
    trace = write_sine(tmp_path / "t.csv", 0.2, amps=5.0, f=f, rate=100000)
    aa = DESIGNS["builds"]["pico"]["anti_alias"]
    res = {}
    for label, r_ohm in (("rc", aa["r_ohm"]), ("none", 0.0)):
        over = dict(IDEAL, burden_ohm=60.0, aa_r_ohm=r_ohm, dnl_width_lsb=0)
        (res[label],) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(ci,), times = sample([hwc["pin_ct"]], {int(f * 20)}, {int(f * 20 * 0.15)})
n = {int(f * 20 * 0.1)}
m, amp, ph = fit(ci, times, {f!r}, len(ci) - n, n)
out({{"amp": amp, "phase": ph}})
""")
    wt = 2 * math.pi * f * aa["r_ohm"] * aa["c_f"]
    assert res["rc"]["amp"] / res["none"]["amp"] == pytest.approx(1 / math.sqrt(1 + wt * wt), abs=0.002)
    assert res["rc"]["phase"] - res["none"]["phase"] == pytest.approx(-math.degrees(math.atan(wt)), abs=0.2)


def test_voltage_module_gain_and_phase_include_its_coupling_network(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 0.6, volts=230.0)
    over = dict(IDEAL, aa_r_ohm=0.0, dnl_width_lsb=0)
    (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(cv,), times = sample([hwc["pin_vt"]], 10000, 5000)
m, amp, ph = fit(cv, times, 50.0, 1000, 4000)
out({{"amp_v": amp * {LSB_PICO!r}, "phase": ph}})
""")
    vt = DESIGNS["builds"]["pico"]["vt"]
    mod = DESIGNS["voltage_modules"][vt["module"]]
    x = 1 / (2 * math.pi * 50 * vt["couple_r_ohm"] * vt["couple_c_f"])  # high-pass, 1/(w R C)
    gain = mod["trim_v_rms"] / mod["at_mains_v_rms"] / math.sqrt(1 + x * x)
    assert r["amp_v"] == pytest.approx(230.0 * math.sqrt(2) * gain, rel=0.001)
    assert r["phase"] == pytest.approx(mod["phase_lead_deg"] + math.degrees(math.atan(x)), abs=0.03)


def test_voltage_is_sampled_one_read_after_the_current(mpy, tmp_path):
    """In one interrupt the current is read first; the voltage conversion happens the board's
    ADC pair delay later, and the trace is sampled at that later instant."""
    trace = write_sine(tmp_path / "t.csv", 0.6, volts=230.0)
    over = dict(IDEAL, aa_r_ohm=0.0, dnl_width_lsb=0)
    (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {over!r})
(cv,), t1 = sample([hwc["pin_vt"]], 10000, 5000)
m, amp, alone = fit(cv, t1, 50.0, 1000, 4000)
""" + f"""
hwc = board("pico", {trace!r}, {over!r})
(ci, cv), t2 = sample([hwc["pin_ct"], hwc["pin_vt"]], 10000, 5000)
m, amp, paired = fit(cv, t2, 50.0, 1000, 4000)
out({{"shift": paired - alone}})
""")
    pair_us = DESIGNS["builds"]["pico"]["adc_pair_us"]
    assert r["shift"] == pytest.approx(360 * 50 * pair_us * 1e-6, abs=0.02)


# ---------------------------------------------------------------------- ADCs

# A pin at a fixed voltage, through the real ADC path (machine.ADC -> board -> ADC model).
FIXED = r"""
class Fixed:
    def __init__(self, v):
        self.v = v
    def volts(self, t):
        return self.v

def read_at(hwc, volts, n=64, atten=3, uv=False):
    pin = hwc["pin_ct"]
    simhw.hw.pins[pin] = Fixed(volts)
    a = sim_machine.ADC(sim_machine.Pin(pin), atten=atten)
    vals = [a.read_uv() if uv else a.read_u16() >> 4 for _ in range(n)]
    return sum(vals) / n, min(vals), max(vals)
"""


def test_esp32_reads_zero_at_and_below_about_100_mv(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 0.1)
    r = run(mpy, FIXED + f"""
hwc = board("esp32", {trace!r}, {{}})
for atten in (0, 3):
    for v in (0.0, 0.03, 0.06, 0.1):
        mean, lo, hi = read_at(hwc, v, atten=atten)
        out({{"atten": atten, "v": v, "max": hi}})
    mean, lo, hi = read_at(hwc, 0.5, atten=atten)
    out({{"atten": atten, "v": 0.5, "max": hi}})
""")
    for x in r:
        if x["v"] <= 0.1 and not (x["atten"] == 0 and x["v"] == 0.1):
            assert x["max"] == 0, x
        if x["v"] == 0.5:
            assert x["max"] > 100, x


def test_esp32_read_uv_is_calibrated_and_linear_inside_the_range_read_u16_stays_raw(mpy, tmp_path):
    """A chip whose reference is 5 % high: raw codes (read_u16) on the nominal scale are about
    5 % low, the eFuse-calibrated read_uv is right within the calibration's residual, and
    straight from 150 to 2450 mV at 11 dB."""
    trace = write_sine(tmp_path / "t.csv", 0.1)
    m = DESIGNS["adc_models"]["esp32"]
    a11 = m["atten"][3]
    lsb_nominal = m["vref_mv"] * a11["scale"] / 65536 / 4096 / 1000  # volts per code
    points = [0.15 + k * 0.2 for k in range(12)] + [2.45]
    r = run(mpy, FIXED + f"""
hwc = board("esp32", {trace!r}, {{"adc_ref_error_pct": 5.0, "adc_offset_mv": 0.0}})
for v in {points!r}:
    uv, lo, hi = read_at(hwc, v, n=200, uv=True)
    code, lo, hi = read_at(hwc, v, n=200)
    out({{"v": v, "uv": uv, "code": code}})
""")
    offset = a11["offset_mv"] / 1000
    for x in r:
        v = x["v"]
        raw_v = x["code"] * lsb_nominal + offset
        assert raw_v - offset == pytest.approx((v - offset) / 1.05, rel=0.01, abs=0.0005)  # raw
        assert x["uv"] / 1e6 == pytest.approx(v, rel=0.004, abs=0.006)  # calibrated
    # Linear: residuals from the best straight line stay within about a millivolt.
    xs = [x["v"] for x in r]
    ys = [x["uv"] / 1e6 for x in r]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    resid = [b - (my + slope * (a - mx)) for a, b in zip(xs, ys)]
    assert max(abs(e) for e in resid) < 0.0015


def test_esp32_top_of_the_11db_range_bends_and_clips_below_the_supply(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 0.1)
    m = DESIGNS["adc_models"]["esp32"]
    a11 = m["atten"][3]
    lsb_mv = m["vref_mv"] * a11["scale"] / 65536 / 4096
    r = run(mpy, FIXED + f"""
hwc = board("esp32", {trace!r}, {{"adc_ref_error_pct": 0.0, "adc_offset_mv": 0.0}})
for v in (2.0, 2.9, 3.25):
    code, lo, hi = read_at(hwc, v)
    out({{"v": v, "code": code, "max": hi}})
""")
    line = {x["v"]: (x["v"] * 1000 - a11["offset_mv"]) / lsb_mv for x in r}
    by_v = {x["v"]: x for x in r}
    assert by_v[2.0]["code"] == pytest.approx(line[2.0], abs=2)  # linear inside the range
    assert by_v[2.9]["code"] - line[2.9] > 50  # well off the line above it
    assert by_v[3.25]["max"] == 4095  # clipped before the 3.3 V supply


def test_rp2040_wide_codes_appear_at_the_erratum_codes(mpy, tmp_path):
    """A slow sweep of the input: each code is hit in proportion to its width. Codes 512, 1536,
    2560 and 3584 are about dnl_width + 1 LSB wide; their neighbours about 1."""
    trace = write_sine(tmp_path / "t.csv", 0.1)
    width = DESIGNS["adc_models"]["rp2040"]["dnl_width_lsb"]
    spikes = DESIGNS["adc_models"]["rp2040"]["dnl_codes"]
    r = run(mpy, FIXED + f"""
def histogram(hwc, lo_code, hi_code):
    pin = hwc["pin_ct"]
    ch = Fixed(0.0)
    simhw.hw.pins[pin] = ch
    a = sim_machine.ADC(sim_machine.Pin(pin))
    counts = {{}}
    steps = (hi_code - lo_code) * 16
    for k in range(steps):
        ch.v = (lo_code + k / 16) * 3.3 / 4096
        c = a.read_u16() >> 4
        counts[c] = counts.get(c, 0) + 1
    return counts

for w in ({width}, 0):
    hwc = board("pico", {trace!r}, {{"dnl_width_lsb": w, "adc_ref_error_pct": 0.0}})
    counts = histogram(hwc, 0, 4096)
    out({{"width": w, "counts": counts}})
""")
    for res in r:
        counts = {int(k): v for k, v in res["counts"].items()}
        typical = sorted(counts[c] for c in range(600, 1400))[400]  # median of ordinary codes
        for s in spikes:
            ratio = counts.get(s, 0) / typical
            if res["width"]:
                assert ratio == pytest.approx(res["width"] + 1, rel=0.25), (s, ratio)
            else:
                assert ratio == pytest.approx(1.0, abs=0.3), (s, ratio)


# ------------------------------------------------------------------- faults

@pytest.mark.parametrize("board", ["esp32", "pico"])
def test_unplugged_clamp_reads_zero_volts_not_the_bias(mpy, tmp_path, board):
    trace = write_sine(tmp_path / "t.csv", 0.3, amps=5.0)
    r = run(mpy, f"""
for plugged in (True, False):
    hwc = board({board!r}, {trace!r}, {{"ct_connected": plugged, "cpu_model": False}})
    (ci,), times = sample([hwc["pin_ct"]], 2000, 400)
    out({{"plugged": plugged, "mean": sum(ci) / len(ci), "max": max(ci)}})
""")
    plugged, unplugged = r
    bias = DESIGNS["builds"][board]["bias"]
    vb = DESIGNS["supply_v"] * bias["r_bottom_ohm"] / (bias["r_top_ohm"] + bias["r_bottom_ohm"])
    # Plugged, the signal rides on the bias: over 1.3 V, more than a thousand codes on
    # either ADC (about 0.8 mV per code).
    assert vb >= 1.3 and plugged["mean"] > 1000
    if board == "esp32":
        assert unplugged["max"] == 0  # 0 V is below the ESP32's zero clip
    else:
        assert unplugged["max"] < 40  # the RP2040's own offset, far from the bias


def test_stuck_adc_returns_one_code_on_every_channel(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 0.3, amps=5.0, volts=230.0)
    (r,) = run(mpy, f"""
hwc = board("pico", {trace!r}, {{"adc_stuck": 1234, "cpu_model": False}})
(ci, cv), times = sample([hwc["pin_ct"], hwc["pin_vt"]], 2000, 400)
out({{"codes": sorted(set(ci) | set(cv))}})
""")
    assert r["codes"] == [1234]


def test_unknown_hardware_key_is_refused_by_name(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 0.1)
    out = mpy(BENCH + f"""
try:
    board("esp32", {trace!r}, {{"burden_ohms": 12.0}})
except ValueError as e:
    print("refused:", e)
""")
    assert "refused:" in out and "burden_ohms" in out


# ------------------------------------------------------------------ CPU time

# A double-buffered sampler like the firmware's, and a consumer that does some arithmetic per
# block: on a slow enough board the consumer falls behind and the sampler overruns.
CPU = r"""
def run_blocks(hwc, blocks):
    fs = hwc["sample_hz"]
    block = int(fs) // 5  # 200 ms
    buf = array("H", bytes(4 * block))
    st = {"w": 0, "ready": 0, "overruns": 0}
    adc = sim_machine.ADC(sim_machine.Pin(hwc["pin_ct"]), atten=3)
    rd = adc.read_u16
    def isr(_):
        w = st["w"]
        if (w == 0 and st["ready"] & 1) or (w == block and st["ready"] & 2):
            st["overruns"] += 1  # the half about to be written is still being processed
            return
        buf[w] = rd() >> 4
        w += 1
        if w == block:
            st["ready"] |= 1
        elif w == 2 * block:
            st["ready"] |= 2
            w = 0
        st["w"] = w
    t = sim_machine.Timer(-1)
    t.init(freq=fs, callback=isr)
    half = 0
    for _ in range(blocks):
        try:
            while not st["ready"] & (1 << half):
                sim_machine.idle()
        except simhw.TraceEnd:
            break  # a slow board can run past the trace; what it did so far counts
        off = half * block
        acc = 0
        for k in range(off, off + block):
            d = buf[k] - 2000
            acc += d * d
        st["ready"] &= ~(1 << half)
        half ^= 1
    t.deinit()
    return st["overruns"]
"""


def test_cpu_model_overruns_only_a_board_too_slow_for_the_work(mpy, tmp_path):
    trace = write_sine(tmp_path / "t.csv", 3.0, amps=5.0, rate=4000)
    r = run(mpy, CPU + f"""
for over in ({{}}, {{"cpu_slowdown": 20000}}, {{"cpu_model": False}}):
    hwc = board("esp32", {trace!r}, over)
    simhw.hw.cpu_us = 0
    n = run_blocks(hwc, 10)
    out({{"over": over, "overruns": n, "cpu_us": simhw.hw.cpu_us, "now_us": simhw.clock.now_us}})
""")
    default, absurd, off = r
    assert default["overruns"] == 0
    assert default["cpu_us"] > 0  # the processing did cost board time
    assert absurd["overruns"] > 0
    assert off["cpu_us"] == 0 and off["overruns"] == 0
