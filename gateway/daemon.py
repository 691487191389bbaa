"""The gateway daemon: ChirpStack uplink events in, verified bundles out to the
ledger, `resend` commands out to meters whose readings have a gap.

Threads and what each owns:
  MQTT loop (paho)  connection, reconnects; hands each message to the worker
                    without acknowledging it.
  worker            parse -> fragments joined -> verify -> outbox, then
                    acknowledges the message, so an uplink is on disk before
                    the broker forgets it. Also the periodic chores: device
                    keys, stale fragment sets, resend requests, command keys.
  forwarder         outbox -> ledger (gateway.forwarder).
  status (optional) GET /health and /stats on loopback (gateway.status).

The MQTT session is persistent (fixed client id, clean_session False, QoS 1):
uplinks published while the gateway is down wait in the broker, and one that
was being processed when the gateway stopped is delivered again.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from gateway import chirpstack
from gateway.chirpstack import Rejected, Uplink
from gateway.commands import CommandError, CommandKeys
from gateway.forwarder import MAX_BATCH, Forwarder
from gateway.ledger_client import LedgerClient
from gateway.outbox import FragmentSet, Outbox
from gateway.registry import Registry
from gateway.seqs import SeqRanges, plan_resend
from gateway.status import StatusServer
from gateway.verify import Verifier
from meter import frame

log = logging.getLogger(__name__)
mqtt_log = logging.getLogger("gateway.mqtt")

OUTBOX_FILE = "outbox.sqlite"
DEVICES_FILE = "devices.json"
LOCK_FILE = "gateway.lock"

# A burst of rejections from one device (a broken meter, a replay) is logged
# once per this many seconds, with a count of what was left out.
_REJECT_LOG_INTERVAL = 60.0

DAY_S = 86400.0
# Incomplete fragment sets kept per device; a meter (or whoever publishes as
# one) cannot fill the disk with pieces that never form a bundle.
MAX_FRAGMENT_SETS = 32
# Requests for one gap before the gateway stops asking: a meter that has
# dropped the bundle from its outbox will never answer, and every request
# costs one of the few downlinks a day.
RESEND_ATTEMPTS = 6
# The command log is kept this long (rate limits look back one day).
COMMAND_LOG_S = 7 * DAY_S

_STOPPED = object()


class Gateway:
    def __init__(self, mqtt_host: str, mqtt_port: int, ledger_url: str,
                 state_dir: str | os.PathLike, application_id: str = "+",
                 ledger_token: str | None = None, status_port: int | None = None, *,
                 name: str | None = None, client_id: str | None = None,
                 batch_size: int = MAX_BATCH, refresh_interval: float = 300.0,
                 unknown_refresh_gap: float = 10.0, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, ledger_timeout: float = 10.0,
                 keepalive: int = 30, command_keys: str | os.PathLike | None = None,
                 fragment_ttl_s: float = 2 * DAY_S, resend_after_s: float = 2 * 3600.0,
                 resend_max_per_day: int = 4, resend_min_interval_s: float = 3600.0,
                 resend_attempts: int = RESEND_ATTEMPTS,
                 max_fragment_sets: int = MAX_FRAGMENT_SETS):
        if application_id != "+" and not _valid_application_id(application_id):
            raise ValueError(f"application_id must be '+' or an id without / + #, "
                             f"got {application_id!r}")
        for label, value in (("fragment_ttl_s", fragment_ttl_s),
                             ("resend_after_s", resend_after_s),
                             ("resend_min_interval_s", resend_min_interval_s)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if not isinstance(resend_max_per_day, int) or resend_max_per_day < 0:
            raise ValueError(f"resend_max_per_day must be a whole number >= 0 (0: never ask), "
                             f"got {resend_max_per_day!r}")
        if not isinstance(resend_attempts, int) or resend_attempts < 1:
            raise ValueError(f"resend_attempts must be >= 1, got {resend_attempts!r}")
        self.name = name or socket.gethostname()
        if not 0 < len(self.name) <= 200 or not self.name.isprintable():
            raise ValueError(f"gateway name must be 1..200 printable characters, got {self.name!r}")
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.topic = chirpstack.uplink_topic(application_id)
        self.state_dir = Path(state_dir)
        self.status_port = status_port
        self._client_id = client_id or f"meter-gateway-{self.name}"
        self._keepalive = keepalive
        self._batch_size = batch_size
        self._backoff = (backoff_base, backoff_cap)
        self._ledger = LedgerClient(ledger_url, ledger_token, timeout=ledger_timeout)
        self._registry = Registry(self._ledger, self.state_dir / DEVICES_FILE,
                                  refresh_interval=refresh_interval,
                                  unknown_gap=unknown_refresh_gap)
        self._verifier = Verifier(self._registry.key_for)
        # Read now: a bad keys file stops the start with a message naming it.
        self._command_keys = CommandKeys(command_keys)
        self._fragment_ttl = float(fragment_ttl_s)
        self._resend_after = float(resend_after_s)
        self._resend_per_day = resend_max_per_day
        self._resend_gap = float(resend_min_interval_s)
        self._resend_attempts = resend_attempts
        self._max_fragment_sets = max_fragment_sets
        # Chores run at a quarter of the shortest of these periods, so a
        # deadline is missed by at most that much (tests use seconds).
        self._chore_every = max(0.05, min(30.0, self._fragment_ttl / 4, self._resend_after / 4,
                                          self._resend_gap / 4))
        self._next_chores = 0.0
        self._next_prune = 0.0
        # Per device, owned by the worker thread: the accepted seqs, and when
        # a resend that could not be sent (no key) may be tried again.
        self._ranges: dict[str, SeqRanges] = {}
        self._resend_blocked: dict[str, float] = {}
        self._apps: dict[str, str] = {}  # dev_eui -> ChirpStack application id
        self._command_lock = threading.Lock()
        self._outbox: Outbox | None = None
        self._forwarder: Forwarder | None = None
        self._status: StatusServer | None = None
        self._mqtt: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._lock_fd: int | None = None
        self._inbox: queue.Queue[tuple[mqtt.MQTTMessage, float]] = queue.Queue(maxsize=1000)
        self._stopping = threading.Event()
        self._counts_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._commands: Counter[str] = Counter()  # sent, by opcode name
        self._command_failures: Counter[str] = Counter()  # not sent, by reason
        self._other_ports: Counter[int] = Counter()  # uplinks not on fPort 1
        self._unsettled = 0  # messages handed over by MQTT and not yet settled
        self._connected = False
        self._connect_failures = 0
        self._subscribed = threading.Event()
        self._reject_log: dict[tuple, list] = {}
        self._started_at: float | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> "Gateway":
        """Open the state, start the threads and connect (in the background:
        the gateway starts whether or not the broker and the ledger are up).
        A Gateway runs once; make a new one to start again."""
        if self._started_at is not None or self._stopping.is_set():
            raise RuntimeError("this Gateway was already started")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock_state_dir()
        try:
            self._start_parts()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_parts(self) -> None:
        self._outbox = Outbox(self.state_dir / OUTBOX_FILE)
        self._ranges = self._outbox.load_ranges()
        self._apps = self._outbox.applications()
        n = self._registry.load_cache()
        log.info("gateway %s: %d device keys from cache, %d bundles pending, %d fragment sets "
                 "incomplete, %d command keys", self.name, n, self._outbox.depth(),
                 self._outbox.fragment_sets(), len(self._command_keys))
        self._forwarder = Forwarder(self._outbox, self._ledger, self.name,
                                    batch_size=self._batch_size,
                                    backoff_base=self._backoff[0], backoff_cap=self._backoff[1])
        self._forwarder.start()
        self._worker = threading.Thread(target=self._work, name="uplink-worker", daemon=True)
        self._worker.start()
        if self.status_port is not None:
            self._status = StatusServer(self.status_port, self.stats, self._health)
            self.status_port = self._status.port
            self._status.start()
        self._mqtt = self._make_client()
        self._mqtt.connect_async(self.mqtt_host, self.mqtt_port, keepalive=self._keepalive)
        self._mqtt.loop_start()
        self._started_at = time.time()

    def stop(self) -> None:
        """Stop taking uplinks, finish the one in hand, close the state.
        Messages received but not yet stored stay unacknowledged in the
        broker's session and come again on the next start."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(30)
        if self._mqtt is not None:
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
        if self._forwarder is not None:
            self._forwarder.stop()
        if self._status is not None:
            self._status.stop()
        if self._outbox is not None:
            self._outbox.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        log.info("gateway %s stopped", self.name)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, timeout: float) -> bool:
        """True once the uplink subscription is in place (again, after a
        reconnect)."""
        return self._subscribed.wait(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True when every uplink handed over by the broker has been settled
        and every verified bundle has been answered for by the ledger."""
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set():
            with self._counts_lock:
                unsettled = self._unsettled
            if unsettled == 0 and self._outbox is not None and self._outbox.depth() == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return False

    # -- reporting ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
            rejected = dict(self._rejected)
            commands = dict(self._commands)
            failures = dict(self._command_failures)
            other_ports = {str(p): n for p, n in sorted(self._other_ports.items())}
        fw = self._forwarder
        ranges = list(self._ranges.values())
        return {
            "name": self.name,
            "received": counts.get("received", 0),
            "bundles": counts.get("bundles", 0),
            "verified": counts.get("verified", 0),
            "fragments": {
                "received": counts.get("fragments", 0),
                "repeated": counts.get("fragments_repeated", 0),
                "joined": counts.get("fragments_joined", 0),
                "incomplete_sets": self._fragment_sets(),
            },
            "rejected": rejected,
            "rejected_total": sum(rejected.values()),
            "other_ports": other_ports,
            "gaps": {
                "devices": sum(1 for r in ranges if len(r.ranges) > 1),
                "missing": sum(r.missing() for r in ranges),
                "given_up": counts.get("gaps_given_up", 0),
            },
            "commands": {
                "sent": sum(commands.values()),
                "by_op": commands,
                "failed": failures,
                "resend_requests": counts.get("resend_requests", 0),
                "keys": len(self._command_keys),
            },
            "storage_errors": counts.get("storage_errors", 0),
            "forwarded": fw.forwarded if fw else 0,
            "ledger": {
                "stored": fw.stored if fw else 0,
                "duplicate": fw.duplicate if fw else 0,
                "rejected": fw.rejected if fw else 0,
                "errors": fw.errors if fw else 0,
                "failing": bool(fw and fw.failures),
                "last_error": fw.last_error if fw else None,
                "last_success_at": fw.last_success_at if fw else None,
            },
            "outbox_depth": self._outbox_depth(),
            "devices": len(self._registry),
            "mqtt_connected": self._connected,
            "uptime_s": round(time.time() - self._started_at, 3) if self._started_at else 0.0,
        }

    def _outbox_depth(self) -> int | None:
        if self._outbox is None or self._stopping.is_set():
            return None
        return self._outbox.depth()

    def _fragment_sets(self) -> int | None:
        if self._outbox is None or self._stopping.is_set():
            return None
        return self._outbox.fragment_sets()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        running = bool(self._worker and self._worker.is_alive()
                       and self._forwarder and self._forwarder.alive())
        degraded = not self._connected or bool(self._forwarder and self._forwarder.failures)
        status = "down" if not running else "degraded" if degraded else "ok"
        return running, {"status": status, "mqtt_connected": self._connected,
                         "subscribed": self._subscribed.is_set(),
                         "ledger_reachable": not (self._forwarder and self._forwarder.failures),
                         "outbox_depth": self._outbox_depth(),
                         "devices": len(self._registry),
                         "command_keys": len(self._command_keys)}

    # -- MQTT --------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        # A bug in a callback must not end the network loop (and with it every
        # reconnect); paho logs it through on_log instead.
        client.suppress_exceptions = True
        client.on_log = self._on_log
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("MQTT broker %s:%d refused the connection: %s",
                      self.mqtt_host, self.mqtt_port, reason_code)
            return
        self._connected = True
        self._connect_failures = 0
        log.info("connected to MQTT %s:%d as %s (session present: %s)", self.mqtt_host,
                 self.mqtt_port, self._client_id, flags.session_present)
        client.subscribe(self.topic, qos=1)

    def _on_connect_fail(self, client, userdata) -> None:
        level = logging.DEBUG if self._connect_failures else logging.WARNING
        self._connect_failures += 1
        log.log(level, "MQTT broker %s:%d unreachable; retrying", self.mqtt_host, self.mqtt_port)

    def _on_log(self, client, userdata, level, buf) -> None:
        std = mqtt.LOGGING_LEVEL.get(level, logging.DEBUG)
        # paho reports every loop pass without a socket (each reconnect
        # attempt, and the last pass after a deliberate disconnect) as an
        # error; the connection callbacks above already tell that story once.
        if buf.startswith("Client is not connected"):
            std = logging.DEBUG
        mqtt_log.log(std, "%s", buf)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("subscription to %s refused: %s", self.topic, reason_codes)
            return
        log.info("subscribed to %s", self.topic)
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False
        self._subscribed.clear()
        if not self._stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        received_at = time.time()
        with self._counts_lock:
            self._unsettled += 1
        # Blocking here is the backpressure: the broker keeps what we cannot
        # take yet (it stops sending once its in-flight window is full).
        while not self._stopping.is_set():
            try:
                self._inbox.put((msg, received_at), timeout=1.0)
                return
            except queue.Full:
                continue

    # -- uplink processing (worker thread) ---------------------------------

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                self._registry.refresh_if_stale()
            except Exception:
                log.exception("device key refresh failed")
            if time.monotonic() >= self._next_chores:
                self._next_chores = time.monotonic() + self._chore_every
                try:
                    self._chores(time.time())
                except sqlite3.Error as exc:
                    self._count("storage_errors")
                    log.error("periodic chores failed, retrying later: %s", exc)
                except Exception:
                    log.exception("periodic chores failed")
            try:
                msg, received_at = self._inbox.get(timeout=min(0.5, self._chore_every))
            except queue.Empty:
                continue
            try:
                self._handle(msg, received_at)
            except Exception:  # keep serving the next uplink whatever happened
                log.exception("uplink on %r could not be processed", msg.topic)
                self._count_rejected("internal_error")
                self._ack(msg)
            finally:
                with self._counts_lock:
                    self._unsettled -= 1

    def _handle(self, msg: mqtt.MQTTMessage, received_at: float) -> None:
        self._count("received")
        try:
            up = chirpstack.parse_uplink(msg.topic, msg.payload)
            if up.f_port != frame.PORT_READING:
                # Not for this gateway: the modem's one-byte uplinks that carry
                # a MAC request, another application's port. Counted by port,
                # so a device sending readings on the wrong port shows up.
                with self._counts_lock:
                    self._other_ports[up.f_port] += 1
                log.debug("uplink from %s on fPort %d ignored", up.dev_eui, up.f_port)
                self._ack(msg)
                return
            item = self._verifier.check(up)
            self._require_key(up.dev_eui)
            if isinstance(item, frame.Fragment):
                done = self._take_fragment(up, item, received_at)
            else:
                done = self._take_bundle(up, item, received_at)
            if not done:
                return  # stopping before it could be stored: not acknowledged
        except Rejected as exc:
            self._count_rejected(exc.reason)
            self._log_rejection(exc)
        self._ack(msg)

    def _require_key(self, dev_eui: str) -> None:
        # A device enrolled since the last refresh is the common reason for an
        # unknown EUI; ask the ledger (rate-limited) before refusing. Checked
        # before a fragment is kept, so only enrolled devices can fill the
        # fragment store.
        if self._verifier.has_key(dev_eui):
            return
        if self._registry.refresh_for_unknown(dev_eui) and self._verifier.has_key(dev_eui):
            return
        raise Rejected("unknown_device", f"device {dev_eui} is not enrolled", dev_eui)

    def _take_fragment(self, up: Uplink, frag: frame.Fragment, received_at: float) -> bool:
        dev = up.dev_eui
        res = self._durably(lambda: self._outbox.add_fragment(
            dev, frag.tag, frag.count, frag.index, frag.piece, received_at,
            self._max_fragment_sets), f"fragment of {dev}")
        if res is _STOPPED:
            return False
        status, pieces, evicted = res
        for s in evicted:
            self._incomplete(s, "evicted: too many incomplete sets from this device")
        self._verifier.remember(up.deduplication_id)
        if status == "conflict":
            raise Rejected("fragment_conflict", f"piece {frag.index} of {frag.count} (tag "
                           f"{frag.tag}) differs from the piece already held; that one is kept",
                           dev)
        self._count("fragments" if status == "new" else "fragments_repeated")
        if len(pieces) < frag.count:
            return True
        # Complete (also when a repeat finds a set that a crash left complete
        # on disk but not yet turned into a bundle).
        try:
            data = frame.reassemble([frame.Fragment(frag.tag, i, frag.count, p)
                                     for i, p in sorted(pieces.items())])
            bundle = frame.decode_bundle(data)
        except frame.FrameError as exc:
            if self._durably(lambda: self._outbox.drop_fragments(dev, frag.tag, frag.count),
                             f"fragments of {dev}") is _STOPPED:
                return False
            raise Rejected(exc.reason, f"{frag.count} fragments of tag {frag.tag} joined: "
                           f"{exc.message}", dev) from None
        self._count("fragments_joined")
        return self._take_bundle(up, bundle, received_at, joined=(frag.tag, frag.count))

    def _take_bundle(self, up: Uplink, bundle: frame.Bundle, received_at: float,
                     joined: tuple[int, int] | None = None) -> bool:
        """Verify and queue a bundle; False when stopping before it was stored.
        `joined`: the fragment set (tag, count) it was joined from, removed
        with it, or when it is refused (a resend brings a fresh set)."""
        dev = up.dev_eui
        try:
            bundle = self._verifier.verify_bundle(dev, bundle)
        except Rejected:
            if joined is not None and self._durably(
                    lambda: self._outbox.drop_fragments(dev, *joined),
                    f"fragments of {dev}") is _STOPPED:
                return False
            raise
        first, last = bundle.first_seq, bundle.last_seq
        # Pieces of this bundle from an earlier try are of no use any more,
        # whether it came whole now or was joined.
        tag = first & 0xFFFF
        ranges = self._ranges.get(dev) or self._first_ranges(dev, first, received_at)
        if ranges.all_accepted(first, last):
            if self._durably(lambda: self._outbox.drop_fragments(dev, tag),
                             f"fragments of {dev}") is _STOPPED:
                return False
            self._verifier.remember(up.deduplication_id)
            raise Rejected("duplicate", f"readings {first}..{last} were all accepted before", dev)
        new = (last - first + 1) - ranges.accepted(first, last)
        updated = ranges.copy()
        updated.add(first, last, received_at)
        given_up = updated.trim()
        app = up.application_id if _valid_application_id(up.application_id) else None
        if app == self._apps.get(dev):
            app = None  # already stored
        queued = self._durably(lambda: self._outbox.store_bundle(
            dev, bundle.data(), first, last, received_at, updated, app, tag),
            f"bundle {dev} seq {first}..{last}")
        if queued is _STOPPED:
            return False
        self._ranges[dev] = updated
        if app:
            self._apps[dev] = app
        if given_up:
            self._count("gaps_given_up", given_up)
            log.warning("%s: more than %d separate runs of readings; the oldest gap is no "
                        "longer tracked", dev, len(updated.ranges))
        self._verifier.remember(up.deduplication_id)
        if not queued:
            raise Rejected("duplicate", f"a bundle of seq {first}..{last} is already queued "
                           "for the ledger", dev)
        self._count("bundles")
        self._count("verified", new)
        self._forwarder.wake()
        return True

    def _first_ranges(self, dev: str, first: int, now: float) -> SeqRanges:
        """The ranges of a device this gateway has no state for. A meter's
        seqs start at 1: what is missing below its first bundle here is a gap,
        except what the ledger already holds (it said so with the device
        keys), so a gateway that starts afresh beside an established fleet
        does not ask every meter for its history. Seq 0, never a reading,
        marks the start; when the ledger's answer is not known, nothing below
        the first bundle counts as missing."""
        ranges = SeqRanges()
        held = self._registry.latest_seq(dev)
        if held is not None and first > 0:
            ranges.add(0, min(held, first - 1), now)
        return ranges

    def _durably(self, op, what: str):
        """Run a state change, retrying while the disk refuses (full, read
        only): the uplink stays unacknowledged, so waiting loses nothing.
        _STOPPED when the gateway stops first."""
        delay = 0.5
        while True:
            try:
                return op()
            except sqlite3.Error as exc:
                self._count("storage_errors")
                log.error("cannot store %s, retrying in %.1fs: %s", what, delay, exc)
                if self._stopping.wait(delay):
                    return _STOPPED
                delay = min(delay * 2, 30.0)

    def _incomplete(self, s: FragmentSet, why: str) -> None:
        self._count_rejected("incomplete")
        self._log_rejection(Rejected(
            "incomplete", f"{s.pieces} of {s.count} fragments of tag {s.tag}, {why}; the "
            "readings are asked for again", s.dev_eui))

    # -- chores: stale fragments, resend requests (worker thread) -----------

    def _chores(self, now: float) -> None:
        self._command_keys.reload_if_changed()
        for s in self._outbox.expire_fragments(now - self._fragment_ttl):
            self._incomplete(s, f"still incomplete after {self._fragment_ttl:g} s")
        self._request_resends(now)
        if now >= self._next_prune:
            self._next_prune = now + 3600.0
            self._outbox.prune_commands(now - COMMAND_LOG_S)

    def _request_resends(self, now: float) -> None:
        """Ask each device with a gap old enough for the readings it lacks,
        within the downlink budget: at most resend_max_per_day a day and one
        per resend_min_interval_s. The gap closes when the bundles come."""
        if self._resend_per_day <= 0 or not self._connected:
            return
        for dev, ranges in list(self._ranges.items()):
            plan = plan_resend(ranges, now, self._resend_after, self._resend_attempts)
            if plan is None or now < self._resend_blocked.get(dev, 0.0):
                continue
            sent_today, last = self._outbox.commands_since(dev, frame.OP_RESEND, now - DAY_S)
            if sent_today >= self._resend_per_day:
                continue
            if last is not None and now - last < self._resend_gap:
                continue
            first, count = plan
            try:
                self.send_command(dev, frame.OP_RESEND, first, count)
            except CommandError as exc:
                # Counted and logged once per interval, not at every chore.
                self._resend_blocked[dev] = now + self._resend_gap
                log.warning("cannot ask %s to resend readings %d..%d: %s", dev, first,
                            first + count - 1, exc)
                continue
            asked = ranges.copy()
            asked.mark_asked(first, first + count - 1)
            self._outbox.save_ranges(dev, asked)
            self._ranges[dev] = asked
            self._count("resend_requests")
            log.info("asked %s to resend readings %d..%d", dev, first, first + count - 1)

    # -- downlink commands ---------------------------------------------------

    def send_command(self, dev_eui: str, opcode: int, *args, expires: int = 0) -> int:
        """Queue a command for one meter through ChirpStack (fPort 2, class A:
        it goes out after the meter's next uplink). Returns the command's
        counter. Raises CommandError: no_key (no command key for the device),
        no_application (no uplink has named its ChirpStack application yet),
        offline (no broker connection), field (bad arguments), publish."""
        dev = dev_eui.lower()
        try:
            return self._send_command(dev, opcode, args, expires)
        except CommandError as exc:
            with self._counts_lock:
                self._command_failures[exc.reason] += 1
            raise

    def _send_command(self, dev: str, opcode: int, args: tuple, expires: int) -> int:
        key = self._command_keys.get(dev)
        if key is None:
            raise CommandError("no_key", f"no command key for {dev}"
                               + ("" if self._command_keys.path else " (no --command-keys file)"))
        app = self._apps.get(dev)
        if app is None:
            raise CommandError("no_application", f"no uplink from {dev} has named its "
                               "ChirpStack application yet")
        client = self._mqtt
        if client is None or not self._connected:
            raise CommandError("offline", "not connected to the MQTT broker")
        eui = bytes.fromhex(dev)
        try:
            frame.encode_command(key, eui, 1, expires, opcode, *args)  # arguments only
        except frame.FrameError as exc:
            raise CommandError("field", f"{frame.OP_NAMES.get(opcode, opcode)}: {exc}") from None
        with self._command_lock:
            # Counter and publish in one order: the meter refuses a counter
            # not above the last it accepted.
            counter = self._outbox.next_command_counter(dev, int(time.time()))
            data = frame.encode_command(key, eui, counter, expires, opcode, *args)
            info = client.publish(chirpstack.command_topic(app, dev),
                                  chirpstack.command_message(dev, frame.PORT_COMMAND, data), qos=1)
            # NO_CONN: the connection dropped just now; paho sends a QoS 1
            # message queued like this one after it reconnects.
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                raise CommandError("publish", f"MQTT publish failed: {mqtt.error_string(info.rc)}")
            self._outbox.log_command(dev, counter, opcode, args, expires, time.time())
        with self._counts_lock:
            self._commands[frame.OP_NAMES.get(opcode, f"op{opcode}")] += 1
        log.info("command %s%s to %s (counter %d, application %s)",
                 frame.OP_NAMES.get(opcode, opcode), list(args), dev, counter, app)
        return counter

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self._mqtt.ack(msg.mid, msg.qos)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _count_rejected(self, reason: str) -> None:
        with self._counts_lock:
            self._rejected[reason] += 1

    def _log_rejection(self, exc: Rejected) -> None:
        key = (exc.reason, exc.dev_eui)
        now = time.monotonic()
        entry = self._reject_log.get(key)
        if entry is not None and now - entry[0] < _REJECT_LOG_INTERVAL:
            entry[1] += 1
            return
        suppressed = f" ({entry[1]} more since last logged)" if entry and entry[1] else ""
        log.warning("rejected uplink from %s: %s: %s%s", exc.dev_eui or "unknown device",
                    exc.reason, exc.message, suppressed)
        if len(self._reject_log) > 10000:  # EUIs come from outside: stay bounded
            self._reject_log.clear()
        self._reject_log[key] = [now, 0]

    def _lock_state_dir(self) -> None:
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"state directory {self.state_dir} is in use by another "
                               "gateway") from None
        self._lock_fd = fd


def _valid_application_id(value: str) -> bool:
    # Goes into MQTT topics: a wildcard or a level separator would address
    # other devices' queues.
    return bool(value) and len(value) <= 200 and not any(c in value for c in "/+#\0")
