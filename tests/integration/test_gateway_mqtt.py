"""Gateway daemon against a real Mosquitto and a real ledger node on loopback.

ChirpStack up events are built with the chirpstack-api classes and published
as ChirpStack's JSON marshaler does; bundles are signed with keys enrolled in
the ledger through its HTTP API. Fragments, gaps and resend commands:
test_gateway_delivery.py, which shares the helpers here.
"""

from __future__ import annotations

import hashlib
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
from pathlib import Path

import pytest
from chirpstack_api import integration
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa
from google.protobuf import json_format

from gateway import config
from gateway.daemon import OUTBOX_FILE, Gateway
from gateway.outbox import Outbox, read_dead_letters
from ledger_node.server import LedgerServer
from meter import frame
from tools import runtime

T0 = 1_767_225_600
APP = "app-1"


class Meter:
    """A meter's identity, signing key and command key, producing ChirpStack up events."""

    def __init__(self, dev_eui: str):
        self.dev_eui = dev_eui
        self.key = ECC.generate(curve="ed25519")
        self.command_key = os.urandom(frame.COMMAND_KEY_LEN)
        self.topic = f"application/{APP}/device/{dev_eui}/event/up"

    def sign(self, first: int, n: int = 1, import_dwh: dict | None = None, key=None) -> bytes:
        """A bundle of n readings from seq `first`: every 900 s, 1.0 Wh a
        reading unless import_dwh {seq: value} says otherwise."""
        over = import_dwh or {}
        body = frame.encode_body([(s, T0 + 900 * s, over.get(s, 1000 + 10 * s), 0,
                                   frame.FLAG_VOLTAGE_MEASURED) for s in range(first, first + n)])
        sig = eddsa.new(key or self.key, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(self.dev_eui), body))
        return frame.assemble(body, sig)

    def event(self, data: bytes, f_port: int = frame.PORT_READING, dedup: str | None = None,
              dev_eui: str | None = None) -> bytes:
        ev = integration.UplinkEvent(deduplication_id=dedup or str(uuid.uuid4()),
                                     f_port=f_port, f_cnt=1, data=data)
        ev.device_info.dev_eui = dev_eui or self.dev_eui
        ev.device_info.application_id = APP
        ev.rx_info.add(gateway_id="0016c001f1500001", rssi=-97, snr=7.5)
        return json_format.MessageToJson(ev).encode()

    def uplink(self, first: int, n: int = 1, **kw) -> bytes:
        return self.event(self.sign(first, n, **kw))

    def fragments(self, first: int, n: int, max_payload: int = 51) -> list[bytes]:
        """The up events of one bundle sent in pieces (EU868 DR0-DR2 take 51 bytes)."""
        pieces = frame.fragment(self.sign(first, n), max_payload)
        assert len(pieces) > 1
        return [self.event(p) for p in pieces]

    def enroll(self, ledger_url: str, token: str | None = None) -> None:
        public = self.key.public_key().export_key(format="raw").hex()
        http_json("POST", ledger_url + "/v1/devices",
                  {"dev_eui": self.dev_eui, "public_key": public, "community": "test",
                   "owner": hashlib.sha256(self.dev_eui.encode()).hexdigest()[:32]},
                  token=token)


def write_command_keys(path, meters) -> str:
    path.write_text(json.dumps({m.dev_eui: m.command_key.hex() for m in meters}))
    os.chmod(path, 0o600)
    return str(path)


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


def ledger_seqs(ledger_url: str, dev_eui: str) -> list[int]:
    return [r["seq"] for r in ledger_readings(ledger_url, dev_eui)]


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


def test_signed_bundles_reach_the_ledger(ledger, meters, publisher, start_gateway):
    gw = start_gateway(ledger.url, status_port=0)
    sent = {m.dev_eui: [] for m in meters}
    for first in (1, 3, 5):
        for m in meters:
            data = m.sign(first, 2, import_dwh={first: 5000 + first, first + 1: 5001 + first})
            sent[m.dev_eui].append(data)
            publisher.publish(m.topic, m.event(data))
    wait_for(lambda: gw.stats()["received"] == 6, "6 uplinks", gw=gw)
    assert gw.wait_idle(20)

    for m in meters:
        rows = ledger_readings(ledger.url, m.dev_eui)
        assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
        assert [bytes.fromhex(r["bundle"]) for r in rows] == [b for b in sent[m.dev_eui]
                                                              for _ in (0, 1)]
        assert [r["import_dwh"] for r in rows] == [5001, 5002, 5003, 5004, 5005, 5006]
        assert {r["gateway"] for r in rows} == {"gw-0"}
    stats = gw.stats()
    assert (stats["received"], stats["bundles"], stats["verified"], stats["forwarded"]) == \
        (6, 6, 12, 6)
    assert stats["rejected"] == {} and stats["outbox_depth"] == 0
    assert stats["ledger"]["stored"] == 12 and stats["devices"] == 2
    assert stats["gaps"] == {"devices": 0, "missing": 0, "given_up": 0}

    base = f"http://127.0.0.1:{gw.status_port}"
    over_http = http_json("GET", base + "/stats")
    assert (over_http["verified"], over_http["forwarded"], over_http["outbox_depth"]) == (12, 6, 0)
    health = http_json("GET", base + "/health")
    assert health["status"] == "ok" and health["mqtt_connected"] is True
    with pytest.raises(urllib.error.HTTPError) as exc:
        http_json("GET", base + "/nope")
    assert exc.value.code == 404


def test_bad_input_is_counted_never_stored_and_processing_goes_on(
        ledger, meters, publisher, start_gateway):
    a, b = meters
    stranger = Meter("0000000000000bad")  # never enrolled
    gw = start_gateway(ledger.url, unknown_refresh_gap=0)
    good = a.sign(1, 2)
    original = a.event(good, dedup="dedup-1")
    altered = bytearray(a.sign(3))
    altered[12] ^= 0x04  # one bit of the import register
    cases = [
        (a.topic, b"\xff\xfe\x00 not text", "malformed_json"),
        (a.topic, b"{'devEui': 1", "malformed_json"),
        (a.topic, b'["up"]', "malformed_event"),
        (a.topic, b'{"deviceInfo": {"devEui": "70b3d57ed0000a01"}, "fPort": "one"}',
         "malformed_event"),
        (a.topic, b'{"fPort": 1, "data": "EQ=="}', "malformed_event"),
        (a.topic, a.event(good)[:-1] + b" " * 70_000 + b"}", "oversized_message"),
        (b.topic, a.event(a.sign(3)), "topic_mismatch"),
        (a.topic, a.event(a.sign(3), f_port=2), None),  # not a readings port: ignored
        (a.topic, a.event(b"\x00", f_port=222), None),  # the modem's MAC request carrier
        (a.topic, a.event(b""), "empty"),
        (a.topic, a.event(a.sign(3)[:-1]), "truncated"),
        (a.topic, a.event(a.sign(3) + b"\x00"), "oversized"),
        (a.topic, a.event(b"\x21" + a.sign(3)[1:]), "version"),
        (a.topic, a.event(b"\x18" + a.sign(3)[1:]), "type"),
        (a.topic, a.event(a.sign(3)[:1] + b"\x00" + a.sign(3)[2:]), "field"),  # count 0
        (stranger.topic, stranger.uplink(1), "unknown_device"),
        (stranger.topic, stranger.fragments(1, 3)[0], "unknown_device"),  # not even kept
        (a.topic, a.event(a.sign(3, key=ECC.generate(curve="ed25519"))), "bad_signature"),
        (a.topic, a.event(bytes(altered)), "bad_signature"),
        (a.topic, a.event(b.sign(3), dev_eui=a.dev_eui), "bad_signature"),  # B's bundle as A
        (a.topic, original, None),  # the good one
        (a.topic, original, "duplicate"),  # delivered twice by the broker (same deduplicationId)
        (a.topic, a.event(good, dedup="dedup-2"), "replay"),  # readings known
        (b.topic, b.uplink(1), None),  # still processing good messages
    ]
    for topic, payload, _ in cases:
        publisher.publish(topic, payload)
    wait_for(lambda: gw.stats()["received"] == len(cases), f"{len(cases)} uplinks", gw=gw)
    assert gw.wait_idle(20)

    stats = gw.stats()
    expected = Counter(reason for _, _, reason in cases if reason and reason != "duplicate")
    assert stats["rejected"] == dict(expected)
    assert stats["duplicates"] == 1  # dropped and counted, not a rejection
    # Every rejection is in the dead-letter store, as it arrived, with its reason.
    dead = read_dead_letters(gw.state_dir / OUTBOX_FILE, limit=1000)
    assert Counter(d["reason"] for d in dead) == expected == Counter(
        {r: n for r, n in stats["rejected"].items()})
    payloads = {(t, bytes(p)[:4096]) for t, p, r in cases if r and r != "duplicate"}
    assert {(d["topic"], d["payload"]) for d in dead} == payloads
    oversized = next(d for d in dead if d["reason"] == "oversized_message")
    assert oversized["size"] > 70_000 and len(oversized["payload"]) == 4096
    assert stats["dead_letters"] == len(dead)
    assert stats["other_ports"] == {"2": 1, "222": 1}
    assert (stats["bundles"], stats["verified"], stats["forwarded"]) == (2, 3, 2)
    assert stats["fragments"]["incomplete_sets"] == 0
    assert ledger_seqs(ledger.url, a.dev_eui) == [1, 2]
    assert ledger_seqs(ledger.url, b.dev_eui) == [1]
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert (ledger_stats["readings"], ledger_stats["bundles"], ledger_stats["rejected"]) == \
        (3, 2, 0)

    # Enrolled while the gateway runs: picked up without a restart.
    stranger.enroll(ledger.url)
    publisher.publish(stranger.topic, stranger.uplink(1))
    wait_for(lambda: gw.stats()["verified"] == 4, "the newly enrolled meter", gw=gw)
    assert gw.wait_idle(20)
    assert ledger_seqs(ledger.url, stranger.dev_eui) == [1]


def test_replayed_and_overlapping_bundles(ledger, meters, publisher, start_gateway, tmp_path):
    a = meters[0]
    gw = start_gateway(ledger.url, state_dir=tmp_path / "st")
    first = a.sign(1, 3)
    publisher.publish(a.topic, a.event(first))
    publisher.publish(a.topic, a.event(first))  # a replay under a new deduplicationId
    publisher.publish(a.topic, a.uplink(3, 3))  # rebundled: 3 again, 4 and 5 new
    wait_for(lambda: gw.stats()["received"] == 3, "3 uplinks", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert stats["rejected"] == {"replay": 1}
    assert (stats["bundles"], stats["verified"]) == (2, 5)
    assert (stats["ledger"]["stored"], stats["ledger"]["duplicate"]) == (5, 1)
    assert ledger_seqs(ledger.url, a.dev_eui) == [1, 2, 3, 4, 5]
    assert http_json("GET", ledger.url + "/v1/stats")["bundles"] == 2

    # The accepted seqs outlive the process: a replay after a restart is still one.
    gw.stop()
    again = start_gateway(ledger.url, state_dir=tmp_path / "st")
    publisher.publish(a.topic, a.event(first))
    wait_for(lambda: again.stats()["received"] == 1, "the replay", gw=again)
    assert again.stats()["rejected"] == {"replay": 1} and again.stats()["bundles"] == 0


def test_reordered_bundles_are_all_accepted_and_the_ledger_is_consistent(
        ledger, meters, publisher, start_gateway):
    a = meters[0]
    gw = start_gateway(ledger.url)
    for first in (7, 1, 10, 4, 13):
        publisher.publish(a.topic, a.uplink(first, 3))
    wait_for(lambda: gw.stats()["received"] == 5, "5 uplinks", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert stats["rejected"] == {} and (stats["bundles"], stats["verified"]) == (5, 15)
    assert stats["gaps"]["missing"] == 0  # every gap an early bundle left has closed
    assert ledger_seqs(ledger.url, a.dev_eui) == list(range(1, 16))
    check = http_json("GET", ledger.url + "/v1/check")
    assert check["ok"], check["problems"]
    assert check["readings"] == 15


def test_ledger_outage_then_recovery_delivers_exactly_once(ledger, meters, publisher,
                                                           start_gateway):
    gw = start_gateway(ledger.url, status_port=0)
    wait_for(lambda: gw.stats()["devices"] == 2, "device keys", gw=gw)
    ledger.stop()

    repeats = []
    for first in range(1, 21, 2):
        for m in meters:
            payload = m.uplink(first, 2)
            publisher.publish(m.topic, payload)
            if first % 4 == 1:
                repeats.append((m.topic, payload))
    for topic, payload in repeats:
        publisher.publish(topic, payload)
    total = 20 + len(repeats)
    wait_for(lambda: gw.stats()["received"] == total, f"{total} uplinks", gw=gw)
    wait_for(lambda: gw.stats()["ledger"]["errors"] >= 2, "retries against the dead ledger",
             gw=gw)
    stats = gw.stats()
    assert stats["bundles"] == 20 and stats["outbox_depth"] == 20 and stats["forwarded"] == 0
    assert stats["rejected"] == {} and stats["duplicates"] == len(repeats)
    health = http_json("GET", f"http://127.0.0.1:{gw.status_port}/health")
    assert health["status"] == "degraded" and health["ledger_reachable"] is False

    ledger.start()  # same database, same port
    assert gw.wait_idle(30)
    for m in meters:
        assert ledger_seqs(ledger.url, m.dev_eui) == list(range(1, 21))
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert ledger_stats["readings"] == 40 and ledger_stats["stored"] == 40
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
    wait_for(lambda: first.stats()["bundles"] == 6, "6 verified bundles", gw=first)
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
    wait_for(lambda: second.stats()["bundles"] == 4, "the 4 uplinks queued in the broker",
             gw=second)
    assert second.stats()["devices"] == 2 and second.stats()["outbox_depth"] == 10
    assert second.stats()["rejected"] == {}

    ledger.start()
    assert second.wait_idle(30)
    for m in meters:
        assert ledger_seqs(ledger.url, m.dev_eui) == [1, 2, 3, 4, 5]
    assert http_json("GET", ledger.url + "/v1/stats")["readings"] == 10


def test_redundant_gateways_store_each_reading_once(ledger, meters, publisher, start_gateway):
    gws = [start_gateway(ledger.url), start_gateway(ledger.url)]
    for first in (1, 3, 5):
        for m in meters:
            publisher.publish(m.topic, m.uplink(first, 2))
    for gw in gws:
        wait_for(lambda: gw.stats()["received"] == 6, "6 uplinks", gw=gw)
        assert gw.wait_idle(20)
    ledger_stats = http_json("GET", ledger.url + "/v1/stats")
    assert (ledger_stats["readings"], ledger_stats["bundles"]) == (12, 6)
    assert (ledger_stats["stored"], ledger_stats["duplicate"]) == (12, 12)
    # Each gateway's outbox drained: "ok" with duplicates means the ledger has them.
    assert [gw.stats()["forwarded"] for gw in gws] == [6, 6]
    assert sum(gw.stats()["ledger"]["stored"] for gw in gws) == 12


def test_bundle_refused_by_the_ledger_is_kept_aside(ledger, meters, publisher, start_gateway,
                                                    tmp_path):
    a = meters[0]
    gw = start_gateway(ledger.url, state_dir=tmp_path / "st")
    publisher.publish(a.topic, a.uplink(1, import_dwh={1: 5000}))
    # Correctly signed, but the import register runs backwards: only the
    # ledger, which knows the history, can refuse it.
    publisher.publish(a.topic, a.uplink(2, 2, import_dwh={2: 4000, 3: 4100}))
    publisher.publish(a.topic, a.uplink(4, import_dwh={4: 5100}))
    wait_for(lambda: gw.stats()["received"] == 3, "3 uplinks", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert stats["bundles"] == 3 and stats["outbox_depth"] == 0
    assert (stats["ledger"]["stored"], stats["ledger"]["rejected"]) == (2, 1)
    gw.stop()
    box = Outbox(tmp_path / "st" / OUTBOX_FILE)
    rejected = box.rejected()
    box.close()
    assert [(r["first_seq"], r["last_seq"], r["reason"]) for r in rejected] == \
        [(2, 3, "registers_backwards")]
    assert ledger_seqs(ledger.url, a.dev_eui) == [1, 4]


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
    assert ledger_seqs(ledger.url, m.dev_eui) == [1, 2]


def daemon(broker_port: int, ledger_url: str, state_dir, status_port: int,
           **settings) -> subprocess.Popen:
    """`meter-gateway run --config` in its own process; `settings` are config
    sections ({"resend": {"after_s": 60}, ...})."""
    doc = {"name": "crashy", "state_dir": str(state_dir), "mqtt": {"port": broker_port},
           "ledger": [{"url": ledger_url}],
           "status": {"listen": f"127.0.0.1:{status_port}"}, "log": {"level": "WARNING"}}
    for section, values in settings.items():
        doc.setdefault(section, {}).update(values)
    path = Path(state_dir).parent / "gateway.toml"
    path.write_text(config.to_toml(doc))
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path)],
                            cwd=runtime.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status_client(status_port: int):
    """(stats(), subscribed()) for a daemon's status endpoint."""
    status = f"http://127.0.0.1:{status_port}"

    def subscribed():
        try:
            return http_json("GET", status + "/health")["subscribed"]
        except OSError:  # not listening yet
            return False

    return (lambda: http_json("GET", status + "/stats")), subscribed


def test_killed_daemon_loses_nothing_and_stores_nothing_twice(broker, ledger, meters, publisher,
                                                             tmp_path):
    m = meters[0]
    state = tmp_path / "state"
    status_port = runtime.free_port()
    stats, subscribed = status_client(status_port)

    url = ledger.url
    proc = daemon(broker.port, url, state, status_port)
    try:
        wait_for(subscribed, "the daemon to subscribe")
        wait_for(lambda: stats()["devices"] == 2, "device keys")
        ledger.stop()  # bundles pile up in the outbox
        for seq in range(1, 31):
            publisher.publish(m.topic, m.uplink(seq))
        wait_for(lambda: stats()["bundles"] >= 10, "some bundles verified")
    finally:
        proc.kill()  # no clean shutdown: whatever was in flight stays in flight
        proc.wait(10)
    box = Outbox(state / OUTBOX_FILE)
    assert box.depth() >= 10  # acknowledged to the broker, so only the outbox has them
    box.close()
    for seq in range(31, 41):
        publisher.publish(m.topic, m.uplink(seq))
    ledger.start()

    proc = daemon(broker.port, ledger.url, state, status_port)
    try:
        wait_for(lambda: len(ledger_readings(ledger.url, m.dev_eui)) == 40,
                 "all 40 readings in the ledger", timeout=30)
        wait_for(lambda: stats()["outbox_depth"] == 0, "the outbox to drain")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert ledger_seqs(ledger.url, m.dev_eui) == list(range(1, 41))
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
        assert stats["bundles"] == 1 and stats["outbox_depth"] == 1 and stats["forwarded"] == 0
        assert "401" in stats["ledger"]["last_error"]
        assert ledger_readings(srv.url, m.dev_eui) == []
    finally:
        srv.stop()
