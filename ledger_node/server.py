"""The ledger node's HTTP API: routing, request limits, authentication, JSON in and out.

All HTTP lives in this module; what a request means is decided by
`ledger_node.admission` (writes), `ledger_node.log` (the tree, checkpoints,
cosignatures), `ledger_node.store` (queries), `ledger_node.export` (proof
bundles) and `ledger_node.check` (consistency). ledger_node/openapi.json
describes every route; the tests fuzz the running server against it.
Standard library only (http.server.ThreadingHTTPServer): one thread per
connection, appends serialised by the store's writer lock. Every error is a
JSON object {"error": <reason code>, "message": <what was wrong>}, counted
by reason (GET /v1/stats, "http_errors") and logged; no input can stop the
server.

    srv = LedgerServer("ledger.db", port=0, token="s3cret")
    srv.start()            # background thread
    srv.url                # "http://127.0.0.1:41234"
    srv.stop()
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qs, urlsplit

from meter import frame

from . import admission, checkpoint, entries, export, note
from .admission import Admission, Rejected
from .log import DEFAULT_CHECKPOINT_INTERVAL_S, CosignatureRefused, Log, LogHalted
from .store import QueriedReading, Store, StoreError

log = logging.getLogger("ledger_node.http")

MAX_BODY = 4 * 1024 * 1024
# A too-large body is read and thrown away up to this size so the client
# gets its 413 instead of a connection reset; beyond it the socket is closed.
_DRAIN_LIMIT = 16 * 1024 * 1024
MAX_QUERY_LIMIT = 10_000
DEFAULT_QUERY_LIMIT = 1000
MAX_ENTRIES_PAGE = 1000
OPENAPI_PATH = Path(__file__).with_name("openapi.json")

# Rejections of a whole request and their HTTP status.
_STATUS = {
    "malformed": 400,
    "bad_json": 400,
    "bad_request": 400,
    "bad_cosignature": 400,
    "unauthorized": 401,
    "unknown_witness": 403,
    "not_found": 404,
    "unknown_device": 404,
    "unknown_checkpoint": 404,
    "no_checkpoint": 404,
    "method_not_allowed": 405,
    "key_conflict": 409,
    "metadata_conflict": 409,
    "already_enrolled": 409,
    "revoked_device": 409,
    "rotate_same_key": 409,
    "rotate_from_seq": 409,
    "length_required": 411,
    "too_large": 413,
    admission.TOO_MANY_ITEMS: 413,
    "internal": 500,
    "not_implemented": 501,
    "unavailable": 503,
    "halted": 503,
}

WRITER, ADMIN = "writer", "admin"


class HttpError(Exception):
    def __init__(self, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class Text:
    """A plain-text answer (the checkpoint note)."""
    body: str


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes):
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise HttpError("bad_json", f"body is not UTF-8: {exc}") from None
    except RecursionError:
        raise HttpError("bad_json", "body is nested too deeply") from None
    except ValueError as exc:
        raise HttpError("bad_json", f"body is not JSON: {exc}") from None


def _object(body: bytes) -> dict:
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise HttpError("bad_request", f"body must be a JSON object, got {type(doc).__name__}")
    return doc


class Api:
    """The routes, independent of the socket server: each handler takes the
    path parameters, the parsed query and the body and returns (status,
    JSON-able payload or Text)."""

    def __init__(self, log_: Log, token: str | None = None, admin_token: str | None = None):
        self.log = log_
        self.store = log_.store
        self.admission = Admission(log_)
        self.token = token
        # Without an admin token the registry is guarded by the writer token.
        self.admin_token = admin_token or token
        self._errors = Counter()
        self._errors_lock = threading.Lock()
        eui = r"(?P<dev_eui>[^/]+)"
        # (method, path pattern) -> (handler, allowed query parameters, who may call)
        self.routes = [
            ("GET", "/v1/health", self.health, (), None),
            ("GET", "/v1/stats", self.stats, (), None),
            # The full audit of the database: seconds of CPU per 10^5 entries.
            ("GET", "/v1/check", self.check, (), ADMIN),
            ("GET", "/v1/openapi.json", self.openapi, (), None),
            ("GET", "/v1/devices", self.list_devices, ("status",), None),
            ("POST", "/v1/devices", self.post_device, (), ADMIN),
            ("GET", f"/v1/devices/{eui}", self.get_device, (), None),
            ("POST", f"/v1/devices/{eui}/rotate", self.post_rotate, (), ADMIN),
            ("POST", f"/v1/devices/{eui}/revoke", self.post_revoke, (), ADMIN),
            ("POST", "/v1/bundles", self.post_bundles, (), WRITER),
            ("GET", "/v1/readings", self.list_readings, ("dev_eui", "from", "to", "limit"), None),
            ("GET", "/v1/checkpoint", self.get_checkpoint, ("size",), None),
            ("POST", "/v1/cosignatures", self.post_cosignature, (), None),
            ("GET", "/v1/entries", self.list_entries, ("start", "end"), None),
            ("GET", "/v1/proof/inclusion", self.inclusion, ("index", "size", "dev_eui", "seq"),
             None),
            ("GET", "/v1/proof/consistency", self.consistency, ("from", "to"), None),
            ("GET", "/v1/proof-bundle", self.proof_bundle, ("dev_eui", "seq"), None),
        ]
        self._compiled = [(m, re.compile(p + r"\Z"), h, q, a) for m, p, h, q, a in self.routes]

    def match(self, method: str, path: str):
        """(handler, params, auth, path parameters), or raises not_found /
        method_not_allowed."""
        allowed = []
        for m, pattern, handler, params, auth in self._compiled:
            found = pattern.match(path)
            if found:
                if m == method:
                    return handler, params, auth, found.groupdict()
                allowed.append(m)
        if allowed:
            allow = ", ".join(sorted(set(allowed)))
            raise HttpError("method_not_allowed", f"{method} is not allowed on {path} "
                            f"(allowed: {allow})", {"Allow": allow})
        raise HttpError("not_found", f"no such endpoint: {path}")

    def count_error(self, code: str) -> None:
        with self._errors_lock:
            self._errors[code] += 1

    def http_errors(self) -> dict:
        with self._errors_lock:
            return dict(sorted(self._errors.items()))

    def authorized(self, auth: str | None, header: str | None) -> bool:
        token = self.admin_token if auth == ADMIN else self.token
        if token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())

    # -- health and statistics -----------------------------------------------

    def health(self, path, query, body):
        if self.log.halted:
            return 503, {"status": "halted", "problem": self.log.halted}
        return 200, {"status": "ok", "size": self.log.size}

    def stats(self, path, query, body):
        with self.store.reader() as r:
            counts = r.counts()
            counters = r.counters()
            latest = r.latest_checkpoint()
            cosigned = len(r.cosignatures(latest.size)) if latest else 0
            latest_readings = r.latest_per_device()
        by_reason = {name.split(":", 1)[1]: n for name, n in counters.items()
                     if name.startswith(admission.REJECTED + ":")}
        return 200, {
            "origin": self.log.origin,
            "size": self.log.size,
            "entries": counts["entries"],
            "devices": len(self.log.registry),
            "readings": counts["readings"],
            "bundles": counters.get(admission.ENTRIES, 0),
            "checkpoint_size": latest.size if latest else None,
            "checkpoint_cosignatures": cosigned,
            "checkpoints_retained": counts["checkpoints"],
            "stored": counters.get(admission.STORED, 0),
            "duplicate": counters.get(admission.DUPLICATE, 0),
            "rejected": sum(by_reason.values()),
            "rejected_by_reason": by_reason,
            "http_errors": self.http_errors(),
            "halted": self.log.halted,
            "per_device": {
                eui.hex(): {"readings": n, "latest_seq": seq, "latest_t_end": t_end,
                            "import_dwh": imp, "export_dwh": exp}
                for eui, (n, seq, t_end, imp, exp) in sorted(latest_readings.items())},
        }

    def check(self, path, query, body):
        from .check import check_store  # the audit code is loaded only when asked for
        return 200, check_store(self.store)

    def openapi(self, path, query, body):
        return 200, json.loads(OPENAPI_PATH.read_text())

    # -- the registry ------------------------------------------------------------

    def list_devices(self, path, query, body):
        status = query.get("status")
        if status not in (None, "active", "revoked"):
            raise Rejected("malformed", f"status: expected active or revoked, got {status!r:.40}")
        registry = self.log.registry
        devices = [admission.device_dict(registry, d.dev_eui)
                   for d in sorted(registry.devices(), key=lambda d: d.dev_eui)]
        if status:
            devices = [d for d in devices if d["status"] == status]
        return 200, {"devices": devices}

    def get_device(self, path, query, body):
        eui = admission.parse_dev_eui(path["dev_eui"].lower(), "dev_eui")
        if self.log.registry.device(eui) is None:
            raise HttpError("unknown_device", f"device {eui.hex()} is not enrolled")
        return 200, {"device": admission.device_dict(self.log.registry, eui)}

    def post_device(self, path, query, body):
        change = self.admission.enroll(_object(body))
        status = "enrolled" if change.created else "already_enrolled"
        return (201 if change.created else 200), {"status": status, "entry": change.entry,
                                                  "device": change.device}

    def post_rotate(self, path, query, body):
        change = self.admission.rotate(path["dev_eui"], _object(body))
        return 200, {"status": "rotated", "entry": change.entry, "device": change.device}

    def post_revoke(self, path, query, body):
        change = self.admission.revoke(path["dev_eui"], _object(body))
        return 200, {"status": "revoked", "entry": change.entry, "device": change.device}

    # -- readings ------------------------------------------------------------------

    def post_bundles(self, path, query, body):
        doc = _object(body)
        if "bundles" not in doc:
            raise HttpError("bad_request", 'body must be an object {"bundles": [...]}')
        if not isinstance(doc["bundles"], list):
            raise HttpError("bad_request", "bundles: expected a list, got "
                                           f"{type(doc['bundles']).__name__}")
        results = self.admission.admit(doc["bundles"])
        return 200, {"results": [r.as_dict() for r in results]}

    def list_readings(self, path, query, body):
        dev_eui = query.get("dev_eui")
        if dev_eui is not None:
            dev_eui = admission.parse_dev_eui(dev_eui)
        t_from = _number_param(query, "from")
        t_to = _number_param(query, "to")
        limit = _int_param(query, "limit", 1, MAX_QUERY_LIMIT, DEFAULT_QUERY_LIMIT)
        with self.store.reader() as r:
            rows = r.readings(dev_eui, t_from, t_to, limit + 1)
        return 200, {"readings": [_reading_json(row) for row in rows[:limit]],
                     "more": len(rows) > limit}

    # -- the log ------------------------------------------------------------------------

    def get_checkpoint(self, path, query, body):
        size = _int_param(query, "size", 0, 2 ** 63 - 1, None)
        text = self.log.checkpoint_note(size)
        if text is None:
            if size is None:
                raise HttpError("no_checkpoint", "the log has not signed a checkpoint yet")
            raise HttpError("unknown_checkpoint", f"size: no retained checkpoint of size {size}")
        return 200, Text(text)

    def post_cosignature(self, path, query, body):
        doc = _object(body)
        size = doc.get("size")
        line = doc.get("cosignature")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2 ** 63:
            raise Rejected("malformed", "size: expected the checkpoint's tree size")
        if not isinstance(line, str) or len(line) > 1000:
            raise Rejected("malformed", "cosignature: expected one signature line")
        try:
            name, fresh = self.log.add_cosignature(size, line)
        except CosignatureRefused as exc:
            raise HttpError(exc.reason if exc.reason in _STATUS else "malformed",
                            exc.message) from None
        if fresh:
            log.info("checkpoint %d cosigned by %s", size, name)
        return 200, {"status": "stored" if fresh else "duplicate", "witness": name, "size": size}

    def list_entries(self, path, query, body):
        size = self.log.size
        start = _int_param(query, "start", 0, 2 ** 63 - 1, None)
        end = _int_param(query, "end", 0, 2 ** 63 - 1, None)
        if start is None or end is None:
            raise Rejected("malformed", "start and end: both are required")
        if not start <= end <= size:
            raise Rejected("malformed", f"start..end: {start}..{end} is not within 0..{size}")
        end = min(end, start + MAX_ENTRIES_PAGE)
        with self.store.reader() as r:
            rows = r.entries(start, end)
        return 200, {"entries": [{"index": i, "data": d.hex()} for i, d in rows]}

    def inclusion(self, path, query, body):
        size = _int_param(query, "size", 0, 2 ** 63 - 1, self.log.size)
        if "dev_eui" in query or "seq" in query:
            if "index" in query:
                raise Rejected("malformed", "index: give either index, or dev_eui and seq")
            index = self._entry_of(query)
        else:
            index = _int_param(query, "index", 0, 2 ** 63 - 1, None)
            if index is None:
                raise Rejected("malformed", "index: required (or dev_eui and seq)")
        try:
            proof = self.log.prove_inclusion(index, size)
        except ValueError as exc:
            raise Rejected("malformed", f"index/size: {exc}") from None
        return 200, {"index": index, "size": size, "proof": [h.hex() for h in proof]}

    def consistency(self, path, query, body):
        old = _int_param(query, "from", 0, 2 ** 63 - 1, None)
        new = _int_param(query, "to", 0, 2 ** 63 - 1, self.log.size)
        if old is None:
            raise Rejected("malformed", "from: required")
        try:
            proof = self.log.prove_consistency(old, new)
        except ValueError as exc:
            raise Rejected("malformed", f"from/to: {exc}") from None
        return 200, {"from": old, "to": new, "proof": [h.hex() for h in proof]}

    def proof_bundle(self, path, query, body):
        index = self._entry_of(query)
        bundle = export.proof_bundle(self.log, index, seq=int(query["seq"]))
        if bundle is None:
            raise HttpError("no_checkpoint", f"entry {index} is not covered by a signed "
                                             "checkpoint yet; try again in a second")
        return 200, bundle

    def _entry_of(self, query) -> int:
        for field in ("dev_eui", "seq"):
            if field not in query:
                raise Rejected("malformed", f"{field}: required")
        eui = admission.parse_dev_eui(query["dev_eui"])
        seq = _int_param(query, "seq", 0, 0xFFFFFFFF, None)
        with self.store.reader() as r:
            found = r.reading(eui, seq)
        if found is None:
            raise HttpError("not_found", f"no reading of seq {seq} is logged for {eui.hex()}")
        return found.entry

    # -- in-process use (tests, tools): the same rules without HTTP ---------

    def enroll(self, device: dict) -> dict:
        """Enroll as POST /v1/devices does; the device as the registry holds
        it. Raises admission.Rejected."""
        return self.admission.enroll(device).device

    def readings_of(self, dev_eui: str) -> list[dict]:
        """Every reading of one device, as GET /v1/readings returns them."""
        with self.store.reader() as r:
            rows = r.readings(admission.parse_dev_eui(dev_eui), limit=None)
        return [_reading_json(row) for row in rows]


def _number_param(query: dict, name: str) -> float | None:
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise Rejected("malformed", f"{name}: expected unix seconds, got {raw!r:.40}")
    return value


def _int_param(query: dict, name: str, lo: int, hi: int, default):
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,20}", raw):
        raise Rejected("malformed", f"{name}: expected an integer {lo}..{hi}, got {raw!r:.40}")
    value = int(raw)
    if not lo <= value <= hi:
        raise Rejected("malformed", f"{name}: {value} is outside {lo}..{hi}")
    return value


_READING_FIELDS = ("seq", "t_end", "import_dwh", "export_dwh", "flags")


def _reading_json(row: QueriedReading) -> dict:
    # Values come from the entry itself, the signed truth, not from the
    # index columns beside it (GET /v1/check compares the two).
    fields = None
    problem = None
    bundle = None
    if row.data is None:
        problem = f"entry {row.entry} is missing"
    else:
        try:
            decoded = entries.decode(row.data)
            bundle = decoded.bundle
            signed = {r.seq: r for r in decoded.decoded().readings}.get(row.seq)
        except (entries.EntryError, frame.FrameError, AttributeError) as exc:
            problem = f"entry {row.entry} does not decode as readings: {exc}"
        else:
            if signed is None:
                problem = f"entry {row.entry} does not hold seq {row.seq}"
            else:
                fields = signed.as_dict()
    if fields is None:
        log.error("%s; run a check", problem)
        fields = {c: getattr(row, c) for c in _READING_FIELDS}
        fields["problem"] = problem
    return {"entry": row.entry, "dev_eui": row.dev_eui.hex(), **fields,
            "bundle": bundle.hex() if bundle is not None else None,
            "received_at": None if row.received_ms is None else row.received_ms / 1000,
            "gateway": row.gateway}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ledger-node/0.1"
    # Idle keep-alive connections and slow senders give up after this long.
    timeout = 30

    @property
    def api(self) -> Api:
        return self.server.api

    def setup(self):
        super().setup()
        # The status line and headers go out in one write and the body in
        # another; without this, Nagle's algorithm holds the body back until
        # the client's delayed ACK (40 ms) on every keep-alive request.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (a test's socket pair)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def __getattr__(self, name):
        # Any other method (OPTIONS, TRACE, ...) on a known path is a 405
        # with Allow, not http.server's 501.
        if name.startswith("do_") and name[3:].isalpha() and name[3:].isupper():
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            path = urlsplit(self.path)
            handler, params, auth, path_params = self.api.match(method, path.path)
            if auth and not self.api.authorized(auth, self.headers.get("Authorization")):
                who = "an administrator's" if auth == ADMIN else "a writer's"
                raise HttpError("unauthorized", f"{who} 'Authorization: Bearer <token>' "
                                "header is required", {"WWW-Authenticate": 'Bearer realm="ledger"'})
            query = self._query(path.query, params)
            status, payload = handler(path_params, query, body)
        except HttpError as exc:
            self._error(exc.code, exc.message, exc.headers)
        except Rejected as exc:
            self._error(exc.reason if exc.reason in _STATUS else "malformed", exc.message)
        except LogHalted as exc:
            self._error("halted", f"the log is halted: {exc}")
        except (StoreError, sqlite3.Error) as exc:
            log.error("%s %s: storage failed: %s", method, self.path, exc)
            self._error("unavailable", f"storage unavailable: {exc}")
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except Exception:
            log.exception("%s %s: unexpected failure", method, self.path)
            self._error("internal", "internal error; see the ledger node's log")
        else:
            self._send(status, payload)

    def _query(self, raw: str, allowed) -> dict:
        try:
            parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=bool(raw),
                              max_num_fields=20)
        except ValueError as exc:
            raise HttpError("bad_request", f"query string: {exc}") from None
        unknown = sorted(set(parsed) - set(allowed))
        if unknown:
            raise HttpError("bad_request", f"unknown query parameter(s): {', '.join(unknown)}"
                            + (f" (known: {', '.join(allowed)})" if allowed else ""))
        repeated = sorted(k for k, v in parsed.items() if len(v) > 1)
        if repeated:
            raise HttpError("bad_request", f"query parameter given twice: {', '.join(repeated)}")
        return {k: v[0] for k, v in parsed.items()}

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            self.close_connection = True  # the body's end cannot be found
            raise HttpError("length_required", "chunked bodies are not accepted; "
                            "send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        try:
            length = int(raw)
            if length < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise HttpError("bad_request", f"Content-Length: not a length: {raw!r}") from None
        if length > MAX_BODY:
            self._discard(length)
            raise HttpError("too_large", f"body is {length} bytes, at most {MAX_BODY}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError("client closed the connection in the middle of the body")
        return body

    def _discard(self, length: int) -> None:
        self.close_connection = True
        if length > _DRAIN_LIMIT:
            return
        left = length
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)

    def _error(self, code: str, message: str, headers: dict | None = None) -> None:
        self.api.count_error(code)
        status = _STATUS.get(code, 400)
        level = logging.ERROR if status >= 500 else logging.WARNING
        log.log(level, "%s %s %s -> %d %s: %s", self.client_address[0], self.command,
                self.path[:200], status, code, message)
        self._send(status, {"error": code, "message": message}, headers)

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        if isinstance(payload, Text):
            data = payload.body.encode()
            ctype = "text/plain; charset=utf-8"
        else:
            data = json.dumps(payload, separators=(",", ":")).encode()
            ctype = "application/json"
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except (ConnectionError, TimeoutError, socket.timeout) as exc:
            log.debug("client went away before the response: %s", exc)
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # http.server's own refusals (bad request line, unknown method,
        # oversized headers) in the same JSON shape as ours.
        reason = {404: "not_found", 405: "method_not_allowed", 414: "too_large",
                  431: "too_large", 501: "not_implemented"}.get(code, "bad_request")
        self.close_connection = True
        self.api.count_error(reason)
        log.warning("%s -> %d %s: %s", self.client_address[0], code, reason, message)
        data = json.dumps({"error": reason, "message": message or explain or ""}).encode()
        try:
            self.send_response(code, message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(data)
        except (ConnectionError, TimeoutError, socket.timeout):
            pass

    def log_message(self, format, *args):
        log.debug("%s " + format, self.client_address[0], *args)


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    # stop() must not wait for idle keep-alive connections; the store's lock
    # still lets a write in flight finish before the database closes.
    block_on_close = False

    def __init__(self, address, api: Api):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.api = api
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def end_connections(self) -> None:
        """Make every open connection end after the request it is serving.

        Shutting down only the reading side wakes handlers idling on a
        keep-alive connection (they read end-of-file) while a handler in the
        middle of a request can still send its response."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request, client_address):
        log.exception("connection from %s failed", client_address)


def load_or_create_key(path: str | Path, origin: str | None = None) -> note.Signer:
    """The log's signing key from a note key file, created (mode 0600) with
    a new key named `origin` when the file does not exist yet."""
    path = Path(path)
    if path.exists():
        try:
            return note.Signer(path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: not a note signing key: {exc}") from None
    name = origin or f"meter-ledger.invalid/{secrets.token_hex(4)}"
    skey, vkey = note.generate_key(name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(skey + "\n")
    log.warning("created the log's signing key %s; its verifier key is %s", path, vkey)
    return note.Signer(skey)


class LedgerServer:
    """A ledger node on one database file, serving HTTP from a background thread.

    The log's signing key comes from `key` (a note signing key) or from
    `key_file` (default: the database path with ".key" appended, created on
    first start). `witnesses` are the cosigner verifier keys whose
    cosignatures the log keeps."""

    def __init__(self, db_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, *, admin_token: str | None = None,
                 key: str | None = None, key_file: str | Path | None = None,
                 origin: str | None = None, witnesses: Sequence[str] = (),
                 checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S):
        self.db_path = Path(db_path)
        self.host = host
        self.port = port
        self.token = token or None
        self.admin_token = admin_token or None
        self.signer = note.Signer(key) if key else load_or_create_key(
            key_file or self.db_path.with_name(self.db_path.name + ".key"), origin)
        self.witnesses = [checkpoint.CosignatureVerifier(v) for v in witnesses]
        self.checkpoint_interval_s = checkpoint_interval_s
        self.store: Store | None = None
        self.log: Log | None = None
        self.api: Api | None = None
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def vkey(self) -> str:
        """The verifier key of the log (its name is the checkpoint origin)."""
        return self.signer.vkey

    def start(self) -> "LedgerServer":
        if self._httpd is not None:
            return self
        self.store = Store(self.db_path)
        try:
            self.log = Log(self.store, self.signer, witnesses=self.witnesses,
                           checkpoint_interval_s=self.checkpoint_interval_s)
            self.api = Api(self.log, self.token, self.admin_token)
            self._httpd = _HttpServer((self.host, self.port), self.api)
            self.log.start()
        except BaseException:
            if self._httpd is not None:
                self._httpd.server_close()
                self._httpd = None
            if self.log is not None:
                self.log.stop()
            self.store.close()
            raise
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"ledger-http-{self.port}", daemon=True)
        self._thread.start()
        log.info("ledger node serving %s on %s", self.db_path, self.url)
        return self

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LedgerServer is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.end_connections()
        self._thread.join(timeout=10)
        self.log.stop()
        self.store.close()
        self._httpd = None
        self._thread = None
        log.info("ledger node stopped")

    def __enter__(self) -> "LedgerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
