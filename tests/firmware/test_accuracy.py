"""Class-1 accuracy, enforced: the firmware in MicroPython on the simulated boards (clamp ratio
error and phase lead, burden, bias, anti-alias filter, each board's ADC), calibrated once with a
2 kW kettle, against steady loads whose energy the trace generator knows from first principles.
Sines and the shapes real homes draw (switch-mode supplies, phase-cut dimmers, motors).

The full sweep and the report are `make accuracy` (docs/accuracy.md); this is the subset every
`make test` enforces."""

import pytest

from hardware.sim.meter import SimMeter
from tools import accuracy, traces


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    work = tmp_path_factory.mktemp("acc")
    flashes = {}
    for board in accuracy.BOARDS:
        for voltage in (False, True):
            flashes[(board, voltage)] = accuracy.calibrate(work, board, voltage)[0]
    return work, flashes


POINTS = [
    # (percent of rated current, PF, shape, voltage channel)
    (5.0, 1.0, "sine", False), (10.0, 1.0, "sine", False), (100.0, 1.0, "sine", False),
    (120.0, 1.0, "sine", False),
    (5.0, 1.0, "sine", True), (10.0, 1.0, "sine", True), (120.0, 1.0, "sine", True),
    (10.0, 0.5, "sine", True), (100.0, 0.5, "sine", True),
    (20.0, 1.0, "smps", True), (20.0, 1.0, "dimmer", True), (20.0, 1.0, "motor", True),
    (20.0, 1.0, "smps", False),
]


@pytest.mark.parametrize("board", accuracy.BOARDS)
@pytest.mark.parametrize("pct,pf,shape,voltage", POINTS)
def test_inside_the_class_1_envelope(calibrated, board, pct, pf, shape, voltage):
    work, flashes = calibrated
    # A motor starts with an inrush (6x current at PF 0.4 for a few tenths of a second): the
    # class test is a steady-state test, so its run is long enough for the start to be small.
    seconds = 10.0 if shape == "motor" else accuracy.POINT_S
    r = accuracy.measure_point(work, flashes[(board, voltage)], board, voltage, pct, pf, shape,
                               seconds)
    limit = accuracy.class1_limit_pct(pct, r["true_pf"] if shape == "sine" else 1.0) or 1.0
    assert abs(r["err_pct"]) <= limit, r
    assert "clipped" not in r["flags"] and "adc_fault" not in r["flags"]


@pytest.mark.parametrize("board", accuracy.BOARDS)
@pytest.mark.parametrize("hz", [49.0, 51.0, 59.0, 61.0])
def test_off_nominal_frequency(tmp_path, calibrated, board, hz):
    """Windows track the frequency: 49-51 Hz on a 50 Hz meter, 59-61 Hz on a 60 Hz one."""
    _, flashes = calibrated
    nominal = 50 if hz < 55 else 60
    trace = tmp_path / "t.csv"
    traces.generate_steady(trace, 20.0, pf=0.8, duration_s=3.0, rate_hz=16000, mains_hz=hz,
                           with_voltage=True)
    ref = traces.reference_energy(trace, mains_hz=hz)
    p_ref = ref["import_wh"] * 3600 / ref["duration_s"]
    import shutil
    flash = tmp_path / "flash"
    shutil.copytree(flashes[(board, True)], flash)
    readings, _ = SimMeter(board, trace, flash, config={
        "interval_s": 3600, "voltage_channel": True, "mains_hz": nominal}).run()
    last = readings[-1]
    # The reading's frequency is the interval's mean: the first window after boot, before the
    # first crossings are seen, counts at nominal (1 window in 15 here).
    assert last["hz"] == pytest.approx(hz, abs=0.1)
    assert last["p_w"] == pytest.approx(p_ref, rel=0.01)
    assert "freq_range" not in last["flags"]


@pytest.mark.parametrize("board", accuracy.BOARDS)
def test_no_load_reads_no_current(tmp_path, board):
    assert accuracy.noload(tmp_path, board) <= 0.02
