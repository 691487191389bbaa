"""The metering core and the energy registers, running in MicroPython on synthetic sample
blocks (the full physical chain is covered by the accuracy tests)."""

import json
import math

import pytest

PRELUDE = """
import json, math, sys
from array import array
from meter.metering import Metering, EnergyRegisters, ST_CLIPPED, ST_FREQ_RANGE, ST_ADC_FAULT, ST_CT_MISSING, ST_CT_REVERSED

def sine(n, fs, f, amp, mid, phase=0.0, offset=0, h3=0.0):
    b = array('H', bytes(2 * n))
    for k in range(n):
        x = 2 * math.pi * f * k / fs
        b[k] = int(mid + offset + amp * (math.sin(x + phase) + h3 * math.sin(3 * (x + phase))) + 0.5)
    return b

def meter(fs=4000, f=50, mid=2048, a=0.01, v=0.3, noise=0.0, **kw):
    return Metering(fs, f, mid, mid, a, v, 230.0, noise, 2100, 8, 4087, **kw)

def run(m, bi, bv=None, block=400):
    regs = EnergyRegisters()
    k = 0
    while k < len(bi):
        n = min(block, len(bi) - k)
        m.process(bi, bv, k, n, regs)
        k += n
    return regs
"""


def _run(mpy, code):
    out = mpy(PRELUDE + code)
    return json.loads(out.strip().splitlines()[-1])


def test_rms_current_of_a_sine(mpy):
    r = _run(mpy, """
bi = sine(8000, 4000, 50, 1000, 2048)
m = meter()
run(m, bi)
w = m.window
print(json.dumps({"irms": w.irms, "p": w.p_w, "n": w.n, "windows": m.windows}))
""")
    assert r["irms"] == pytest.approx(1000 / math.sqrt(2) * 0.01, rel=2e-3)
    assert r["p"] == pytest.approx(r["irms"] * 230.0)
    assert r["n"] == 800  # 10 cycles of 50 Hz at 4 kHz
    assert r["windows"] == 10


@pytest.mark.parametrize("f", [49.0, 51.0, 59.0, 61.0])
def test_windows_track_the_mains_frequency(mpy, f):
    """Windows hold whole cycles of the actual frequency: the estimate converges and the RMS has
    no partial-cycle ripple."""
    nominal = 50 if f < 55 else 60
    r = _run(mpy, f"""
bi = sine(4000 * 6, 4000, {f}, 600, 2048)
bv = sine(4000 * 6, 4000, {f}, 900, 2048)
m = meter(f={nominal})
rms = []
m.on_window = lambda w: rms.append(w.irms)
run(m, bi, bv)
print(json.dumps({{"hz": m.f_est, "n": m.window.n, "rms": rms[-20:], "status": m.window.status}}))
""")
    assert r["hz"] == pytest.approx(f, abs=0.02)
    assert r["n"] == round(10 * 4000 / f)
    want = 600 / math.sqrt(2) * 0.01
    assert max(abs(x / want - 1) for x in r["rms"]) < 1e-3
    assert r["status"] & 0x20 == 0  # inside +-5 %


def test_frequency_out_of_range_is_flagged(mpy):
    r = _run(mpy, """
bv = sine(4000 * 4, 4000, 46.0, 900, 2048)
bi = sine(4000 * 4, 4000, 46.0, 300, 2048)
m = meter()
run(m, bi, bv)
print(json.dumps({"status": m.window.status, "hz": m.f_est}))
""")
    assert r["status"] & 0x20
    assert r["hz"] == pytest.approx(46.0, abs=0.1)


def test_dc_offset_is_removed_without_settling(mpy):
    r = _run(mpy, """
a = sine(800, 4000, 50, 800, 2048)
b = sine(800, 4000, 50, 800, 2048, offset=300)
m1 = meter(); run(m1, a)
m2 = meter(); run(m2, b)
print(json.dumps({"a": m1.window.irms, "b": m2.window.irms}))
""")
    assert r["b"] == pytest.approx(r["a"], rel=1e-4)


def test_noise_is_removed_in_quadrature(mpy):
    r = _run(mpy, """
n = 800
bi = array('H', bytes(2 * n))
for k in range(n):
    bi[k] = 2048 + (1 if k % 2 else -1)   # variance exactly 1 unit^2
m1 = meter(a=0.05); run(m1, bi)
m2 = meter(a=0.05, noise=1.0); run(m2, bi)
print(json.dumps({"raw": m1.window.irms, "clean": m2.window.irms}))
""")
    assert r["raw"] == pytest.approx(0.05, rel=1e-6)
    assert r["clean"] == 0.0


def test_starting_current_threshold(mpy):
    r = _run(mpy, """
bi = sine(800, 4000, 50, 3, 2048)          # 0.02 A peak-ish
m = meter(a=0.01, i_start=0.04); regs = run(m, bi)
print(json.dumps({"irms": m.window.irms, "e": regs.import_dwh + regs.carry_imp}))
""")
    assert r["irms"] == 0.0 and r["e"] == 0.0


@pytest.mark.parametrize("lead_deg", [0.0, 3.0])
def test_real_power_with_phase_correction(mpy, lead_deg):
    """Current lagging 60 degrees; the clamp advances it by lead_deg, which the table corrects."""
    r = _run(mpy, f"""
lag = math.radians(60.0 - {lead_deg})
bi = sine(8000, 4000, 50, 1000, 2048, phase=-lag)
bv = sine(8000, 4000, 50, 1000, 2048)
m = meter(ct_table=((0.0, 0.0, {lead_deg}), (100.0, 0.0, {lead_deg})))
run(m, bi, bv)
w = m.window
print(json.dumps({{"irms": w.irms, "vrms": w.vrms, "p": w.p_w, "q": w.q_var, "pf": w.pf}}))
""")
    assert r["p"] == pytest.approx(0.5 * r["irms"] * r["vrms"], rel=2e-3)
    assert r["pf"] == pytest.approx(0.5, abs=2e-3)
    assert r["q"] < 0  # current lags


def test_export_and_reversed_clamp(mpy):
    r = _run(mpy, """
bi = sine(8000, 4000, 50, 1000, 2048, phase=math.pi)
bv = sine(8000, 4000, 50, 1000, 2048)
m = meter(expect_export=False)
regs = run(m, bi, bv)
m2 = meter(expect_export=True); run(m2, bi, bv)
print(json.dumps({"p": m.window.p_w, "imp": regs.import_dwh, "exp": regs.export_dwh,
                  "st": m.window.status, "st2": m2.window.status}))
""")
    assert r["p"] < 0 and r["imp"] == 0 and r["exp"] > 0
    assert r["st"] & 0x04  # reversed clamp flagged on a meter that does not export
    assert r["st2"] & 0x04 == 0


def test_faults_are_flagged_not_measured(mpy):
    r = _run(mpy, """
out = {}
stuck = array('H', [4095] * 800)
m = meter(); run(m, stuck); out["stuck"] = [m.window.status, m.window.irms]
missing = array('H', [0] * 400 + [1] * 400)      # input pulled to 0 V: no clamp plugged in
m = meter(); run(m, missing); out["missing"] = [m.window.status, m.window.irms]
clip = sine(800, 4000, 50, 2500, 2048)          # beyond the rails
for k in range(800):
    clip[k] = min(4095, max(0, clip[k]))
m = meter(); run(m, clip); out["clip"] = [m.window.status, m.window.irms]
print(json.dumps(out))
""")
    assert r["stuck"][0] & 0x40 and r["stuck"][1] == 0.0
    assert r["missing"][0] & 0x02 and r["missing"][1] == 0.0
    assert r["clip"][0] & 0x10


def test_register_carry_loses_nothing(mpy):
    r = _run(mpy, """
e = EnergyRegisters()
for _ in range(1000000):
    e.add(3.6, 1.0)      # 3.6 W for 1 s = 1 mWh
print(json.dumps({"dwh": e.import_dwh, "wh": e.import_wh()}))
""")
    assert r["dwh"] in (9999, 10000)
    assert r["wh"] == pytest.approx(1000.0, rel=1e-9)


@pytest.mark.parametrize("board", ["esp32", "pico"])
def test_integer_sums_stay_small_on_the_targets(mpy, board):
    """Worst-case input (rail-to-rail samples, as from a fault) keeps every integer sum below
    2**30 on each board's configuration: they stay small ints on a 32-bit port."""
    r = _run(mpy, f"""
sys.modules['machine'] = __import__('sim_machine')
from meter.boards import load
b = load('{board}')
max_dev = max(b.ADC_MID, b.ADC_MAX - b.ADC_MID) + 4 * b.ADC_DNL_WIDTH
m = Metering(b.SAMPLE_HZ, 50, b.ADC_MID, b.ADC_MID, 1.0, 1.0, 230.0, 0.0, max_dev,
             b.ADC_LIN_LO, b.ADC_LIN_HI)
# Feed alternating rails and watch the integer sums through a spy on the fold.
top = b.ADC_MAX + 4 * b.ADC_DNL_WIDTH
n = 4 * int(b.SAMPLE_HZ) // 10
bi = array('H', [0 if k % 2 else top for k in range(n)])
seen = [0]
orig = Metering._chunk_iv
names = ("_fxx", "_fyy", "_fxy", "_fxy1")
def spy(self, bi, bv, k, stop):
    before = [getattr(self, a) for a in names]
    orig(self, bi, bv, k, stop)
    for a, b0 in zip(names, before):
        seen[0] = max(seen[0], abs(getattr(self, a) - b0))
m._chunk_iv = lambda bi, bv, k, stop: spy(m, bi, bv, k, stop)
regs = EnergyRegisters()
m.process(bi, bi, 0, n, regs)
print(json.dumps({{"chunk": m.chunk, "max_dev": max_dev + 256, "seen": seen[0]}}))
""")
    assert r["chunk"] * r["max_dev"] ** 2 < 2**30  # 256: how far the centre may track the mean
    assert 0 < r["seen"] < 2**30


def test_float32_accumulators_change_nothing_that_matters(mpy):
    """The targets have float32. Round every float accumulator to float32 after each fold
    (array('f') stores single precision) and compare with the 64-bit host run, on the
    hardest cases: a small current on a large offset, and a full-scale one."""
    r = _run(mpy, """
F = array('f', [0.0])
def f32(x):
    F[0] = x
    return F[0]
class M32(Metering):
    def _chunk_i(self, *a):
        Metering._chunk_i(self, *a)
        self._fx = f32(self._fx); self._fxx = f32(self._fxx)
    def _chunk_iv(self, *a):
        Metering._chunk_iv(self, *a)
        for name in ("_fx", "_fxx", "_fy", "_fyy", "_fxy", "_fxy1"):
            setattr(self, name, f32(getattr(self, name)))
out = {}
for name, amp, off in (("small", 4, 400), ("full", 1900, 0)):
    bi = sine(8000, 4000, 50, amp, 2048, offset=off, phase=-0.5)
    bv = sine(8000, 4000, 50, 1000, 2048)
    a = Metering(4000, 50, 2048, 2048, 0.01, 0.3, 230.0, 0.0, 2100, 0, 4095); ra = run(a, bi, bv)
    b = M32(4000, 50, 2048, 2048, 0.01, 0.3, 230.0, 0.0, 2100, 0, 4095); rb = run(b, bi, bv)
    out[name] = [a.window.irms, b.window.irms, a.window.p_w, b.window.p_w, ra.import_wh(), rb.import_wh()]
print(json.dumps(out))
""")
    for name, (i64, i32, p64, p32, e64, e32) in r.items():
        assert i32 == pytest.approx(i64, rel=1e-4), name
        assert p32 == pytest.approx(p64, rel=1e-4), name
        assert e32 == pytest.approx(e64, rel=1e-4), name
