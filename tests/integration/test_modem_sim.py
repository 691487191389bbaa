"""The modem simulator against a real Mosquitto: the RUI3 AT dialog over raw TCP
on one side, ChirpStack v4 integration events and downlink commands on the other."""

from __future__ import annotations

import base64
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
JOIN_EUI = "0000000000000001"
APP_KEY = "2b7e151628aed2a6abf7158809cf4f3c"
SPEED = 100.0  # a 5 s join takes 50 ms


class AtClient:
    """A raw TCP modem line, as sim_uart speaks it."""

    def __init__(self, port: int, attach: bool = True, dev_eui: str = DEV):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = b""
        self.lines: list[str] = []
        if attach:
            self.s.sendall(f"#SIM-ATTACH deveui={dev_eui} joineui={JOIN_EUI} "
                           f"appkey={APP_KEY}\r\n".encode())

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
                line = raw.decode().strip()
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

    def join(self) -> None:
        assert self.answer("AT+JOIN=1:0:10:8")[-1] == "OK"
        self.expect("+EVT:JOINED")

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


def test_time_on_air_matches_semtech_figures():
    # BRIEF section 4: a 51-byte payload takes about 2.8 s at SF12, 118 ms at SF7.
    assert modem_sim.time_on_air_s(51 + 13, 12, 125_000) == pytest.approx(2.8, rel=0.01)
    assert modem_sim.time_on_air_s(51 + 13, 7, 125_000) == pytest.approx(0.118, rel=0.01)


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
