"""Delivers the outbox to one ledger node in batches, retrying until it answers.

One thread per ledger node. It takes the oldest bundles that node has not
answered for (up to `batch_size`), posts them, and settles each with the
node's per-bundle answer. When the node is unreachable or fails, the same
bundles are retried after an exponential backoff with jitter; nothing leaves
the outbox without an answer from every node. Resending a batch whose answer
was lost is safe: the ledger answers "duplicate" for the readings it already
stored.
"""

from __future__ import annotations

import logging
import random
import threading
import time

from gateway.ledger_client import LedgerClient, LedgerError, LedgerUnavailable
from gateway.outbox import DEFAULT_LEDGER_BIT, Outbox, Pending

log = logging.getLogger(__name__)

MAX_BATCH = 500

# Upper bounds (seconds) of the ledger round-trip histogram, as Prometheus
# reads them (`le`), the last one +Inf.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Latency:
    """A cumulative histogram of ledger round trips (one per posted batch)."""

    def __init__(self):
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(LATENCY_BUCKETS) and seconds > LATENCY_BUCKETS[i]:
            i += 1
        self.counts[i] += 1
        self.sum += seconds
        self.count += 1

    def snapshot(self) -> dict:
        buckets, total = {}, 0
        for bound, n in zip(LATENCY_BUCKETS, self.counts):
            total += n
            buckets[f"{bound:g}"] = total
        buckets["+Inf"] = total + self.counts[-1]
        return {"buckets": buckets, "sum": round(self.sum, 6), "count": self.count}


def backoff_delay(failures: int, base: float, cap: float, rng=random.random) -> float:
    """Seconds to wait after `failures` consecutive failures (>= 1): doubling
    from `base`, capped at `cap`, with the upper half randomised so a fleet of
    gateways does not hammer a recovering ledger in step."""
    ceiling = min(cap, base * 2 ** min(failures - 1, 30))
    return ceiling / 2 + rng() * ceiling / 2


class Forwarder:
    def __init__(self, outbox: Outbox, client: LedgerClient, gateway_name: str,
                 batch_size: int = MAX_BATCH, backoff_base: float = 0.5,
                 backoff_cap: float = 30.0, idle_poll: float = 1.0,
                 bit: int = DEFAULT_LEDGER_BIT, name: str | None = None,
                 clock=time.time):
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}, got {batch_size}")
        self._outbox = outbox
        self._client = client
        self._name = gateway_name
        self._batch = batch_size
        self._base = backoff_base
        self._cap = backoff_cap
        self._idle_poll = idle_poll
        self._bit = bit
        self._clock = clock
        self.name = name or client.url
        # Bundles up to this id are answered for by this node, except the
        # ones an earlier batch left unsettled (the cursor stops before them).
        self._cursor = 0
        self.latency = Latency()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Written by the forwarder thread only; read by stats().
        self.forwarded = 0  # bundles the ledger answered "ok" for
        self.stored = 0  # readings it stored
        self.duplicate = 0  # readings it already had
        self.rejected = 0  # bundles it refused
        self.errors = 0
        self.failures = 0  # consecutive, 0 when the last attempt got an answer
        self.last_error: str | None = None
        self.last_success_at: float | None = None

    def stats(self) -> dict:
        return {"name": self.name, "url": self._client.url, "forwarded": self.forwarded,
                "stored": self.stored, "duplicate": self.duplicate, "rejected": self.rejected,
                "errors": self.errors, "failing": bool(self.failures),
                "last_error": self.last_error, "last_success_at": self.last_success_at,
                "latency": self.latency.snapshot()}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"forwarder-{self._bit}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wake(self) -> None:
        """A bundle was queued: deliver now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delivered = self.deliver_once()
            except Exception:  # a bug here must not end delivery for good
                log.exception("forwarder error; retrying")
                delivered = None
                self.failures += 1
            if delivered is None:
                self._stop.wait(backoff_delay(max(self.failures, 1), self._base, self._cap))
            elif delivered == 0:
                self._wake.wait(self._idle_poll)
                self._wake.clear()

    def deliver_once(self) -> int | None:
        """Post one batch. Returns how many bundles were settled (0: nothing
        pending), or None when the batch must be retried later."""
        items = self._outbox.pending(self._batch, self._bit, self._cursor)
        if not items:
            return 0
        body = [{"dev_eui": it.dev_eui, "bundle": it.bundle.hex(),
                 "received_at": it.received_at, "gateway": self._name} for it in items]
        started = time.monotonic()
        try:
            results = self._client.post_bundles(body)
        except LedgerError as exc:
            self.errors += 1
            self.failures += 1
            self.last_error = str(exc)
            # An outage is logged when it starts (and when it ends, below); a
            # contract error (bad token, wrong URL) on every attempt.
            if not isinstance(exc, LedgerUnavailable):
                log.error("%d bundles not delivered to %s, will retry: %s", len(items), self.name,
                          exc)
            elif self.failures == 1:
                log.warning("ledger %s unreachable, %d bundles kept for retry: %s",
                            self.name, len(items), exc)
            return None
        self.latency.observe(time.monotonic() - started)
        if self.failures:
            log.info("ledger %s reachable again after %d failed attempts", self.name,
                     self.failures)
        self.failures = 0
        self.last_error = None
        self.last_success_at = self._clock()
        return self._settle(items, results)

    def _settle(self, items: list[Pending], results: list[dict]) -> int:
        done = []
        settled = 0
        unsettled = None
        for item, res in zip(items, results):
            status = res.get("status")
            if status == "ok":
                done.append(item.id)
                self.forwarded += 1
                self.stored += _count(res.get("stored"))
                self.duplicate += _count(res.get("duplicate"))
            elif status == "rejected":
                reason = str(res.get("reason") or "unspecified")
                message = str(res.get("message") or "")
                log.warning("ledger %s rejected %s seq %d..%d: %s %s", self.name, item.dev_eui,
                            item.first_seq,
                            item.last_seq, reason, message)
                self._outbox.reject(item, reason, message, self._bit, self.name)
                self.rejected += 1
                settled += 1
            else:
                # Kept: an answer we do not understand is not an acknowledgement.
                self.errors += 1
                unsettled = item.id if unsettled is None else unsettled
                log.error("ledger answered status %r for %s seq %d..%d; kept for retry",
                          status, item.dev_eui, item.first_seq, item.last_seq)
        self._outbox.acknowledge(done, self._bit)
        settled += len(done)
        self._cursor = items[-1].id if unsettled is None else max(self._cursor, unsettled - 1)
        if not settled:
            self.failures += 1
            return None
        return settled


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
