"""The modem drivers (both dialects, real MicroPython) against the simulator's
injected faults: a modem that answers busy, acknowledgements and frames lost,
a network outage, a modem that restarts by itself, line noise, and a modem
that hangs. Whatever happens, every call returns within its bounds and the
driver keeps going."""

from __future__ import annotations

import threading
import time

import pytest

# The fixtures too: pytest finds them among this module's names.
from test_modem_driver import (DEV, KINDS, SPEED, make_sim, run_driver, run_joined,  # noqa: F401
                               tap, ups, wait_for)

# Runs a driver call and notes it when it took longer than it may.
TIMED = """
async def timed(name, coro, limit_ms):
    t0 = time.ticks_ms()
    try:
        r = await coro
    except Exception as e:  # ModemError from a garbled answer: noted, not fatal
        r = "%s: %s" % (type(e).__name__, e)
    ms = time.ticks_diff(time.ticks_ms(), t0)
    if ms > limit_ms:
        res.setdefault("late", []).append([name, ms])
    return r
"""


def in_background(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("kind", KINDS)
def test_busy_answers_are_waited_out(make_sim, tap, kind):
    sim = make_sim(busy_prob=0.5, seed=7)
    res = run_joined(sim.port, kind, 'res["sent"] = await sends(4)\n')
    assert res["sent"] == [[True, None]] * 4
    busy = res["stats"]["busy"]
    assert busy >= 1 and busy == sim.counters["busy"] == sim.counters["fault_busy"]
    assert [u.data for u in ups(tap, 4)] == [bytes([i]) for i in range(4)]


@pytest.mark.parametrize("kind", KINDS)
def test_lost_acknowledgements(make_sim, tap, kind):
    sim = make_sim(ack_loss=0.5, seed=3)
    res = run_joined(sim.port, kind, 'res["sent"] = await sends(6, confirmed=True)\n')
    lost = sim.counters["fault_ack_lost"]
    assert 0 < lost < 6  # seeded: some of each
    assert [ok for ok, _ in res["sent"]].count(False) == lost == res["stats"]["send_failed"]
    assert all(err == "no acknowledgement" for ok, err in res["sent"] if not ok)
    # The network got every one of them; only its answers were lost.
    assert [u.data for u in ups(tap, 6)] == [bytes([i]) for i in range(6)]


@pytest.mark.parametrize("kind", KINDS)
def test_lost_uplinks(make_sim, tap, kind):
    sim = make_sim(uplink_loss=0.5, seed=11)
    res = run_joined(sim.port, kind, """
res["unconfirmed"] = await sends(6)
res["confirmed"] = await sends(6, port=2, confirmed=True)
""")
    # A radio does not know its frame was lost: unconfirmed uplinks all "went".
    assert res["unconfirmed"] == [[True, None]] * 6
    lost = sim.counters["fault_uplinks_lost"]
    arrived = sim.counters["uplinks"]
    assert lost + arrived == 12 and 0 < lost < 12
    # A confirmed one is acknowledged exactly when it arrived.
    assert [ok for ok, _ in res["confirmed"]].count(True) == \
        [u.f_port for u in ups(tap, arrived)].count(2)


@pytest.mark.parametrize("kind", KINDS)
def test_network_outage(make_sim, tap, kind):
    sim = make_sim()
    sim.set_outage(True)

    def operator():
        # The network comes back after two failed joins, and goes again
        # after the first uplink went through.
        wait_for(lambda: sim.counters["fault_outage_joins"] >= 2)
        sim.set_outage(False)
        wait_for(lambda: sim.counters["uplinks"] >= 1)
        sim.set_outage(True)

    t = in_background(operator)
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(dr=5)
    res["join"] = await m.join(attempts=30, retries=0, backoff_s=0.02,
                               interval_s=7 if KIND == "rak3172" else 0)
    res["sent"] = []
    for i in range(40):
        ok = await m.send(1, bytes([i]), confirmed=True)
        res["sent"].append(ok)
        if not ok:
            res["error"] = m.last_error
            break
""")
    t.join(5)
    assert res["join"] is True and res["stats"]["join_failed"] >= 2
    assert res["sent"][0] is True and res["sent"][-1] is False
    assert res["error"] == "no acknowledgement"
    assert sim.counters["fault_outage_uplinks"] == 1
    assert sim.counters["fault_outages"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_modem_restart_is_noticed_and_recovered(make_sim, tap, kind):
    sim = make_sim()

    def restart_after_first_uplink():
        wait_for(lambda: sim.counters["uplinks"] >= 1)
        time.sleep(0.1)  # past the first uplink's receive windows (20 ms here)
        sim.reboot(DEV)

    t = in_background(restart_after_first_uplink)
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(dr=5, device_class="C")
    await m.join()
    res["first"] = await m.send(1, b"a")
    # The RAK3172 prints its banner; the Wio-E5 prints nothing and its next
    # uplink is refused ("Please join network first").
    tries = 0
    while not m.needs_setup and tries < 50:
        tries += 1
        await m.send(1, b"b", timeout_s=0.5)
        await asyncio.sleep_ms(20)
    res["noticed"] = [m.needs_setup, m.device_class, await m.joined()]
    await m.configure(dr=5, device_class="C")
    res["after_setup"] = m.needs_setup
    res["rejoin"] = await m.join()
    res["again"] = await m.send(1, b"c")
""")
    t.join(5)
    assert res["first"] is True
    assert res["noticed"] == [True, None, False]
    assert res["after_setup"] is False and res["rejoin"] is True and res["again"] is True
    assert res["stats"]["reboots"] == 1 and res["stats"]["joins"] == 2
    assert sim.counters["fault_reboots"] == 1 and sim.counters["joins"] == 2
    assert ups(tap, 2)[-1].data == b"c"


@pytest.mark.parametrize("kind", KINDS)
def test_line_noise_never_hangs_the_driver(make_sim, kind):
    # A third of the modem's lines garbled: answers, events, downlinks. The
    # driver may fail a step, but each call comes back within its bound.
    sim = make_sim(corrupt_prob=0.3, seed=5)
    res = run_driver(sim.port, kind, TIMED + """
m.cmd_timeout_ms = 150
m.reboot_ms = 400
async def main():
    res["steps"] = []
    res["steps"].append(await timed("probe", m.probe(), 500))
    res["steps"].append(await timed("configure", m.configure(dr=5), 2500))
    res["steps"].append(await timed("join", m.join(attempts=2, timeout_s=0.5, backoff_s=0.05,
                                                   interval_s=7 if KIND == "rak3172" else 0),
                                    2500))
    for k in range(3):
        res["steps"].append(await timed("send", m.send(1, bytes([k]), timeout_s=0.5), 1500))
    res["steps"].append(await timed("time", m.network_time(timeout_s=0.5), 2500))
""")
    assert "late" not in res, res["late"]
    assert sim.counters["fault_corrupted_lines"] > 0
    st = res["stats"]
    assert st["unknown_lines"] + st["timeouts"] > 0  # the noise was seen, and survived
    assert True in res["steps"]  # and some things still worked


@pytest.mark.parametrize("kind", KINDS)
def test_hung_modem_times_out_then_recovers(make_sim, kind):
    sim = make_sim()

    def hang_when_joined():
        wait_for(lambda: sim.devices().get(DEV, {}).get("joined"))
        sim.silence(DEV, 0.6 * SPEED)  # 0.6 s here

    t = in_background(hang_when_joined)
    res = run_driver(sim.port, kind, TIMED + """
m.cmd_timeout_ms = 150
async def main():
    await m.configure(dr=5)
    await m.join()
    await asyncio.sleep_ms(100)  # the modem hangs meanwhile
    res["during"] = [await timed("probe", m.probe(attempts=1), 400),
                     await timed("send", m.send(1, b"x", timeout_s=1), 400)]
    res["error"] = m.last_error
    ok = False
    for i in range(20):
        ok = await timed("send", m.send(1, b"y", timeout_s=1), 1500)
        if ok:
            break
    res["after"] = ok
""")
    t.join(5)
    assert "late" not in res, res["late"]
    assert res["during"] == [False, False] and res["error"].startswith("timeout")
    assert res["after"] is True
    assert res["stats"]["timeouts"] >= 2
    assert sim.counters["fault_silences"] == 1 and sim.counters["fault_silenced_lines"] >= 2
