"""Enrolled device keys: fetched from the ledger, cached on disk.

The ledger is the source of truth (`GET /v1/devices`). The last good answer is
kept in a JSON file in the state directory so the gateway verifies readings
from known meters even when it starts while the ledger is unreachable. The
list is refreshed periodically and, at most once per `unknown_gap` seconds,
when a device nobody has heard of shows up (it was probably just enrolled).

Beside each key the ledger says the highest seq it holds for the device
(`latest_seq`, null when none): a gateway without state for a meter does not
count what the ledger already has as missing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from gateway.ledger_client import LedgerClient, LedgerError

log = logging.getLogger(__name__)

_DEV_EUI = re.compile(r"[0-9a-f]{16}\Z")
_PUBLIC_KEY = re.compile(r"[0-9a-f]{64}\Z")


def parse_devices(doc: Any) -> tuple[dict[str, bytes], list[str]]:
    """Keys from a `{"devices": [{"dev_eui", "public_key", "status"}, ...]}`
    document (revoked devices left out), and one problem description per
    entry that was skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        raise ValueError("device list must be an object with a 'devices' array")
    keys: dict[str, bytes] = {}
    problems = []
    for i, entry in enumerate(doc["devices"]):
        if not isinstance(entry, dict):
            problems.append(f"devices[{i}] is not an object")
            continue
        eui = entry.get("dev_eui")
        key = entry.get("public_key")
        if entry.get("status", "active") != "active":
            # A revoked device's readings are refused by the ledger; the
            # gateway refuses them too (as unknown_device) instead of
            # queueing what can never be delivered.
            continue
        eui = eui.lower() if isinstance(eui, str) else eui
        key = key.lower() if isinstance(key, str) else key
        if not isinstance(eui, str) or not _DEV_EUI.match(eui):
            problems.append(f"devices[{i}]: dev_eui {eui!r} is not 16 hex digits")
        elif not isinstance(key, str) or not _PUBLIC_KEY.match(key):
            problems.append(f"devices[{i}] ({eui}): public_key is not 64 hex digits")
        else:
            keys[eui] = bytes.fromhex(key)
    return keys, problems


def parse_latest_seqs(doc: Any) -> dict[str, int]:
    """{dev_eui: latest_seq} for the entries that state it: 0 when the
    ledger holds no reading of the device (null), left out when the entry
    does not say (an older ledger) or says something that is not a seq."""
    out: dict[str, int] = {}
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list):
        return out
    for entry in doc["devices"]:
        if not isinstance(entry, dict) or "latest_seq" not in entry:
            continue
        eui = entry.get("dev_eui")
        seq = entry["latest_seq"]
        if not isinstance(eui, str) or not _DEV_EUI.match(eui.lower()):
            continue
        if seq is None:
            out[eui.lower()] = 0
        elif isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= 0xFFFFFFFF:
            out[eui.lower()] = seq
    return out


def _document(keys: dict[str, bytes], latest: dict[str, int]) -> dict[str, Any]:
    devices = []
    for eui, key in sorted(keys.items()):
        entry: dict[str, Any] = {"dev_eui": eui, "public_key": key.hex()}
        if eui in latest:
            entry["latest_seq"] = latest[eui] or None
        devices.append(entry)
    return {"devices": devices}


class Registry:
    def __init__(self, client: "LedgerClient | list[LedgerClient]", cache_path: str | os.PathLike,
                 refresh_interval: float = 300.0, unknown_gap: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        # With several ledger nodes the first that answers gives the list
        # (they hold the same registry).
        self._clients = list(client) if isinstance(client, (list, tuple)) else [client]
        self._cache = Path(cache_path)
        self._interval = refresh_interval
        self._unknown_gap = unknown_gap
        self._clock = clock
        self._keys: dict[str, bytes] = {}
        self._latest: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_attempt: float | None = None
        self.last_error: str | None = None

    def __len__(self) -> int:
        return len(self._keys)

    def key_for(self, dev_eui: str) -> bytes | None:
        return self._keys.get(dev_eui)

    def latest_seq(self, dev_eui: str) -> int | None:
        """The highest seq the ledger held for the device at the last
        refresh: 0 for none, None when not known."""
        return self._latest.get(dev_eui)

    def load_cache(self) -> int:
        """Load the keys saved by the last successful refresh; returns how many."""
        try:
            doc = json.loads(self._cache.read_text())
            keys, problems = parse_devices(doc)
        except FileNotFoundError:
            return 0
        except (OSError, ValueError) as exc:
            log.warning("ignoring device cache %s: %s", self._cache, exc)
            return 0
        for p in problems:
            log.warning("device cache %s: %s", self._cache, p)
        self._keys = keys
        self._latest = parse_latest_seqs(doc)
        return len(keys)

    def refresh(self) -> bool:
        """Fetch the device list from the ledger; on success replace the keys
        and the cache. On failure the keys in use stay as they were."""
        with self._lock:
            self._last_attempt = self._clock()
            errors = []
            for client in self._clients:
                try:
                    doc = client.devices()
                    keys, problems = parse_devices(doc)
                    break
                except (LedgerError, ValueError) as exc:
                    errors.append(f"{client.url}: {exc}" if len(self._clients) > 1 else str(exc))
            else:
                self.last_error = "; ".join(errors)
                log.warning("device list not refreshed: %s", self.last_error)
                return False
            for p in problems:
                log.warning("ledger device list: %s", p)
            self.last_error = None
            self.replace(keys, parse_latest_seqs(doc))
            return True

    def replace(self, keys: dict[str, bytes], latest: dict[str, int] | None = None) -> None:
        """Use exactly these keys (and the ledger's latest seqs) from now on
        and cache them for the next start."""
        self._latest = dict(latest or {})
        self._keys = dict(keys)  # one assignment: readers see the old or the new map
        try:
            self._save()
        except OSError as exc:
            log.warning("device cache %s not written: %s", self._cache, exc)

    def refresh_if_stale(self) -> bool:
        """Refresh when the keys are older than the refresh interval (failed
        attempts are retried after the same interval, not in a loop)."""
        last = self._last_attempt
        if last is not None and self._clock() - last < self._interval:
            return False
        return self.refresh()

    def refresh_for_unknown(self, dev_eui: str) -> bool:
        """A reading came from a device without a key: refresh unless that was
        done very recently. True when the device now has a key."""
        last = self._last_attempt
        if last is not None and self._clock() - last < self._unknown_gap:
            return False
        return self.refresh() and dev_eui in self._keys

    def _save(self) -> None:
        tmp = self._cache.with_name(self._cache.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(_document(self._keys, self._latest), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._cache)
