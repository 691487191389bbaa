"""Logging set-up of the daemon: plain text for a terminal, or one JSON object
per line for journald and log shippers.

JSON lines keep the fields a caller passes with `extra=` as fields
(`log.warning("rejected uplink", extra={"dev_eui": dev, "reason": r})`), so
`journalctl -u meter-gateway -o cat | jq 'select(.reason == "bad_signature")'`
finds them without parsing sentences. A record that cannot be rendered
faithfully (arguments that do not fit the message, values JSON does not know)
is still written, as well as it can be: a log line must never be the thing
that fails.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("text", "json")

# Attributes every LogRecord has (on this Python version): anything else on a
# record came from `extra=`.
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime"}
_CORE = ("ts", "level", "logger", "msg", "exc", "stack")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601 with milliseconds),
    level, logger, msg, the `extra=` fields, exc (the traceback) and stack
    (with stack_info=True) when there are any."""

    def format(self, record: logging.LogRecord) -> str:
        try:
            return self._format(record)
        except Exception as exc:  # the last resort must not fail in turn
            return json.dumps({"ts": _timestamp(getattr(record, "created", None)),
                               "level": str(getattr(record, "levelname", "ERROR")),
                               "logger": str(getattr(record, "name", "")),
                               "msg": _safe_str(getattr(record, "msg", "")),
                               "log_error": _safe_str(exc)})

    def _format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": _message(record),
        }
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRS or key.startswith("_"):
                continue
            # A field named like one of ours is kept beside it, not over it.
            doc["x_" + key if key in _CORE else key] = value
        try:
            return json.dumps(doc, default=_safe_str, allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            # NaN, a circular structure, keys JSON cannot have: each field on
            # its own, the ones that fail as text.
            return json.dumps({k: _jsonable(v) for k, v in doc.items()})


def setup(level: str, fmt: str = "text") -> None:
    """Send the process's log records to stderr at `level` (DEBUG, INFO,
    WARNING, ERROR, CRITICAL; any case), as `fmt` "text" or "json". Replaces
    handlers set up before, so calling it again switches format."""
    name = str(level).upper()
    if name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=name, handlers=[handler], force=True)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # arguments that do not fit the format
        return f"{_safe_str(record.msg)} (arguments {_safe_repr(record.args)} could not be " \
               f"formatted: {_safe_str(exc)})"


def _timestamp(created: Any) -> str:
    try:
        t = datetime.fromtimestamp(float(created), timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        t = datetime.now(timezone.utc)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
        return value
    except Exception:
        return _safe_str(value)


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return _safe_repr(value)


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"
