"""Gateway daemon against a real Mosquitto and a real ledger node on loopback.

ChirpStack up events are built with the chirpstack-api classes and published
as ChirpStack's JSON marshaler does; frames are signed with keys enrolled in
the ledger through its HTTP API.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter

import pytest
from chirpstack_api import integration
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from google.protobuf import json_format

from gateway.daemon import OUTBOX_FILE, Gateway
from gateway.outbox import Outbox
from ledger_node.server import LedgerServer
from meter import frame
from tools import runtime

FIELDS = dict(t_end=1_767_225_600, interval_s=900, import_dwh=0, export_dwh=0,
              irms_ca=523, vrms_dv=2305, flags=frame.FLAG_VOLTAGE_MEASURED)


class Meter:
    """A meter's identity and signing key, producing ChirpStack up events."""

    def __init__(self, dev_eui: str):
        self.dev_eui = dev_eui
        self.key = ECC.generate(curve="ed25519")
        self.topic = f"application/app-1/device/{dev_eui}/event/up"

    def sign(self, seq: int, **over) -> bytes:
        fields = {**FIELDS, "seq": seq, "t_end": FIELDS["t_end"] + 900 * seq,
                  "import_dwh": 1000 + 10 * seq, **over}
        body = frame.encode_body(**fields)
        sig = eddsa.new(self.key, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(self.dev_eui), body))
        return frame.assemble(body, sig)

    def event(self, data: bytes, f_port: int = frame.PORT_READING, dedup: str | None = None,
              dev_eui: str | None = None) -> bytes:
        ev = integration.UplinkEvent(deduplication_id=dedup or str(uuid.uuid4()),
                                     f_port=f_port, f_cnt=1, data=data)
        ev.device_info.dev_eui = dev_eui or self.dev_eui
        ev.device_info.application_id = "app-1"
        ev.rx_info.add(gateway_id="0016c001f1500001", rssi=-97, snr=7.5)
        return json_format.MessageToJson(ev).encode()

    def uplink(self, seq: int, **over) -> bytes:
        return self.event(self.sign(seq, **over))

    def enroll(self, ledger_url: str, token: str | None = None) -> None:
        public = self.key.public_key().export_key(format="raw").hex()
        http_json("POST", ledger_url + "/v1/devices",
                  {"dev_eui": self.dev_eui, "public_key": public}, token=token)


def http_json(method: str, url: str, body=None, token: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def ledger_readings(ledger_url: str, dev_eui: str) -> list[dict]:
    return http_json("GET", f"{ledger_url}/v1/readings?dev_eui={dev_eui}")["readings"]


def wait_for(predicate, what: str, timeout: float = 20.0, gw: Gateway | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}"
                        + (f"; gateway stats {gw.stats()}" if gw else ""))
        time.sleep(0.05)


def chirpstack(mqtt_tap, port: int | None = None):
    """Stands in for ChirpStack's MQTT integration: QoS 1 publishes."""
    return mqtt_tap(port=port, client_id=f"chirpstack-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def publisher(mqtt_tap):
    return chirpstack(mqtt_tap)


@pytest.fixture
def ledger(tmp_path):
    srv = LedgerServer(tmp_path / "ledger.db", port=0)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def start_gateway(broker, tmp_path):
    started = []

    def start(ledger_url: str, state_dir=None, **kw) -> Gateway:
        kw.setdefault("name", f"gw-{len(started)}")
        kw.setdefault("backoff_cap", 0.5)
        gw = Gateway("127.0.0.1", broker.port, ledger_url,
                     state_dir or tmp_path / f"state-{len(started)}", **kw)
        started.append(gw)
        gw.start()
        assert gw.wait_ready(10), "gateway did not subscribe"
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def meters(ledger):
    ms = [Meter("70b3d57ed0000a01"), Meter("70b3d57ed0000b02")]
    for m in ms:
        m.enroll(ledger.url)
    return ms


def test_signed_readings_reach_the_ledger(ledger, meters, publisher, start_gateway):
    gw = start_gateway(ledger.url, status_port=0)
    sent = {m.dev_eui: {} for m in meters}
    for seq in range(1, 6):
        for m in meters:
            data = m.sign(seq, import_dwh=5000 + seq)
            sent[m.dev_eui][seq] = data
            publisher.publish(m.topic, m.event(data))
    wait_for(lambda: gw.stats()["received"] == 10, "10 uplinks", gw=gw)
    assert gw.wait_idle(20)

    for m in meters:
        rows = ledger_readings(ledger.url, m.dev_eui)
        assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
        assert [base64.b64decode(r["frame"]) for r in rows] == [sent[m.dev_eui][s]
                                                                for s in range(1, 6)]
        assert [r["import_dwh"] for r in rows] == [5001, 5002, 5003, 5004, 5005]
        assert {r["gateway"] for r in rows} == {"gw-0"}
    stats = gw.stats()
    assert (stats["received"], stats["verified"], stats["forwarded"]) == (10, 10, 10)
    assert stats["rejected"] == {} and stats["outbox_depth"] == 0
    assert stats["ledger"]["stored"] == 10 and stats["devices"] == 2

    base = f"http://127.0.0.1:{gw.status_port}"
    over_http = http_json("GET", base + "/stats")
    assert (over_http["verified"], over_http["forwarded"], over_http["outbox_depth"]) == (10, 10, 0)
    health = http_json("GET", base + "/health")
    assert health["status"] == "ok" and health["mqtt_connected"] is True
    with pytest.raises(urllib.error.HTTPError) as exc:
        http_json("GET", base + "/metrics")
    assert exc.value.code == 404


def test_bad_input_is_counted_never_stored_and_processing_goes_on(
        ledger, meters, publisher, start_gateway):
    a, b = meters
    stranger = Meter("0000000000000bad")  # never enrolled
    gw = start_gateway(ledger.url, unknown_refresh_gap=0)
    good = a.sign(1)
    original = a.event(good, dedup="dedup-1")
    cases = [
        (a.topic, b"\xff\xfe\x00 not text", "malformed_json"),
        (a.topic, b"{'devEui': 1", "malformed_json"),
        (a.topic, b'["up"]', "malformed_event"),
        (a.topic, b'{"deviceInfo": {"devEui": "70b3d57ed0000a01"}, "fPort": "one"}',
         "malformed_event"),
        (a.topic, b'{"fPort": 1, "data": "EQ=="}', "malformed_event"),
        (a.topic, a.event(good)[:-1] + b" " * 70_000 + b"}", "oversized_message"),
        (b.topic, a.event(a.sign(2)), "topic_mismatch"),
        (a.topic, a.event(a.sign(2), f_port=2), "wrong_port"),
        (a.topic, a.event(b""), "empty"),
        (a.topic, a.event(a.sign(2)[:-1]), "truncated"),
        (a.topic, a.event(a.sign(2) + b"\x00"), "oversized"),
        (a.topic, a.event(b"\x21" + a.sign(2)[1:]), "version"),
        (a.topic, a.event(b"\x12" + a.sign(2)[1:]), "type"),
        (a.topic, a.event(a.sign(2)[:23] + b"\x80" + a.sign(2)[24:]), "field"),  # unknown flag bit
        (stranger.topic, stranger.uplink(1), "unknown_device"),
        (a.topic, a.event(a.sign(2)[:-1] + bytes([a.sign(2)[-1] ^ 1])), "bad_signature"),
        (a.topic, a.event(b.sign(2), dev_eui=a.dev_eui), "bad_signature"),  # B's frame as A
        (a.topic, original, None),  # the good one
        (a.topic, original, "duplicate"),  # delivered twice by the broker
        (a.topic, a.event(good, dedup="dedup-2"), "duplicate"),  # relayed twice
        (b.topic, b.uplink(1), None),  # still processing good messages
    ]
    for topic, payload, _ in cases:
        publisher.publish(topic, payload)
    wait_for(lambda: gw.stats()["received"] == len(cases), f"{len(cases)} uplinks", gw=gw)
    assert gw.wait_idle(20)

    stats = gw.stats()
    expected = Counter(reason for _, _, reason in cases if reason)
    assert stats["rejected"] == dict(expected)
    assert stats["verified"] == 2 and stats["forwarded"] == 2
    assert [r["seq"] for r in ledger_readings(ledger.url, a.dev_eui)] == [1]
    assert [r["seq"] for r in ledger_readings(ledger.url, b.dev_eui)] == [1]
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert ledger_stats["readings"] == 2 and ledger_stats["rejected"] == 0

    # Enrolled while the gateway runs: picked up without a restart.
    stranger.enroll(ledger.url)
    publisher.publish(stranger.topic, stranger.uplink(1))
    wait_for(lambda: gw.stats()["verified"] == 3, "the newly enrolled meter", gw=gw)
    assert gw.wait_idle(20)
    assert [r["seq"] for r in ledger_readings(ledger.url, stranger.dev_eui)] == [1]


def test_ledger_outage_then_recovery_delivers_exactly_once(ledger, meters, publisher,
                                                           start_gateway):
    gw = start_gateway(ledger.url, status_port=0)
    wait_for(lambda: gw.stats()["devices"] == 2, "device keys", gw=gw)
    ledger.stop()

    repeats = []
    for seq in range(1, 11):
        for m in meters:
            payload = m.uplink(seq)
            publisher.publish(m.topic, payload)
            if seq % 4 == 0:
                repeats.append((m.topic, payload))
    for topic, payload in repeats:
        publisher.publish(topic, payload)
    total = 20 + len(repeats)
    wait_for(lambda: gw.stats()["received"] == total, f"{total} uplinks", gw=gw)
    wait_for(lambda: gw.stats()["ledger"]["errors"] >= 2, "retries against the dead ledger",
             gw=gw)
    stats = gw.stats()
    assert stats["verified"] == 20 and stats["outbox_depth"] == 20 and stats["forwarded"] == 0
    assert stats["rejected"] == {"duplicate": len(repeats)}
    health = http_json("GET", f"http://127.0.0.1:{gw.status_port}/health")
    assert health["status"] == "degraded" and health["ledger_reachable"] is False

    ledger.start()  # same database, same port
    assert gw.wait_idle(30)
    for m in meters:
        assert [r["seq"] for r in ledger_readings(ledger.url, m.dev_eui)] == list(range(1, 11))
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert ledger_stats["readings"] == 20 and ledger_stats["stored"] == 20
    assert gw.stats()["forwarded"] == 20


def test_restart_with_pending_outbox_and_ledger_down(ledger, meters, publisher, start_gateway,
                                                     tmp_path):
    state = tmp_path / "gw-state"
    url = ledger.url
    first = start_gateway(url, state_dir=state, name="edge-1")
    wait_for(lambda: first.stats()["devices"] == 2, "device keys", gw=first)
    ledger.stop()
    for seq in (1, 2, 3):
        for m in meters:
            publisher.publish(m.topic, m.uplink(seq))
    wait_for(lambda: first.stats()["verified"] == 6, "6 verified readings", gw=first)
    first.stop()
    box = Outbox(state / OUTBOX_FILE)
    assert box.depth() == 6
    box.close()

    # Published while no gateway runs: kept by the broker for the session.
    for seq in (4, 5):
        for m in meters:
            publisher.publish(m.topic, m.uplink(seq))

    # The ledger is still down: the keys come from the cache in the state dir.
    second = start_gateway(url, state_dir=state, name="edge-1")
    wait_for(lambda: second.stats()["verified"] == 4, "the 4 uplinks queued in the broker",
             gw=second)
    assert second.stats()["devices"] == 2 and second.stats()["outbox_depth"] == 10
    assert second.stats()["rejected"] == {}

    ledger.start()
    assert second.wait_idle(30)
    for m in meters:
        assert [r["seq"] for r in ledger_readings(ledger.url, m.dev_eui)] == [1, 2, 3, 4, 5]
    assert http_json("GET", ledger.url + "/v1/stats")["readings"] == 10


def test_redundant_gateways_store_each_reading_once(ledger, meters, publisher, start_gateway):
    gws = [start_gateway(ledger.url), start_gateway(ledger.url)]
    for seq in range(1, 6):
        for m in meters:
            publisher.publish(m.topic, m.uplink(seq))
    for gw in gws:
        wait_for(lambda: gw.stats()["received"] == 10, "10 uplinks", gw=gw)
        assert gw.wait_idle(20)
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert ledger_stats["readings"] == 10
    assert (ledger_stats["stored"], ledger_stats["duplicate"]) == (10, 10)
    # Each gateway's outbox drained: "duplicate" means the ledger has it.
    assert [gw.stats()["forwarded"] for gw in gws] == [10, 10]
    assert sum(gw.stats()["ledger"]["stored"] for gw in gws) == 10


def test_reading_refused_by_the_ledger_is_kept_aside(ledger, meters, publisher, start_gateway,
                                                     tmp_path):
    a = meters[0]
    gw = start_gateway(ledger.url, state_dir=tmp_path / "st")
    publisher.publish(a.topic, a.uplink(1, import_dwh=5000))
    # Correctly signed, but the import register runs backwards: only the
    # ledger, which knows the history, can refuse it.
    publisher.publish(a.topic, a.uplink(2, import_dwh=4000))
    publisher.publish(a.topic, a.uplink(3, import_dwh=5100))
    wait_for(lambda: gw.stats()["received"] == 3, "3 uplinks", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert stats["verified"] == 3 and stats["outbox_depth"] == 0
    assert (stats["ledger"]["stored"], stats["ledger"]["rejected"]) == (2, 1)
    gw.stop()
    box = Outbox(tmp_path / "st" / OUTBOX_FILE)
    rejected = box.rejected()
    box.close()
    assert [(r["seq"], r["reason"]) for r in rejected] == [(2, "registers_backwards")]
    assert [r["seq"] for r in ledger_readings(ledger.url, a.dev_eui)] == [1, 3]


def test_command_line_daemon_with_token(broker, publisher, tmp_path):
    token = "s3cret-token"
    srv = LedgerServer(tmp_path / "ledger.db", port=0, token=token).start()
    try:
        m = Meter("70b3d57ed0000c03")
        m.enroll(srv.url, token=token)
        status_port = runtime.free_port()
        env = dict(os.environ, METER_LEDGER_TOKEN=token)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "run", "--mqtt-host", "127.0.0.1",
             "--mqtt-port", str(broker.port), "--ledger", srv.url, "--state-dir",
             str(tmp_path / "state"), "--application-id", "app-1", "--status-port",
             str(status_port), "--name", "cli-gw"],
            env=env, cwd=runtime.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            runtime.wait_for_port(status_port)
            status = f"http://127.0.0.1:{status_port}"
            wait_for(lambda: http_json("GET", status + "/health")["subscribed"],
                     "the daemon to subscribe")
            for seq in (1, 2):
                publisher.publish(m.topic, m.uplink(seq))
            publisher.publish(m.topic, b"not json")
            wait_for(lambda: http_json("GET", status + "/stats")["forwarded"] == 2,
                     "2 readings forwarded by the daemon")
            stats = http_json("GET", status + "/stats")
            assert stats["rejected"] == {"malformed_json": 1}
            assert [r["seq"] for r in ledger_readings(srv.url, m.dev_eui)] == [1, 2]
            assert {r["gateway"] for r in ledger_readings(srv.url, m.dev_eui)} == {"cli-gw"}
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
        assert b"malformed_json" in out  # the rejection was logged
    finally:
        srv.stop()


def test_broker_restart_reconnects_and_resubscribes(broker, ledger, meters, start_gateway,
                                                     mqtt_tap):
    m = meters[0]
    gw = start_gateway(ledger.url)
    first = chirpstack(mqtt_tap)
    first.publish(m.topic, m.uplink(1))
    first.close()
    wait_for(lambda: gw.stats()["verified"] == 1, "the first reading", gw=gw)

    port = broker.port
    broker.stop()  # its session store goes with it: the gateway must subscribe anew
    wait_for(lambda: not gw.stats()["mqtt_connected"], "the gateway to notice", gw=gw)
    with runtime.Broker(port=port) as again:
        assert gw.wait_ready(20), "gateway did not resubscribe"
        pub = chirpstack(mqtt_tap, again.port)
        try:
            pub.publish(m.topic, m.uplink(2))
            wait_for(lambda: gw.stats()["verified"] == 2, "a reading after the restart", gw=gw)
            assert gw.wait_idle(20)
        finally:
            pub.close()
    assert [r["seq"] for r in ledger_readings(ledger.url, m.dev_eui)] == [1, 2]


def _daemon(broker_port: int, ledger_url: str, state_dir, status_port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--mqtt-port", str(broker_port),
         "--ledger", ledger_url, "--state-dir", str(state_dir), "--status-port",
         str(status_port), "--name", "crashy", "--log-level", "WARNING"],
        cwd=runtime.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_killed_daemon_loses_nothing_and_stores_nothing_twice(broker, ledger, meters, publisher,
                                                             tmp_path):
    m = meters[0]
    state = tmp_path / "state"
    status_port = runtime.free_port()
    status = f"http://127.0.0.1:{status_port}"

    def subscribed():
        try:
            return http_json("GET", status + "/health")["subscribed"]
        except OSError:  # not listening yet
            return False

    url = ledger.url
    proc = _daemon(broker.port, url, state, status_port)
    try:
        wait_for(subscribed, "the daemon to subscribe")
        wait_for(lambda: http_json("GET", status + "/health")["devices"] == 2, "device keys")
        ledger.stop()  # readings pile up in the outbox
        for seq in range(1, 31):
            publisher.publish(m.topic, m.uplink(seq))
        wait_for(lambda: http_json("GET", status + "/stats")["verified"] >= 10,
                 "some readings verified")
    finally:
        proc.kill()  # no clean shutdown: whatever was in flight stays in flight
        proc.wait(10)
    box = Outbox(state / OUTBOX_FILE)
    assert box.depth() >= 10  # acknowledged to the broker, so only the outbox has them
    box.close()
    for seq in range(31, 41):
        publisher.publish(m.topic, m.uplink(seq))
    ledger.start()

    proc = _daemon(broker.port, ledger.url, state, status_port)
    try:
        wait_for(lambda: len(ledger_readings(ledger.url, m.dev_eui)) == 40,
                 "all 40 readings in the ledger", timeout=30)
        wait_for(lambda: http_json("GET", status + "/stats")["outbox_depth"] == 0,
                 "the outbox to drain")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert [r["seq"] for r in ledger_readings(ledger.url, m.dev_eui)] == list(range(1, 41))
    assert http_json("GET", ledger.url + "/v1/stats")["stored"] == 40


def test_second_gateway_on_the_same_state_dir_is_refused(ledger, start_gateway, tmp_path):
    start_gateway(ledger.url, state_dir=tmp_path / "shared")
    with pytest.raises(RuntimeError, match="in use"):
        start_gateway(ledger.url, state_dir=tmp_path / "shared")


def test_wrong_token_keeps_readings_queued(broker, publisher, start_gateway, tmp_path):
    srv = LedgerServer(tmp_path / "ledger.db", port=0, token="right").start()
    try:
        m = Meter("70b3d57ed0000d04")
        m.enroll(srv.url, token="right")
        gw = start_gateway(srv.url, ledger_token="wrong")
        publisher.publish(m.topic, m.uplink(1))
        wait_for(lambda: gw.stats()["ledger"]["errors"] >= 2, "refused deliveries", gw=gw)
        stats = gw.stats()
        assert stats["verified"] == 1 and stats["outbox_depth"] == 1 and stats["forwarded"] == 0
        assert "401" in stats["ledger"]["last_error"]
        assert ledger_readings(srv.url, m.dev_eui) == []
    finally:
        srv.stop()
