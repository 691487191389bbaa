"""The gateway daemon: ChirpStack uplink events in, verified readings out to the ledger.

Threads and what each owns:
  MQTT loop (paho)  connection, reconnects; hands each message to the worker
                    without acknowledging it.
  worker            parse -> verify -> outbox, then acknowledges the message,
                    so a reading is on disk before the broker forgets it.
                    Also refreshes the device keys.
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
from gateway.chirpstack import Rejected
from gateway.forwarder import MAX_BATCH, Forwarder
from gateway.ledger_client import LedgerClient
from gateway.outbox import Outbox
from gateway.registry import Registry
from gateway.status import StatusServer
from gateway.verify import Verified, Verifier

log = logging.getLogger(__name__)
mqtt_log = logging.getLogger("gateway.mqtt")

OUTBOX_FILE = "outbox.sqlite"
DEVICES_FILE = "devices.json"
LOCK_FILE = "gateway.lock"

# A burst of rejections from one device (a broken meter, a replay) is logged
# once per this many seconds, with a count of what was left out.
_REJECT_LOG_INTERVAL = 60.0


class Gateway:
    def __init__(self, mqtt_host: str, mqtt_port: int, ledger_url: str,
                 state_dir: str | os.PathLike, application_id: str = "+",
                 ledger_token: str | None = None, status_port: int | None = None, *,
                 name: str | None = None, client_id: str | None = None,
                 batch_size: int = MAX_BATCH, refresh_interval: float = 300.0,
                 unknown_refresh_gap: float = 10.0, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, ledger_timeout: float = 10.0,
                 keepalive: int = 30):
        if application_id != "+" and (not application_id
                                      or any(c in application_id for c in "/+#")):
            raise ValueError(f"application_id must be '+' or an id without / + #, "
                             f"got {application_id!r}")
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
        n = self._registry.load_cache()
        log.info("gateway %s: %d device keys from cache, %d readings pending",
                 self.name, n, self._outbox.depth())
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
        and every verified reading has been answered for by the ledger."""
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
        fw = self._forwarder
        return {
            "name": self.name,
            "received": counts.get("received", 0),
            "verified": counts.get("verified", 0),
            "rejected": rejected,
            "rejected_total": sum(rejected.values()),
            "storage_errors": counts.get("storage_errors", 0),
            "forwarded": (fw.stored + fw.duplicate) if fw else 0,
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

    def _health(self) -> tuple[bool, dict[str, Any]]:
        running = bool(self._worker and self._worker.is_alive()
                       and self._forwarder and self._forwarder.alive())
        degraded = not self._connected or bool(self._forwarder and self._forwarder.failures)
        status = "down" if not running else "degraded" if degraded else "ok"
        return running, {"status": status, "mqtt_connected": self._connected,
                         "subscribed": self._subscribed.is_set(),
                         "ledger_reachable": not (self._forwarder and self._forwarder.failures),
                         "outbox_depth": self._outbox_depth(),
                         "devices": len(self._registry)}

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
            try:
                msg, received_at = self._inbox.get(timeout=0.5)
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
            verified = self._accept(msg.topic, msg.payload)
            if not self._store(verified, received_at):
                return  # stopping before it could be stored: not acknowledged
        except Rejected as exc:
            self._count_rejected(exc.reason)
            self._log_rejection(exc)
        self._ack(msg)

    def _accept(self, topic: str, payload: bytes) -> Verified:
        up = chirpstack.parse_uplink(topic, payload)
        try:
            return self._verifier.verify(up)
        except Rejected as exc:
            # A device enrolled since the last refresh is the common reason
            # for an unknown EUI; ask the ledger (rate-limited) before refusing.
            if exc.reason != "unknown_device" or not self._registry.refresh_for_unknown(up.dev_eui):
                raise
        return self._verifier.verify(up)

    def _store(self, v: Verified, received_at: float) -> bool:
        """Commit to the outbox, retrying while the disk refuses (full, read
        only): the uplink stays unacknowledged, so waiting loses nothing."""
        delay = 0.5
        while True:
            try:
                queued = self._outbox.put(v.dev_eui, v.seq, v.frame, received_at)
                break
            except sqlite3.Error as exc:
                self._count("storage_errors")
                log.error("cannot store reading %s seq %d, retrying in %.1fs: %s",
                          v.dev_eui, v.seq, delay, exc)
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, 30.0)
        self._verifier.remember(v.dev_eui, v.seq, v.deduplication_id)
        if not queued:
            raise Rejected("duplicate", f"seq {v.seq} is already queued for the ledger",
                           v.dev_eui)
        self._count("verified")
        self._forwarder.wake()
        return True

    def _ack(self, msg: mqtt.MQTTMessage) -> None:
        if msg.qos > 0:
            self._mqtt.ack(msg.mid, msg.qos)

    def _count(self, key: str) -> None:
        with self._counts_lock:
            self._counts[key] += 1

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
