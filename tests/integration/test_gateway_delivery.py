"""Delivery guarantees of the gateway (docs/protocol.md, "Delivery: nothing lost"),
against a real Mosquitto and a real ledger node: fragments joined in any order
and across a killed gateway, gaps in the sequence numbers answered with
authenticated, rate-limited `resend` commands on ChirpStack's command/down
topic, and commands through `Gateway.send_command`.

The gateway's settle times are set to fractions of a second here; the logic is
the same as with the hours it uses in the field.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time

import uuid

import pytest
from chirpstack_api import integration
from google.protobuf import json_format
# Helpers and fixtures shared with the other gateway tests (tests/integration
# is on sys.path, as pytest puts a test folder without __init__.py there).
from test_gateway_mqtt import (APP, Meter, daemon, http_json, ledger, ledger_seqs,  # noqa: F401
                               meters, publisher, start_gateway, status_client, wait_for,
                               write_command_keys)

from gateway.commands import CommandError
from meter import frame
from tools import runtime

COMMANDS = "application/+/device/+/command/down"


class Downlinks:
    """The command/down messages the gateway publishes, with arrival times."""

    def __init__(self, tap):
        self.tap = tap

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[float, str, dict]]:
        deadline = time.monotonic() + timeout
        seen: list[tuple[float, str, dict]] = []
        while True:
            msgs = list(self.tap.messages)
            now = time.monotonic()
            for topic, payload in msgs[len(seen):]:
                seen.append((now, topic, json.loads(payload)))
            if len(seen) >= n or now > deadline:
                return seen
            time.sleep(0.01)

    def count(self) -> int:
        return len(self.tap.messages)


@pytest.fixture
def downlinks(mqtt_tap):
    return Downlinks(mqtt_tap(COMMANDS))


def command_of(meter: Meter, doc: dict) -> frame.Command:
    assert (doc["devEui"], doc["fPort"], doc["confirmed"]) == (meter.dev_eui, 2, True)
    return frame.decode_command(meter.command_key, bytes.fromhex(meter.dev_eui),
                                base64.b64decode(doc["data"]))


def test_fragments_out_of_order_complete_the_bundle(ledger, meters, publisher, start_gateway):
    a = meters[0]
    gw = start_gateway(ledger.url)
    pieces = a.fragments(1, 9)  # 131 bytes: three pieces at 51 bytes
    assert len(pieces) == 3
    raw = frame.fragment(a.sign(1, 9), 51)
    # A different piece for an index already held: counted, and the held one kept.
    forged = bytearray(raw[0])
    forged[-1] ^= 0xFF
    for payload in (pieces[2], pieces[0], a.event(bytes(forged)),
                    a.event(raw[2]),  # the same piece relayed again: fine
                    pieces[2],  # the same message delivered again: dropped
                    pieces[1]):
        publisher.publish(a.topic, payload)
    wait_for(lambda: gw.stats()["received"] == 6, "6 uplinks", gw=gw)
    assert gw.wait_idle(20)
    stats = gw.stats()
    assert stats["rejected"] == {"fragment_conflict": 1} and stats["duplicates"] == 1
    assert stats["fragments"] == {"received": 3, "repeated": 1, "joined": 1,
                                  "incomplete_sets": 0}
    assert (stats["bundles"], stats["verified"]) == (1, 9)
    rows = http_json("GET", f"{ledger.url}/v1/readings?dev_eui={a.dev_eui}")["readings"]
    assert [r["seq"] for r in rows] == list(range(1, 10))
    assert {bytes.fromhex(r["bundle"]) for r in rows} == {a.sign(1, 9)}


def test_bundle_arriving_whole_clears_its_pieces_from_an_earlier_try(
        ledger, meters, publisher, start_gateway):
    a = meters[0]
    gw = start_gateway(ledger.url, fragment_ttl_s=0.5)
    publisher.publish(a.topic, a.fragments(1, 9)[0])
    wait_for(lambda: gw.stats()["fragments"]["incomplete_sets"] == 1, "the piece", gw=gw)
    publisher.publish(a.topic, a.uplink(1, 9))  # sent again whole, at a faster data rate
    wait_for(lambda: gw.stats()["bundles"] == 1, "the bundle", gw=gw)
    assert gw.stats()["fragments"]["incomplete_sets"] == 0
    time.sleep(1.0)  # past the TTL: nothing left to expire
    assert gw.stats()["rejected"] == {}


def test_missing_bundle_gets_a_rate_limited_resend_command(ledger, meters, publisher,
                                                           start_gateway, downlinks, tmp_path):
    a = meters[0]
    keys = write_command_keys(tmp_path / "keys.json", meters)
    gw = start_gateway(ledger.url, command_keys=keys, resend_after_s=0.5,
                       resend_min_interval_s=1.0, resend_max_per_day=2)
    publisher.publish(a.topic, a.uplink(1, 3))
    wait_for(lambda: gw.stats()["bundles"] == 1, "the first bundle", gw=gw)
    opened = time.monotonic()
    publisher.publish(a.topic, a.uplink(7, 3))  # 4..6 never arrive
    wait_for(lambda: gw.stats()["gaps"]["missing"] == 3, "the gap", gw=gw)

    got = downlinks.wait(2, timeout=10)
    assert len(got) == 2, gw.stats()
    (t1, topic1, doc1), (t2, _, doc2) = got
    assert topic1 == f"application/{APP}/device/{a.dev_eui}/command/down"
    assert t1 - opened >= 0.5  # not before the gap has settled
    # resend_min_interval_s apart, less what delivery jitter can take off;
    # without the limit the next chore (1/8 s later) would have sent it.
    assert t2 - t1 >= 0.75
    c1, c2 = command_of(a, doc1), command_of(a, doc2)
    for c in (c1, c2):
        assert (c.opcode, tuple(c.args), c.expires) == (frame.OP_RESEND, (4, 3), 0)
    assert int(time.time()) - 60 <= c1.counter < c2.counter
    # Tagged for this meter: another key (or another device's EUI) does not verify.
    with pytest.raises(frame.FrameError) as exc:
        frame.decode_command(meters[1].command_key, bytes.fromhex(a.dev_eui),
                             base64.b64decode(doc1["data"]))
    assert exc.value.reason == "auth"

    # resend_max_per_day=2: no third request however long the gap stays.
    time.sleep(2.0)
    assert downlinks.count() == 2
    stats = gw.stats()
    assert stats["commands"]["by_op"] == {"resend": 2}
    assert stats["commands"]["resend_requests"] == 2

    # The meter answers: the gap closes, the ledger has everything.
    publisher.publish(a.topic, a.uplink(4, 3))
    wait_for(lambda: gw.stats()["gaps"]["missing"] == 0, "the gap to close", gw=gw)
    assert gw.wait_idle(20)
    assert ledger_seqs(ledger.url, a.dev_eui) == list(range(1, 10))


def test_lost_first_bundle_is_asked_for_unless_the_ledger_holds_it(
        ledger, meters, publisher, start_gateway, downlinks, tmp_path):
    a, b = meters
    # The ledger already holds b's readings 1..5 (delivered through another gateway).
    http_json("POST", ledger.url + "/v1/bundles", {"bundles": [
        {"dev_eui": b.dev_eui, "bundle": b.sign(1, 5).hex()}]})
    keys = write_command_keys(tmp_path / "keys.json", meters)
    gw = start_gateway(ledger.url, command_keys=keys, resend_after_s=0.3,
                       resend_min_interval_s=30.0)
    publisher.publish(a.topic, a.uplink(4, 3))  # a's first bundle, 1..3, was lost
    publisher.publish(b.topic, b.uplink(8))  # 6..7 lost; 1..5 are in the ledger
    wait_for(lambda: gw.stats()["bundles"] == 2, "2 bundles", gw=gw)
    assert gw.stats()["gaps"] == {"devices": 2, "missing": 5, "given_up": 0}
    got = downlinks.wait(2)
    asked = {doc["devEui"]: tuple(command_of(m, doc).args)
             for _, _, doc in got for m in meters if m.dev_eui == doc["devEui"]}
    assert asked == {a.dev_eui: (1, 3), b.dev_eui: (6, 2)}

    publisher.publish(a.topic, a.uplink(1, 3))
    publisher.publish(b.topic, b.uplink(6, 2))
    wait_for(lambda: gw.stats()["gaps"]["missing"] == 0, "both gaps to close", gw=gw)
    assert gw.wait_idle(20)
    assert ledger_seqs(ledger.url, a.dev_eui) == list(range(1, 7))
    assert ledger_seqs(ledger.url, b.dev_eui) == list(range(1, 9))


def test_lost_fragment_expires_as_incomplete_and_the_resend_completes(
        ledger, meters, publisher, start_gateway, downlinks, tmp_path):
    a = meters[0]
    keys = write_command_keys(tmp_path / "keys.json", meters)
    gw = start_gateway(ledger.url, command_keys=keys, fragment_ttl_s=1.0, resend_after_s=0.5,
                       resend_min_interval_s=30.0)
    pieces = a.fragments(2, 9)
    publisher.publish(a.topic, a.uplink(1))
    for payload in (pieces[0], pieces[2]):  # piece 1 is lost
        publisher.publish(a.topic, payload)
    publisher.publish(a.topic, a.uplink(11))
    wait_for(lambda: gw.stats()["received"] == 4, "4 uplinks", gw=gw)
    stats = gw.stats()
    assert stats["bundles"] == 2 and stats["fragments"]["incomplete_sets"] == 1

    wait_for(lambda: gw.stats()["rejected"].get("incomplete") == 1,
             "the incomplete set to expire", gw=gw)
    assert gw.stats()["fragments"]["incomplete_sets"] == 0
    (_, _, doc), = downlinks.wait(1)
    c = command_of(a, doc)
    assert (c.opcode, tuple(c.args)) == (frame.OP_RESEND, (2, 9))

    # The meter resends the stored bundle: the same pieces, all of them this time.
    for payload in a.fragments(2, 9):
        publisher.publish(a.topic, payload)
    wait_for(lambda: gw.stats()["bundles"] == 3, "the resent bundle", gw=gw)
    assert gw.wait_idle(20)
    assert gw.stats()["gaps"]["missing"] == 0
    assert ledger_seqs(ledger.url, a.dev_eui) == list(range(1, 12))


def test_commands_need_a_key_and_an_application(ledger, meters, publisher, start_gateway,
                                                downlinks, tmp_path):
    a, b = meters
    keys = write_command_keys(tmp_path / "keys.json", [a])  # none for b
    gw = start_gateway(ledger.url, command_keys=keys, resend_after_s=0.3,
                       resend_min_interval_s=30.0)
    with pytest.raises(CommandError) as exc:
        gw.send_command(a.dev_eui, frame.OP_RELAY, frame.RELAY_OFF, 60)
    assert exc.value.reason == "no_application"  # nothing heard from it yet

    for m in (a, b):
        publisher.publish(m.topic, m.uplink(1))
        publisher.publish(m.topic, m.uplink(5))  # 2..4 missing
    wait_for(lambda: gw.stats()["bundles"] == 4, "4 bundles", gw=gw)
    (_, topic, doc), = downlinks.wait(1)
    assert a.dev_eui in topic and tuple(command_of(a, doc).args) == (2, 3)
    wait_for(lambda: gw.stats()["commands"]["failed"].get("no_key") == 1,
             "the request b cannot get", gw=gw)

    expires = int(time.time()) + 600
    counter = gw.send_command(a.dev_eui.upper(), frame.OP_RELAY, frame.RELAY_OFF, 60,
                              expires=expires)
    (_, _, first), (_, _, relay) = downlinks.wait(2)
    c = command_of(a, relay)
    assert (c.name, tuple(c.args), c.expires, c.counter) == ("relay", (frame.RELAY_OFF, 60),
                                                             expires, counter)
    assert counter > command_of(a, first).counter
    for args, reason in [((b.dev_eui, frame.OP_RELAY, frame.RELAY_ON, 0), "no_key"),
                         ((a.dev_eui, frame.OP_INTERVAL, 70_000), "field"),
                         ((a.dev_eui, 99), "field")]:
        with pytest.raises(CommandError) as exc:
            gw.send_command(*args)
        assert exc.value.reason == reason
    time.sleep(0.5)
    assert downlinks.count() == 2
    stats = gw.stats()["commands"]
    assert stats["by_op"] == {"resend": 1, "relay": 1} and stats["sent"] == 2
    assert stats["failed"] == {"no_application": 1, "no_key": 2, "field": 2}


def ack_event(meter: Meter, item_id: str, acknowledged: bool, txack: bool = False) -> bytes:
    """ChirpStack's `ack` event (the meter's acknowledgement, or its absence,
    after a confirmed downlink) or `txack` (the gateway transmitted it), as
    its JSON marshaler publishes them."""
    if txack:
        ev = integration.TxAckEvent(queue_item_id=item_id, f_cnt_down=3, downlink_id=77,
                                    gateway_id="0016c001f1500001")
    else:
        ev = integration.AckEvent(deduplication_id=str(uuid.uuid4()), queue_item_id=item_id,
                                  acknowledged=acknowledged, f_cnt_down=3)
    ev.device_info.dev_eui = meter.dev_eui
    ev.device_info.application_id = APP
    return json_format.MessageToJson(ev).encode()


def test_commands_are_confirmed_by_ack_events_and_retried(ledger, meters, publisher,
                                                          start_gateway, downlinks, tmp_path):
    a, b = meters
    keys = write_command_keys(tmp_path / "keys.json", meters)
    gw = start_gateway(ledger.url, command_keys=keys, resend_max_per_day=0,
                       downlink_ack_timeout_s=0.6, downlink_max_attempts=3)
    for m in meters:
        publisher.publish(m.topic, m.uplink(1))
    wait_for(lambda: gw.stats()["bundles"] == 2, "2 bundles", gw=gw)
    ack_topic = f"application/{APP}/device/{{}}/event/{{}}"

    # Acknowledged by the meter: settled, never sent again. The txack that
    # comes first (the radio gateway sent it) is not a confirmation.
    gw.send_command(a.dev_eui, frame.OP_RELAY, frame.RELAY_OFF, 60)
    (_, _, doc), = downlinks.wait(1)
    publisher.publish(ack_topic.format(a.dev_eui, "txack"), ack_event(a, doc["id"], True, True))
    time.sleep(0.3)
    assert gw.stats()["downlinks"]["pending"] == 1
    publisher.publish(ack_topic.format(a.dev_eui, "ack"), ack_event(a, doc["id"], True))
    wait_for(lambda: gw.stats()["downlinks"]["acked"] == 1, "the acknowledgement", gw=gw)
    assert gw.stats()["downlinks"]["pending"] == 0

    # Not acknowledged (acknowledged: false): queued again at once with a new
    # queue item id and the same bytes (same counter: a meter that did get it
    # refuses the repeat), then acknowledged.
    counter = gw.send_command(b.dev_eui, frame.OP_INTERVAL, 900)
    (_, _, first), = downlinks.wait(2)[1:]
    publisher.publish(ack_topic.format(b.dev_eui, "ack"), ack_event(b, first["id"], False))
    (_, _, again), = downlinks.wait(3)[2:]
    assert again["id"] != first["id"] and again["data"] == first["data"]
    assert command_of(b, again).counter == counter
    publisher.publish(ack_topic.format(b.dev_eui, "ack"), ack_event(b, again["id"], True))
    wait_for(lambda: gw.stats()["downlinks"]["acked"] == 2, "the second acknowledgement", gw=gw)
    # A stale event for the first attempt changes nothing.
    publisher.publish(ack_topic.format(b.dev_eui, "ack"), ack_event(b, first["id"], True))

    # Never acknowledged: retried after the timeout, given up after 3 attempts.
    gw.send_command(a.dev_eui, frame.OP_RELAY, frame.RELAY_ON, 0)
    got = downlinks.wait(6, timeout=15)
    tries = [d for _, t, d in got[3:]]
    assert len(tries) == 3 and len({d["id"] for d in tries}) == 3
    assert len({d["data"] for d in tries}) == 1
    wait_for(lambda: gw.stats()["downlinks"]["failed"] == 1, "the command given up", gw=gw)
    # An expiry cuts the retries short.
    gw.send_command(a.dev_eui, frame.OP_RELAY, frame.RELAY_OFF, 30, expires=int(time.time()) + 1)
    wait_for(lambda: gw.stats()["downlinks"]["expired"] == 1, "the command to expire", gw=gw)
    stats = gw.stats()["downlinks"]
    assert (stats["acked"], stats["failed"], stats["expired"], stats["pending"]) == (2, 1, 1, 0)
    assert stats["retried"] >= 3  # one after the nack, two after timeouts, maybe one more
    states = [c["state"] for c in gw._outbox.commands()]
    assert states == ["acked", "acked", "failed", "expired"]
    time.sleep(1.5)
    assert downlinks.count() <= 8  # nothing more for settled commands
    assert gw.stats()["rejected"] == {}


def test_fragments_survive_a_killed_gateway(broker, ledger, meters, publisher, tmp_path):
    a = meters[0]
    state = tmp_path / "state"
    keys = write_command_keys(tmp_path / "keys.json", meters)
    status_port = runtime.free_port()
    stats, subscribed = status_client(status_port)
    options = {"downlink": {"command_keys": keys},
               "resend": {"fragment_ttl_s": 3600, "after_s": 3600, "min_interval_s": 600,
                          "max_per_day": 3}}
    pieces = a.fragments(1, 9)

    proc = daemon(broker.port, ledger.url, state, status_port, **options)
    try:
        wait_for(subscribed, "the daemon to subscribe")
        for payload in (pieces[2], pieces[0]):
            publisher.publish(a.topic, payload)
        wait_for(lambda: stats()["fragments"]["received"] == 2, "2 pieces kept")
        assert stats()["commands"]["keys"] == 2
    finally:
        proc.kill()  # no clean shutdown
        proc.wait(10)

    proc = daemon(broker.port, ledger.url, state, status_port, **options)
    try:
        wait_for(subscribed, "the daemon to subscribe again")
        assert stats()["fragments"]["incomplete_sets"] == 1
        publisher.publish(a.topic, pieces[1])
        wait_for(lambda: ledger_seqs(ledger.url, a.dev_eui) == list(range(1, 10)),
                 "the bundle joined across the restart")
        after = stats()
        assert after["fragments"]["joined"] == 1 and after["rejected"] == {}
        assert after["fragments"]["incomplete_sets"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
