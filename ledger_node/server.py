"""The ledger node's HTTP API: routing, request limits, authentication, JSON in and out.

All HTTP lives in this module; what a request means is decided by
`ledger_node.admission` (writes), `ledger_node.store` (queries) and
`ledger_node.check` (consistency). Standard library only
(http.server.ThreadingHTTPServer): one thread per connection, admission
serialised by the store's writer lock. Every error is a JSON object
{"error": <reason code>, "message": <what was wrong>}, counted by reason
(GET /v1/stats, "http_errors") and logged; no input can stop the server.

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
import socket
import sqlite3
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from meter import frame

from . import admission
from .admission import Admission, Rejected
from .check import check_store
from .store import Store, StoredReading, StoreError

log = logging.getLogger("ledger_node.http")

MAX_BODY = 4 * 1024 * 1024
# A too-large body is read and thrown away up to this size so the client
# gets its 413 instead of a connection reset; beyond it the socket is closed.
_DRAIN_LIMIT = 16 * 1024 * 1024
MAX_QUERY_LIMIT = 10_000
DEFAULT_QUERY_LIMIT = 1000

# Rejections of a whole request and their HTTP status.
_STATUS = {
    "malformed": 400,
    "bad_json": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    admission.KEY_CONFLICT: 409,
    admission.METADATA_CONFLICT: 409,
    "length_required": 411,
    "too_large": 413,
    admission.TOO_MANY_ITEMS: 413,
    "internal": 500,
    "not_implemented": 501,
    "unavailable": 503,
}


class HttpError(Exception):
    def __init__(self, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


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


class Api:
    """The routes, independent of the socket server: each handler takes the
    parsed query and body and returns (status, JSON-able payload)."""

    def __init__(self, store: Store, token: str | None = None):
        self.store = store
        self.admission = Admission(store)
        self.token = token
        self._errors = Counter()
        self._errors_lock = threading.Lock()
        # (method, path) -> (handler, allowed query parameters, needs writer auth)
        self.routes = {
            ("GET", "/v1/health"): (self.health, (), False),
            ("GET", "/v1/stats"): (self.stats, (), False),
            ("GET", "/v1/check"): (self.check, (), False),
            ("GET", "/v1/devices"): (self.list_devices, (), False),
            ("POST", "/v1/devices"): (self.post_device, (), True),
            ("GET", "/v1/readings"): (self.list_readings, ("dev_eui", "from", "to", "limit"),
                                      False),
            ("POST", "/v1/bundles"): (self.post_bundles, (), True),
        }
        self.paths = {path for _, path in self.routes}

    def count_error(self, code: str) -> None:
        with self._errors_lock:
            self._errors[code] += 1

    def http_errors(self) -> dict:
        with self._errors_lock:
            return dict(sorted(self._errors.items()))

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        if not header or not header.startswith("Bearer "):
            return False
        return hmac.compare_digest(header[len("Bearer "):].strip().encode(), self.token.encode())

    # -- handlers ----------------------------------------------------------

    def health(self, query, body):
        return 200, {"status": "ok"}

    def stats(self, query, body):
        summary = self.store.summary()
        counters = self.store.counters()
        by_reason = {name.split(":", 1)[1]: n for name, n in counters.items()
                     if name.startswith(admission.REJECTED + ":")}
        return 200, {
            "devices": summary["devices"],
            "bundles": summary["bundles"],
            "readings": summary["readings"],
            "bundles_stored": counters.get(admission.BUNDLES, 0),
            "stored": counters.get(admission.STORED, 0),
            "duplicate": counters.get(admission.DUPLICATE, 0),
            "rejected": sum(by_reason.values()),
            "rejected_by_reason": by_reason,
            "http_errors": self.http_errors(),
            "per_device": summary["per_device"],
        }

    def check(self, query, body):
        return 200, check_store(self.store)

    def list_devices(self, query, body):
        # latest_seq lets a gateway that starts without state tell the readings
        # the ledger already holds from a gap worth asking the meter for.
        latest = self.store.latest_seqs()
        return 200, {"devices": [{**d.as_dict(), "latest_seq": latest.get(d.dev_eui)}
                                 for d in self.store.devices()]}

    def post_device(self, query, body):
        result = self.admission.enroll(parse_json(body))
        status = "enrolled" if result.created else "already_enrolled"
        return (201 if result.created else 200), {"status": status,
                                                  "device": result.device.as_dict()}

    # -- in-process use (tests, tools): the same rules without HTTP ---------

    def enroll(self, device: dict) -> dict:
        """Enroll as POST /v1/devices does; the device as it is stored.
        Raises admission.Rejected."""
        return self.admission.enroll(device).device.as_dict()

    def readings_of(self, dev_eui: str) -> list[dict]:
        """Every reading of one device, as GET /v1/readings returns them."""
        rows = self.store.readings(admission.parse_dev_eui(dev_eui), limit=None)
        return [_reading_json(r) for r in rows]

    def post_bundles(self, query, body):
        doc = parse_json(body)
        if not isinstance(doc, dict) or "bundles" not in doc:
            raise HttpError("bad_request", 'body must be an object {"bundles": [...]}')
        if not isinstance(doc["bundles"], list):
            raise HttpError("bad_request", "bundles: expected a list, got "
                                           f"{type(doc['bundles']).__name__}")
        results = self.admission.admit(doc["bundles"])
        return 200, {"results": [r.as_dict() for r in results]}

    def list_readings(self, query, body):
        dev_eui = query.get("dev_eui")
        if dev_eui is not None:
            dev_eui = admission.parse_dev_eui(dev_eui)
        t_from = _number_param(query, "from")
        t_to = _number_param(query, "to")
        limit = DEFAULT_QUERY_LIMIT
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                limit = 0
            if not 1 <= limit <= MAX_QUERY_LIMIT:
                raise Rejected("malformed", f"limit: expected an integer 1..{MAX_QUERY_LIMIT}, "
                                            f"got {query['limit']!r:.40}")
        rows = self.store.readings(dev_eui, t_from, t_to, limit + 1)
        return 200, {"readings": [_reading_json(r) for r in rows[:limit]],
                     "more": len(rows) > limit}


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


_READING_FIELDS = ("seq", "t_end", "import_dwh", "export_dwh", "flags")


def _reading_json(row: StoredReading) -> dict:
    # Values come from the bundle itself, the signed truth, not from the
    # index columns beside it (GET /v1/check compares the two).
    fields = None
    problem = None
    if row.bundle is None:
        problem = f"bundle {row.bundle_id} is missing"
    else:
        try:
            signed = {r.seq: r for r in frame.decode_bundle(row.bundle).readings}.get(row.seq)
        except frame.FrameError as exc:
            problem = f"stored bundle does not decode: {exc.reason}"
        else:
            if signed is None:
                problem = f"bundle {row.bundle_id} does not hold seq {row.seq}"
            else:
                fields = signed.as_dict()
    if fields is None:
        log.error("entry %d: %s; run a check", row.entry_id, problem)
        fields = {c: getattr(row, c) for c in _READING_FIELDS}
        fields["problem"] = problem
    return {"entry_id": row.entry_id, "dev_eui": row.dev_eui, **fields,
            "bundle_id": row.bundle_id,
            "bundle": row.bundle.hex() if row.bundle is not None else None,
            "received_at": row.received_at, "gateway": row.gateway,
            "stored_at": row.stored_at}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ledger-node/0.1"
    # Idle keep-alive connections and slow senders give up after this long.
    timeout = 30

    @property
    def api(self) -> Api:
        return self.server.api

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

    def _dispatch(self, method: str) -> None:
        try:
            body = self._read_body()
            path = urlsplit(self.path)
            route = self.api.routes.get((method, path.path))
            if route is None:
                if path.path in self.api.paths:
                    allowed = ", ".join(sorted(m for m, p in self.api.routes if p == path.path))
                    raise HttpError("method_not_allowed", f"{method} is not allowed on "
                                    f"{path.path} (allowed: {allowed})", {"Allow": allowed})
                raise HttpError("not_found", f"no such endpoint: {path.path}")
            handler, params, writer = route
            if writer and not self.api.authorized(self.headers.get("Authorization")):
                raise HttpError("unauthorized", "a valid 'Authorization: Bearer <token>' "
                                "header is required", {"WWW-Authenticate": 'Bearer realm="ledger"'})
            query = self._query(path.query, params)
            status, payload = handler(query, body)
        except HttpError as exc:
            self._error(exc.code, exc.message, exc.headers)
        except Rejected as exc:
            self._error(exc.reason if exc.reason in _STATUS else "malformed", exc.message)
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
        data = json.dumps(payload, separators=(",", ":")).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
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


class LedgerServer:
    """A ledger node on one database file, serving HTTP from a background thread."""

    def __init__(self, db_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None):
        self.db_path = Path(db_path)
        self.host = host
        self.port = port
        self.token = token or None
        self.store: Store | None = None
        self.api: Api | None = None
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LedgerServer":
        if self._httpd is not None:
            return self
        self.store = Store(self.db_path)
        try:
            self.api = Api(self.store, self.token)
            self._httpd = _HttpServer((self.host, self.port), self.api)
        except BaseException:
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
        self.store.close()
        self._httpd = None
        self._thread = None
        log.info("ledger node stopped")

    def __enter__(self) -> "LedgerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
