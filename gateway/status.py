"""HTTP endpoint for operators, supervisors and Prometheus: GET /health,
GET /stats, GET /metrics.

/health and /stats answer JSON. /health is 200 while the daemon's threads are
running (503 otherwise), so a supervisor restarts a gateway whose worker died
rather than one that merely waits for a broker or a ledger. /metrics is the
Prometheus text format (gateway.metrics), rendered from the same stats.

It listens on loopback unless configured otherwise: the stats name devices
and ledgers, and nothing here is authenticated, so listening on another
address is a choice (a Prometheus on another host) for a network that is
trusted or firewalled.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusServer:
    def __init__(self, port: int, stats: Callable[[], dict[str, Any]],
                 health: Callable[[], tuple[bool, dict[str, Any]]], host: str = "127.0.0.1",
                 metrics: Callable[[], str] | None = None):
        # path -> () -> (status code, content type, body)
        routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/stats": lambda: _json(200, stats()),
            "/health": lambda: _health(health),
        }
        if metrics is not None:
            routes["/metrics"] = lambda: (200, METRICS_CONTENT_TYPE, metrics().encode())
        endpoints = sorted(routes)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server naming)
                path = self.path.split("?", 1)[0]
                route = routes.get(path)
                if route is None:
                    self._send(*_json(404, {"error": f"no such endpoint {path}",
                                            "endpoints": endpoints}))
                    return
                try:
                    answer = route()
                except Exception as exc:  # report, do not kill the server thread
                    log.exception("status endpoint %s failed", path)
                    answer = _json(500, {"error": str(exc)})
                self._send(*answer)

            def _not_allowed(self):
                self._send(*_json(405, {"error": f"method {self.command} not allowed; "
                                                 "use GET", "endpoints": endpoints}),
                           allow="GET")

            def __getattr__(self, name: str):
                # http.server looks up do_<METHOD>; every method but GET
                # (also ones it does not know) gets 405 rather than its 501.
                if name.startswith("do_"):
                    return self._not_allowed
                raise AttributeError(name)

            def _send(self, code: int, content_type: str, body: bytes,
                      allow: str | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if allow:
                    self.send_header("Allow", allow)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("status %s " + fmt, self.client_address[0], *args)

        self._server = _server_for(host, port, Handler)
        self._server.daemon_threads = True
        self.host = host
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="status",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()


def _json(code: int, doc: dict[str, Any]) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(doc, sort_keys=True).encode()


def _health(health: Callable[[], tuple[bool, dict[str, Any]]]) -> tuple[int, str, bytes]:
    ok, doc = health()
    return _json(200 if ok else 503, doc)


def _server_for(host: str, port: int, handler) -> ThreadingHTTPServer:
    """A server bound to `host`: an IPv4 or IPv6 address, "0.0.0.0" (or "")
    for every IPv4 address, "::" for every address, or a name (its IPv4
    address when it has one: "localhost" is 127.0.0.1, where a scraper looks
    for it, even where the resolver lists ::1 first)."""
    if not host:
        return ThreadingHTTPServer(("", port), handler)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise OSError(f"status host {host!r}: {exc}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, address = infos[0][0], infos[0][4][:2]
    if family == socket.AF_INET6:
        class Server6(ThreadingHTTPServer):
            address_family = socket.AF_INET6
        return Server6(address, handler)
    return ThreadingHTTPServer(address, handler)
