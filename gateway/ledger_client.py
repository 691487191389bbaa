"""HTTP client for the two ledger endpoints the gateway uses.

`GET /v1/devices` (enrolled keys) and `POST /v1/bundles` (a batch of
verified bundles). Errors are split by what the caller should do:
`LedgerUnavailable` means try again later (connection refused, timeout, 5xx),
`LedgerError` means the ledger answered but not as the contract says (4xx, a
body that is not the expected JSON); retrying it blindly will not help, but
the readings must still be kept.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

# The ledger is reached directly: proxy variables in the environment of a
# service must not silently reroute signed readings.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LedgerError(Exception):
    """The ledger answered, but not with what the contract promises."""


class LedgerUnavailable(LedgerError):
    """The ledger could not be reached or failed on its side; retry later."""


class LedgerClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"ledger URL must be http(s)://host[:port], got {url!r}")
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def devices(self) -> dict[str, Any]:
        return self._call("GET", "/v1/devices")

    def post_bundles(self, bundles: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One result per bundle, in order; raises LedgerError when the answer
        does not line up with the batch."""
        doc = self._call("POST", "/v1/bundles", {"bundles": bundles})
        results = doc.get("results")
        if not isinstance(results, list) or len(results) != len(bundles):
            raise LedgerError("ledger answered %s results for %d bundles"
                              % (len(results) if isinstance(results, list) else "no",
                                 len(bundles)))
        if not all(isinstance(r, dict) for r in results):
            raise LedgerError("ledger results are not all objects")
        return results

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code >= 500:
                raise LedgerUnavailable(f"{method} {path}: HTTP {exc.code} {detail}") from None
            raise LedgerError(f"{method} {path}: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # URLError wraps refused connections; timeouts and resets while
            # reading the answer arrive as OSError, a truncated answer as an
            # HTTPException.
            raise LedgerUnavailable(f"{method} {path}: {getattr(exc, 'reason', exc)}") from None
        try:
            doc = json.loads(raw)
        except ValueError:
            raise LedgerError(f"{method} {path}: answer is not JSON") from None
        if not isinstance(doc, dict):
            raise LedgerError(f"{method} {path}: answer is not a JSON object")
        return doc


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        text = exc.read(500).decode("utf-8", "replace")
    except OSError:
        return exc.reason or ""
    return text.strip() or (exc.reason or "")
