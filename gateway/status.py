"""Loopback HTTP endpoint for operators and supervisors: GET /health, GET /stats.

Both answer JSON. /health is 200 while the daemon's threads are running
(503 otherwise), so a supervisor restarts a gateway whose worker died rather
than one that merely waits for a broker or a ledger.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)


class StatusServer:
    def __init__(self, port: int, stats: Callable[[], dict[str, Any]],
                 health: Callable[[], tuple[bool, dict[str, Any]]], host: str = "127.0.0.1"):
        routes = {"/stats": lambda: (True, stats()), "/health": health}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server naming)
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self._send(404, {"error": f"no such endpoint {self.path}",
                                     "endpoints": sorted(routes)})
                    return
                try:
                    ok, doc = route()
                except Exception as exc:  # report, do not kill the server thread
                    log.exception("status endpoint %s failed", self.path)
                    self._send(500, {"error": str(exc)})
                    return
                self._send(200 if ok else 503, doc)

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc, sort_keys=True).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("status %s " + fmt, self.client_address[0], *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
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
