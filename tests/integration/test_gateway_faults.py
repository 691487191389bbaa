"""The gateway under faults, against a real Mosquitto and real ledger nodes: the
broker restarted mid-stream, a ledger down for an hour while the queue fills,
a full disk, fuzzed MQTT traffic, clock jumps, `kill -9` in the middle of
batches, two ledger nodes. After each,
every reading is in the ledger exactly once and the daemon is still running.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import signal
import re
import subprocess
import threading
import time
import uuid
from collections import Counter

import paho.mqtt.client as mqtt
import pytest
from test_gateway_mqtt import (APP, Meter, daemon, http_json, ledger,  # noqa: F401
                               ledger_seqs, meters, publisher, start_gateway, status_client,
                               wait_for)

from gateway.daemon import OUTBOX_FILE
from gateway.outbox import read_dead_letters
from ledger_node.server import LedgerServer
from meter import frame
from tools import runtime


def fleet(ledger_url: str, n: int, base: int = 0xF000) -> list[Meter]:
    ms = [Meter(f"70b3d57ed001{base + i:04x}") for i in range(n)]
    for m in ms:
        m.enroll(ledger_url)
    return ms


def ledger_count(url: str) -> dict:
    return http_json("GET", url + "/v1/stats")


def assert_exactly_once(url: str, expected: dict[str, list[int]]) -> None:
    """The ledger holds every expected reading once: per device exactly these
    seqs, and as many readings in all as were sent."""
    for dev, seqs in expected.items():
        assert ledger_seqs(url, dev) == seqs, dev
    assert ledger_count(url)["readings"] == sum(len(s) for s in expected.values())


class Stream:
    """ChirpStack publishing a stream of uplinks with QoS 1 from its own
    thread; paho keeps what the broker has not acknowledged and sends it
    again after a reconnect, as ChirpStack's client does."""

    def __init__(self, port: int, events: list[tuple[str, bytes]], rate: float):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                                  client_id=f"chirpstack-{uuid.uuid4().hex[:8]}")
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.events = events
        self.rate = rate
        self.infos: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        for i, (topic, payload) in enumerate(self.events):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.infos.append(self.client.publish(topic, payload, qos=1))

    def start(self) -> "Stream":
        self.thread.start()
        return self

    def finish(self, timeout: float = 60.0) -> None:
        """Wait until the broker has acknowledged every message. (paho marks a
        message published while the connection was down with an error code,
        sends it after the reconnect all the same, and records the PUBACK.)"""
        self.thread.join(timeout)
        deadline = time.monotonic() + timeout
        while not all(info._published for info in self.infos):
            assert time.monotonic() < deadline, "the broker did not take every message"
            time.sleep(0.05)
        self.client.loop_stop()
        self.client.disconnect()


def test_broker_restarted_mid_stream_loses_and_repeats_nothing(broker, ledger, start_gateway):
    ms = fleet(ledger.url, 6)
    gw = start_gateway(ledger.url)
    events = [(m.topic, m.uplink(seq)) for seq in range(1, 51) for m in ms]
    stream = Stream(broker.port, events, rate=150.0).start()
    wait_for(lambda: gw.stats()["bundles"] >= 60, "the stream to flow", gw=gw)
    broker.restart(down_s=1.0)  # in-flight messages, unacknowledged ones, sessions on disk
    assert gw.wait_ready(20), "gateway did not resubscribe"
    stream.finish()
    wait_for(lambda: gw.stats()["bundles"] == len(events), f"{len(events)} bundles", gw=gw,
             timeout=30)
    assert gw.wait_idle(30)
    stats = gw.stats()
    assert stats["rejected"] == {} and stats["verified"] == len(events)
    assert stats["ledger"]["duplicate"] == 0  # the ledger never saw a bundle twice
    assert_exactly_once(ledger.url, {m.dev_eui: list(range(1, 51)) for m in ms})


class SimClock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def test_ledger_down_an_hour_fills_the_queue_warns_and_drops_nothing(ledger, start_gateway,
                                                                    broker, caplog):
    # An hour of 40 meters reporting every 15 minutes, one bundle per reading,
    # on a simulated clock; the queue holds 100 bundles, so 60 must wait in
    # the broker until the ledger is back.
    caplog.set_level(logging.INFO, logger="gateway")
    ms = fleet(ledger.url, 40)
    clock = SimClock()
    gw = start_gateway(ledger.url, status_port=0, queue_capacity=100, clock=clock)
    wait_for(lambda: gw.stats()["devices"] == 40, "device keys", gw=gw)
    ledger.stop()
    events = [(m.topic, m.uplink(seq)) for seq in range(1, 5) for m in ms]
    stream = Stream(broker.port, events, rate=400.0).start()
    for _ in range(len(events)):
        clock.offset += 3600.0 / len(events)  # the hour passes as the readings come
        time.sleep(0.0025)
    stream.finish()
    wait_for(lambda: gw.stats()["queue"]["full"], "the queue to fill", gw=gw)
    time.sleep(0.5)
    stats = gw.stats()
    assert stats["outbox_depth"] == 100 and stats["bundles"] == 100  # never above capacity
    health = http_json("GET", f"http://127.0.0.1:{gw.status_port}/health")
    assert health["status"] == "degraded" and health["queue_full"] is True
    warnings = [r.getMessage() for r in caplog.records if "queue for the ledger" in r.getMessage()]
    assert [re.search(r"(\d+)% full", w).group(1) for w in warnings if "% full" in w] == [
        "50", "80", "95"]
    assert any("is full (100 bundles)" in w for w in warnings)

    ledger.start()
    wait_for(lambda: gw.stats()["bundles"] == len(events), "the rest from the broker", gw=gw,
             timeout=30)
    assert gw.wait_idle(30)
    assert not gw.stats()["queue"]["full"]
    assert_exactly_once(ledger.url, {m.dev_eui: [1, 2, 3, 4] for m in ms})
    received = sorted(r["received_at"] for m in ms[:1] for r in
                      http_json("GET", f"{ledger.url}/v1/readings?dev_eui={m.dev_eui}")["readings"])
    assert received[-1] - received[0] > 2000  # stamped on the simulated clock


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs) that the test can fill to the last
    byte. Mounting needs root, which the test machines and CI have."""
    path = tmp_path / "disk"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], check=True)
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path) -> None:
    """Write until the file system refuses: ENOSPC."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_disk_full_holds_uplinks_in_the_broker_until_there_is_room(ledger, start_gateway,
                                                                   publisher, small_disk):
    ms = fleet(ledger.url, 3)
    gw = start_gateway(ledger.url, state_dir=small_disk / "state", status_port=0)
    for m in ms:
        publisher.publish(m.topic, m.uplink(1))
    assert gw.wait_idle(20)
    ledger.stop()  # what comes next has to be written to the full disk
    fill(small_disk)
    for seq in range(2, 42):
        for m in ms:
            publisher.publish(m.topic, m.uplink(seq))
    wait_for(lambda: gw.stats()["storage_errors"] >= 2, "the full disk", gw=gw)
    stats = gw.stats()
    assert stats["bundles"] < 3 * 41  # some, maybe none, fitted before it filled
    health = http_json("GET", f"http://127.0.0.1:{gw.status_port}/health")
    # Waiting for room, not broken: the watchdog must not restart it for this.
    assert health["status"] == "degraded" and health["storage_failing"] is True

    os.remove(small_disk / "filler")
    ledger.start()
    wait_for(lambda: gw.stats()["bundles"] == 3 * 41, "the uplinks held back", gw=gw,
             timeout=60)
    assert gw.wait_idle(30)
    assert gw.stats()["rejected"] == {}
    assert_exactly_once(ledger.url, {m.dev_eui: list(range(1, 42)) for m in ms})


def _mutations(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(6)
    data = bytearray(good)
    if kind == 0:  # bit flips
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncation
        data = data[:rng.randrange(len(data))]
    elif kind == 2:  # inserted bytes
        i = rng.randrange(len(data))
        data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    elif kind == 3:  # random bytes
        data = bytearray(rng.randbytes(rng.randint(0, 300)))
    elif kind == 4:  # a JSON event with a field of the wrong type
        doc = json.loads(good)
        key = rng.choice(list(doc))
        doc[key] = rng.choice([None, 1, -1, 2**70, "x", [], {}, True, 1.5])
        data = bytearray(json.dumps(doc).encode())
    else:  # valid JSON, wrong frame inside
        doc = json.loads(good)
        doc["data"] = base64.b64encode(rng.randbytes(rng.randint(0, 250))).decode()
        data = bytearray(json.dumps(doc).encode())
    return bytes(data)


def test_fuzzed_mqtt_traffic_is_refused_counted_and_kept(ledger, meters, start_gateway,
                                                         publisher):
    a, b = meters
    gw = start_gateway(ledger.url, status_port=0)
    rng = random.Random(20261122)
    good = a.event(a.sign(1))
    topics = [a.topic, f"application/{APP}/device/{a.dev_eui}/event/ack",
              f"application/{APP}/device/{a.dev_eui}/event/txack",
              f"application/{APP}/device/ffffffffffffffff/event/up"]
    cases = [(rng.choice(topics), _mutations(rng, good)) for _ in range(400)]
    cases.append((a.topic, b"{" * 100_000))  # deep nesting, oversized
    cases.append((a.topic, b"[" * 5000 + b"]" * 5000))  # deep nesting under the size limit
    for topic, payload in cases:
        publisher.publish(topic, payload)
    publisher.publish(b.topic, b.uplink(1))  # a good one after all that
    wait_for(lambda: gw.stats()["received"] == len(cases) + 1, "every message", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert "internal_error" not in stats["rejected"], stats["rejected"]
    assert gw.healthy()
    assert ledger_seqs(ledger.url, b.dev_eui) == [1]
    # A mutation may leave a valid uplink (a flipped bit in rxInfo): at most
    # the one reading of `good`, once.
    assert ledger_seqs(ledger.url, a.dev_eui) in ([], [1])
    settled = (stats["rejected_total"] + stats["duplicates"] + stats["bundles"]
               + sum(stats["other_ports"].values()))
    acks = len(cases) + 1 - settled  # ack/txack events that parsed: they settle no command
    assert 0 <= acks <= sum(1 for t, _ in cases if not t.endswith("/up"))
    dead = read_dead_letters(gw.state_dir / OUTBOX_FILE, limit=10_000)
    assert len(dead) == stats["rejected_total"] == stats["dead_letters"]
    assert Counter(d["reason"] for d in dead) == Counter(stats["rejected"])


def test_clock_jumps_lose_and_repeat_nothing(ledger, start_gateway, broker, tmp_path):
    ms = fleet(ledger.url, 4)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({m.dev_eui: m.command_key.hex() for m in ms}))
    os.chmod(keys, 0o600)
    clock = SimClock()
    gw = start_gateway(ledger.url, clock=clock, command_keys=str(keys), resend_max_per_day=0)
    counters = []
    pieces = ms[0].fragments(200, 9)
    events = [(m.topic, m.uplink(seq)) for seq in range(1, 61) for m in ms]
    stream = Stream(broker.port, events, rate=200.0).start()
    for jump in (+86400.0, -3 * 86400.0, +3600.0, -7200.0):
        wait_for(lambda: gw.stats()["bundles"] >= 40 * (len(counters) + 1), "progress", gw=gw)
        clock.offset += jump
        counters.append(gw.send_command(ms[1].dev_eui, frame.OP_INTERVAL, 900))
    # A fragmented bundle whose pieces straddle a jump back in time.
    stream.finish()
    Stream(broker.port, [(ms[0].topic, p) for p in pieces[:2]], rate=100).start().finish()
    clock.offset -= 86400.0
    Stream(broker.port, [(ms[0].topic, p) for p in pieces[2:]], rate=100).start().finish()
    wait_for(lambda: gw.stats()["bundles"] == len(events) + 1, "every bundle", gw=gw,
             timeout=30)
    assert gw.wait_idle(30)
    assert gw.stats()["rejected"] == {}
    expected = {m.dev_eui: list(range(1, 61)) for m in ms}
    expected[ms[0].dev_eui] = list(range(1, 61)) + list(range(200, 209))
    assert_exactly_once(ledger.url, expected)
    # Commands stay in order for the meter whatever the clock did.
    assert counters == sorted(counters) and len(set(counters)) == len(counters)


def test_two_ledger_nodes_each_get_every_reading(broker, start_gateway, publisher, tmp_path):
    one = LedgerServer(tmp_path / "one.db", port=0).start()
    two = LedgerServer(tmp_path / "two.db", port=0).start()
    try:
        ms = [Meter(f"70b3d57ed002{i:04x}") for i in range(3)]
        for m in ms:
            m.enroll(one.url)
            m.enroll(two.url)
        gw = start_gateway(None, ledgers=[(one.url, None), (two.url, None)])
        wait_for(lambda: gw.stats()["devices"] == 3, "device keys", gw=gw)
        two.stop()
        for seq in range(1, 11):
            for m in ms:
                publisher.publish(m.topic, m.uplink(seq))
        wait_for(lambda: gw.stats()["ledgers"][0]["forwarded"] == 30, "node one", gw=gw)
        stats = gw.stats()
        # Held until every node has it.
        assert stats["outbox_depth"] == 30 and stats["ledgers"][1]["failing"]
        two.start()
        assert gw.wait_idle(30)
        for node in (one, two):
            assert_exactly_once(node.url, {m.dev_eui: list(range(1, 11)) for m in ms})
        assert [lg["forwarded"] for lg in gw.stats()["ledgers"]] == [30, 30]
    finally:
        one.stop()
        two.stop()


def test_kill_9_during_batches_loses_and_repeats_nothing(broker, ledger, mqtt_tap, tmp_path):
    """The daemon killed three times while a stream is being stored, and
    started again each time as systemd's Restart=always would; its last will
    says it went away, its retained status that it is back."""
    ms = fleet(ledger.url, 6)
    state = tmp_path / "state"
    status_port = runtime.free_port()
    stats, subscribed = status_client(status_port)
    status_tap = mqtt_tap("meter-gateway/+/status")
    events = [(m.topic, m.uplink(seq)) for seq in range(1, 101) for m in ms]
    proc = daemon(broker.port, ledger.url, state, status_port)
    stream = None
    try:
        wait_for(subscribed, "the daemon to subscribe")
        stream = Stream(broker.port, events, rate=300.0).start()
        for _ in range(3):
            time.sleep(0.4 + random.random() * 0.3)
            proc.kill()  # mid-batch: no chance to finish or to say goodbye
            proc.wait(10)
            wait_for(lambda: json.loads(status_tap.messages[-1][1])["state"] == "offline",
                     "the last will")
            proc = daemon(broker.port, ledger.url, state, status_port)
            wait_for(subscribed, "the daemon to subscribe again")
        stream.finish()
        wait_for(lambda: ledger_count(ledger.url)["readings"] == len(events),
                 "every reading in the ledger", timeout=60)
        wait_for(lambda: stats()["outbox_depth"] == 0, "the outbox to drain")
        assert json.loads(status_tap.messages[-1][1])["state"] == "online"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert json.loads(status_tap.messages[-1][1])["state"] == "offline"  # said on a clean stop
    assert_exactly_once(ledger.url, {m.dev_eui: list(range(1, 101)) for m in ms})
