"""The meter's radio side in the loop: the real firmware in MicroPython, the modem simulator
and ChirpStack's MQTT integration on a real broker. Commands arrive as ChirpStack downlinks,
readings leave as signed bundles; power cuts, clock errors and forged commands do what
docs/protocol.md says."""

import base64
import json
import time

import pytest
from Crypto.Signature import eddsa

from hardware.sim.meter import ModemLink, SimMeter
from meter import frame
from tools import traces

APP_ID = "22222222-3333-4444-5555-666666666666"
DEV_EUI = "70b3d57ed0d1b001"
EUI = bytes.fromhex(DEV_EUI)
KEY = bytes(range(100, 116))
T_TRUE = 1_767_225_600  # what time it really is at boot


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / "kettle.csv"
    traces.generate(p, "kettle", 60.0, rate_hz=2000, seed=3)
    return p


def _meter(tmp_path, trace, modem, max_sim_s, flash="flash", dialect="rak3172", **cfg):
    config = {"interval_s": 10, "jitter_s": 0, "region": "US915", "dr": 3, "device_class": "C",
              "airtime_s_day": 5000.0, "modem": dialect, **cfg}
    return SimMeter(board="esp32", trace=trace, flash=tmp_path / flash, loop=True, speed=10.0,
                    max_sim_s=max_sim_s, command_key=KEY, true_epoch=T_TRUE,
                    rtc_epoch=T_TRUE - 3700, config=config,
                    modem=ModemLink("127.0.0.1", modem.port, DEV_EUI, dialect=dialect))


def _bundles(tap, public):
    """Every bundle that reached the network, verified with the meter's public key."""
    out = {}
    verifier = eddsa.new(eddsa.import_public_key(public), "rfc8032")
    for p in tap.of("up", 0, timeout=0.1):
        ev = json.loads(p)
        if ev.get("fPort") != frame.PORT_READING:
            continue  # the modem's one-byte uplink that carries DeviceTimeReq
        data = base64.b64decode(ev["data"])
        b = frame.decode_bundle(data)
        verifier.verify(frame.signed_message(EUI, b.body), b.signature)
        for r in b.readings:
            out[r.seq] = r
    return out


@pytest.mark.parametrize("dialect", ["rak3172", "wioe5"])
def test_commands_run_once_and_only_when_genuine(tmp_path, trace, broker, start_modem_sim,
                                                 mqtt_tap, dialect):
    modem = start_modem_sim(APP_ID, speed=100.0)
    tap = mqtt_tap(f"application/{APP_ID}/device/+/event/+", application_id=APP_ID)
    m = _meter(tmp_path, trace, modem, 150, dialect=dialect)
    public = m.provision_key()
    m.start()
    tap.wait("up", timeout=60)  # joined and talking

    def send(counter, op, *args, key=KEY, expires=0):
        tap.down(DEV_EUI, frame.PORT_COMMAND,
                 frame.encode_command(key, EUI, counter, expires, op, *args))
        time.sleep(0.5)

    send(10, frame.OP_INTERVAL, 20)                      # genuine: readings every 20 s
    send(10, frame.OP_INTERVAL, 5)                       # the same counter again: a replay
    send(11, frame.OP_INTERVAL, 5, key=bytes(16))        # forged: wrong key
    send(12, frame.OP_RELAY, frame.RELAY_OFF, 0, expires=T_TRUE - 10)  # expired
    send(13, frame.OP_RELAY, frame.RELAY_OFF, 600)       # genuine
    tap.down(DEV_EUI, frame.PORT_COMMAND, b"\x18garbage")  # malformed
    readings, stats = m.run()
    assert stats["uplink_commands"] == 2, m.log_tail()
    assert stats["uplink_commands_rejected"] == 4, m.log_tail()
    log = m.log_tail(200)
    assert "replay" in log and "auth" in log and "expired" in log and "truncated" in log
    # The interval change took effect: after it, readings are 20 s apart.
    ends = [r["t_end"] for r in readings]
    assert 20 in {b - a for a, b in zip(ends, ends[1:])}
    assert 5 not in {b - a for a, b in zip(ends, ends[1:])}
    assert _bundles(tap, public)


def test_power_cut_loses_no_reading_and_reuses_no_sequence_number(tmp_path, trace, broker,
                                                                   start_modem_sim, mqtt_tap):
    modem = start_modem_sim(APP_ID, speed=100.0)
    tap = mqtt_tap(f"application/{APP_ID}/device/+/event/up", application_id=APP_ID)
    # Bundles of 4 readings: at the cut, up to 3 closed readings wait unsigned on flash.
    first = _meter(tmp_path, trace, modem, 65, bundle_max=4, airtime_s_day=1.0)
    first.power_cut = True
    public = first.provision_key()
    r1, s1 = first.run()
    before = {r["seq"]: r for r in r1}
    second = _meter(tmp_path, trace, modem, 120, bundle_max=4, airtime_s_day=50000.0)
    r2, s2 = second.run()
    after = {r["seq"]: r for r in r2}
    assert not set(before) & set(after), "a sequence number was used twice"
    assert min(after) == max(before) + 1
    time.sleep(1.0)
    got = _bundles(tap, public)
    # Every reading closed before the cut reached the network, signed, with its registers.
    for seq, r in before.items():
        assert seq in got, (seq, sorted(got))
        assert got[seq].import_dwh == r["import_dwh"]
    assert got[min(after)].flags & frame.FLAG_RESTART


def test_clock_is_set_from_the_network_and_readings_align(tmp_path, trace, broker,
                                                          start_modem_sim, mqtt_tap):
    modem = start_modem_sim(APP_ID, speed=100.0)
    tap = mqtt_tap(f"application/{APP_ID}/device/+/event/up", application_id=APP_ID)
    m = _meter(tmp_path, trace, modem, 90)  # the RTC is 3700 s behind the truth
    public = m.provision_key()
    readings, stats = m.run()
    assert stats["synced"] and stats["uplink_time_syncs"] >= 1
    assert abs(stats["unix_time"] - stats["true_unix"]) <= 2
    synced = [r for r in readings if "clock_unsynced" not in r["flags"]]
    unsynced = [r for r in readings if "clock_unsynced" in r["flags"]]
    assert synced, readings
    # Before the sync the meter said so; after it, readings end on 10 s boundaries of true
    # time (all but the last: the simulation's end closes a partial interval).
    assert unsynced and all(r["t_end"] < T_TRUE for r in unsynced)
    assert all(r["t_end"] % 10 == 0 and r["t_end"] >= T_TRUE for r in synced[:-1])
    time.sleep(1.0)
    got = _bundles(tap, public)
    assert {r["seq"] for r in readings if r["seq"] in got}
