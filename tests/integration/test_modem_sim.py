"""The modem simulator against a real Mosquitto: the RUI3 and Wio-E5 AT dialogs
over raw TCP on one side, ChirpStack v4 integration events and downlink
commands on the other; and each injected fault."""

from __future__ import annotations

import base64
import calendar
import functools
import json
import socket
import subprocess
import sys
import time
import uuid

import pytest
from chirpstack_api import gw, integration
from google.protobuf import json_format

from hardware.sim import modem_sim
from tools import runtime

APP = "3f1c2b7a-5d4e-4c8f-9a61-0b2d7e9c4f10"
DEV = "70b3d57ed0051a01"
DEV2 = "70b3d57ed0051a02"
JOIN_EUI = "0000000000000001"
APP_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
SPEED = 100.0  # a 5 s join takes 50 ms


class AtClient:
    """A raw TCP modem line, as sim_uart speaks it."""

    def __init__(self, port: int, attach: bool = True, dev_eui: str = DEV,
                 dialect: str | None = None):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.lines: list[str] = []
        if attach:
            extra = f" dialect={dialect}" if dialect else ""
            self.s.sendall(f"#SIM-ATTACH deveui={dev_eui} joineui={JOIN_EUI} "
                           f"appkey={APP_KEY}{extra}\r\n".encode())

    def cmd(self, line: str) -> None:
        self.s.sendall(line.encode() + b"\r\n")

    def expect(self, want, timeout: float = 5.0) -> list[str]:
        """Read lines until one equals `want` (or satisfies it, if callable);
        return every line read, the match last."""
        match = want if callable(want) else (lambda ln: ln == want)
        got = []
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                got.append(line)
                if match(line):
                    return got
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {want!r} within {timeout}s; lines: {got}")
            self.s.settimeout(left)
            try:
                chunk = self.s.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError(f"connection closed waiting for {want!r}; lines: {got}")
            self.buf += chunk

    def answer(self, line: str) -> list[str]:
        """Send a command, return its lines up to the final result."""
        self.cmd(line)
        return self.expect(lambda ln: ln == "OK" or ln.startswith("AT_"))

    def wio(self, line: str) -> list[str]:
        """A Wio-E5 command: its lines up to the first that names it."""
        name = line.partition("=")[0][3:].upper() or "AT"
        self.cmd(line)
        return self.expect(lambda ln: ln.startswith(f"+{name}:"))

    def join(self) -> None:
        assert self.answer("AT+JOIN=1:0:10:8")[-1] == "OK"
        self.expect("+EVT:JOINED")

    def wio_join(self) -> None:
        assert self.wio("AT+JOIN") == ["+JOIN: Start"]
        assert self.expect("+JOIN: Done")[-3] == "+JOIN: Network joined"

    def quiet(self, seconds: float) -> list[str]:
        """Every line that arrives within `seconds` (none expected, usually)."""
        got: list[str] = []
        try:
            self.expect(lambda ln: got.append(ln) and False, timeout=seconds)
        except AssertionError:
            pass
        return got

    def close(self) -> None:
        self.s.close()


@pytest.fixture
def tap(mqtt_tap):
    return mqtt_tap(f"application/{APP}/#", application_id=APP)


@pytest.fixture
def make_sim(start_modem_sim):
    # test_boot_banner_and_injected_lines covers the banner; the rest go without.
    return functools.partial(start_modem_sim, APP, speed=SPEED, boot_banner=False)


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def parse(payload, message):
    return json_format.Parse(payload, message, ignore_unknown_fields=True)


def test_uplinks_become_chirpstack_up_events(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    assert at.answer("AT") == ["OK"]
    assert at.answer("AT+DEVEUI=?") == [f"AT+DEVEUI={DEV}", "OK"]
    assert at.answer("AT+NJS=?") == ["AT+NJS=0", "OK"]
    assert at.answer("AT+DR=5")[-1] == "OK"
    at.join()
    assert at.answer("AT+NJS=?") == ["AT+NJS=1", "OK"]
    topic, payload = tap.wait("join")
    assert topic == f"application/{APP}/device/{DEV}/event/join"
    joined = parse(payload, integration.JoinEvent())
    assert joined.device_info.dev_eui == DEV and len(joined.dev_addr) == 8

    for body in (b"\x01\x02\x03", bytes(range(40))):
        assert at.answer(f"AT+SEND=7:{body.hex()}")[-1] == "OK"
        at.expect("+EVT:TX_DONE")
    ups = [tap.wait("up") for _ in range(2)]
    assert {t for t, _ in ups} == {f"application/{APP}/device/{DEV}/event/up"}
    evs = [parse(p, integration.UplinkEvent()) for _, p in ups]
    assert [e.data for e in evs] == [b"\x01\x02\x03", bytes(range(40))]
    assert [e.f_cnt for e in evs] == [0, 1]
    e = evs[1]
    assert e.device_info.dev_eui == DEV and e.device_info.application_id == APP
    assert e.f_port == 7 and e.dr == 5 and e.dev_addr == joined.dev_addr
    assert uuid.UUID(e.deduplication_id) and e.time.seconds > 0
    lora = e.tx_info.modulation.lora
    assert (lora.spreading_factor, lora.bandwidth, lora.code_rate) == (7, 125_000, gw.CR_4_5)
    assert e.tx_info.frequency in modem_sim.EU868.uplink_hz
    assert e.rx_info[0].gateway_id == sim.gateway_id and e.rx_info[0].rssi < 0
    # The JSON is what ChirpStack's marshaler emits: camelCase, bytes in base64.
    raw = json.loads(ups[1][1])
    assert raw["deviceInfo"]["devEui"] == DEV
    assert base64.b64decode(raw["data"]) == bytes(range(40))
    at.close()


def test_send_before_join_is_refused(make_sim):
    sim = make_sim()
    at = AtClient(sim.port)
    assert at.answer("AT+SEND=1:00") == ["AT_NO_NETWORK_JOINED"]
    assert sim.counters["uplinks"] == 0


@pytest.mark.parametrize("dr,limit", [(0, 51), (3, 115), (5, 222)])
def test_payload_above_the_data_rate_maximum_is_rejected(make_sim, tap, dr, limit):
    sim = make_sim()
    at = AtClient(sim.port)
    assert at.answer(f"AT+DR={dr}")[-1] == "OK"
    at.join()
    assert at.answer(f"AT+SEND=1:{'ab' * (limit + 1)}") == ["AT_PARAM_ERROR"]
    assert at.answer(f"AT+SEND=1:{'ab' * limit}") == ["OK"]
    at.expect("+EVT:TX_DONE", timeout=10)
    _, payload = tap.wait("up")
    assert len(parse(payload, integration.UplinkEvent()).data) == limit
    assert sim.counters["uplinks"] == 1


def test_busy_while_the_previous_uplink_is_on_air(make_sim, tap):
    # At speed 20 a 51-byte SF12 uplink plus its receive windows keeps the
    # modem busy for about a quarter of a second.
    sim = make_sim(speed=20)
    at = AtClient(sim.port)
    at.answer("AT+DR=0")
    at.join()
    assert at.answer("AT+SEND=1:" + "11" * 51) == ["OK"]
    assert at.answer("AT+SEND=1:22") == ["AT_BUSY_ERROR"]
    at.expect("+EVT:TX_DONE")
    assert at.answer("AT+SEND=1:33") == ["OK"]
    at.expect("+EVT:TX_DONE")
    evs = [parse(tap.wait("up")[1], integration.UplinkEvent()) for _ in range(2)]
    assert [e.data[:1] for e in evs] == [b"\x11", b"\x33"]
    assert sim.counters["busy"] == 1


@pytest.mark.parametrize("legacy", [False, True])
def test_class_a_downlink_follows_the_next_uplink(make_sim, tap, legacy):
    sim = make_sim(legacy_events=legacy)
    at = AtClient(sim.port)
    at.join()
    item = str(uuid.uuid4())
    tap.publish_down(DEV, {"devEui": DEV, "confirmed": True, "fPort": 10,
                           "data": base64.b64encode(b"\x07\x08\xAB").decode(), "id": item})
    wait_until(lambda: sim.counters["downlinks_queued"] == 1)
    assert at.answer("AT+SEND=1:01") == ["OK"]
    lines = at.expect("+EVT:TX_DONE")
    if legacy:
        assert lines[:2] == ["+EVT:RX_1, RSSI -70, SNR 8", "+EVT:10:0708AB"]
    else:
        assert lines[0] == "+EVT:RX_1:-70:8:UNICAST:10:0708AB"
    txack = parse(tap.wait("txack")[1], integration.TxAckEvent())
    assert txack.queue_item_id == item and txack.device_info.dev_eui == DEV
    topic, payload = tap.wait("ack")
    assert topic == f"application/{APP}/device/{DEV}/event/ack"
    ack = parse(payload, integration.AckEvent())
    assert ack.acknowledged and ack.queue_item_id == item
    assert at.answer("AT+RECV=?") == ["AT+RECV=10:0708AB", "OK"]


def test_class_c_downlink_arrives_without_an_uplink(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    at.join()
    assert at.answer("AT+CLASS=C") == ["OK"]
    tap.publish_down(DEV, {"devEui": DEV.upper(), "fPort": 3, "data": "AQI="})
    assert at.expect(lambda ln: ln.startswith("+EVT:RX_"))[-1] == \
        "+EVT:RX_C:-70:8:UNICAST:3:0102"
    txack = parse(tap.wait("txack")[1], integration.TxAckEvent())
    assert uuid.UUID(txack.queue_item_id)  # ChirpStack gives every queue item an id
    assert sim.counters["acks"] == 0  # unconfirmed: no ack event


def test_malformed_downlink_commands_are_counted_and_survived(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    at.join()
    ok = {"devEui": DEV, "fPort": 2, "data": "AQ=="}
    bad = [
        (b"{not json", "json"),
        (b"\xff\xfe", "json"),
        ([1, 2], "json"),
        ({"fPort": 2, "data": "AQ=="}, "dev_eui"),
        ({**ok, "devEui": "70b3d57ed0051a02"}, "dev_eui_mismatch"),
        ({**ok, "fPort": 0}, "f_port"),
        ({**ok, "fPort": "2"}, "f_port"),
        ({**ok, "data": "not base64!"}, "data"),
        ({**ok, "data": base64.b64encode(bytes(243)).decode()}, "too_large"),
        ({**ok, "confirmed": "yes"}, "confirmed"),
        ({**ok, "id": "queue-item-1"}, "id"),
    ]
    for payload, _ in bad:
        tap.publish_down(DEV, payload)
    tap.publish_down("not-a-dev-eui", ok)
    wait_until(lambda: sim.counters["downlinks_rejected"] == len(bad) + 1)
    want = {}
    for _, reason in bad:
        want[reason] = want.get(reason, 0) + 1
    want["dev_eui"] += 1  # the topic's DevEUI
    assert dict(sim.rejections) == want
    # Still serving: a good command goes through.
    tap.publish_down(DEV, ok)
    wait_until(lambda: sim.counters["downlinks_queued"] == 1)
    at.answer("AT+SEND=1:01")
    assert "+EVT:RX_1:-70:8:UNICAST:2:01" in at.expect("+EVT:TX_DONE")


def test_injected_join_failures_then_join(make_sim, tap):
    sim = make_sim(fail_joins=2)
    at = AtClient(sim.port)
    # The modem retries by itself: 1 + 8 attempts, 10 s apart.
    assert at.answer("AT+JOIN=1:0:10:8") == ["OK"]
    lines = at.expect("+EVT:JOINED")
    assert lines == ["+EVT:JOIN_FAILED_RX_TIMEOUT"] * 2 + ["+EVT:JOINED"]
    assert sim.counters["join_requests"] == 3


def test_join_sequence_ends_after_its_retries(make_sim):
    sim = make_sim(fail_joins=5, legacy_events=True)
    at = AtClient(sim.port)
    assert at.answer("AT+JOIN=1:0:7:1") == ["OK"]
    assert at.answer("AT+JOIN=1:0:7:1") == ["AT_BUSY_ERROR"]  # already joining
    at.expect("+EVT:JOIN FAILED")
    at.expect("+EVT:JOIN FAILED")
    time.sleep(0.3)  # longer than another attempt would take (13 s / SPEED)
    assert at.answer("AT+NJS=?") == ["AT+NJS=0", "OK"]
    assert sim.counters["join_requests"] == 2


def test_drop_ack_fails_confirmed_uplinks(make_sim, tap):
    sim = make_sim(drop_ack=True)
    at = AtClient(sim.port)
    at.join()
    assert at.answer("AT+CFM=1") == ["OK"]
    at.answer("AT+SEND=1:0102")
    assert at.expect(lambda ln: ln.startswith("+EVT:SEND_CONFIRMED"))[-1].startswith(
        "+EVT:SEND_CONFIRMED_FAILED(")
    up = parse(tap.wait("up")[1], integration.UplinkEvent())
    assert up.confirmed  # the network got it; the acknowledgement was lost
    assert at.answer("AT+CFS=?") == ["AT+CFS=0", "OK"]


def test_confirmed_uplink_is_acknowledged(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    at.join()
    at.answer("AT+CFM=1")
    at.answer("AT+SEND=1:0102")
    assert at.expect(lambda ln: ln.startswith("+EVT:"))[-1] == "+EVT:SEND_CONFIRMED_OK"
    assert at.answer("AT+CFS=?") == ["AT+CFS=1", "OK"]


def test_the_network_refuses_unknown_devices_and_wrong_keys(make_sim):
    sim = make_sim()
    stranger = AtClient(sim.port, attach=False)
    assert stranger.answer("AT+JOIN=1:0:10:0") == ["OK"]
    stranger.expect("+EVT:JOIN_FAILED_RX_TIMEOUT")
    known = AtClient(sim.port)
    assert known.answer("AT+APPKEY=" + "00" * 16) == ["OK"]
    known.answer("AT+JOIN=1:0:10:0")
    known.expect("+EVT:JOIN_FAILED_RX_TIMEOUT")
    assert known.answer("AT+APPKEY=" + APP_KEY) == ["OK"]
    known.join()
    assert sim.counters["joins"] == 1


def test_bad_commands_get_rui3_errors(make_sim):
    sim = make_sim()
    at = AtClient(sim.port)
    assert at.answer("AT+NOPE") == ["AT_ERROR"]
    assert at.answer("AT+DR=9") == ["AT_PARAM_ERROR"]
    assert at.answer("AT+DEVEUI=123") == ["AT_PARAM_ERROR"]
    assert at.answer("AT+JOIN=1:0:3:8") == ["AT_PARAM_ERROR"]  # interval below 7 s
    assert at.answer("ATE") == ["OK"]
    assert at.answer("at") == ["at", "OK"]  # echo on, commands case-insensitive
    assert at.answer("ATE") == ["ATE", "OK"]  # echo off again
    at.s.sendall(b"A" * 5000 + b"\r\n")  # garbage: dropped, not a crash, no answer
    assert at.answer("AT") == ["OK"]
    assert sim.counters["overlong_lines"] == 1


def test_runs_as_a_process(broker, tap):
    port = runtime.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hardware.sim.modem_sim", "--listen", f"127.0.0.1:{port}",
         "--mqtt-host", "127.0.0.1", "--mqtt-port", str(broker.port),
         "--application-id", APP, "--speed", "50", "--no-boot-banner",
         "--log-level", "WARNING"],
        cwd=runtime.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        runtime.wait_for_port(port)
        at = AtClient(port)
        at.join()
        assert tap.wait("join")[0] == f"application/{APP}/device/{DEV}/event/join"
    finally:
        assert runtime.stop_process(proc) == 0, proc.stderr.read().decode()


def test_boot_banner_and_injected_lines(make_sim):
    sim = make_sim(boot_banner=True)
    sim.inject_lines(DEV, "+EVT:SOMETHING_NEW", "\x01garbage")
    at = AtClient(sim.port)
    assert at.answer("AT") == ["RAKwireless RAK3172-E Example",
                               "------------------------------------------------------",
                               "Current Work Mode: LoRaWAN.",
                               "+EVT:SOMETHING_NEW", "\x01garbage", "OK"]
    assert at.answer("AT") == ["OK"]  # injected once only


def test_changing_the_deveui_moves_the_downlink_queue(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    other = "70b3d57ed0051aff"
    assert at.answer("AT+DEVEUI=" + other.upper()) == ["OK"]
    assert at.answer("AT+DEVEUI=?") == [f"AT+DEVEUI={other}", "OK"]
    assert at.answer("AT+DEVEUI=xyz") == ["AT_PARAM_ERROR"]
    assert at.answer("AT+CLASS=C") == ["OK"]
    # The network knows this DevEUI only if it was provisioned: it was not.
    at.answer("AT+JOIN=1:0:10:0")
    at.expect("+EVT:JOIN_FAILED_RX_TIMEOUT")
    assert sim.devices() == {other: dict(joined=False, dev_addr="", f_cnt=0, dr=0, cls="C",
                                         queued=0)}


# ------------------------------------------------------------------ Wio-E5


def test_wio_e5_dialog(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port, dialect="wioe5")
    assert at.wio("AT") == ["+AT: OK"]
    assert at.wio("AT+ID=DevEui") == ["+ID: DevEui, 70:B3:D5:7E:D0:05:1A:01"]
    assert at.wio('AT+ID=AppEui,"0000000000000001"') == ["+ID: AppEui, 00:00:00:00:00:00:00:01"]
    assert at.wio(f'AT+KEY=APPKEY,"{APP_KEY}"') == [f"+KEY: APPKEY {APP_KEY.upper()}"]
    assert at.wio("AT+MODE=LWOTAA") == ["+MODE: LWOTAA"]
    assert at.wio("AT+DR=EU868") == ["+DR: EU868"]
    assert at.wio("AT+DR=5") == ["+DR: DR5"]
    assert at.expect(lambda ln: True) == ["+DR: EU868 DR5  SF7 BW125K"]
    assert at.wio("AT+CLASS=A") == ["+CLASS: A"]
    assert at.wio("AT+ADR=OFF") == ["+ADR: OFF"]
    assert at.wio("AT+PORT=7") == ["+PORT: 7"]
    assert at.wio('AT+MSGHEX="01"') == ["+MSGHEX: Please join network first"]
    at.wio_join()
    assert at.wio("AT+JOIN") == ["+JOIN: Joined already"]
    assert at.wio('AT+MSGHEX="0102"') == ["+MSGHEX: Start"]
    assert at.expect("+MSGHEX: Done") == ["+MSGHEX: Done"]
    assert at.wio('AT+CMSGHEX="0304"') == ["+CMSGHEX: Start"]
    assert at.expect("+CMSGHEX: Done") == [
        "+CMSGHEX: Wait ACK", "+CMSGHEX: ACK Received", "+CMSGHEX: RXWIN1, RSSI -70, SNR 8.0",
        "+CMSGHEX: Done"]
    assert at.wio(f'AT+MSGHEX="{"ab" * 223}"') == ["+MSGHEX: Length error 222"]
    assert at.wio("AT+NOPE") == ["+NOPE: ERROR(-10)"]
    ups = [parse(tap.wait("up")[1], integration.UplinkEvent()) for _ in range(2)]
    assert [(u.f_port, u.data, u.confirmed) for u in ups] == [
        (7, b"\x01\x02", False), (7, b"\x03\x04", True)]
    assert sim.counters["joins"] == 1


@pytest.mark.parametrize("spaced", [False, True])
def test_wio_e5_downlinks(make_sim, tap, spaced):
    sim = make_sim(wio_spaced_hex=spaced)
    at = AtClient(sim.port, dialect="wioe5")
    at.wio_join()
    tap.down(DEV, 10, b"\x07\x08\xAB")
    tap.down(DEV, 11, b"\x01")
    wait_until(lambda: sim.counters["downlinks_queued"] == 2)
    assert at.wio('AT+MSGHEX="01"') == ["+MSGHEX: Start"]
    rx = '"07 08 AB"' if spaced else '"0708AB"'
    assert at.expect("+MSGHEX: Done") == [
        "+MSGHEX: FPENDING", f"+MSGHEX: PORT: 10; RX: {rx}",
        "+MSGHEX: RXWIN1, RSSI -70, SNR 8.0", "+MSGHEX: Done"]
    # Class C: the next one comes at once, outside any uplink.
    assert at.wio("AT+CLASS=C") == [
        '+MSG: PORT: 11; RX: "01"', "+MSG: RXWIN2, RSSI -70, SNR 8.0", "+CLASS: C"]
    assert [parse(tap.wait("txack")[1], integration.TxAckEvent()).f_cnt_down
            for _ in range(2)] == [0, 1]


# ------------------------------------------------------- MAC requests


@pytest.mark.parametrize("legacy", [False, True])
def test_rui3_link_check_and_time_request(make_sim, legacy):
    sim = make_sim(legacy_events=legacy)
    at = AtClient(sim.port)
    assert at.answer("AT+TIMEREQ=1") == ["AT_NO_NETWORK_JOINED"]  # needs a session
    assert at.answer("AT+DR=3")[-1] == "OK"
    at.join()
    assert at.answer("AT+LINKCHECK=1") == ["OK"]
    assert at.answer("AT+TIMEREQ=1") == ["OK"]
    at.s.sendall(b"#SIM-TIME 1790000000.250\r\n")  # the board's true time
    assert at.answer("AT+SEND=1:01") == ["OK"]
    # SF9 (DR3) needs -12.5 dB: an SNR of 8 leaves a 20 dB margin; one gateway.
    sep = "," if legacy else ":"
    assert at.expect(lambda ln: "LINKCHECK" in ln) == [
        "+EVT:TIMEREQ_OK", "+EVT:TX_DONE", f"+EVT:LINKCHECK:0{sep}20{sep}1{sep}-70{sep}8"]
    at.s.sendall(b"#SIM-TIME 1790003600.900\r\n")  # an hour later, the modem's clock shows
    t = time.gmtime(1790003600)
    if legacy:
        assert at.answer("AT+LTIME=?") == [time.strftime("LTIME: %Hh%Mm%Ss %Y-%m-%d", t), "OK"]
    else:
        assert at.answer("AT+LTIME=?") == [
            time.strftime("AT+LTIME=%Hh%Mm%Ss on %m/%d/%Y", t), "OK"]
    # Once only: the next uplink carries neither request.
    assert at.answer("AT+SEND=1:02") == ["OK"]
    assert at.expect("+EVT:TX_DONE") == ["+EVT:TX_DONE"]
    assert (sim.counters["link_answers"], sim.counters["time_answers"]) == (1, 1)


def test_wio_e5_link_check_and_time_request(make_sim):
    sim = make_sim()
    at = AtClient(sim.port, dialect="wioe5")
    before = at.wio("AT+RTC")[0]
    assert before.startswith("+RTC: 2020-01-01 00:00:")  # its clock from power-up
    at.wio_join()
    assert at.wio("AT+LW=LCR") == ["+LW: LCR"]
    assert at.wio("AT+LW=DTR") == ["+LW: DTR"]
    at.s.sendall(b"#SIM-TIME 1790000000.250\r\n")
    assert at.wio('AT+MSGHEX="01"') == ["+MSGHEX: Start"]
    # At the default DR0 (SF12, which needs -20 dB) an SNR of 8 leaves 28 dB.
    assert at.expect("+MSGHEX: Done") == [
        "+MSGHEX: RXWIN1, RSSI -70, SNR 8.0", "+MSGHEX: Link 28, 1", "+MSGHEX: Done"]
    assert at.wio("AT+RTC") == [time.strftime("+RTC: %Y-%m-%d %H:%M:%S", time.gmtime(1790000000))]


def test_time_without_the_board_is_the_host_clock(make_sim):
    sim = make_sim()
    at = AtClient(sim.port, dialect="wioe5")
    at.wio_join()
    at.wio("AT+LW=DTR")
    at.wio('AT+MSGHEX="01"')
    at.expect("+MSGHEX: Done")
    shown = at.wio("AT+RTC")[0][len("+RTC: "):]
    t = calendar.timegm(time.strptime(shown, "%Y-%m-%d %H:%M:%S"))
    assert abs(t - time.time()) < 3


# ------------------------------------------------------------- faults


def two_joined(sim) -> tuple[AtClient, AtClient]:
    """A RAK3172 (DEV) and a Wio-E5 (DEV2), both joined."""
    rak, wio = AtClient(sim.port), AtClient(sim.port, dev_eui=DEV2, dialect="wioe5")
    rak.join()
    wio.wio_join()
    return rak, wio


def test_busy_answers_on_demand_and_at_run_time(make_sim):
    sim = make_sim(busy_prob=1.0)
    rak, wio = two_joined(sim)
    assert rak.answer("AT+SEND=1:01") == ["AT_BUSY_ERROR"]
    assert wio.wio('AT+MSGHEX="01"') == ["+MSGHEX: LoRaWAN modem is busy"]
    sim.set_faults(busy_prob=0.0)
    assert rak.answer("AT+SEND=1:01") == ["OK"]
    assert wio.wio('AT+MSGHEX="01"') == ["+MSGHEX: Start"]
    assert sim.counters["fault_busy"] == 2 and sim.counters["busy"] == 2


def test_lost_acknowledgement(make_sim, tap):
    sim = make_sim(ack_loss=1.0)
    rak, wio = two_joined(sim)
    rak.answer("AT+CFM=1")
    rak.answer("AT+SEND=1:01")
    assert rak.expect(lambda ln: ln.startswith("+EVT:SEND"))[-1] == "+EVT:SEND_CONFIRMED_FAILED(4)"
    assert wio.wio('AT+CMSGHEX="02"') == ["+CMSGHEX: Start"]
    assert wio.expect("+CMSGHEX: Done") == ["+CMSGHEX: Wait ACK", "+CMSGHEX: Done"]
    # Both reached the network; its answers were lost.
    assert len(tap.of("up", 2)) == 2
    assert sim.counters["fault_ack_lost"] == 2


def test_lost_uplinks_look_sent_to_the_modem(make_sim, tap):
    sim = make_sim(uplink_loss=1.0)
    rak, wio = two_joined(sim)
    rak.answer("AT+SEND=1:01")
    assert rak.expect(lambda ln: ln.startswith("+EVT:")) == ["+EVT:TX_DONE"]
    wio.wio('AT+MSGHEX="02"')
    assert wio.expect("+MSGHEX: Done") == ["+MSGHEX: Done"]
    rak.answer("AT+CFM=1")
    rak.answer("AT+SEND=1:03")
    assert rak.expect(lambda ln: ln.startswith("+EVT:"))[-1] == "+EVT:SEND_CONFIRMED_FAILED(4)"
    assert tap.of("up", 1, timeout=0.3) == []
    assert sim.counters["fault_uplinks_lost"] == 3 and sim.counters["uplinks"] == 0


def test_network_outage(make_sim, tap):
    sim = make_sim()
    at = AtClient(sim.port)
    at.join()
    assert at.answer("AT+CLASS=C") == ["OK"]
    sim.set_outage(True)
    tap.down(DEV, 4, b"\x04")
    wait_until(lambda: sim.counters["downlinks_queued"] == 1)
    assert at.quiet(0.2) == []  # not delivered during the outage
    at.answer("AT+CFM=1")
    at.answer("AT+SEND=1:01")
    assert at.expect(lambda ln: ln.startswith("+EVT:"))[-1] == "+EVT:SEND_CONFIRMED_FAILED(4)"
    sim.set_outage(False)
    assert at.expect(lambda ln: ln.startswith("+EVT:RX_C")) == ["+EVT:RX_C:-70:8:UNICAST:4:04"]
    assert tap.of("up", 1, timeout=0.3) == []
    sim.set_outage(True)
    at.answer("AT+JOIN=1:0:10:0")
    assert at.expect(lambda ln: ln.startswith("+EVT:")) == ["+EVT:JOIN_FAILED_RX_TIMEOUT"]
    sim.set_outage(False)
    at.join()
    assert (sim.counters["fault_outages"], sim.counters["fault_outage_uplinks"],
            sim.counters["fault_outage_joins"]) == (2, 1, 1)


def test_modem_restart(make_sim):
    sim = make_sim(boot_banner=True)
    rak, wio = AtClient(sim.port), AtClient(sim.port, dev_eui=DEV2, dialect="wioe5")
    rak.expect("Current Work Mode: LoRaWAN.")
    rak.join()
    wio.wio_join()
    assert rak.answer("AT+DR=3")[-1] == "OK"
    sim.reboot(DEV)
    sim.reboot(DEV2)
    assert rak.expect("Current Work Mode: LoRaWAN.")[0] == "RAKwireless RAK3172-E Example"
    assert rak.answer("AT+NJS=?") == ["AT+NJS=0", "OK"]
    assert rak.answer("AT+DR=?") == ["AT+DR=3", "OK"]  # settings live in flash
    assert rak.answer("AT+SEND=1:01") == ["AT_NO_NETWORK_JOINED"]
    assert wio.quiet(0.1) == []  # the Wio-E5 says nothing when it starts
    assert wio.wio('AT+MSGHEX="01"') == ["+MSGHEX: Please join network first"]
    with pytest.raises(KeyError):
        sim.reboot("70b3d57ed0051aff")
    assert sim.counters["fault_reboots"] == 2


def test_garbled_output_is_seeded(make_sim):
    def garbled(seed):
        sim = make_sim(corrupt_prob=1.0, seed=seed)
        at = AtClient(sim.port)
        at.cmd("AT+DEVEUI=?")
        lines = at.quiet(0.1)
        return sim, lines

    sim, a = garbled(5)
    _, b = garbled(5)
    _, c = garbled(6)
    assert a == b and a != c  # the same seed garbles the same way
    assert a != [f"AT+DEVEUI={DEV}", "OK"] and sim.counters["fault_corrupted_lines"] == 2
    sim.set_faults(corrupt_prob=0.0)
    at = AtClient(sim.port, dev_eui=DEV2)
    at.quiet(0.05)
    assert at.answer("AT") == ["OK"]


def test_silent_modem(make_sim):
    sim = make_sim()
    at = AtClient(sim.port)
    assert at.answer("AT") == ["OK"]
    sim.silence(DEV, 0.3 * SPEED)  # 0.3 s here
    at.cmd("AT")
    assert at.quiet(0.15) == []  # no answer, and the command is gone
    time.sleep(0.2)
    assert at.answer("AT") == ["OK"]
    assert sim.counters["fault_silences"] == 1 and sim.counters["fault_silenced_lines"] == 1


def test_fail_joins_at_run_time_and_seeded_sessions(make_sim):
    sim = make_sim(seed=42)
    at = AtClient(sim.port)
    sim.set_faults(fail_joins=1)
    at.answer("AT+JOIN=1:0:10:1")
    assert at.expect("+EVT:JOINED") == ["+EVT:JOIN_FAILED_RX_TIMEOUT", "+EVT:JOINED"]
    again = make_sim(seed=42)
    b = AtClient(again.port)
    b.join()
    assert sim.devices()[DEV]["dev_addr"] == again.devices()[DEV]["dev_addr"]
    assert sim.counters["fault_join_failures"] == 1
    with pytest.raises(ValueError):
        sim.set_faults(busy_prob=1.5)


def test_bad_attach_lines(make_sim):
    sim = make_sim()
    AtClient(sim.port, dialect="lorawan9000")
    at = AtClient(sim.port, attach=False)
    at.s.sendall(b"#SIM-TIME soon\r\n")
    assert at.answer("AT") == ["OK"]
    assert sim.counters["bad_attach"] == 1 and sim.counters["bad_sim_lines"] == 1
