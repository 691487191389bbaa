"""Trace files and the reference energy: checked against energies worked out by hand."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from tools import runtime, traces

SQ2 = math.sqrt(2.0)


def write_sine(path, seconds: float, irms: float, lag_deg: float = 0.0, vrms: float = 230.0,
               hz: float = 50.0, rate: float = 4000.0, with_voltage: bool = True,
               times=None) -> None:
    """A textbook sinusoid, written here without the module under test."""
    lag = math.radians(lag_deg)
    if times is None:
        times = [n / rate for n in range(round(seconds * rate) + 1)]
    with open(path, "w") as fh:
        fh.write("t_s,current_a,voltage_v\n" if with_voltage else "t_s,current_a\n")
        for t in times:
            w = 2 * math.pi * hz * t
            i = irms * SQ2 * math.sin(w - lag)
            if with_voltage:
                fh.write("%.6f,%.6f,%.4f\n" % (t, i, vrms * SQ2 * math.sin(w)))
            else:
                fh.write("%.6f,%.6f\n" % (t, i))


# 10 A rms at 230 V rms for 60 s: 2300 W * 60 s / 3600 s/h.
WH_10A_60S = 2300.0 * 60 / 3600  # 38.333...


def test_pure_sine_with_voltage_is_its_textbook_energy(tmp_path):
    p = tmp_path / "sine.csv"
    write_sine(p, 60, 10.0)
    ref = traces.reference_energy(p)
    assert ref["has_voltage"] is True
    assert ref["import_wh"] == pytest.approx(WH_10A_60S, rel=1e-4)
    assert ref["import_wh"] == pytest.approx(38.333, abs=1e-3)
    assert ref["export_wh"] == pytest.approx(0.0, abs=1e-9)
    assert ref["duration_s"] == pytest.approx(60.0)
    assert ref["irms_mean_a"] == pytest.approx(10.0, rel=1e-4)
    assert ref["vrms_mean_v"] == pytest.approx(230.0, rel=1e-4)
    assert ref["cycles"] in (3000, 3001)  # 50 Hz for 60 s, maybe a sliver at the end


def test_current_only_trace_gives_apparent_energy_at_nominal_voltage(tmp_path):
    p = tmp_path / "sine_i.csv"
    write_sine(p, 60, 10.0, with_voltage=False)
    ref = traces.reference_energy(p)
    assert ref["has_voltage"] is False
    assert ref["vrms_mean_v"] is None
    assert ref["import_wh"] == pytest.approx(WH_10A_60S, rel=1e-4)
    assert ref["export_wh"] == 0.0
    # The same current read as if the supply were 240 V.
    assert traces.reference_energy(p, vrms_nominal=240.0)["import_wh"] == \
        pytest.approx(2400.0 * 60 / 3600, rel=1e-4)


def test_power_factor_half_lagging_halves_real_but_not_apparent_energy(tmp_path):
    # cos(60 deg) = 0.5
    real = tmp_path / "pf_v.csv"
    app = tmp_path / "pf_i.csv"
    write_sine(real, 60, 10.0, lag_deg=60.0)
    write_sine(app, 60, 10.0, lag_deg=60.0, with_voltage=False)
    assert traces.reference_energy(real)["import_wh"] == pytest.approx(WH_10A_60S / 2, rel=1e-4)
    assert traces.reference_energy(real)["export_wh"] == pytest.approx(0.0, abs=1e-9)
    assert traces.reference_energy(app)["import_wh"] == pytest.approx(WH_10A_60S, rel=1e-4)


def test_current_in_antiphase_is_export(tmp_path):
    p = tmp_path / "export.csv"
    write_sine(p, 10, 4.0, lag_deg=180.0)
    ref = traces.reference_energy(p)
    assert ref["export_wh"] == pytest.approx(230 * 4.0 * 10 / 3600, rel=1e-4)
    assert ref["import_wh"] == pytest.approx(0.0, abs=1e-9)


def test_mixed_import_and_export_cycles_are_registered_separately(tmp_path):
    # 5 s importing 5 A, then 5 s exporting 2 A: the registers do not net out.
    p = tmp_path / "mixed.csv"
    rate, hz = 4000.0, 50.0
    with open(p, "w") as fh:
        fh.write("t_s,current_a,voltage_v\n")
        for n in range(40001):
            t = n / rate
            s = math.sin(2 * math.pi * hz * t)
            amps = 5.0 if t < 5.0 else -2.0
            fh.write("%.6f,%.6f,%.4f\n" % (t, amps * SQ2 * s, 230 * SQ2 * s))
    ref = traces.reference_energy(p)
    assert ref["import_wh"] == pytest.approx(230 * 5 * 5 / 3600, rel=1e-3)
    assert ref["export_wh"] == pytest.approx(230 * 2 * 5 / 3600, rel=1e-3)


def test_varying_sample_rate(tmp_path):
    rng = random.Random(7)
    times, t = [], 0.0
    while t <= 20.0:
        times.append(t)
        t += rng.uniform(0.15e-3, 0.35e-3)  # 2.9 to 6.7 kHz
    p = tmp_path / "jitter.csv"
    write_sine(p, 20, 3.0, times=times)
    ref = traces.reference_energy(p)
    assert ref["import_wh"] == pytest.approx(690.0 * times[-1] / 3600, rel=2e-3)


def test_reference_intervals_split_the_total(tmp_path):
    p = tmp_path / "sine.csv"
    write_sine(p, 10, 10.0)
    ivs = traces.reference_intervals(p, 2.0)
    assert [iv["t_start"] for iv in ivs] == [0.0, 2.0, 4.0, 6.0, 8.0]
    for iv in ivs:
        assert iv["import_wh"] == pytest.approx(2300 * 2 / 3600, rel=1e-3)
        assert iv["irms_mean_a"] == pytest.approx(10.0, rel=1e-3)
    total = traces.reference_energy(p)["import_wh"]
    assert sum(iv["import_wh"] for iv in ivs) == pytest.approx(total, rel=1e-9)
    with pytest.raises(ValueError):
        traces.reference_intervals(p, 0)


# ---------------------------------------------------------------- generated kinds


def test_generate_is_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    traces.generate(a, "home", 3, seed=5, with_voltage=True)
    traces.generate(b, "home", 3, seed=5, with_voltage=True)
    traces.generate(c, "home", 3, seed=6, with_voltage=True)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_generate_writes_the_format_it_documents(tmp_path):
    p = tmp_path / "k.csv"
    info = traces.generate(p, "kettle", 2, rate_hz=4000)
    lines = p.read_text().splitlines()
    assert lines[0] == "t_s,current_a"
    assert len(lines) == 1 + 8001 == 1 + info["rows"]
    t = [float(line.split(",")[0]) for line in lines[1:]]
    assert t[0] == 0.0 and t[-1] == pytest.approx(2.0)
    assert all(b - a == pytest.approx(0.00025) for a, b in zip(t, t[1:]))
    traces.generate(p, "kettle", 1, with_voltage=True)
    assert p.read_text().splitlines()[0] == "t_s,current_a,voltage_v"


def test_idle_draws_nothing(tmp_path):
    p = tmp_path / "idle.csv"
    traces.generate(p, "idle", 2, with_voltage=True)
    ref = traces.reference_energy(p)
    assert ref["import_wh"] == 0.0 and ref["export_wh"] == 0.0
    assert ref["irms_mean_a"] == 0.0
    assert 225 < ref["vrms_mean_v"] < 235  # the supply is still there


def test_kettle_energy_follows_its_schedule(tmp_path):
    p = tmp_path / "kettle.csv"
    info = traces.generate(p, "kettle", 20, seed=3)
    (kettle,) = info["loads"]
    on_s = sum(b - a for a, b in kettle["on"])
    assert 4 < on_s < 16
    # A 2 kW element at 230 V: 230 * (V/R) with the supply between about 224
    # and 233 V once its own 8.7 A have dropped 2.6 V across the grid.
    ref = traces.reference_energy(p)
    assert ref["import_wh"] == pytest.approx(2000 * on_s / 3600, rel=0.03)
    # Steps: nothing at all while it is off.
    ivs = traces.reference_intervals(p, 0.5)
    first_on = kettle["on"][0][0]
    assert all(iv["import_wh"] == 0.0 for iv in ivs if iv["t_end"] <= first_on)


def test_fridge_runs_at_power_factor_0_7_after_a_starting_surge(tmp_path):
    p = tmp_path / "fridge.csv"
    info = traces.generate(p, "fridge", 30, seed=2, with_voltage=True)
    start = info["loads"][0]["on"][0][0]
    ivs = traces.reference_intervals(p, 0.1)
    running = [iv for iv in ivs if iv["t_start"] >= start + 2.0]
    assert running
    for iv in running[:5]:
        watts = iv["import_wh"] * 3600 / 0.1
        pf = watts / (iv["vrms_mean_v"] * iv["irms_mean_a"])
        assert watts == pytest.approx(120, rel=0.02)
        assert pf == pytest.approx(0.7, abs=0.02)
    surge = [iv for iv in ivs if start <= iv["t_start"] < start + 0.1]
    assert surge and surge[0]["irms_mean_a"] > 3 * running[0]["irms_mean_a"]


def test_home_draws_distorted_current(tmp_path):
    p = tmp_path / "home.csv"
    traces.generate(p, "home", 5, seed=1, with_voltage=True)
    ref = traces.reference_energy(p)
    apparent_wh = ref["vrms_mean_v"] * ref["irms_mean_a"] * ref["duration_s"] / 3600
    assert 0 < ref["import_wh"] < 0.99 * apparent_wh
    assert ref["export_wh"] == 0.0
    # The electronics' pulses: a strong 3rd harmonic in the first cycle
    # (80 samples at 4 kHz is one 50 Hz period, to within the 0.1 % wander).
    rows = [tuple(map(float, line.split(","))) for line in p.read_text().splitlines()[1:81]]

    def harmonic(h):
        re_ = sum(r[1] * math.cos(2 * math.pi * h * k / 80) for k, r in enumerate(rows))
        im_ = sum(r[1] * math.sin(2 * math.pi * h * k / 80) for k, r in enumerate(rows))
        return math.hypot(re_, im_)

    assert harmonic(3) > 0.1 * harmonic(1)
    assert harmonic(5) > 0.05 * harmonic(1)


def test_pv_exports_and_needs_a_voltage_column(tmp_path):
    p = tmp_path / "pv.csv"
    traces.generate(p, "pv", 5, seed=4, with_voltage=True)
    ref = traces.reference_energy(p)
    assert ref["import_wh"] == 0.0
    # At most 3 kW minus the home's own base load, at least a clouded 5 %.
    assert 150 * 5 / 3600 < ref["export_wh"] < 3000 * 5 / 3600
    with pytest.raises(ValueError, match="with_voltage"):
        traces.generate(tmp_path / "x.csv", "pv", 1)


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown trace kind 'sauna'"):
        traces.generate(tmp_path / "x.csv", "sauna", 1)


# ---------------------------------------------------------------- malformed files


def _write(tmp_path, text: str):
    p = tmp_path / "t.csv"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,line,what", [
    ("", 1, "empty file"),
    ("time,current\n0,1\n0.1,1\n", 1, "bad header"),
    ("t_s,current_a,voltage\n0,1,2\n", 1, "bad header"),
    ("t_s,current_a\n0,1\n0.001,1\n0.002,abc\n", 4, "current_a 'abc' is not a number"),
    ("t_s,current_a,voltage_v\n0,1,2\n0.001,1,\n", 3, "voltage_v '' is not a number"),
    ("t_s,current_a\n0,1\n0.001,nan\n", 3, "not finite"),
    ("t_s,current_a\n0,1\n0.001,1\n0.002,1\n0.002,1\n", 5, "does not increase"),
    ("t_s,current_a\n0,1\n0.002,1\n0.001,1\n", 4, "does not increase"),
    ("t_s,current_a\n0,1\n0.001,1,230\n", 3, "3 cells, expected 2"),
    ("t_s,current_a\n0,1\n\n0.002,1\n", 3, "empty line"),
    ("t_s,current_a\n0,1\n", 2, "at least two samples"),
])
def test_malformed_trace_raises_value_error_naming_the_line(tmp_path, text, line, what):
    p = _write(tmp_path, text)
    with pytest.raises(ValueError) as exc:
        traces.reference_energy(p)
    assert isinstance(exc.value, traces.TraceError)
    assert f"line {line}:" in str(exc.value)
    assert what in str(exc.value)
    assert exc.value.line == line


def test_crlf_line_ends_are_accepted(tmp_path):
    p = tmp_path / "crlf.csv"
    write_sine(p, 1, 1.0)
    p.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    assert traces.reference_energy(p)["import_wh"] == pytest.approx(230 / 3600, rel=1e-3)


# ---------------------------------------------------------------- CLI


def test_cli_generate_then_energy(tmp_path):
    out = tmp_path / "home.csv"
    gen = subprocess.run([sys.executable, "-m", "tools.traces", "generate", "--kind", "home",
                          "--duration", "2", "--rate", "4000", "--seed", "1", "--voltage", str(out)],
                         cwd=runtime.REPO, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    en = subprocess.run([sys.executable, "-m", "tools.traces", "energy", str(out), "--json"],
                        cwd=runtime.REPO, capture_output=True, text=True, timeout=60)
    assert en.returncode == 0, en.stderr
    ref = json.loads(en.stdout)
    assert ref["has_voltage"] is True and ref["duration_s"] == pytest.approx(2.0)
    assert ref["import_wh"] > 0


def test_cli_energy_reports_a_bad_file(tmp_path):
    p = _write(tmp_path, "t_s,current_a\n0,1\n0.001,x\n")
    res = subprocess.run([sys.executable, "-m", "tools.traces", "energy", str(p)],
                         cwd=runtime.REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "line 3" in res.stderr
