"""The modem drivers (RAK3172 / RUI3 and Wio-E5 / Seeed AT) running in the real
MicroPython interpreter, over the simulated UART, against the modem simulator
and a real Mosquitto. Every flow runs against both dialects through the one
interface (`meter.modem.make`)."""

from __future__ import annotations

import functools
import json
import math
import socket
import subprocess
import textwrap
import threading
import time

import pytest
from chirpstack_api import integration
from google.protobuf import json_format

from meter import lorawan
from tools import runtime

APP = "9b0e6f2c-1a3d-4e5f-8a7b-6c5d4e3f2a19"
DEV = "70b3d57ed0051b02"
JOIN_EUI = "0000000000000001"
APP_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
SPEED = 100.0  # a 5 s join takes 50 ms
KINDS = ("rak3172", "wioe5")

# Shared by every scenario: wire UART 1 to the simulator as a modem of the
# given kind, make its driver, run `main()` and print `res` as the last line.
PRELUDE = """
import sys, json, asyncio, time
import sim_uart
from meter.modem import make, ModemError
KIND = sys.argv[2]
sim_uart.attach(1, "127.0.0.1", int(sys.argv[1]), "%(dev)s", "%(join_eui)s", "%(app_key)s",
                dialect=KIND)
uart = sim_uart.TcpUart(1, baudrate=115200, timeout=0)
log = []
m = make(KIND, uart, log=log.append)
m.busy_wait_ms = 30
m.mac_wait_ms = 300
res = {}
def out(r):
    r["stats"] = m.stats
    print(json.dumps(r))
def hexdl(d):
    return d and [d[0], d[1].hex()]
async def sends(n, port=1, confirmed=False):
    # n one-byte uplinks (0, 1, ...): [[ok, last_error], ...]
    r = []
    for i in range(n):
        ok = await m.send(port, bytes([i]), confirmed=confirmed)
        r.append([ok, None if ok else m.last_error])
    return r
""" % dict(dev=DEV, join_eui=JOIN_EUI, app_key=APP_KEY)


def run_driver(port: int, kind: str, body: str, heapsize: str | None = None, path=None) -> dict:
    code = PRELUDE + body + "\nasyncio.run(main())\nout(res)\n"
    proc = runtime.run_micropython(None, str(port), kind, code=code, heapsize=heapsize,
                                   timeout=60, path=path)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    if proc.returncode != 0:
        pytest.fail(f"MicroPython exited {proc.returncode}:\n{stdout}\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


def run_joined(port: int, kind: str, body: str, **kw) -> dict:
    """run_driver with a main() that configures (EU868, DR5) and joins, then
    runs `body` (statements at the left margin)."""
    main = "async def main():\n    await m.configure(dr=5)\n    await m.join()\n"
    return run_driver(port, kind, main + textwrap.indent(body, "    "), **kw)


def ups(tap, n):
    return [json_format.Parse(p, integration.UplinkEvent(), ignore_unknown_fields=True)
            for p in tap.of("up", n)]


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def wait_queued(sim, n, timeout=5.0):
    wait_for(lambda: sim.counters["downlinks_queued"] >= n, timeout)


def link_margin(snr: float, region: str, dr: int) -> int:
    """LinkCheckAns margin: the SNR above what the spreading factor needs
    (SX126x data sheet: -7.5 dB at SF7, 2.5 dB less per step up to -20 at SF12)."""
    sf = lorawan.DATA_RATES[region][dr][0]
    return int(snr - (-7.5 - 2.5 * (sf - 7)))


@pytest.fixture
def tap(mqtt_tap):
    return mqtt_tap(f"application/{APP}/device/+/event/#", application_id=APP)


@pytest.fixture
def make_sim(start_modem_sim):
    return functools.partial(start_modem_sim, APP, speed=SPEED)


@pytest.mark.parametrize("kind", KINDS)
def test_probe_configure_join_and_send(make_sim, tap, kind):
    sim = make_sim()
    res = run_driver(sim.port, kind, """
async def main():
    res["setup_before"] = m.needs_setup
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
    res["configure"] = await m.configure("EU868", dr=5, device_class="A")
    res["setup_after"] = m.needs_setup
    res["region_dr"] = [m.region, m.dr, m.max_payload()]
    res["joined_before"] = await m.joined()
    res["join"] = await m.join()
    res["joined_after"] = await m.joined()
    res["unconfirmed"] = await m.send(1, b"\\x01\\x02\\x03")
    res["confirmed"] = await m.send(1, bytes(range(100)), confirmed=True)
    res["downlink"] = m.downlink()
""")
    assert res["setup_before"] is True and res["setup_after"] is False
    assert res["probe"] is True
    assert res["dev_eui"] == DEV
    assert res["configure"] is True
    assert res["region_dr"] == ["EU868", 5, 222]  # BRIEF section 4: DR4-DR5 carry 222
    assert res["joined_before"] is False and res["join"] is True and res["joined_after"] is True
    assert res["unconfirmed"] is True and res["confirmed"] is True
    assert res["downlink"] is None
    st = res["stats"]
    assert (st["sent"], st["send_failed"], st["joins"], st["join_failed"]) == (2, 0, 1, 0)
    # The RAK3172's power-up banner is known, not noise; nothing else came.
    assert st["unknown_lines"] == 0 and st["timeouts"] == 0 and st["reboots"] == 0
    got = ups(tap, 2)
    assert [(u.f_port, u.data, u.f_cnt, u.confirmed) for u in got] == [
        (1, b"\x01\x02\x03", 0, False), (1, bytes(range(100)), 1, True)]
    assert all(u.device_info.dev_eui == DEV and u.dr == 5 for u in got)


@pytest.mark.parametrize("kind", KINDS)
def test_join_backs_off_between_failed_attempts(make_sim, kind):
    sim = make_sim(fail_joins=2)
    res = run_driver(sim.port, kind, """
async def main():
    t0 = time.ticks_ms()
    # One join request per attempt, so our own backoff runs between them.
    res["join"] = await m.join(attempts=3, retries=0, interval_s=7, backoff_s=0.1)
    res["ms"] = time.ticks_diff(time.ticks_ms(), t0)
    res["log"] = [x for x in log if "join attempt" in x]
""")
    assert res["join"] is True
    assert res["stats"]["join_failed"] == 2 and res["stats"]["joins"] == 1
    assert sim.counters["join_requests"] == 3
    # Backoff doubles: at least 100 ms after the first failure, 200 ms after the second.
    assert len(res["log"]) == 2
    assert res["ms"] >= 300


@pytest.mark.parametrize("kind", KINDS)
def test_join_retries_within_one_attempt(make_sim, kind):
    # RUI3 retries by itself (AT+JOIN=1:0:10:8); for the Wio-E5 the driver
    # sends AT+JOIN again, interval_s apart. Either way no backoff is needed.
    sim = make_sim(fail_joins=2, legacy_events=True)
    res = run_driver(sim.port, kind, """
async def main():
    res["join"] = await m.join(attempts=1, retries=8,
                               interval_s=10 if KIND == "rak3172" else 0.05)
""")
    assert res["join"] is True
    assert res["stats"]["join_failed"] == 2
    assert sim.counters["join_requests"] == 3


@pytest.mark.parametrize("kind", KINDS)
def test_join_gives_up(make_sim, kind):
    sim = make_sim(fail_joins=100)
    res = run_driver(sim.port, kind, """
async def main():
    res["join"] = await m.join(attempts=2, retries=1, backoff_s=0.05,
                               interval_s=7 if KIND == "rak3172" else 0.05)
    res["joined"] = await m.joined()
    res["send"] = await m.send(1, b"x")
    res["error"] = m.last_error
""")
    assert res["join"] is False and res["joined"] is False
    assert res["stats"]["join_failed"] == 4  # 2 attempts x (1 + 1 retry)
    assert res["send"] is False
    assert ("AT_NO_NETWORK_JOINED" if kind == "rak3172" else "Please join network first") \
        in res["error"]
    assert res["stats"]["reboots"] == 0  # never joined: nothing was lost
    assert sim.counters["join_requests"] == 4


@pytest.mark.parametrize("kind,old", [("rak3172", False), ("rak3172", True),
                                      ("wioe5", False), ("wioe5", True)])
def test_downlinks_in_both_formats(make_sim, tap, kind, old):
    # RUI3: +EVT:RX_1:..:<port>:<hex> or the older header + payload lines;
    # Wio-E5: RX: "AABB" or the older firmware's RX: "AA BB".
    sim = make_sim(legacy_events=old, wio_spaced_hex=old)
    tap.down(DEV, 5, b"\xAA\xBB")
    tap.down(DEV, 6, b"")
    tap.down(DEV, 7, bytes(range(200)), confirmed=True)
    wait_queued(sim, 3)
    res = run_joined(sim.port, kind, """
got = []
for i in range(3):
    ok = await m.send(2, b"\\x01")
    got.append([ok, hexdl(m.downlink())])
res["got"] = got
res["after"] = m.downlink()
res["rssi"] = [m.last_rssi, m.last_snr]
""")
    assert res["got"] == [[True, [5, "aabb"]], [True, [6, ""]],
                          [True, [7, bytes(range(200)).hex()]]]
    assert res["after"] is None
    assert res["rssi"] == [sim.rssi, round(sim.snr)]
    assert res["stats"]["downlinks"] == 3 and res["stats"]["unknown_lines"] == 0
    acks = [json_format.Parse(p, integration.AckEvent(), ignore_unknown_fields=True)
            for p in tap.of("ack", 1)]
    assert len(acks) == 1 and acks[0].acknowledged


@pytest.mark.parametrize("kind,old", [("rak3172", False), ("rak3172", True), ("wioe5", False)])
def test_class_c_downlink_while_a_command_waits(make_sim, tap, kind, old):
    sim = make_sim(legacy_events=old, wio_spaced_hex=old)
    tap.down(DEV, 9, b"\x01\x00")
    wait_queued(sim, 1)
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(device_class="A")
    await m.join()
    # Switching to Class C releases the queued downlink; its lines reach us
    # while the driver waits for the answer to AT+CLASS=C.
    await m.configure(device_class="C")
    res["dl"] = hexdl(m.downlink())
    res["wait"] = await m.wait_downlink(100)
""")
    assert res["dl"] == [9, "0100"]
    assert res["wait"] is None
    assert res["stats"]["timeouts"] == 0 and res["stats"]["unknown_lines"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_class_c_downlink_while_idle(make_sim, tap, kind):
    sim = make_sim()

    def publish_when_joined():
        wait_for(lambda: sim.devices().get(DEV, {}).get("cls") == "C"
                 and sim.devices()[DEV]["joined"])
        tap.down(DEV, 12, b"\x42")

    t = threading.Thread(target=publish_when_joined, daemon=True)
    t.start()
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(device_class="C")
    await m.join()
    res["dl"] = hexdl(await m.wait_downlink(5000))
""")
    t.join(5)
    assert res["dl"] == [12, "42"]
    assert res["stats"]["downlinks"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_lines_are_ignored_and_counted(make_sim, kind):
    sim = make_sim(boot_banner=False)
    sim.inject_lines(DEV, "+EVT:SOMETHING_NEW:1", "Restarting...", "+EVT:RX_1:broken",
                     '+MSGHEX: PORT: x; RX: "zz"')
    res = run_driver(sim.port, kind, """
async def main():
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
""")
    assert res["probe"] is True and res["dev_eui"] == DEV
    assert res["stats"]["unknown_lines"] == 4
    assert res["stats"]["downlinks"] == 0


@pytest.mark.parametrize("kind", KINDS)
def test_payload_too_long_for_the_data_rate_is_refused(make_sim, tap, kind):
    sim = make_sim()
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(dr=0)
    await m.join()
    res["max0"] = m.max_payload()
    try:
        await m.send(1, bytes(52))
    except ValueError as e:
        res["big"] = str(e)
    res["fits"] = await m.send(1, bytes(51))
    await m.set_dr(3)
    res["max3"] = [m.dr, m.max_payload()]
    res["dr3"] = await m.send(1, bytes(115))
    try:
        await m.set_dr(7)
    except ValueError as e:
        res["bad_dr"] = str(e)
    try:
        await m.send(0, b"x")
    except ValueError as e:
        res["port0"] = str(e)
""")
    # BRIEF section 4: EU868 DR0-DR2 carry 51 bytes, DR3 115; EU868 has DR0..DR6.
    assert res["max0"] == 51 and res["max3"] == [3, 115]
    assert "52 bytes" in res["big"] and "51" in res["big"]
    assert res["fits"] is True and res["dr3"] is True
    assert "7" in res["bad_dr"] and "port" in res["port0"]
    assert [(len(u.data), u.dr) for u in ups(tap, 2)] == [(51, 0), (115, 3)]
    assert sim.counters["uplinks_rejected"] == 0  # the modem never saw the long one


@pytest.mark.parametrize("kind", KINDS)
def test_busy_modem_is_retried(make_sim, tap, kind):
    # 1 % duty cycle: after each uplink the modem refuses the next for 99x its
    # airtime. At DR3 that is 18 s simulated, 0.37 s here, far longer than the
    # uplink's own receive windows.
    sim = make_sim(duty_cycle=0.01, speed=50)
    res = run_driver(sim.port, kind, """
async def main():
    await m.configure(dr=3)
    await m.join()
    res["a"] = await m.send(3, b"first")
    res["b"] = await m.send(3, b"second")
""")
    assert res["a"] is True and res["b"] is True
    assert res["stats"]["busy"] >= 1 and sim.counters["busy"] == res["stats"]["busy"]
    assert [u.data for u in ups(tap, 2)] == [b"first", b"second"]


@pytest.mark.parametrize("kind", KINDS)
def test_link_check(make_sim, tap, kind):
    sim = make_sim()
    res = run_joined(sim.port, kind, """
# On its own: a one-byte uplink on mac_port carries the request.
res["own"] = await m.link_check()
res["mac_uplinks"] = m.stats["mac_uplinks"]
# Riding on an application uplink sent meanwhile by another task.
async def reading():
    await asyncio.sleep_ms(50)
    return await m.send(1, b"reading")
task = asyncio.create_task(reading())
res["ride"] = await m.link_check(wait_s=5)
res["sent"] = await task
""")
    want = [link_margin(sim.snr, "EU868", 5), 1]  # one gateway in the simulation
    assert res["own"] == want and res["ride"] == want
    assert res["mac_uplinks"] == 1 and res["stats"]["mac_uplinks"] == 1
    assert res["sent"] is True
    got = ups(tap, 2)
    assert [(u.f_port, u.data) for u in got] == [(222, b"\x00"), (1, b"reading")]
    assert sim.counters["link_answers"] == 2


@pytest.mark.parametrize("kind,old", [("rak3172", False), ("rak3172", True), ("wioe5", False)])
def test_network_time_is_the_true_time(make_sim, kind, old):
    # The simulated board's true time (simhw.true_unix) reaches the simulator
    # in #SIM-TIME lines; the network answers DeviceTimeReq with it and the
    # modem's clock (AT+LTIME / AT+RTC, whole seconds) shows it.
    epoch, board_s, ppm = 1790000000, 3600.5, 50.0
    sim = make_sim(legacy_events=old)
    res = run_driver(sim.port, kind, """
import simhw
simhw.hw.true_epoch = %d
simhw.clock.now_us = %d
simhw.hw.clock_ppm = %r
async def main():
    await m.configure(dr=5)
    await m.join()
    res["t"] = await m.network_time()
""" % (epoch, int(board_s * 1e6), ppm))
    true = epoch + board_s / (1 + ppm * 1e-6)  # 1790003600.32
    assert res["t"] == math.floor(true)
    assert sim.counters["time_answers"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_network_time_and_link_check_without_answer(make_sim, kind):
    sim = make_sim(uplink_loss=1.0)
    res = run_joined(sim.port, kind, """
t0 = time.ticks_ms()
res["time"] = await m.network_time(timeout_s=2)
res["link"] = await m.link_check(timeout_s=2)
res["ms"] = time.ticks_diff(time.ticks_ms(), t0)
""")
    assert res["time"] is None and res["link"] is None
    assert res["ms"] < 2 * (2000 + 300) + 1000  # each within its timeouts
    assert sim.counters["fault_uplinks_lost"] == 2 and sim.counters["uplinks"] == 0


def test_partial_lines_from_a_real_uart(make_sim):
    # machine.UART with timeout=0 hands out whatever arrived, often half a line.
    sim = make_sim()
    res = run_driver(sim.port, "rak3172", """
class Choppy:
    # Hands out at most 7 bytes per call, with no regard for line ends.
    def __init__(self, u):
        self.u = u
    def any(self):
        return self.u.any()
    def readline(self):
        return self.u.read(7)
    def read(self, n=None):
        return self.u.read(7 if n is None else min(n, 7))
    def write(self, b):
        return self.u.write(b)
m = make(KIND, Choppy(uart))
async def main():
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
    await m.configure(dr=5)
    await m.join()
    res["send"] = await m.send(1, bytes(range(60)))
""")
    assert res["probe"] is True and res["dev_eui"] == DEV and res["send"] is True
    st = res["stats"]
    assert st["unknown_lines"] == 0  # the banner, reassembled line by line and known
    assert st["timeouts"] == 0 and st["overlong_lines"] == 0


class SilentModem:
    """A TCP peer that takes everything and answers nothing (a dead modem), or
    hangs up at once (`hang_up`)."""

    def __init__(self, hang_up=False):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.received = b""
        self.hang_up = hang_up
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        conn, _ = self.srv.accept()
        with conn:
            if self.hang_up:
                return
            conn.settimeout(10)
            try:
                while chunk := conn.recv(4096):
                    self.received += chunk
            except OSError:
                pass

    def close(self):
        self.srv.close()


@pytest.mark.parametrize("kind,hang_up", [("rak3172", False), ("rak3172", True),
                                          ("wioe5", False)])
def test_silent_modem_times_out(kind, hang_up):
    peer = SilentModem(hang_up=hang_up)
    try:
        res = run_driver(peer.port, kind, """
m.cmd_timeout_ms = 100
async def main():
    res["probe"] = await m.probe(attempts=2)
    try:
        await m.dev_eui()
    except ModemError as e:
        res["dev_eui_error"] = str(e)
    res["send"] = await m.send(1, b"x")
    res["join"] = await m.join(attempts=1, timeout_s=0.2)
    res["time"] = await m.network_time()
    res["downlink"] = m.downlink()
    res["connected"] = uart.connected
""")
    finally:
        peer.close()
    assert res["probe"] is False
    assert "DevEUI" in res["dev_eui_error"]
    assert res["send"] is False and res["join"] is False and res["downlink"] is None
    assert res["time"] is None
    # probe x2, DevEUI, the send's set-up command (CFM / PORT), JOIN, the
    # DeviceTimeReq; RUI3 also asks AT+NJS=? after a join without result.
    assert res["stats"]["timeouts"] == (7 if kind == "rak3172" else 6)
    assert res["connected"] is (not hang_up)
    if not hang_up:
        assert peer.received.startswith(b"#SIM-ATTACH deveui=" + DEV.encode())
        assert f"dialect={kind}".encode() in peer.received
        # The board's true time goes before every command line, never inside one.
        assert b"#SIM-TIME " in peer.received and b"\r\nAT\r\n" in peer.received


class ScriptedModem(SilentModem):
    """A TCP peer that answers each command whose start matches a key with the
    next of that key's scripted answers (lists of lines); for answers the
    simulator has no occasion to give."""

    def __init__(self, script: dict[str, list[list[str]]]):
        self.script = script
        super().__init__()

    def _run(self):
        conn, _ = self.srv.accept()
        with conn:
            conn.settimeout(10)
            buf = b""
            try:
                while chunk := conn.recv(4096):
                    buf += chunk
                    while b"\n" in buf:
                        raw, buf = buf.split(b"\n", 1)
                        line = raw.decode().strip()
                        for key, answers in self.script.items():
                            if line.startswith(key) and answers:
                                conn.sendall("".join(a + "\r\n" for a in answers.pop(0)).encode())
                                break
            except OSError:
                pass


def test_wio_e5_waits_as_long_as_the_duty_cycle_says():
    peer = ScriptedModem({"AT+PORT": [["+PORT: 1"]], "AT+MSGHEX": [
        ["+MSGHEX: No band in 200ms"], ["+MSGHEX: No free channel"],
        ["+MSGHEX: Start", "+MSGHEX: Done"]]})
    try:
        res = run_driver(peer.port, "wioe5", """
async def main():
    t0 = time.ticks_ms()
    res["sent"] = await m.send(1, b"x")
    res["ms"] = time.ticks_diff(time.ticks_ms(), t0)
""")
    finally:
        peer.close()
    assert res["sent"] is True and res["stats"]["busy"] == 2
    # 200 ms as told, then the doubled busy wait (2 x 30 ms).
    assert res["ms"] >= 260


@pytest.mark.parametrize("kind", KINDS)
def test_driver_runs_in_a_small_heap_when_precompiled(make_sim, tmp_path, kind):
    # On a board the driver ships as .mpy (or frozen), so nothing is compiled
    # at import; the unix port's 64-bit objects make this a generous stand-in
    # for a 32-bit target. 56 KB: the simulated UART and asyncio take 12 KB,
    # a driver with its dialect about 25 KB, this script the rest.
    (tmp_path / "meter" / "modem").mkdir(parents=True)
    sources = [runtime.FIRMWARE / "meter" / "__init__.py",
               runtime.FIRMWARE / "meter" / "lorawan.py", runtime.SIM_MPY / "sim_uart.py"]
    sources += sorted((runtime.FIRMWARE / "meter" / "modem").glob("*.py"))
    for src in sources:
        rel = src.relative_to(runtime.FIRMWARE) if "firmware" in src.parts else src.name
        out = (tmp_path / rel).with_suffix(".mpy")
        subprocess.run([runtime.mpy_cross(), "-o", str(out), str(src)], check=True)
    sim = make_sim()
    res = run_joined(sim.port, kind, """
for i in range(10):
    await m.send(1, bytes(200))
""", heapsize="56k", path=[tmp_path])
    assert res["stats"]["sent"] == 10 and res["stats"]["send_failed"] == 0
    assert sim.counters["uplinks"] == 10


@pytest.mark.parametrize("arch", ["xtensawin", "armv6m"])
@pytest.mark.parametrize("name", ["__init__", "at", "rak3172", "wioe5"])
def test_compiles_for_the_targets(tmp_path, arch, name):
    src = runtime.FIRMWARE / "meter" / "modem" / f"{name}.py"
    out = tmp_path / f"{name}.mpy"
    proc = subprocess.run([runtime.mpy_cross(), f"-march={arch}", "-o", str(out), str(src)],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.stat().st_size > 0
