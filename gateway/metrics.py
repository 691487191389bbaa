"""The gateway's stats() as Prometheus text exposition (format 0.0.4), for GET /metrics.

Rendered from the same dict as GET /stats, so the two never disagree and the
daemon keeps one set of counters. A key the dict does not have (a gateway of
an older version, a value not known while stopping) is left out rather than
reported as 0: a missing series tells an operator "not known", a zero would
claim a fact.

Counter names end in `_total`, as Prometheus expects; the known rejection
reasons are always exported (0 until one happens), so an alert on
`increase(...{reason="bad_signature"}[1h]) > 0` fires at the first one
instead of waiting for the series to exist.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

PREFIX = "meter_gateway_"

# Content type of the text format this module writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The reasons an uplink is refused for (docs/gateway.md, "Rejections").
REJECTION_REASONS = (
    "oversized_message", "malformed_json", "malformed_event", "topic_mismatch",
    "empty", "truncated", "oversized", "version", "type", "field", "fragment",
    "unknown_device", "bad_key", "bad_signature", "replay", "fragment_conflict",
    "incomplete", "internal_error",
)

# (stats key, metric name without prefix and suffix, help)
_COUNTERS = (
    ("received", "uplinks_received", "MQTT uplink messages taken from the broker."),
    ("bundles", "bundles_queued", "Bundles verified and queued for the ledger (whole or "
                                  "joined from fragments)."),
    ("verified", "readings_verified", "Readings in queued bundles that were new."),
    ("duplicates", "duplicates_dropped", "Uplinks dropped as repeats of what was already "
                                         "accepted."),
    ("storage_errors", "storage_errors", "Failed writes to the state file (each retried)."),
)
_DOWNLINK_COUNTERS = (
    ("sent", "Downlink commands handed to the network server."),
    ("acked", "Confirmed downlinks the meter acknowledged."),
    ("nacked", "Confirmed downlinks not acknowledged by the meter."),
    ("retried", "Downlink attempts repeated after no acknowledgement."),
    ("expired", "Downlinks given up because their command expired."),
    ("failed", "Downlinks that could not be delivered after every attempt."),
)
# (key in a ledgers[] entry, metric name, help)
_LEDGER_COUNTERS = (
    ("forwarded", "ledger_forwarded_bundles", "Bundles the ledger node answered ok for."),
    ("stored", "ledger_stored_readings", "Readings the ledger node stored."),
    ("duplicate", "ledger_duplicate_readings", "Readings the ledger node already held."),
    ("rejected", "ledger_rejected_bundles", "Bundles the ledger node refused."),
    ("errors", "ledger_errors", "Failed deliveries to the ledger node (each retried)."),
)


def render(stats: dict[str, Any]) -> str:
    """The exposition text for one stats() dict (ends with a newline)."""
    out = _Writer()
    s = stats if isinstance(stats, dict) else {}

    name = s.get("name")
    if isinstance(name, str):
        out.family("info", "gauge", "The gateway's name (constant 1).", [({"name": name}, 1)])

    for key, metric, help_ in _COUNTERS:
        out.single(metric + "_total", "counter", help_, s.get(key))
    rejected = s.get("rejected")
    if isinstance(rejected, dict):
        by_reason = {r: 0 for r in REJECTION_REASONS}
        by_reason.update({str(r): n for r, n in rejected.items()})
        out.family("uplinks_rejected_total", "counter", "Uplinks refused, by reason.",
                   [({"reason": r}, n) for r, n in sorted(by_reason.items())])
    ports = s.get("other_ports")
    if isinstance(ports, dict):
        out.family("uplinks_other_port_total", "counter",
                   "Uplinks on an fPort the gateway does not read, by port.",
                   [({"port": str(p)}, n) for p, n in sorted(ports.items(), key=_port_order)])

    fragments = _dict(s, "fragments")
    out.single("fragments_received_total", "counter", "New fragment pieces stored.",
               fragments.get("received"))
    out.single("fragments_repeated_total", "counter", "Fragment pieces received again.",
               fragments.get("repeated"))
    out.single("fragments_joined_total", "counter", "Fragment sets completed and joined.",
               fragments.get("joined"))

    gaps = _dict(s, "gaps")
    out.single("gaps_given_up_total", "counter",
               "Gaps no longer tracked (a device with too many separate runs of readings).",
               gaps.get("given_up"))

    commands = _dict(s, "commands")
    by_op = commands.get("by_op")
    if isinstance(by_op, dict):
        out.family("commands_sent_total", "counter", "Downlink commands sent, by operation.",
                   [({"op": str(op)}, n) for op, n in sorted(by_op.items(), key=_str_order)])
    failed = commands.get("failed")
    if isinstance(failed, dict):
        out.family("commands_failed_total", "counter", "Downlink commands not sent, by reason.",
                   [({"reason": str(r)}, n) for r, n in sorted(failed.items(), key=_str_order)])
    out.single("resend_requests_total", "counter", "Resend requests sent to meters.",
               commands.get("resend_requests"))

    downlinks = _dict(s, "downlinks")
    for key, help_ in _DOWNLINK_COUNTERS:
        out.single(f"downlinks_{key}_total", "counter", help_, downlinks.get(key))

    queue = _dict(s, "queue")
    depth = queue.get("depth", s.get("outbox_depth"))
    out.single("queue_depth", "gauge", "Bundles waiting for the ledger.", depth)
    out.single("queue_capacity", "gauge", "Bundles the queue holds before the gateway stops "
                                          "taking uplinks from the broker.",
               queue.get("capacity"))
    fill = _number(queue.get("fill_pct"))
    out.single("queue_fill_ratio", "gauge", "Queue depth over capacity (0..1).",
               None if fill is None else fill / 100)
    out.single("queue_full", "gauge", "1 while the queue is full and uplinks wait in the "
                                      "broker (backpressure).", queue.get("full"))
    out.single("dead_letters", "gauge", "Refused MQTT messages held in the dead-letter store.",
               s.get("dead_letters"))
    out.single("devices", "gauge", "Device keys known.", s.get("devices"))
    out.single("command_keys", "gauge", "Command keys loaded.", commands.get("keys"))
    out.single("mqtt_connected", "gauge", "1 while connected to the MQTT broker.",
               s.get("mqtt_connected"))
    out.single("uptime_seconds", "gauge", "Seconds since the daemon started.",
               s.get("uptime_s"))
    out.single("gap_devices", "gauge", "Devices with a gap in their readings.",
               gaps.get("devices"))
    out.single("gaps_missing_readings", "gauge", "Readings missing in all gaps now.",
               gaps.get("missing"))
    out.single("fragment_sets_incomplete", "gauge", "Fragment sets held, not yet complete.",
               fragments.get("incomplete_sets"))
    out.single("downlinks_pending", "gauge", "Downlinks waiting for an acknowledgement.",
               downlinks.get("pending"))

    ledgers = _ledgers(s)
    for key, metric, help_ in _LEDGER_COUNTERS:
        out.family(metric + "_total", "counter", help_,
                   [({"ledger": lname}, led.get(key)) for lname, led in ledgers])
    out.family("ledger_failing", "gauge", "1 while deliveries to the ledger node fail.",
               [({"ledger": lname}, led.get("failing")) for lname, led in ledgers])
    out.family("ledger_last_success_timestamp_seconds", "gauge",
               "Unix time of the last answer from the ledger node.",
               [({"ledger": lname}, led.get("last_success_at")) for lname, led in ledgers])
    out.histogram("ledger_latency_seconds", "Time the ledger node took to answer a batch.",
                  [(lname, led.get("latency")) for lname, led in ledgers])
    return out.text()


def _ledgers(s: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, entry) per ledger node. A stats dict from before several
    ledgers had one `ledger` entry and `forwarded` at the top."""
    entries = s.get("ledgers")
    if not isinstance(entries, list):
        single = s.get("ledger")
        if not isinstance(single, dict):
            return []
        entries = [dict(single, forwarded=s.get("forwarded"))]
    out = []
    for i, led in enumerate(entries):
        if not isinstance(led, dict):
            continue
        label = led.get("name") or led.get("url") or str(i)
        out.append((str(label), led))
    return out


class _Writer:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def text(self) -> str:
        return "\n".join(self._lines) + "\n" if self._lines else ""

    def single(self, name: str, kind: str, help_: str, value: Any) -> None:
        self.family(name, kind, help_, [({}, value)])

    def family(self, name: str, kind: str, help_: str,
               samples: Iterable[tuple[dict[str, str], Any]]) -> None:
        """HELP, TYPE and the samples with a usable value; nothing when none is."""
        lines = []
        for labels, value in samples:
            v = _number(value)
            if v is not None:
                lines.append(f"{PREFIX}{name}{_labels(labels)} {_format(v)}")
        if lines:
            self._header(name, kind, help_)
            self._lines.extend(lines)

    def histogram(self, name: str, help_: str, series: list[tuple[str, Any]]) -> None:
        lines = []
        for ledger, h in series:
            if not isinstance(h, dict):
                continue
            count, total = _number(h.get("count")), _number(h.get("sum"))
            buckets = _buckets(h.get("buckets"), count)
            if count is None or total is None or buckets is None:
                continue
            for le, n in buckets:
                lines.append(f"{PREFIX}{name}_bucket{_labels({'ledger': ledger, 'le': le})} "
                             f"{_format(n)}")
            lines.append(f"{PREFIX}{name}_sum{_labels({'ledger': ledger})} {_format(total)}")
            lines.append(f"{PREFIX}{name}_count{_labels({'ledger': ledger})} {_format(count)}")
        if lines:
            self._header(name, "histogram", help_)
            self._lines.extend(lines)

    def _header(self, name: str, kind: str, help_: str) -> None:
        self._lines.append(f"# HELP {PREFIX}{name} {_escape_help(help_)}")
        self._lines.append(f"# TYPE {PREFIX}{name} {kind}")


def _buckets(raw: Any, count: float | None) -> list[tuple[str, float]] | None:
    """Cumulative buckets sorted by bound, `le` written as Prometheus' own
    clients write it ("1.0", "+Inf"), ending with +Inf (which equals the
    count); None when the buckets cannot be read."""
    if not isinstance(raw, dict) or count is None:
        return None
    bounds: dict[float, float] = {}
    for key, n in raw.items():
        v = _number(n)
        try:
            bound = float(key)
        except (TypeError, ValueError):
            return None
        if v is None or math.isnan(bound):
            return None
        bounds[bound] = v
    bounds.setdefault(math.inf, count)
    return [(_format(b), n) for b, n in sorted(bounds.items())]


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    return None


def _format(v: float | int) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _dict(s: dict[str, Any], key: str) -> dict[str, Any]:
    value = s.get(key)
    return value if isinstance(value, dict) else {}


def _port_order(item: tuple[Any, Any]) -> tuple[int, str]:
    port = str(item[0])
    return (int(port), "") if port.isdigit() else (1 << 30, port)


def _str_order(item: tuple[Any, Any]) -> str:
    return str(item[0])
