"""The gateway daemon: ChirpStack events in, verified bundles out to the
ledger nodes, commands out to meters (resend requests for readings that went
missing, and whatever an operator or the demand-response engine sends).

Threads and what each owns:
  MQTT loop (paho)  connection, reconnects; hands each message to the worker
                    without acknowledging it.
  worker            takes the messages waiting, up to BATCH_MAX at a time:
                    parse and verify (no lock held), then one transaction for
                    the whole batch (fragments joined, bundles queued, refused
                    messages to the dead-letter store, downlink
                    acknowledgements), then acknowledges the messages, so an
                    uplink is on disk before the broker forgets it. Also the
                    periodic chores: device keys, stale fragment sets, resend
                    requests, downlink retries, pruning, the status topic.
  forwarder (one per ledger node)  outbox -> ledger (gateway.forwarder).
  status (optional) GET /health, /stats, /metrics (gateway.status).

The MQTT session is persistent (fixed client id, clean_session False, QoS 1):
uplinks published while the gateway is down wait in the broker, and one that
was being processed when the gateway stopped is delivered again.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt

from gateway import chirpstack
from gateway.chirpstack import Rejected, Uplink
from gateway.commands import CommandError, CommandKeys
from gateway.forwarder import MAX_BATCH, Forwarder
from gateway.ledger_client import LedgerClient
from gateway.outbox import Batch, FragmentSet, Outbox
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
# Settled commands are kept this long (rate limits look back one day).
COMMAND_LOG_S = 7 * DAY_S
# MQTT messages handled in one transaction. The broker's in-flight window
# (Mosquitto max_inflight_messages) bounds what is on hand at once.
BATCH_MAX = 512
# 7 days of 1,000 meters reporting every 15 minutes, one reading per bundle,
# is 672,000 bundles; the default leaves room above that.
QUEUE_CAPACITY = 1_000_000
# The status topic is refreshed this often (seconds) while connected.
STATUS_EVERY = 60.0
# The worker counts as hung when its loop has not come round for this long.
WORKER_STALL_S = 120.0


@dataclass
class _Examined:
    """One MQTT message after the lock-free first pass."""
    msg: mqtt.MQTTMessage
    received_at: float
    kind: str  # "up", "ack", "txack", "other_port", "rejected"
    up: Uplink | None = None
    item: Any = None  # frame.Bundle (signature checked) or frame.Fragment; Ack; TxAck
    rejected: Rejected | None = None


@dataclass
class _Stage:
    """What one batch changes in memory, applied only once its transaction
    has committed (a batch that is retried starts from a clean stage)."""
    ranges: dict[str, SeqRanges] = field(default_factory=dict)
    apps: dict[str, str] = field(default_factory=dict)
    dedup: set[str] = field(default_factory=set)
    counts: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    other_ports: Counter = field(default_factory=Counter)
    downlinks: Counter = field(default_factory=Counter)  # acked, nacked, transmitted
    logs: list = field(default_factory=list)  # Rejected, logged after commit


class Gateway:
    def __init__(self, mqtt_host: str, mqtt_port: int, ledger_url: str | None,
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
                 max_fragment_sets: int = MAX_FRAGMENT_SETS,
                 ledgers: list[tuple[str, str | None]] | None = None,
                 mqtt_username: str | None = None, mqtt_password: str | None = None,
                 mqtt_tls: dict | None = None, marshaler: str = "auto",
                 status_topic: str | None = None, status_host: str = "127.0.0.1",
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 30.0,
                 queue_capacity: int = QUEUE_CAPACITY,
                 queue_warn_pct: tuple[int, ...] = (50, 80, 95),
                 dead_letter_max: int = 100_000, dead_letter_days: float = 30.0,
                 downlink_via: str = "mqtt", grpc_url: str | None = None,
                 grpc_token: str | None = None, grpc_tls: bool = False,
                 grpc_ca_file: str | None = None,
                 downlink_confirmed: bool = True, downlink_ack_timeout_s: float = 900.0,
                 downlink_max_attempts: int = 3,
                 clock: Callable[[], float] = time.time):
        if application_id != "+" and not chirpstack.valid_application_id(application_id):
            raise ValueError(f"application_id must be '+' or an id without / + #, "
                             f"got {application_id!r}")
        for label, value in (("fragment_ttl_s", fragment_ttl_s),
                             ("resend_after_s", resend_after_s),
                             ("resend_min_interval_s", resend_min_interval_s),
                             ("downlink_ack_timeout_s", downlink_ack_timeout_s),
                             ("reconnect_min_s", reconnect_min_s),
                             ("reconnect_max_s", reconnect_max_s)):
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{label} must be a positive number of seconds, got {value!r}")
        if not isinstance(resend_max_per_day, int) or resend_max_per_day < 0:
            raise ValueError(f"resend_max_per_day must be a whole number >= 0 (0: never ask), "
                             f"got {resend_max_per_day!r}")
        for label, value in (("resend_attempts", resend_attempts),
                             ("downlink_max_attempts", downlink_max_attempts),
                             ("queue_capacity", queue_capacity),
                             ("dead_letter_max", dead_letter_max)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a whole number >= 1, got {value!r}")
        if marshaler not in ("auto", "json", "protobuf"):
            raise ValueError(f"marshaler must be auto, json or protobuf, got {marshaler!r}")
        if downlink_via not in ("mqtt", "grpc"):
            raise ValueError(f"downlink_via must be mqtt or grpc, got {downlink_via!r}")
        if downlink_via == "grpc" and not grpc_url:
            raise ValueError("downlinks through gRPC need grpc_url (host:port of ChirpStack's API)")
        self.name = name or socket.gethostname()
        if not 0 < len(self.name) <= 200 or not self.name.isprintable():
            raise ValueError(f"gateway name must be 1..200 printable characters, got {self.name!r}")
        if ledgers is None:
            if not ledger_url:
                raise ValueError("at least one ledger node URL is needed")
            ledgers = [(ledger_url, ledger_token)]
        if not ledgers or len({u for u, _ in ledgers}) != len(ledgers):
            raise ValueError("ledger nodes must be one or more distinct URLs")
        self._clock = clock
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.application_id = application_id
        self.topic = chirpstack.uplink_topic(application_id)
        self.topics = [self.topic] + [f"application/{application_id}/device/+/event/{e}"
                                      for e in ("ack", "txack")]
        self.state_dir = Path(state_dir)
        self.status_port = status_port
        self._status_host = status_host
        self.status_topic = status_topic or f"meter-gateway/{self.name}/status"
        self._client_id = client_id or f"meter-gateway-{self.name}"
        self._keepalive = keepalive
        self._mqtt_auth = (mqtt_username, mqtt_password)
        self._mqtt_tls = mqtt_tls
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._marshaler = marshaler
        self._batch_size = batch_size
        self._backoff = (backoff_base, backoff_cap)
        self._ledgers = [LedgerClient(url, token, timeout=ledger_timeout)
                         for url, token in ledgers]
        self._registry = Registry(self._ledgers, self.state_dir / DEVICES_FILE,
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
        self._queue_capacity = queue_capacity
        self._queue_warn = tuple(sorted(queue_warn_pct))
        self._queue_warned = 0  # the highest threshold warned about
        self._queue_full = False
        self._dead_letter_max = dead_letter_max
        self._dead_letter_s = float(dead_letter_days) * DAY_S
        self._downlink_via = downlink_via
        self._grpc_args = (grpc_url, grpc_token, grpc_tls, grpc_ca_file)
        self._grpc = None
        self._confirmed = downlink_confirmed
        self._ack_timeout = float(downlink_ack_timeout_s)
        self._max_attempts = downlink_max_attempts
        # Chores run at a quarter of the shortest of these periods, so a
        # deadline is missed by at most that much (tests use seconds).
        self._chore_every = max(0.05, min(30.0, self._fragment_ttl / 4, self._resend_after / 4,
                                          self._resend_gap / 4, self._ack_timeout / 4))
        self._next_chores = 0.0
        self._next_prune = 0.0
        self._next_status = 0.0
        # Per device, owned by the worker thread: the accepted seqs, and when
        # a resend that could not be sent (no key) may be tried again.
        self._ranges: dict[str, SeqRanges] = {}
        self._resend_blocked: dict[str, float] = {}
        self._apps: dict[str, str] = {}  # dev_eui -> ChirpStack application id
        self._command_lock = threading.Lock()
        self._outbox: Outbox | None = None
        self._forwarders: list[Forwarder] = []
        self._status: StatusServer | None = None
        self._mqtt: mqtt.Client | None = None
        self._worker: threading.Thread | None = None
        self._heartbeat = time.monotonic()
        self._storage_failing = False
        self._lock_fd: int | None = None
        self._inbox: queue.Queue[tuple[mqtt.MQTTMessage, float]] = queue.Queue(maxsize=4096)
        self._stopping = threading.Event()
        self._counts_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._commands: Counter[str] = Counter()  # sent, by opcode name
        self._command_failures: Counter[str] = Counter()  # not sent, by reason
        self._downlinks: Counter[str] = Counter()  # acked, nacked, retried, expired, failed
        self._other_ports: Counter[int] = Counter()  # uplinks not on fPort 1
        self._unsettled = 0  # messages handed over by MQTT and not yet settled
        self._connected = False
        self._connect_failures = 0
        self._subscribed = threading.Event()
        self._sub_pending: set[int] = set()
        self._reject_log: dict[tuple, list] = {}
        self._started_at: float | None = None
        self._dead_letters = 0

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
        bits = self._outbox.set_ledgers([c.url for c in self._ledgers])
        self._ranges = self._outbox.load_ranges()
        self._apps = self._outbox.applications()
        self._dead_letters = self._outbox.dead_letter_count()
        n = self._registry.load_cache()
        log.info("gateway %s: %d device keys from cache, %d bundles pending, %d fragment sets "
                 "incomplete, %d command keys, %d ledger nodes", self.name, n,
                 self._outbox.depth(), self._outbox.fragment_sets(), len(self._command_keys),
                 len(self._ledgers))
        if self._downlink_via == "grpc":
            from gateway.chirpstack_grpc import GrpcDownlink
            url, token, tls, ca_file = self._grpc_args
            self._grpc = GrpcDownlink(url, token, tls=tls, ca_file=ca_file)
        for client, bit in zip(self._ledgers, bits):
            fw = Forwarder(self._outbox, client, self.name, batch_size=self._batch_size,
                           backoff_base=self._backoff[0], backoff_cap=self._backoff[1],
                           bit=bit, name=client.url, clock=self._clock)
            self._forwarders.append(fw)
            fw.start()
        self._worker = threading.Thread(target=self._work, name="uplink-worker", daemon=True)
        self._worker.start()
        if self.status_port is not None:
            self._status = StatusServer(self.status_port, self.stats, self._health,
                                        host=self._status_host, metrics=self._metrics)
            self.status_port = self._status.port
            self._status.start()
        self._mqtt = self._make_client()
        self._mqtt.connect_async(self.mqtt_host, self.mqtt_port, keepalive=self._keepalive)
        self._mqtt.loop_start()
        self._started_at = time.time()

    def stop(self) -> None:
        """Stop taking uplinks, finish the batch in hand, close the state.
        Messages received but not yet stored stay unacknowledged in the
        broker's session and come again on the next start."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(30)
        if self._mqtt is not None:
            if self._connected:
                # A clean stop says so; a crash leaves it to the last will.
                info = self._mqtt.publish(self.status_topic, self._status_doc("offline"),
                                          qos=1, retain=True)
                try:
                    info.wait_for_publish(2.0)
                except (RuntimeError, ValueError):
                    pass
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
        for fw in self._forwarders:
            fw.stop()
        if self._status is not None:
            self._status.stop()
        if self._grpc is not None:
            self._grpc.close()
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
        """True once the subscriptions are in place (again, after a
        reconnect)."""
        return self._subscribed.wait(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """True when every uplink handed over by the broker has been settled
        and every verified bundle has been answered for by every ledger."""
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

    def healthy(self) -> bool:
        """The threads run and the worker is not stuck (a supervisor's
        watchdog is fed only while this holds)."""
        return self._health()[0]

    # -- reporting ---------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self._counts)
            rejected = dict(self._rejected)
            commands = dict(self._commands)
            failures = dict(self._command_failures)
            downlinks = dict(self._downlinks)
            other_ports = {str(p): n for p, n in sorted(self._other_ports.items())}
        ranges = list(self._ranges.values())
        ledgers = [fw.stats() for fw in self._forwarders]
        first = ledgers[0] if ledgers else {}
        depth = self._outbox_depth()
        return {
            "name": self.name,
            "received": counts.get("received", 0),
            "bundles": counts.get("bundles", 0),
            "verified": counts.get("verified", 0),
            "duplicates": counts.get("duplicates", 0),
            "fragments": {
                "received": counts.get("fragments", 0),
                "repeated": counts.get("fragments_repeated", 0),
                "joined": counts.get("fragments_joined", 0),
                "incomplete_sets": self._fragment_sets(),
            },
            "rejected": rejected,
            "rejected_total": sum(rejected.values()),
            "dead_letters": self._dead_letters,
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
            "downlinks": {
                "sent": sum(commands.values()),
                "acked": downlinks.get("acked", 0),
                "nacked": downlinks.get("nacked", 0),
                "retried": downlinks.get("retried", 0),
                "expired": downlinks.get("expired", 0),
                "failed": downlinks.get("failed", 0),
                "pending": self._open_downlinks(),
            },
            "storage_errors": counts.get("storage_errors", 0),
            "forwarded": sum(fw["forwarded"] for fw in ledgers),
            "ledger": {k: first.get(k) for k in ("stored", "duplicate", "rejected", "errors",
                                                 "failing", "last_error", "last_success_at")},
            "ledgers": ledgers,
            "outbox_depth": depth,
            "queue": {"depth": depth, "capacity": self._queue_capacity,
                      "fill_pct": None if depth is None
                      else round(100.0 * depth / self._queue_capacity, 3),
                      "full": self._queue_full},
            "devices": len(self._registry),
            "mqtt_connected": self._connected,
            "uptime_s": round(time.time() - self._started_at, 3) if self._started_at else 0.0,
        }

    def _metrics(self) -> str:
        from gateway import metrics
        return metrics.render(self.stats())

    def _outbox_depth(self) -> int | None:
        if self._outbox is None or self._stopping.is_set():
            return None
        return self._outbox.depth()

    def _fragment_sets(self) -> int | None:
        if self._outbox is None or self._stopping.is_set():
            return None
        return self._outbox.fragment_sets()

    def _open_downlinks(self) -> int | None:
        if self._outbox is None or self._stopping.is_set():
            return None
        return self._outbox.open_downlink_count()

    def _health(self) -> tuple[bool, dict[str, Any]]:
        stalled = time.monotonic() - self._heartbeat > WORKER_STALL_S
        running = bool(self._worker and self._worker.is_alive() and not stalled
                       and self._forwarders and all(fw.alive() for fw in self._forwarders))
        failing = [fw.name for fw in self._forwarders if fw.failures]
        degraded = (not self._connected or bool(failing) or self._queue_full
                    or self._storage_failing)
        status = "down" if not running else "degraded" if degraded else "ok"
        return running, {"status": status, "mqtt_connected": self._connected,
                         "subscribed": self._subscribed.is_set(),
                         "ledger_reachable": not failing,
                         "ledgers_failing": failing,
                         "worker_stalled": stalled,
                         "queue_full": self._queue_full,
                         "storage_failing": self._storage_failing,
                         "outbox_depth": self._outbox_depth(),
                         "devices": len(self._registry),
                         "command_keys": len(self._command_keys)}

    def _status_doc(self, state: str) -> bytes:
        doc: dict[str, Any] = {"state": state, "name": self.name, "at": round(self._clock(), 3)}
        if state == "online" and self._outbox is not None and not self._stopping.is_set():
            doc.update(queue_depth=self._outbox.depth(),
                       ledgers_failing=[fw.name for fw in self._forwarders if fw.failures],
                       started_at=self._started_at)
        return json.dumps(doc, sort_keys=True).encode()

    # -- MQTT --------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             clean_session=False, protocol=mqtt.MQTTv311, manual_ack=True)
        client.reconnect_delay_set(min_delay=self._reconnect[0], max_delay=self._reconnect[1])
        user, password = self._mqtt_auth
        if user:
            client.username_pw_set(user, password)
        if self._mqtt_tls is not None:
            client.tls_set(ca_certs=self._mqtt_tls.get("ca_file"),
                           certfile=self._mqtt_tls.get("cert_file"),
                           keyfile=self._mqtt_tls.get("key_file"))
        # Retained, so whoever subscribes later sees whether this gateway is
        # up; the broker publishes the will when the connection dies unclean.
        client.will_set(self.status_topic, self._status_doc("offline"), qos=1, retain=True)
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
        client.publish(self.status_topic, self._status_doc("online"), qos=1, retain=True)
        _, mid = client.subscribe([(t, 1) for t in self.topics])
        self._sub_pending = {mid}

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
            log.error("subscription to %s refused: %s", self.topics, reason_codes)
            return
        log.info("subscribed to %s", ", ".join(self.topics))
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connected = False
        self._subscribed.clear()
        if not self._stopping.is_set():
            log.warning("MQTT connection lost (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        received_at = self._clock()
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
            self._heartbeat = time.monotonic()
            try:
                self._registry.refresh_if_stale()
            except Exception:
                log.exception("device key refresh failed")
            if time.monotonic() >= self._next_chores:
                self._next_chores = time.monotonic() + self._chore_every
                try:
                    self._chores(self._clock())
                except sqlite3.Error as exc:
                    self._count("storage_errors")
                    log.error("periodic chores failed, retrying later: %s", exc)
                except Exception:
                    log.exception("periodic chores failed")
            if self._check_queue_full():
                self._stopping.wait(0.5)
                continue
            try:
                first = self._inbox.get(timeout=min(0.5, self._chore_every))
            except queue.Empty:
                continue
            batch = [first]
            # A message adds at most one bundle: a batch never takes the
            # queue past its capacity.
            limit = min(BATCH_MAX, max(1, self._queue_capacity - self._outbox.depth()))
            while len(batch) < limit:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            finally:
                with self._counts_lock:
                    self._unsettled -= len(batch)

    def _check_queue_full(self) -> bool:
        """Warn as the queue for the ledger fills; when it is full, stop
        taking messages (they wait in the broker) rather than drop any."""
        depth = self._outbox.depth()
        pct = 100.0 * depth / self._queue_capacity
        crossed = [t for t in self._queue_warn if pct >= t]
        top = crossed[-1] if crossed else 0
        if top > self._queue_warned:
            log.warning("queue for the ledger is %d%% full: %d of %d bundles; oldest waiting "
                        "since %s; ledgers failing: %s", top, depth, self._queue_capacity,
                        _iso(self._outbox.oldest_pending_at()),
                        [fw.name for fw in self._forwarders if fw.failures] or "none")
        elif top < self._queue_warned and pct < self._queue_warned - 10:
            log.info("queue for the ledger down to %.0f%% (%d bundles)", pct, depth)
        else:
            top = self._queue_warned
        self._queue_warned = top
        full = depth >= self._queue_capacity
        if full and not self._queue_full:
            log.error("queue for the ledger is full (%d bundles): uplinks wait in the MQTT "
                      "broker until the ledger takes some", depth)
        elif self._queue_full and not full:
            log.info("queue for the ledger has room again; taking uplinks")
        self._queue_full = full
        return full

    def _process(self, batch: list[tuple[mqtt.MQTTMessage, float]]) -> None:
        """Handle a batch: verify without holding the state, store it all in
        one transaction, then acknowledge every message. While the disk
        refuses (full, read only) the batch waits, unacknowledged."""
        examined = []
        for msg, at in batch:
            try:
                examined.append(self._examine(msg, at))
            except Exception as exc:  # a bug: the message is dead-lettered, not lost silently
                log.exception("uplink on %r could not be processed", msg.topic)
                examined.append(_Examined(msg, at, "rejected", rejected=Rejected(
                    "internal_error", f"{type(exc).__name__}: {exc}")))
        delay = 0.5
        while True:
            stage = _Stage()
            try:
                with self._outbox.batch() as tx:
                    for ex in examined:
                        self._apply_safely(tx, stage, ex)
                break
            except sqlite3.Error as exc:
                self._count("storage_errors")
                self._storage_failing = True
                log.error("cannot store %d messages, retrying in %.1fs: %s", len(batch), delay,
                          exc)
                if self._stopping.wait(delay):
                    return  # not acknowledged: the broker sends them again
                # Waiting for the disk is not a hang: a restart would not help.
                self._heartbeat = time.monotonic()
                delay = min(delay * 2, 30.0)
        self._storage_failing = False
        self._commit(stage)
        for msg, _ in batch:
            self._ack(msg)

    def _commit(self, stage: _Stage) -> None:
        self._ranges.update(stage.ranges)
        self._apps.update(stage.apps)
        for d in stage.dedup:
            self._verifier.remember(d)
        with self._counts_lock:
            self._counts.update(stage.counts)
            self._rejected.update(stage.rejected)
            self._other_ports.update(stage.other_ports)
            self._downlinks.update(stage.downlinks)
        self._dead_letters += stage.counts.get("dead_letters", 0)
        for exc in stage.logs:
            self._log_rejection(exc)
        if stage.counts.get("bundles"):
            for fw in self._forwarders:
                fw.wake()

    def _examine(self, msg: mqtt.MQTTMessage, at: float) -> _Examined:
        """Parse and check what needs no stored state: the event, the frame,
        the device's key, a whole bundle's signature."""
        event = msg.topic.rsplit("/", 1)[-1]
        try:
            if event == "ack":
                return _Examined(msg, at, "ack", item=chirpstack.parse_ack(
                    msg.topic, msg.payload, self._marshaler))
            if event == "txack":
                return _Examined(msg, at, "txack", item=chirpstack.parse_txack(
                    msg.topic, msg.payload, self._marshaler))
            up = chirpstack.parse_uplink(msg.topic, msg.payload, self._marshaler)
            if up.f_port != frame.PORT_READING:
                return _Examined(msg, at, "other_port", up=up)
            item = self._verifier.check(up)
            self._require_key(up.dev_eui)
            if isinstance(item, frame.Bundle):
                item = self._verifier.verify_bundle(up.dev_eui, item)
            return _Examined(msg, at, "up", up=up, item=item)
        except Rejected as exc:
            return _Examined(msg, at, "rejected", rejected=exc)

    def _apply_safely(self, tx: Batch, stage: _Stage, ex: _Examined) -> None:
        stage.counts["received"] += 1
        try:
            with tx.savepoint():
                self._apply(tx, stage, ex)
        except Rejected as exc:
            self._refuse(tx, stage, ex, exc)
        except sqlite3.Error:
            raise
        except Exception as exc:
            log.exception("uplink on %r could not be processed", ex.msg.topic)
            self._refuse(tx, stage, ex, Rejected("internal_error", f"{type(exc).__name__}: {exc}",
                                                 ex.up.dev_eui if ex.up else None))

    def _refuse(self, tx: Batch, stage: _Stage, ex: _Examined, exc: Rejected) -> None:
        """Count and log a refused message and keep it, as received, in the
        dead-letter store; a repeat of a message already stored (the broker
        delivering it again) is only counted."""
        if exc.reason == "duplicate":
            stage.counts["duplicates"] += 1
            return
        stage.rejected[exc.reason] += 1
        stage.logs.append(exc)
        dev = exc.dev_eui or chirpstack.topic_dev_eui(ex.msg.topic)
        tx.dead_letter(ex.received_at, ex.msg.topic, dev, exc.reason, exc.message,
                       bytes(ex.msg.payload))
        stage.counts["dead_letters"] += 1

    def _apply(self, tx: Batch, stage: _Stage, ex: _Examined) -> None:
        if ex.rejected is not None:
            raise ex.rejected
        if ex.kind == "ack":
            ack = ex.item
            if ack.acknowledged:
                if tx.settle_item(ack.queue_item_id, "acked", ex.received_at):
                    stage.downlinks["acked"] += 1
            elif tx.nack_item(ack.queue_item_id):
                stage.downlinks["nacked"] += 1
            return
        if ex.kind == "txack":
            if not self._confirmed and tx.settle_item(ex.item.queue_item_id, "transmitted",
                                                      ex.received_at):
                stage.downlinks["transmitted"] += 1
            return
        up = ex.up
        if ex.kind == "other_port":
            # Not for this gateway: the modem's one-byte uplinks that carry a
            # MAC request, another application's port. Counted by port, so a
            # device sending readings on the wrong port shows up.
            stage.other_ports[up.f_port] += 1
            return
        if up.deduplication_id and up.deduplication_id in stage.dedup:
            raise Rejected("duplicate", f"deduplicationId {up.deduplication_id} already seen",
                           up.dev_eui)
        if isinstance(ex.item, frame.Fragment):
            self._take_fragment(tx, stage, up, ex.item, ex.received_at)
        else:
            self._take_bundle(tx, stage, up, ex.item, ex.received_at)

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

    def _take_fragment(self, tx: Batch, stage: _Stage, up: Uplink, frag: frame.Fragment,
                       received_at: float) -> None:
        dev = up.dev_eui
        status, pieces, evicted = tx.add_fragment(dev, frag.tag, frag.count, frag.index,
                                                  frag.piece, received_at,
                                                  self._max_fragment_sets)
        for s in evicted:
            self._incomplete(stage, s, "evicted: too many incomplete sets from this device")
        if up.deduplication_id:
            stage.dedup.add(up.deduplication_id)
        if status == "conflict":
            raise Rejected("fragment_conflict", f"piece {frag.index} of {frag.count} (tag "
                           f"{frag.tag}) differs from the piece already held; that one is kept",
                           dev)
        stage.counts["fragments" if status == "new" else "fragments_repeated"] += 1
        if len(pieces) < frag.count:
            return
        # Complete (also when a repeat finds a set that a crash left complete
        # on disk but not yet turned into a bundle).
        try:
            data = frame.reassemble([frame.Fragment(frag.tag, i, frag.count, p)
                                     for i, p in sorted(pieces.items())])
            bundle = self._verifier.verify_bundle(dev, data)
        except Rejected as exc:  # a resend brings a fresh set
            tx.drop_fragments(dev, frag.tag, frag.count)
            raise Rejected(exc.reason, f"{frag.count} fragments of tag {frag.tag} joined: "
                           f"{exc.message}", dev) from None
        except frame.FrameError as exc:
            tx.drop_fragments(dev, frag.tag, frag.count)
            raise Rejected(exc.reason, f"{frag.count} fragments of tag {frag.tag} joined: "
                           f"{exc.message}", dev) from None
        stage.counts["fragments_joined"] += 1
        self._take_bundle(tx, stage, up, bundle, received_at, joined=(frag.tag, frag.count))

    def _take_bundle(self, tx: Batch, stage: _Stage, up: Uplink, bundle: frame.Bundle,
                     received_at: float, joined: tuple[int, int] | None = None) -> None:
        """Queue a verified bundle with the seqs it adds."""
        dev = up.dev_eui
        first, last = bundle.first_seq, bundle.last_seq
        # Pieces of this bundle from an earlier try are of no use any more,
        # whether it came whole now or was joined.
        tag = first & 0xFFFF
        ranges = (stage.ranges.get(dev) or self._ranges.get(dev)
                  or self._first_ranges(dev, first, received_at))
        if up.deduplication_id:
            stage.dedup.add(up.deduplication_id)
        if ranges.all_accepted(first, last):
            tx.drop_fragments(dev, tag)
            raise Rejected("replay", f"readings {first}..{last} were all accepted before (a "
                           "retransmission after a lost acknowledgement, or a replay)", dev)
        new = (last - first + 1) - ranges.accepted(first, last)
        updated = ranges.copy()
        updated.add(first, last, received_at)
        given_up = updated.trim()
        app = up.application_id if chirpstack.valid_application_id(up.application_id) else None
        if app == (stage.apps.get(dev) or self._apps.get(dev)):
            app = None  # already stored
        queued = tx.store_bundle(dev, bundle.data(), first, last, received_at, updated, app, tag)
        stage.ranges[dev] = updated
        if app:
            stage.apps[dev] = app
        if given_up:
            stage.counts["gaps_given_up"] += given_up
            log.warning("%s: more than %d separate runs of readings; the oldest gap is no "
                        "longer tracked", dev, len(updated.ranges))
        if not queued:
            raise Rejected("replay", f"a bundle of seq {first}..{last} is already queued "
                           "for the ledger", dev)
        stage.counts["bundles"] += 1
        stage.counts["verified"] += new

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

    def _incomplete(self, stage: _Stage, s: FragmentSet, why: str) -> None:
        stage.rejected["incomplete"] += 1
        stage.logs.append(Rejected(
            "incomplete", f"{s.pieces} of {s.count} fragments of tag {s.tag}, {why}; the "
            "readings are asked for again", s.dev_eui))

    # -- chores (worker thread) ----------------------------------------------

    def _chores(self, now: float) -> None:
        self._command_keys.reload_if_changed()
        stale = self._outbox.expire_fragments(now - self._fragment_ttl)
        if stale:
            stage = _Stage()
            for s in stale:
                self._incomplete(stage, s, f"still incomplete after {self._fragment_ttl:g} s")
            self._commit(stage)
        self._request_resends(now)
        self._retry_downlinks(now)
        mono = time.monotonic()
        if mono >= self._next_status and self._connected and self._mqtt is not None:
            self._next_status = mono + STATUS_EVERY
            self._mqtt.publish(self.status_topic, self._status_doc("online"), qos=1, retain=True)
        if mono >= self._next_prune:
            self._next_prune = mono + 3600.0
            self._outbox.prune_commands(now - COMMAND_LOG_S)
            gone = self._outbox.prune_dead_letters(now - self._dead_letter_s,
                                                   self._dead_letter_max)
            if gone:
                self._dead_letters = self._outbox.dead_letter_count()
                log.info("dead-letter store: %d old entries removed, %d kept", gone,
                         self._dead_letters)

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

    def _retry_downlinks(self, now: float) -> None:
        """Commands not acknowledged by their meter: expired ones are given
        up, the others are queued again (same counter and bytes: a meter that
        did get the first one refuses the repeat) after the acknowledgement
        timeout, or at once after a negative acknowledgement, up to
        downlink_max_attempts."""
        for d in self._outbox.open_downlinks():
            op = frame.OP_NAMES.get(d.opcode, d.opcode)
            if d.expires and now >= d.expires:
                self._outbox.settle_downlink(d.id, "expired", now)
                self._count_downlink("expired")
                log.warning("command %s%s to %s (counter %d) expired unacknowledged after %d "
                            "attempts", op, d.args, d.dev_eui, d.counter, d.attempts)
                continue
            if d.tried_at and now - d.tried_at < self._ack_timeout:
                continue
            if d.attempts >= self._max_attempts:
                self._outbox.settle_downlink(d.id, "failed", now)
                self._count_downlink("failed")
                log.warning("command %s%s to %s (counter %d) not acknowledged after %d attempts; "
                            "given up", op, d.args, d.dev_eui, d.counter, d.attempts)
                continue
            if not self._connected and self._downlink_via == "mqtt":
                continue
            item_id = str(uuid.uuid4())
            try:
                item_id = self._publish_downlink(
                    d.dev_eui, d.application_id or self._apps.get(d.dev_eui), d.data, item_id,
                    d.expires)
            except CommandError as exc:
                log.warning("command %s to %s not queued again: %s", op, d.dev_eui, exc)
                continue
            self._outbox.retry_downlink(d.id, item_id, now)
            self._count_downlink("retried")
            log.info("command %s%s to %s (counter %d) queued again, attempt %d", op, d.args,
                     d.dev_eui, d.counter, d.attempts + 1)

    # -- downlink commands ---------------------------------------------------

    def send_command(self, dev_eui: str, opcode: int, *args, expires: int = 0) -> int:
        """Queue a command for one meter through ChirpStack (fPort 2, class A:
        it goes out after the meter's next uplink; class C: at once). Returns
        the command's counter. Delivery is confirmed by the meter's
        acknowledgement (ChirpStack `ack` event); without one it is queued
        again (downlink_ack_timeout_s, downlink_max_attempts) until `expires`
        (unix seconds, 0: never). Raises CommandError: no_key (no command key
        for the device), no_application (no uplink has named its ChirpStack
        application yet), offline (no broker connection), field (bad
        arguments), publish, or the gRPC client's reasons."""
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
                               + ("" if self._command_keys.path else " (no command keys file)"))
        app = self._apps.get(dev)
        if app is None and self._grpc is None:  # the API needs only the DevEUI
            raise CommandError("no_application", f"no uplink from {dev} has named its "
                               "ChirpStack application yet")
        if self._downlink_via == "mqtt" and (self._mqtt is None or not self._connected):
            raise CommandError("offline", "not connected to the MQTT broker")
        eui = bytes.fromhex(dev)
        try:
            frame.encode_command(key, eui, 1, expires, opcode, *args)  # arguments only
        except frame.FrameError as exc:
            raise CommandError("field", f"{frame.OP_NAMES.get(opcode, opcode)}: {exc}") from None
        with self._command_lock:
            # Counter and publish in one order: the meter refuses a counter
            # not above the last it accepted.
            now = self._clock()
            counter = self._outbox.next_command_counter(dev, int(now))
            data = frame.encode_command(key, eui, counter, expires, opcode, *args)
            item_id = self._publish_downlink(dev, app, data, str(uuid.uuid4()), expires)
            self._outbox.log_command(dev, counter, opcode, args, expires, now, item_id=item_id,
                                     data=data, application_id=app, tracked=True)
        with self._counts_lock:
            self._commands[frame.OP_NAMES.get(opcode, f"op{opcode}")] += 1
        log.info("command %s%s to %s (counter %d, application %s, item %s)",
                 frame.OP_NAMES.get(opcode, opcode), list(args), dev, counter, app, item_id)
        return counter

    def _publish_downlink(self, dev: str, app: str | None, data: bytes, item_id: str,
                          expires: int) -> str:
        """Queue the command in ChirpStack; returns the queue item id its
        `ack` and `txack` events will name (ChirpStack's API picks its own;
        on MQTT the one given in the message is kept)."""
        expires_at = float(expires) if expires else None
        if self._grpc is not None:
            return self._grpc.enqueue(dev, frame.PORT_COMMAND, data, self._confirmed, item_id,
                                      expires_at)
        client = self._mqtt
        if client is None or app is None:
            raise CommandError("offline", "not connected to the MQTT broker")
        marshaler = "protobuf" if self._marshaler == "protobuf" else "json"
        info = client.publish(chirpstack.command_topic(app, dev), chirpstack.command_message(
            dev, frame.PORT_COMMAND, data, confirmed=self._confirmed, item_id=item_id,
            expires_at=expires_at, marshaler=marshaler), qos=1)
        # NO_CONN: the connection dropped just now; paho sends a QoS 1
        # message queued like this one after it reconnects.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise CommandError("publish", f"MQTT publish failed: {mqtt.error_string(info.rc)}")
        return item_id

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self._mqtt.ack(msg.mid, msg.qos)

    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _count_downlink(self, key: str) -> None:
        with self._counts_lock:
            self._downlinks[key] += 1

    def _log_rejection(self, exc: Rejected) -> None:
        key = (exc.reason, exc.dev_eui)
        now = time.monotonic()
        entry = self._reject_log.get(key)
        if entry is not None and now - entry[0] < _REJECT_LOG_INTERVAL:
            entry[1] += 1
            return
        suppressed = f" ({entry[1]} more since last logged)" if entry and entry[1] else ""
        log.warning("rejected uplink from %s: %s: %s%s", exc.dev_eui or "unknown device",
                    exc.reason, exc.message, suppressed,
                    extra={"dev_eui": exc.dev_eui, "reason": exc.reason})
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


def _iso(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
