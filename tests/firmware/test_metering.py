"""The metering core and the energy registers, running in MicroPython."""

import json
import math

import pytest


def _run(mpy, code):
    out = mpy("import json\nfrom meter.metering import Metering, EnergyRegisters\n" + code)
    return json.loads(out.strip().splitlines()[-1])


SINE_BLOCK = """
from array import array
import math
def block(n, fs, f, amp_counts, mid, phase=0.0, vamp=0.0, offset=0):
    bi = array('H', bytes(2 * n)); bv = array('H', bytes(2 * n))
    for k in range(n):
        t = k / fs
        bi[k] = int(mid + offset + amp_counts * math.sin(2 * math.pi * f * t - phase) + 0.5)
        bv[k] = int(mid + vamp * math.sin(2 * math.pi * f * t) + 0.5)
    return bi, bv
"""


def test_rms_current_of_a_sine(mpy):
    # 1000 counts peak -> 707.1 counts rms; 0.05 A per count -> 35.36 A.
    r = _run(mpy, SINE_BLOCK + """
bi, bv = block(400, 2000, 50, 1000, 2048)
m = Metering(2000, 50, 2048, 0.05, 0.5, 230.0, 0.0)
r = m.process(bi, None, 0, 400)
print(json.dumps({"irms": r.irms, "p": r.p_w, "vm": r.voltage_measured, "dt": r.dt_s}))
""")
    assert r["irms"] == pytest.approx(1000 / math.sqrt(2) * 0.05, rel=2e-3)
    assert r["p"] == pytest.approx(r["irms"] * 230.0)
    assert r["vm"] is False
    assert r["dt"] == pytest.approx(0.2)


def test_dc_offset_is_removed_without_settling(mpy):
    """A bias 300 counts off the nominal mid-code changes nothing, from the first block."""
    r = _run(mpy, SINE_BLOCK + """
a, _ = block(400, 2000, 50, 800, 2048)
b, _ = block(400, 2000, 50, 800, 2048, offset=300)
m = Metering(2000, 50, 2048, 0.05, 0.5, 230.0, 0.0)
x = m.process(a, None, 0, 400).irms
y = m.process(b, None, 0, 400).irms
print(json.dumps({"a": x, "b": y}))
""")
    assert r["b"] == pytest.approx(r["a"], rel=1e-4)


def test_noise_is_removed_in_quadrature(mpy):
    """No current, only ADC noise: the meter must read (almost) zero, not the noise rms."""
    r = _run(mpy, """
from array import array
n = 400
bi = array('H', bytes(2 * n))
for k in range(n):
    bi[k] = 2048 + (1 if k % 2 else -1)   # variance exactly 1 count^2
raw = Metering(2000, 50, 2048, 0.05, 0.5, 230.0, 0.0).process(bi, None, 0, n).irms
clean = Metering(2000, 50, 2048, 0.05, 0.5, 230.0, 1.0).process(bi, None, 0, n).irms
print(json.dumps({"raw": raw, "clean": clean}))
""")
    assert r["raw"] == pytest.approx(0.05, rel=1e-6)
    assert r["clean"] == 0.0


def test_real_power_and_phase(mpy):
    """Current lagging voltage by 60 degrees: real power is half of Vrms*Irms."""
    r = _run(mpy, SINE_BLOCK + """
bi, bv = block(800, 4000, 50, 1000, 2048, phase=math.pi / 3, vamp=1000)
m = Metering(4000, 50, 2048, 0.01, 0.3, 230.0, 0.0)
r = m.process(bi, bv, 0, 800)
print(json.dumps({"irms": r.irms, "vrms": r.vrms, "p": r.p_w, "vm": r.voltage_measured}))
""")
    assert r["vm"] is True
    assert r["irms"] == pytest.approx(1000 / math.sqrt(2) * 0.01, rel=2e-3)
    assert r["vrms"] == pytest.approx(1000 / math.sqrt(2) * 0.3, rel=2e-3)
    assert r["p"] == pytest.approx(0.5 * r["irms"] * r["vrms"], rel=5e-3)


def test_export_goes_to_the_export_register(mpy):
    r = _run(mpy, SINE_BLOCK + """
bi, bv = block(800, 4000, 50, 1000, 2048, phase=math.pi, vamp=1000)
m = Metering(4000, 50, 2048, 0.01, 0.3, 230.0, 0.0)
res = m.process(bi, bv, 0, 800)
e = EnergyRegisters()
for _ in range(18000):   # one hour of 0.2 s blocks
    e.add(res.p_w, res.dt_s)
print(json.dumps({"p": res.p_w, "imp": e.import_dwh, "exp": e.export_dwh, "exp_wh": e.export_wh()}))
""")
    assert r["p"] < 0
    assert r["imp"] == 0
    assert r["exp_wh"] == pytest.approx(-r["p"], rel=1e-6)  # one hour at P watts is P Wh
    assert r["exp"] == int(-r["p"] * 10)  # whole 0.1 Wh steps


def test_register_carry_loses_nothing(mpy):
    """A million 1 mWh steps add up to exactly 1 kWh: the fraction is carried, not dropped."""
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
    """Worst-case input (rail-to-rail codes) must keep every per-chunk integer sum below
    2**30, so the sums stay small ints on a 32-bit port (no heap allocation, no slowdown)."""
    r = _run(mpy, f"""
import sys
sys.modules['machine'] = __import__('sim_machine')
from meter.boards import load
b = load('{board}')
m = Metering(b.SAMPLE_HZ, 50, b.ADC_MID, 1.0, 1.0, 230.0, 0.0)
worst = max(b.ADC_MID, (1 << b.ADC_BITS) - 1 - b.ADC_MID)
print(json.dumps({{"chunk": m.chunk, "worst": worst, "sum": m.chunk * worst * worst}}))
""")
    assert r["chunk"] <= 255
    assert r["sum"] < 2**30
