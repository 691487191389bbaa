"""Command line of the gateway daemon.

    meter-gateway run --config PATH [--log-level LEVEL]
    meter-gateway check-config PATH
    meter-gateway dead-letters (--config PATH | --state-dir DIR) [--reason R] [--device EUI]
                               [--since WHEN] [--limit N] [--json] [--payload]
    meter-gateway status (--config PATH | --url URL) [--state-dir DIR] [--json]

Exit status: 0 success; 1 the daemon answers but is degraded or down, or the
state file cannot be read; 2 bad arguments or configuration; 3 (status) the
daemon does not answer. docs/gateway.md, "Commands", says more.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gateway import config, logs, sdnotify

log = logging.getLogger("gateway")

# The daemon tells systemd it is alive at least this often (more often when
# the unit's WatchdogSec= asks for it).
WATCHDOG_EVERY_S = 5.0
HTTP_TIMEOUT_S = 5.0


# -- run ----------------------------------------------------------------------

def _print_errors(path: str, errors: list[str], out) -> None:
    n = len(errors)
    print(f"{path}: {n} error{'s' if n != 1 else ''}", file=out)
    for e in errors:
        print(f"  {e}", file=out)


def cmd_run(args: argparse.Namespace) -> int:
    cfg, errors = config.check(args.config)
    if cfg is None:
        _print_errors(args.config, errors, sys.stderr)
        return 2
    logs.setup(args.log_level or cfg.log.level, cfg.log.format)
    for w in cfg.warnings:
        log.warning("config %s: %s", cfg.path, w)
    # The daemon module (and with it paho) is needed only here.
    from gateway.daemon import Gateway

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        gw = Gateway(**cfg.gateway_kwargs())
        gw.start()
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"meter-gateway: {exc}", file=sys.stderr)
        return 2
    notify = sdnotify.notify
    every = min(WATCHDOG_EVERY_S, sdnotify.watchdog_interval() or WATCHDOG_EVERY_S)
    status = cfg.status.url or "off"
    log.info("running: MQTT %s:%d topic %s, ledgers %s, status %s", cfg.mqtt.host,
             cfg.mqtt.port, gw.topic, ", ".join(led.url for led in cfg.ledgers), status)
    # Ready once started: the daemon works without a broker (it delivers
    # what is queued) and connects in the background, so a broker that is
    # down does not fail the start; STATUS= tells `systemctl status` why no
    # uplinks flow.
    notify("READY=1")
    subscribed = None
    next_ping = 0.0
    try:
        while not done.is_set():
            now_subscribed = gw.wait_ready(0)
            if now_subscribed != subscribed:
                subscribed = now_subscribed
                notify(f"STATUS=subscribed to {gw.topic}" if subscribed
                       else f"STATUS=waiting for the MQTT broker {cfg.mqtt.host}:{cfg.mqtt.port}")
                if subscribed:
                    log.info("ready: subscribed to %s", gw.topic)
            # A gateway whose threads died or hang stops pinging, so systemd's
            # watchdog restarts it; one waiting for a broker or a ledger is
            # healthy.
            if time.monotonic() >= next_ping and gw.healthy():
                notify("WATCHDOG=1")
                next_ping = time.monotonic() + every
            done.wait(min(1.0, every))
    finally:
        notify("STOPPING=1")
        gw.stop()
    return 0


# -- check-config ---------------------------------------------------------------

def _secret_source(file: Path | None, env: str | None) -> str:
    if env is not None:
        return f"${env}"
    return str(file) if file is not None else "none"


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg, errors = config.check(args.config)
    if cfg is None:
        _print_errors(args.config, errors, sys.stdout)
        return 2
    for w in cfg.warnings:
        print(f"warning: {w}")
    m, dl = cfg.mqtt, cfg.downlink
    broker = f"{'mqtts' if m.tls is not None else 'mqtt'}://{m.host}:{m.port}"
    if m.username is not None:
        broker += (f" as {m.username} (password "
                   f"{_secret_source(m.password_file, m.password_env)})")
    print(f"ok: {cfg.path}")
    print(f"  gateway     {cfg.name or '(host name)'}")
    print(f"  broker      {broker}, application {m.application_id}, "
          f"marshaler {m.marshaler}")
    for i, led in enumerate(cfg.ledgers):
        print(f"  {'ledgers' if i == 0 else '':<11} {led.url} "
              f"(token {_secret_source(led.token_file, led.token_env)})")
    print(f"  state dir   {cfg.state_dir}")
    keys = (f"{cfg.command_key_count} command keys from {dl.command_keys}"
            if dl.command_keys is not None else "no command keys: no commands are sent")
    via = f"grpc {dl.grpc_url}" if dl.via == "grpc" else "mqtt"
    print(f"  downlinks   via {via}, {keys}")
    endpoint = f"{cfg.status.url} (/health, /stats, /metrics)" if cfg.status.url else "off"
    print(f"  status      {endpoint}")
    print(f"  log         {cfg.log.level}, {cfg.log.format}")
    return 0


# -- dead-letters ----------------------------------------------------------------

_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd])\Z")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _when(text: str) -> float:
    """Unix seconds from "2026-11-20", "2026-11-20T08:00Z" (no zone: UTC), a
    unix time, or an age such as 90m, 6h, 2d."""
    age = _AGE.match(text.strip())
    if age:
        return time.time() - float(age.group(1)) * _UNIT_S[age.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give 2026-11-20, 2026-11-20T08:00Z (UTC unless a zone "
            f"is given), a unix time, or an age like 90m, 6h, 2d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _dev_eui(text: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{16}", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DevEUI (16 hex digits)")
    return text.lower()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def _utc(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _duration(s: float) -> str:
    for unit, size, above in (("d", 86400, 172800), ("h", 3600, 7200), ("min", 60, 120)):
        if s >= above:
            return f"{s / size:.0f} {unit}"
    return f"{max(0.0, s):.0f} s"


def _ago(ts: float, now: float) -> str:
    return _duration(now - ts) + " ago"


def _payload_text(payload: bytes, cut: bool) -> str | None:
    """The payload as text when it reads as such (ChirpStack's JSON events
    do, even cut at the stored 4 KiB); None for binary."""
    text = None
    # A cut may have split the last character (up to 3 more bytes of it).
    for drop in range(4 if cut else 1):
        try:
            text = payload[:len(payload) - drop].decode()
            break
        except UnicodeDecodeError:
            continue
    if not text or text.lstrip()[:1] not in ("{", "["):
        return None
    if not all(c.isprintable() or c in "\n\r\t" for c in text):
        return None
    return text


def _state_file(state_dir: str | os.PathLike) -> Path:
    from gateway.daemon import OUTBOX_FILE
    return Path(state_dir) / OUTBOX_FILE


def cmd_dead_letters(args: argparse.Namespace) -> int:
    try:
        path = _state_file(args.state_dir if args.state_dir is not None
                           else config.load(args.config, files=False).state_dir)
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not path.is_file():
        print(f"meter-gateway: no state file {path}", file=sys.stderr)
        return 1
    from gateway import outbox
    try:
        rows = outbox.read_dead_letters(path, reason=args.reason, dev_eui=args.device,
                                        since=args.since, limit=args.limit)
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        print(f"meter-gateway: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for r in rows:
            doc = {k: r[k] for k in ("id", "received_at", "topic", "dev_eui", "reason",
                                     "message", "size")}
            doc["time"] = datetime.fromtimestamp(r["received_at"], timezone.utc).isoformat()
            if args.payload:
                doc["payload"] = r["payload"].hex()
                text = _payload_text(r["payload"], len(r["payload"]) < r["size"])
                if text is not None:
                    doc["payload_text"] = text
            print(json.dumps(doc, sort_keys=True))
        return 0
    if not rows:
        print("no dead letters" + (" that match" if args.reason or args.device or args.since
                                   else ""))
        return 0
    print(f"{'time (UTC)':<19}  {'device':<16}  {'reason':<18}  {'size':>6}  message")
    for r in rows:
        print(f"{_utc(r['received_at'])}  {r['dev_eui'] or '-':<16}  {r['reason']:<18}  "
              f"{r['size']:>6}  {r['message']}")
        if args.payload:
            payload = r["payload"]
            cut = f" (first {len(payload)} of {r['size']} bytes)" if len(payload) < r["size"] \
                else ""
            text = _payload_text(payload, len(payload) < r["size"])
            shown = text if text is not None else payload.hex()
            print(f"    payload{cut}: {shown}")
    if len(rows) == args.limit:
        print(f"(the newest {args.limit}; --limit N shows more)", file=sys.stderr)
    return 0


# -- status -------------------------------------------------------------------------

def _get_json(url: str) -> dict[str, Any]:
    """The JSON document at url; /health answers 503 with a body when down."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code != 503:
            raise OSError(f"{url} answered HTTP {exc.code}") from None
        body = exc.read()
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError(f"{url} did not answer a JSON object")
    return doc


def _view(url: str, health: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """What an operator looks at first, from /health and /stats. Keys a
    daemon of another version does not report are left out."""
    ledgers = stats.get("ledgers")
    if not isinstance(ledgers, list):  # a daemon with one ledger reports it alone
        one = dict(stats.get("ledger") or {})
        one.setdefault("forwarded", stats.get("forwarded"))
        ledgers = [one]
    queue = stats.get("queue")
    if not isinstance(queue, dict):
        queue = {"depth": stats.get("outbox_depth")}
    view = {
        "reachable": True,
        "url": url,
        "status": health.get("status", "down"),
        "name": stats.get("name"),
        "uptime_s": stats.get("uptime_s"),
        "mqtt_connected": bool(stats.get("mqtt_connected", health.get("mqtt_connected"))),
        "ledgers": [{k: led.get(k) for k in ("name", "url", "failing", "last_success_at",
                                            "forwarded", "errors", "rejected")}
                    for led in ledgers],
        "queue": {k: queue.get(k) for k in ("depth", "capacity", "fill_pct", "full")},
        "bundles": stats.get("bundles"),
        "verified": stats.get("verified"),
        "duplicates": stats.get("duplicates"),
        "rejected": stats.get("rejected") or {},
        "rejected_total": stats.get("rejected_total", 0),
        "dead_letters": stats.get("dead_letters"),
        "downlinks_pending": (stats.get("downlinks") or {}).get("pending"),
    }
    return view


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _print_view(v: dict[str, Any], now: float) -> None:
    up = f", up {_duration(v['uptime_s'])}" if v.get("uptime_s") else ""
    print(f"gateway {v['name'] or '?'} at {v['url']}: {v['status']}{up}")
    print(f"  broker        {'connected' if v['mqtt_connected'] else 'NOT CONNECTED'}")
    for i, led in enumerate(v["ledgers"]):
        label = led.get("url") or led.get("name") or "ledger"
        if led.get("name") and led.get("url") and led["name"] != led["url"]:
            label = f"{led['name']} ({led['url']})"
        state = "FAILING" if led.get("failing") else "reachable"
        last = led.get("last_success_at")
        last_text = f"{_utc(last)} UTC ({_ago(last, now)})" if last else "never"
        extra = f", {led['forwarded']} forwarded" if led.get("forwarded") is not None else ""
        if led.get("errors"):
            extra += f", {led['errors']} errors"
        print(f"  {'ledgers' if i == 0 else '':<13} {label}: {state}, last success "
              f"{last_text}{extra}")
    q = v["queue"]
    if q.get("depth") is not None:
        of = f" of {q['capacity']}" if q.get("capacity") else ""
        fill = f" ({q['fill_pct']:.1f} % full)" if q.get("fill_pct") is not None else ""
        full = "; FULL: uplinks wait in the broker" if q.get("full") else ""
        print(f"  queue         {q['depth']}{of} bundles waiting for the ledgers{fill}{full}")
    if v.get("verified") is not None:
        dups = f", {v['duplicates']} duplicates dropped" if v.get("duplicates") else ""
        print(f"  verified      {v['verified']} readings in {v.get('bundles', 0)} bundles{dups}")
    rej = v["rejected"]
    print(f"  rejected      {v['rejected_total']}" + (f": {_by_reason(rej)}" if rej else ""))
    if v.get("dead_letters") is not None:
        print(f"  dead letters  {v['dead_letters']}")
    if v.get("downlinks_pending") is not None:
        print(f"  downlinks     {v['downlinks_pending']} waiting for the meter's "
              f"acknowledgement")


def _state_summary(path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    if path is None:
        return None, "no state directory given (--state-dir)"
    if not path.is_file():
        return None, f"no state file {path}"
    from gateway import outbox
    try:
        return outbox.read_summary(path), None
    except (sqlite3.Error, OSError, RuntimeError) as exc:
        return None, f"cannot read {path}: {exc}"


def cmd_status(args: argparse.Namespace) -> int:
    state_dir: Path | None = Path(args.state_dir) if args.state_dir else None
    if args.config is not None:
        try:
            cfg = config.load(args.config, files=False)
        except config.ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        url = cfg.status.url
        state_dir = state_dir or cfg.state_dir
        why = "its status endpoint is off ([status] listen = \"\")" if url is None else ""
    else:
        url = args.url.rstrip("/")
        why = ""
    now = time.time()
    if url is not None:
        try:
            health = _get_json(url + "/health")
            stats = _get_json(url + "/stats")
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            why = f"no answer from {url} ({getattr(reason, 'strerror', None) or reason})"
        else:
            view = _view(url, health, stats)
            if args.json:
                print(json.dumps(view, sort_keys=True))
            else:
                _print_view(view, now)
            return 0 if view["status"] == "ok" else 1

    path = _state_file(state_dir) if state_dir is not None else None
    summary, trouble = _state_summary(path)
    if args.json:
        print(json.dumps({"reachable": False, "url": url, "error": why,
                          "state_file": str(path) if path else None, "state": summary,
                          "state_error": trouble}, sort_keys=True))
        return 3
    print(f"the gateway is not answering: {why}. It is not running, or not reachable from "
          f"here.")
    if summary is None:
        print(f"state: {trouble}")
        return 3
    print(f"its state file {path} says:")
    oldest = summary.get("oldest_pending_at")
    age = f", the oldest from {_utc(oldest)} UTC ({_ago(oldest, now)})" if oldest else ""
    print(f"  queue         {summary.get('queue_depth')} bundles waiting for the ledgers{age}")
    dead = summary.get("dead_letters_by_reason") or {}
    print(f"  dead letters  {summary.get('dead_letters')}"
          + (f": {_by_reason(dead)}" if dead else ""))
    print(f"  refused by the ledger  {summary.get('ledger_rejected')}")
    if summary.get("downlinks_pending") is not None:
        print(f"  downlinks     {summary['downlinks_pending']} waiting for the meter's "
              f"acknowledgement")
    if summary.get("devices") is not None:
        print(f"  devices       {summary['devices']}")
    return 3


# -- the parser ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway",
        description="Verify signed meter readings from ChirpStack MQTT, forward them "
                    "to the ledger and ask meters for readings that went missing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon until SIGINT/SIGTERM")
    run.add_argument("--config", required=True, metavar="PATH",
                     help="the configuration file (TOML), e.g. /etc/meter-gateway/config.toml")
    run.add_argument("--log-level", type=str.upper, choices=config.LOG_LEVELS,
                     help="instead of [log] level")
    run.set_defaults(func=cmd_run)

    chk = sub.add_parser("check-config", help="check a configuration file: every error at "
                                              "once, or ok and what would run")
    chk.add_argument("config", metavar="PATH")
    chk.set_defaults(func=cmd_check_config)

    dl = sub.add_parser("dead-letters", help="list uplinks set aside as undeliverable, "
                                             "newest first")
    where = dl.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="PATH", help="take the state directory from here")
    where.add_argument("--state-dir", metavar="DIR")
    dl.add_argument("--reason", metavar="R", help="only this rejection reason, e.g. "
                                                  "bad_signature")
    dl.add_argument("--device", type=_dev_eui, metavar="EUI", help="only this device")
    dl.add_argument("--since", type=_when, metavar="WHEN",
                    help="only from then: 2026-11-20, 2026-11-20T08:00Z, a unix time, "
                         "or an age like 90m, 6h, 2d")
    dl.add_argument("--limit", type=_positive, default=100, metavar="N",
                    help="at most N (default 100)")
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    dl.add_argument("--payload", action="store_true",
                    help="with the stored payload (text when it is JSON, else hex)")
    dl.set_defaults(func=cmd_dead_letters)

    st = sub.add_parser("status", help="ask the running daemon how it is; the state file "
                                       "when it does not answer")
    where = st.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", metavar="PATH", help="take the status address and the "
                                                        "state directory from here")
    where.add_argument("--url", metavar="URL", help="the status endpoint, e.g. "
                                                    "http://127.0.0.1:8481")
    st.add_argument("--state-dir", metavar="DIR",
                    help="the state to read when the daemon does not answer "
                         "(default: from --config)")
    st.add_argument("--json", action="store_true", help="one JSON object")
    st.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
