"""End to end on the demo's path: real firmware in MicroPython on simulated boards -> AT modem
simulator -> ChirpStack events on a real Mosquitto -> gateway -> ledger node (SQLite).

The energy the ledger holds for each meter must equal the energy in the meter's trace (computed
independently from the CSV by tools.traces) within 2 %."""


import pytest

from meter import frame
from tools import traces
from tools.deployment import RTC_EPOCH, Deployment, default_fleet

pytestmark = pytest.mark.slow

INTERVAL_S = 20


@pytest.fixture(scope="module")
def finished_deployment(tmp_path_factory):
    wd = tmp_path_factory.mktemp("e2e")
    fleet = default_fleet(3)
    # 240 simulated seconds per meter at 20x: the meters run about 12 s, then their traces end.
    dep = Deployment(wd, fleet, speed=20.0, interval_s=INTERVAL_S, trace_s=240.0)
    dep.start()
    try:
        for sm in dep.meters.values():
            sm.proc.wait(timeout=240)
        dep.inject_bad_uplinks()
        assert dep.drain(timeout=60), "gateway did not drain its outbox"
        yield dep
    finally:
        dep.stop()


def _reference_wh(path, t_s):
    """Trace energy from its start to t_s (whole intervals), as an ideal meter registers it."""
    iv = traces.reference_intervals(path, INTERVAL_S)
    n = int(round(t_s / INTERVAL_S))
    assert n <= len(iv)
    imp = sum(d["import_wh"] for d in iv[:n])
    exp = sum(d["export_wh"] for d in iv[:n])
    return imp, exp


def test_every_meter_reached_the_ledger(finished_deployment):
    dep = finished_deployment
    for m in dep.fleet:
        stored = dep.ledger_readings(m.dev_eui)
        fw = dep.readings[m.name]
        # The last reading or two may still sit in the meter when its trace (its power) ends.
        assert len(stored) >= len(fw) - 2 >= 8, (m.name, len(stored), len(fw))
        assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))


def test_ledger_energy_matches_the_trace_within_2_percent(finished_deployment):
    dep = finished_deployment
    for m in dep.fleet:
        stored = dep.ledger_readings(m.dev_eui)
        last = stored[-1]
        t_s = last["t_end"] - RTC_EPOCH
        ref_imp, ref_exp = _reference_wh(dep.trace_path(m), t_s)
        got_imp, got_exp = last["import_dwh"] / 10, last["export_dwh"] / 10
        if m.kind == "pv":
            assert ref_exp > 50, "the PV trace must export"
            assert got_exp == pytest.approx(ref_exp, rel=0.02), m.name
        assert got_imp == pytest.approx(ref_imp, rel=0.02, abs=0.2), m.name


def test_ledger_registers_are_the_meters_own(finished_deployment):
    """What the ledger holds is exactly what the firmware registered at that sequence number."""
    dep = finished_deployment
    for m in dep.fleet:
        fw = {r["seq"]: r for r in dep.readings[m.name]}
        for r in dep.ledger_readings(m.dev_eui):
            f = fw[r["seq"]]
            assert r["t_end"] == f["t_end"]
            assert r["import_dwh"] == f["import_dwh"] and r["export_dwh"] == f["export_dwh"]
            # Each reading comes with the signed bundle that carried it.
            b = frame.decode_bundle(bytes.fromhex(r["bundle"]))
            assert r["seq"] in [x.seq for x in b.readings]


def test_bad_input_is_rejected_and_counted_not_stored(finished_deployment):
    dep = finished_deployment
    g = dep.gateway_stats()
    rej = g["rejected"]
    for reason in ("malformed_json", "unknown_device", "bad_signature", "truncated"):
        assert rej.get(reason, 0) >= 1, (reason, rej)
    led = dep.ledger_stats()
    assert led["stored"] == g["verified"]
    assert set(led["per_device"]) == {m.dev_eui for m in dep.fleet}


def test_ledger_is_consistent(finished_deployment):
    check = finished_deployment.ledger_check()
    assert check["ok"], check["problems"]
    assert check["devices"] == 3
