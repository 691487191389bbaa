"""The RAK3172 driver running in the real MicroPython interpreter, over the
simulated UART, against the modem simulator and a real Mosquitto."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time

import pytest
from chirpstack_api import integration
from google.protobuf import json_format

from tools import runtime

APP = "9b0e6f2c-1a3d-4e5f-8a7b-6c5d4e3f2a19"
DEV = "70b3d57ed0051b02"
JOIN_EUI = "0000000000000001"
APP_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
SPEED = 100.0  # a 5 s join takes 50 ms

# Shared by every scenario: wire UART 1 to the simulator, make a driver,
# run `main()` and print its result as the last stdout line.
PRELUDE = """
import sys, json, asyncio
import sim_uart
from meter.modem import Rak3172, ModemError
sim_uart.attach(1, "127.0.0.1", int(sys.argv[1]), "%(dev)s", "%(join_eui)s", "%(app_key)s")
uart = sim_uart.TcpUart(1, baudrate=115200, timeout=0)
log = []
m = Rak3172(uart, log=log.append)
m.busy_wait_ms = 30
res = {}
def out(r):
    r["stats"] = m.stats
    print(json.dumps(r))
""" % dict(dev=DEV, join_eui=JOIN_EUI, app_key=APP_KEY)


def run_driver(port: int, body: str, heapsize: str | None = None, path=None) -> dict:
    code = PRELUDE + body + "\nasyncio.run(main())\nout(res)\n"
    proc = runtime.run_micropython(None, str(port), code=code, heapsize=heapsize, timeout=60,
                                   path=path)
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    if proc.returncode != 0:
        pytest.fail(f"MicroPython exited {proc.returncode}:\n{stdout}\n{stderr}")
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def tap(mqtt_tap):
    return mqtt_tap(f"application/{APP}/device/+/event/#", application_id=APP)


@pytest.fixture
def make_sim(start_modem_sim):
    return functools.partial(start_modem_sim, APP, speed=SPEED)


def wait_queued(sim, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while sim.counters["downlinks_queued"] < n:
        assert time.monotonic() < deadline, "simulator never queued the downlinks"
        time.sleep(0.01)


def test_probe_configure_join_and_send(make_sim, tap):
    sim = make_sim()
    res = run_driver(sim.port, """
async def main():
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
    res["configure"] = await m.configure("EU868", dr=5, device_class="A")
    res["joined_before"] = await m.joined()
    res["join"] = await m.join()
    res["joined_after"] = await m.joined()
    res["unconfirmed"] = await m.send(1, b"\\x01\\x02\\x03")
    res["confirmed"] = await m.send(1, bytes(range(100)), confirmed=True)
    res["downlink"] = m.downlink()
""")
    assert res["probe"] is True
    assert res["dev_eui"] == DEV
    assert res["configure"] is True
    assert res["joined_before"] is False and res["join"] is True and res["joined_after"] is True
    assert res["unconfirmed"] is True and res["confirmed"] is True
    assert res["downlink"] is None
    st = res["stats"]
    assert (st["sent"], st["send_failed"], st["joins"], st["join_failed"]) == (2, 0, 1, 0)
    # The simulated modem printed its power-up banner: noise, counted, harmless.
    assert st["unknown_lines"] == 3 and st["timeouts"] == 0
    ups = [json_format.Parse(p, integration.UplinkEvent(), ignore_unknown_fields=True)
           for p in tap.of("up", 2)]
    assert [(u.f_port, u.data, u.f_cnt, u.confirmed) for u in ups] == [
        (1, b"\x01\x02\x03", 0, False), (1, bytes(range(100)), 1, True)]
    assert all(u.device_info.dev_eui == DEV and u.dr == 5 for u in ups)


def test_join_backs_off_between_failed_attempts(make_sim):
    sim = make_sim(fail_joins=2)
    res = run_driver(sim.port, """
import time
async def main():
    t0 = time.ticks_ms()
    # One modem attempt per AT+JOIN, so our own backoff runs between them.
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


def test_join_rides_the_modems_own_retries(make_sim):
    sim = make_sim(fail_joins=2, legacy_events=True)
    res = run_driver(sim.port, """
async def main():
    res["join"] = await m.join(attempts=1)   # AT+JOIN=1:0:10:8
""")
    assert res["join"] is True
    assert res["stats"]["join_failed"] == 2  # "+EVT:JOIN FAILED" twice, then joined
    assert sim.counters["join_requests"] == 3


def test_join_gives_up(make_sim):
    sim = make_sim(fail_joins=100)
    res = run_driver(sim.port, """
async def main():
    res["join"] = await m.join(attempts=2, retries=1, interval_s=7, backoff_s=0.05)
    res["joined"] = await m.joined()
    res["send"] = await m.send(1, b"x")
    res["error"] = m.last_error
""")
    assert res["join"] is False and res["joined"] is False
    assert res["stats"]["join_failed"] == 4  # 2 attempts x (1 + 1 retry)
    assert res["send"] is False and "AT_NO_NETWORK_JOINED" in res["error"]
    assert sim.counters["join_requests"] == 4


@pytest.mark.parametrize("legacy", [False, True])
def test_downlinks_in_both_event_formats(make_sim, tap, legacy):
    sim = make_sim(legacy_events=legacy)
    tap.down(DEV, 5, b"\xAA\xBB")
    tap.down(DEV, 6, b"")
    tap.down(DEV, 7, bytes(range(200)), confirmed=True)
    wait_queued(sim, 3)
    res = run_driver(sim.port, """
async def main():
    await m.configure(dr=5)
    await m.join()
    got = []
    for i in range(3):
        ok = await m.send(2, b"\\x01")
        got.append([ok, m.downlink()])
    res["got"] = [[ok, d and [d[0], d[1].hex()]] for ok, d in got]
    res["after"] = m.downlink()
    res["rssi"] = [m.last_rssi, m.last_snr]
""")
    assert res["got"] == [[True, [5, "aabb"]], [True, [6, ""]],
                          [True, [7, bytes(range(200)).hex()]]]
    assert res["after"] is None
    assert res["rssi"] == [sim.rssi, round(sim.snr)]
    assert res["stats"]["downlinks"] == 3
    acks = [json_format.Parse(p, integration.AckEvent(), ignore_unknown_fields=True)
            for p in tap.of("ack", 1)]
    assert len(acks) == 1 and acks[0].acknowledged


@pytest.mark.parametrize("legacy", [False, True])
def test_class_c_downlink_while_a_command_waits(make_sim, tap, legacy):
    sim = make_sim(legacy_events=legacy)
    tap.down(DEV, 9, b"\x01\x00")
    wait_queued(sim, 1)
    res = run_driver(sim.port, """
async def main():
    await m.configure(device_class="A")
    await m.join()
    # Switching to Class C releases the queued downlink; its lines reach us
    # while the driver waits for the answer to AT+CLASS=C.
    await m.configure(device_class="C")
    res["dl"] = m.downlink()
    res["dl"] = res["dl"] and [res["dl"][0], res["dl"][1].hex()]
    res["wait"] = await m.wait_downlink(100)
""")
    assert res["dl"] == [9, "0100"]
    assert res["wait"] is None
    assert res["stats"]["timeouts"] == 0


def test_unknown_lines_are_ignored_and_counted(make_sim):
    sim = make_sim(boot_banner=False)
    sim.inject_lines(DEV, "+EVT:SOMETHING_NEW:1", "Restarting...", "+EVT:RX_1:broken")
    res = run_driver(sim.port, """
async def main():
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
""")
    assert res["probe"] is True and res["dev_eui"] == DEV
    assert res["stats"]["unknown_lines"] == 3
    assert res["stats"]["downlinks"] == 0


def test_send_failures(make_sim):
    sim = make_sim(drop_ack=True)
    res = run_driver(sim.port, """
async def main():
    await m.configure(dr=0)
    await m.join()
    res["big"] = await m.send(1, bytes(52))          # DR0 carries 51
    res["big_err"] = m.last_error
    res["confirmed"] = await m.send(1, b"\\x01", confirmed=True)
    res["confirmed_err"] = m.last_error
    res["unconfirmed"] = await m.send(1, bytes(51))
    try:
        await m.send(0, b"x")
    except ValueError as e:
        res["port0"] = str(e)
""")
    assert res["big"] is False and "AT_PARAM_ERROR" in res["big_err"]
    assert res["confirmed"] is False and res["confirmed_err"] == "no acknowledgement"
    assert res["unconfirmed"] is True
    assert "port" in res["port0"]
    assert (res["stats"]["sent"], res["stats"]["send_failed"]) == (1, 2)
    assert sim.counters["uplinks"] == 2  # the oversize one never went on air


def test_busy_modem_is_retried(make_sim, tap):
    # 1 % duty cycle: after each uplink the modem refuses the next for 99x its
    # airtime. At DR3 that is 18 s simulated, 0.37 s here, far longer than the
    # uplink's own receive windows.
    sim = make_sim(duty_cycle=0.01, speed=50)
    res = run_driver(sim.port, """
async def main():
    await m.configure(dr=3)
    await m.join()
    res["a"] = await m.send(3, b"first")
    res["b"] = await m.send(3, b"second")
""")
    assert res["a"] is True and res["b"] is True
    assert res["stats"]["busy"] >= 1 and sim.counters["busy"] == res["stats"]["busy"]
    assert [json_format.Parse(p, integration.UplinkEvent(), ignore_unknown_fields=True).data
            for p in tap.of("up", 2)] == [b"first", b"second"]


def test_partial_lines_from_a_real_uart(make_sim):
    # machine.UART with timeout=0 hands out whatever arrived, often half a line.
    sim = make_sim()
    res = run_driver(sim.port, """
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
m = Rak3172(Choppy(uart))
async def main():
    res["probe"] = await m.probe()
    res["dev_eui"] = (await m.dev_eui()).hex()
    await m.configure(dr=5)
    await m.join()
    res["send"] = await m.send(1, bytes(range(60)))
""")
    assert res["probe"] is True and res["dev_eui"] == DEV and res["send"] is True
    st = res["stats"]
    assert st["unknown_lines"] == 3  # the banner, reassembled line by line
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


@pytest.mark.parametrize("hang_up", [False, True])
def test_silent_modem_times_out(hang_up):
    peer = SilentModem(hang_up=hang_up)
    try:
        res = run_driver(peer.port, """
m.cmd_timeout_ms = 100
async def main():
    res["probe"] = await m.probe(attempts=2)
    try:
        await m.dev_eui()
    except ModemError as e:
        res["dev_eui_error"] = str(e)
    res["send"] = await m.send(1, b"x")
    res["join"] = await m.join(attempts=1, timeout_s=0.2)
    res["downlink"] = m.downlink()
    res["connected"] = uart.connected
""")
    finally:
        peer.close()
    assert res["probe"] is False
    assert "AT+DEVEUI" in res["dev_eui_error"]
    assert res["send"] is False and res["join"] is False and res["downlink"] is None
    # probe x2, DEVEUI, CFM before the send, JOIN, and the NJS check after it
    assert res["stats"]["timeouts"] == 6
    assert res["connected"] is (not hang_up)
    if not hang_up:
        assert peer.received.startswith(b"#SIM-ATTACH deveui=" + DEV.encode())
        assert b"AT\r\n" in peer.received


def test_driver_runs_in_a_small_heap_when_precompiled(make_sim, tmp_path):
    # On a board the driver ships as .mpy (or frozen), so nothing is compiled
    # at import; the unix port's 64-bit objects make this a generous stand-in
    # for a 32-bit target.
    import subprocess
    (tmp_path / "meter" / "modem").mkdir(parents=True)
    sources = [runtime.FIRMWARE / "meter" / "__init__.py", runtime.SIM_MPY / "sim_uart.py"]
    sources += sorted((runtime.FIRMWARE / "meter" / "modem").glob("*.py"))
    for src in sources:
        rel = src.relative_to(runtime.FIRMWARE) if "firmware" in src.parts else src.name
        out = (tmp_path / rel).with_suffix(".mpy")
        subprocess.run([runtime.mpy_cross(), "-o", str(out), str(src)], check=True)
    sim = make_sim()
    res = run_driver(sim.port, """
async def main():
    await m.configure(dr=5)
    await m.join()
    for i in range(10):
        await m.send(1, bytes(200))
""", heapsize="48k", path=[tmp_path])
    assert res["stats"]["sent"] == 10 and res["stats"]["send_failed"] == 0
    assert sim.counters["uplinks"] == 10


@pytest.mark.parametrize("arch", ["xtensawin", "armv6m"])
@pytest.mark.parametrize("name", ["__init__", "at", "rak3172"])
def test_compiles_for_the_targets(tmp_path, arch, name):
    import subprocess
    src = runtime.FIRMWARE / "meter" / "modem" / f"{name}.py"
    out = tmp_path / f"{name}.mpy"
    proc = subprocess.run([runtime.mpy_cross(), f"-march={arch}", "-o", str(out), str(src)],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert out.stat().st_size > 0
