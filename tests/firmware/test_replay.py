"""`meter-sim replay`: the firmware in MicroPython on the simulated board, driven through its
stable command-line interface."""

import json
import math
import subprocess
import sys

import pytest


def write_sine_trace(path, seconds, irms, vrms=None, phase=0.0, rate=4000, f=50.0,
                     step_at=None, irms_after=None):
    """A clean sine trace, written here from first principles (not with tools.traces)."""
    with open(path, "w") as fh:
        fh.write("t_s,current_a,voltage_v\n" if vrms else "t_s,current_a\n")
        for k in range(int(seconds * rate) + 1):
            t = k / rate
            a = irms if step_at is None or t < step_at else irms_after
            i = a * math.sqrt(2) * math.sin(2 * math.pi * f * t - phase)
            if vrms:
                v = vrms * math.sqrt(2) * math.sin(2 * math.pi * f * t)
                fh.write(f"{t:.6f},{i:.5f},{v:.3f}\n")
            else:
                fh.write(f"{t:.6f},{i:.5f}\n")


def replay(*args, stats=False):
    res = subprocess.run([sys.executable, "-m", "hardware.sim.cli", "replay", *args,
                          *(["--stats"] if stats else [])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = [json.loads(x) for x in res.stdout.splitlines()]
    if stats:
        return out, json.loads(res.stderr.strip().splitlines()[-1])["stats"]
    return out


@pytest.mark.parametrize("board", ["esp32", "pico"])
def test_replay_reports_rms_power_and_energy(tmp_path, board):
    trace = tmp_path / "t.csv"
    write_sine_trace(trace, 10.0, irms=8.0)
    out = replay("--trace", str(trace), "--board", board, "--json")
    # One reading per whole second of trace. The trace's last row is at 10.000 s, and the
    # sampling instants do not land on it exactly, so the tenth second is not complete: its
    # energy stays in the registers (saved at power-off) and no reading closes for it.
    assert [r["t_s"] for r in out] == list(range(1, 10))
    assert [r["seq"] for r in out] == list(range(1, 10))
    for r in out:
        assert set(r) >= {"t_s", "irms_a", "p_w", "energy_wh"}
        assert "vrms_v" not in r  # no voltage channel fitted
        assert r["irms_a"] == pytest.approx(8.0, rel=0.01)
        assert r["p_w"] == pytest.approx(8.0 * 230.0, rel=0.01)  # apparent power at 230 V
    # 8 A at 230 V for 9 s
    assert out[-1]["energy_wh"] == pytest.approx(8 * 230 * 9 / 3600, rel=0.01)


def test_replay_with_voltage_channel_measures_real_power(tmp_path):
    trace = tmp_path / "t.csv"
    write_sine_trace(trace, 6.0, irms=10.0, vrms=230.0, phase=math.radians(60))
    out = replay("--trace", str(trace), "--board", "pico", "--voltage", "--json", "--interval", "2")
    assert [r["t_s"] for r in out][:2] == [2, 4]
    r = out[1]
    assert r["vrms_v"] == pytest.approx(230.0, rel=0.01)
    assert r["irms_a"] == pytest.approx(10.0, rel=0.01)
    assert r["p_w"] == pytest.approx(0.5 * 2300.0, rel=0.015)


def test_load_step_is_seen_in_the_right_interval(tmp_path):
    trace = tmp_path / "t.csv"
    write_sine_trace(trace, 6.0, irms=1.0, step_at=3.0, irms_after=12.0)
    out = replay("--trace", str(trace), "--board", "esp32", "--json")
    by_t = {r["t_s"]: r for r in out}
    assert by_t[2]["irms_a"] == pytest.approx(1.0, rel=0.03)
    assert by_t[5]["irms_a"] == pytest.approx(12.0, rel=0.01)


def test_registers_and_sequence_survive_a_reboot(tmp_path):
    """Two runs on the same flash: the second boots with the first's registers and sequence
    and continues them."""
    trace = tmp_path / "t.csv"
    write_sine_trace(trace, 4.0, irms=5.0)
    flash = tmp_path / "flash"
    first, st1 = replay("--trace", str(trace), "--board", "esp32", "--json", "--flash", str(flash),
                        stats=True)
    second, st2 = replay("--trace", str(trace), "--board", "esp32", "--json", "--flash",
                         str(flash), stats=True)
    assert st1["boot"]["seq"] == 0 and st1["boot"]["import_wh"] == 0
    assert st2["boot"]["seq"] == first[-1]["seq"]
    assert st2["boot"]["import_wh"] >= first[-1]["import_wh"]
    assert second[0]["seq"] == first[-1]["seq"] + 1
    # the same trace adds the same energy in each run
    run1 = first[-1]["energy_wh"] - st1["boot"]["import_wh"]
    run2 = second[-1]["energy_wh"] - st2["boot"]["import_wh"]
    assert run2 == pytest.approx(run1, rel=0.02)


def test_bad_trace_is_reported_with_its_line(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text("t_s,current_a\n0.0,1.0\n0.001,abc\n")
    res = subprocess.run([sys.executable, "-m", "hardware.sim.cli", "replay", "--trace", str(trace),
                          "--board", "esp32", "--json"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "line 3" in res.stderr
