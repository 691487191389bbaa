"""Hardware in the loop: one meter (the real firmware in MicroPython on simulated hardware), the
modem simulator with 10 % of uplinks lost and a 6-hour outage, the gateway and the ledger, for
a day of 96 readings. Afterwards the ledger holds every reading, each with exactly the
registers the meter reported, with no gap.

The day is compressed 180 times so it runs in about a minute: readings every 5 s instead
of 15 min, the radio simulator 180 times faster than the meter's clock, the gateway's resend
timings scaled alike. Signing does not compress (the simulated ESP32 takes its real time to
sign), so the airtime budget is set for three readings per signature, as the meter plans
at SF9 in the field. The region is US915 so that the sub-band
duty cycle (which does not compress: it is a property of the band) does not throttle a
day squeezed into 8 minutes; the duty cycle is covered by tests/unit/test_airtime.py and
the meter's budget tests.
"""

import json
import threading
import time

from gateway.daemon import Gateway
from hardware.sim.meter import ModemLink, SimMeter
from ledger_node.server import LedgerServer
from tools import traces

APP_ID = "11111111-2222-3333-4444-555555555555"
DEV_EUI = "70b3d57ed0d1a001"
COMPRESS = 180
INTERVAL_S = 5  # 15 min / 180
DAY_S = 96 * INTERVAL_S
OUTAGE = (0.25 * DAY_S, 0.5 * DAY_S)  # 6 h of the 24
METER_SPEED = 12.0  # simulated seconds per real second on the meter


def test_a_lossy_day_ends_with_every_reading_in_the_ledger(tmp_path, broker, start_modem_sim):
    trace = tmp_path / "home.csv"
    traces.generate(trace, "home", 600.0, rate_hz=2000, seed=11)
    cmd_key = bytes(range(16, 32))
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({DEV_EUI: cmd_key.hex()}))
    keys.chmod(0o600)

    modem = start_modem_sim(APP_ID, speed=METER_SPEED * COMPRESS, uplink_loss=0.10, seed=5)
    meter = SimMeter(board="esp32", trace=trace, flash=tmp_path / "flash", loop=True,
                     speed=METER_SPEED, max_sim_s=DAY_S + 40 * INTERVAL_S,
                     command_key=cmd_key,
                     config={"interval_s": INTERVAL_S, "region": "US915", "dr": 3,
                             "device_class": "C", "airtime_s_day": 1200.0,
                             "jitter_s": 1, "confirm_every": 4, "time_sync_s": 300},
                     modem=ModemLink("127.0.0.1", modem.port, DEV_EUI))
    public = meter.provision_key()

    with LedgerServer(tmp_path / "ledger.db") as ledger:
        ledger.api.enroll({"dev_eui": DEV_EUI, "public_key": public.hex(),
                           "community": "lossy", "owner": "00" * 16})
        gw = Gateway("127.0.0.1", broker.port, f"http://127.0.0.1:{ledger.port}",
                     tmp_path / "gw", application_id=APP_ID,
                     command_keys=tmp_path / "keys.json",
                     resend_after_s=2 * 3600 / COMPRESS / METER_SPEED,
                     resend_min_interval_s=3600 / COMPRESS / METER_SPEED,
                     resend_max_per_day=100)
        with gw:
            readings = {}
            outage = {"on": None, "off": None}
            meter.start()
            stats = None
            for line in meter.lines():
                if "stats" in line:
                    stats = line["stats"]
                    continue
                if "seq" not in line:
                    continue
                readings[line["seq"]] = line
                t = line["t_s"]
                if outage["on"] is None and t >= OUTAGE[0]:
                    modem.set_outage(True)
                    outage["on"] = line["seq"]
                elif outage["off"] is None and t >= OUTAGE[1]:
                    modem.set_outage(False)
                    outage["off"] = line["seq"]
            assert stats is not None, meter.log_tail()
            gw.wait_idle(30)
            stored = {r["seq"]: r for r in ledger.api.readings_of(DEV_EUI)}

    assert len(readings) >= 96 + 30
    lost = modem.counters.get("fault_uplinks_lost", 0)
    assert lost >= 2, (modem.counters, stats)  # the loss really happened (seeded: 3 here)
    assert outage["on"] and outage["off"]
    # Everything the meter sealed before the last stretch reached the ledger, with no gap...
    top = max(stored)
    assert top >= 96 + 20, ({k: v for k, v in stats.items() if k.startswith(("uplink", "pending", "open"))}, len(readings))
    assert sorted(stored) == list(range(1, top + 1)), sorted(set(range(1, top + 1)) - set(stored))
    # ...and every stored reading holds exactly the meter's registers at that reading.
    for seq, r in stored.items():
        m = readings[seq]
        assert r["import_dwh"] == m["import_dwh"], seq
        assert r["export_dwh"] == m["export_dwh"], seq
        assert r["t_end"] == m["t_end"], seq
    # The link went down and came back, and the gateway asked for what random loss took.
    assert stats["uplink_link_down"] >= 1
    assert stats["uplink_commands"] >= 1
