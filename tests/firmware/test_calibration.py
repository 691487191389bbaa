"""One-point calibration with a known load, through the firmware's own Calibrator (what the
technician's `cal` command calls), on the simulated boards."""

import json
import subprocess
import sys

import pytest

from hardware.sim.meter import SimMeter
from tools import traces


def mean_power_error(trace, flash, board, voltage):
    ref = traces.reference_energy(trace)
    p_ref = (ref["import_wh"] - ref["export_wh"]) * 3600 / ref["duration_s"]
    readings, _ = SimMeter(board, trace, flash, config={
        "interval_s": 3600, "voltage_channel": voltage}).run()
    return (readings[-1]["p_w"] - p_ref) / p_ref * 100


@pytest.mark.parametrize("board", ["esp32", "pico"])
@pytest.mark.parametrize("voltage", [False, True])
def test_kettle_calibration_removes_the_units_error(tmp_path, board, voltage):
    kettle = tmp_path / "kettle.csv"
    traces.generate_steady(kettle, 2000 / 230, duration_s=6, rate_hz=16000, with_voltage=voltage)
    load = tmp_path / "load.csv"
    traces.generate_steady(load, 30.0, pf=0.8 if voltage else 1.0, duration_s=3, rate_hz=16000,
                           with_voltage=voltage)
    # This simulated unit's parts are off nominal (hardware/designs.json "unit"): clamp gain,
    # burden, ADC reference, voltage module gain.
    before = mean_power_error(load, tmp_path / "raw", board, voltage)
    flash = tmp_path / "cal"
    cal = SimMeter(board, kettle, flash, config={"voltage_channel": voltage}).calibrate(
        known_w=2000.0, seconds=4.0)
    assert json.loads((flash / "cal.json").read_text()) == cal
    after = mean_power_error(load, flash, board, voltage)
    assert abs(before) > 0.2  # the uncalibrated unit is measurably off
    assert abs(after) < 0.2
    assert abs(after) < abs(before) / 2


def test_implausible_calibration_is_refused_and_nothing_is_stored(tmp_path):
    kettle = tmp_path / "kettle.csv"
    traces.generate_steady(kettle, 2000 / 230, duration_s=4, rate_hz=8000)
    res = subprocess.run([sys.executable, "-m", "hardware.sim.cli", "calibrate", "--trace",
                          str(kettle), "--board", "esp32", "--flash", str(tmp_path / "f"),
                          "--known-w", "3000", "--seconds", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "more than 20 % off" in res.stderr
    assert not (tmp_path / "f" / "cal.json").exists()


def test_calibration_without_a_load_is_refused(tmp_path):
    idle = tmp_path / "idle.csv"
    traces.generate(idle, "idle", 4.0, rate_hz=8000)
    with pytest.raises(RuntimeError, match="no current measured"):
        SimMeter("pico", idle, tmp_path / "f").calibrate(known_w=2000.0, seconds=2.0)
