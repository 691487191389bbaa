"""ChirpStack v4 gRPC API: downlinks queued with `DeviceService.Enqueue`.

The alternative to publishing on the MQTT integration's `command/down` topic
(docs/gateway-grpc.md). The call is authenticated with a ChirpStack API key
sent as `authorization: Bearer <key>` metadata and every call has a deadline,
so a ChirpStack that is down or hanging costs the caller at most `timeout`
seconds. Failures raise `gateway.commands.CommandError` with a reason the
caller can act on:

- offline    UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED: try again later
- auth       UNAUTHENTICATED, PERMISSION_DENIED: the API key is wrong, revoked
             or does not cover the device's application
- not_found  NOT_FOUND: ChirpStack does not know the device
- publish    any other status
- field      the arguments were refused before anything was sent

ChirpStack answers with the id under which it queued the item; it may differ
from the one sent (ChirpStack 4 assigns its own), and it is the id that comes
back in the device's `txack` and `ack` events, so callers keep the answer.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import uuid

import grpc
from chirpstack_api import api

from gateway.commands import CommandError

log = logging.getLogger(__name__)

_DEV_EUI = re.compile(r"[0-9a-fA-F]{16}\Z")
# host:port, host a name, an IPv4 address or a bracketed IPv6 address
_TARGET = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}\Z")
# gRPC metadata values are visible ASCII; a token with anything else would only
# fail at the first call, far from the configuration that caused it.
_TOKEN = re.compile(r"[\x21-\x7e]+\Z")

_OFFLINE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
            # a call cut off by close() or by the channel going away: nothing
            # says ChirpStack refused it, so it is retried like an outage
            grpc.StatusCode.CANCELLED}
_AUTH = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}

# Downlinks are rare (a resend request now and then), so the connection sits
# idle most of the time. Pinging it every minute finds a half-open connection
# (ChirpStack restarted, a switch rebooted) before a command is sent into it;
# a LAN answers a ping in milliseconds, so 10 s without an answer means the
# peer is gone. Reconnect attempts back off to 10 s at most (gRPC's default is
# 2 minutes): a ChirpStack that comes back is used again within seconds.
_CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
    # Enqueue answers are a few bytes; anything big is not ChirpStack.
    ("grpc.max_receive_message_length", 64 * 1024),
]


class GrpcDownlink:
    """Queues downlinks through ChirpStack's `DeviceService`. Thread-safe; the
    channel is opened at the first call and reopened after close()."""

    def __init__(self, url: str, token: str | None, tls: bool = False, timeout: float = 5.0,
                 ca_file: str | None = None):
        if not isinstance(url, str) or not _TARGET.match(url):
            raise ValueError(f"ChirpStack gRPC address {url!r}: expected host:port "
                             "(no scheme; TLS is chosen with tls)")
        port = int(url.rsplit(":", 1)[1])
        if not 0 < port < 65536:
            raise ValueError(f"ChirpStack gRPC address {url!r}: port out of range")
        if token is not None:
            # API keys are often kept in a file ending with a newline
            token = token.strip()
            if not _TOKEN.match(token):
                raise ValueError("ChirpStack API key is empty or contains spaces or "
                                 "non-ASCII characters")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"gRPC timeout must be a positive number of seconds, got {timeout!r}")
        if ca_file is not None and not tls:
            raise ValueError("a CA file is given for the ChirpStack gRPC API but TLS is off")
        self._root_certs: bytes | None = None
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as f:
                    self._root_certs = f.read()
            except OSError as exc:
                raise ValueError(f"gRPC CA file {ca_file}: cannot read: "
                                 f"{exc.strerror or exc}") from None
            if b"-----BEGIN CERTIFICATE-----" not in self._root_certs:
                raise ValueError(f"gRPC CA file {ca_file}: no PEM certificate in it")
        self.url = url
        self.tls = tls
        self.timeout = float(timeout)
        self._metadata = (("authorization", "Bearer " + token),) if token else ()
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._stub: api.DeviceServiceStub | None = None

    def _device_service(self) -> api.DeviceServiceStub:
        with self._lock:
            if self._stub is None:
                if self.tls:
                    creds = grpc.ssl_channel_credentials(root_certificates=self._root_certs)
                    self._channel = grpc.secure_channel(self.url, creds, options=_CHANNEL_OPTIONS)
                else:
                    self._channel = grpc.insecure_channel(self.url, options=_CHANNEL_OPTIONS)
                self._stub = api.DeviceServiceStub(self._channel)
                log.info("ChirpStack gRPC API at %s (%s)", self.url, "TLS" if self.tls else "plaintext")
            return self._stub

    def enqueue(self, dev_eui: str, f_port: int, data: bytes, confirmed: bool, item_id: str,
                expires_at: float | None) -> str:
        """Queue `data` for the device on `f_port`; the id ChirpStack queued it
        under. `expires_at` (unix seconds) is when ChirpStack drops the item
        unsent; None or 0: never."""
        item = self._queue_item(dev_eui, f_port, data, confirmed, item_id, expires_at)
        stub = self._device_service()
        try:
            resp = stub.Enqueue(api.EnqueueDeviceQueueItemRequest(queue_item=item),
                                timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _command_error(exc, item.dev_eui, self.url) from None
        # Every ChirpStack 4 answers with an id; should one not, the item is
        # queued all the same and ours is the best name for it.
        return resp.id or item.id

    @staticmethod
    def _queue_item(dev_eui, f_port, data, confirmed, item_id, expires_at) -> api.DeviceQueueItem:
        if not isinstance(dev_eui, str) or not _DEV_EUI.match(dev_eui):
            raise CommandError("field", f"DevEUI {dev_eui!r} is not 16 hex digits")
        # LoRaWAN application ports are 1..223; 0 carries MAC commands only.
        if isinstance(f_port, bool) or not isinstance(f_port, int) or not 1 <= f_port <= 223:
            raise CommandError("field", f"fPort {f_port!r} is not an application port (1..223)")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CommandError("field", f"payload must be bytes, not {type(data).__name__}")
        try:
            item_id = str(uuid.UUID(item_id))
        except (TypeError, ValueError, AttributeError):
            raise CommandError("field", f"queue item id {item_id!r} is not a UUID") from None
        item = api.DeviceQueueItem(id=item_id, dev_eui=dev_eui.lower(), f_port=f_port,
                                   data=bytes(data), confirmed=bool(confirmed))
        if expires_at:
            if not (isinstance(expires_at, (int, float)) and math.isfinite(expires_at)
                    and expires_at > 0):
                raise CommandError("field", f"expiry {expires_at!r} is not a unix time")
            seconds = math.floor(expires_at)
            nanos = min(int(round((expires_at - seconds) * 1e9)), 999_999_999)
            item.expires_at.seconds = int(seconds)
            item.expires_at.nanos = nanos
        return item

    def close(self) -> None:
        """Close the channel; calls in flight end with reason offline. The next
        enqueue opens a new one."""
        with self._lock:
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()


def _command_error(exc: grpc.RpcError, dev_eui: str, url: str) -> CommandError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    message = f"ChirpStack gRPC Enqueue for {dev_eui} at {url}: {name}: {details or 'no details'}"
    if code in _OFFLINE:
        reason = "offline"
    elif code in _AUTH:
        reason = "auth"
    elif code == grpc.StatusCode.NOT_FOUND:
        reason = "not_found"
    else:
        reason = "publish"
    return CommandError(reason, message)
