"""Command line of the gateway daemon (`meter-gateway run ...`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from gateway.daemon import Gateway


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} outside 0..65535")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meter-gateway",
        description="Verify signed meter readings from ChirpStack MQTT, forward them "
                    "to the ledger and ask meters for readings that went missing.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon until SIGINT/SIGTERM")
    run.add_argument("--mqtt-host", default="127.0.0.1", help="MQTT broker host")
    run.add_argument("--mqtt-port", type=_port, default=1883, help="MQTT broker port")
    run.add_argument("--ledger", required=True, metavar="URL",
                     help="ledger node base URL, e.g. http://127.0.0.1:8480")
    run.add_argument("--ledger-token", metavar="T",
                     default=os.environ.get("METER_LEDGER_TOKEN"),
                     help="bearer token for the ledger (default: $METER_LEDGER_TOKEN)")
    run.add_argument("--state-dir", required=True, metavar="DIR",
                     help="outbox and device key cache live here")
    run.add_argument("--application-id", default="+", metavar="ID",
                     help="ChirpStack application id to subscribe to, '+' for all")
    run.add_argument("--status-port", type=_port, metavar="N",
                     help="serve GET /health and /stats on 127.0.0.1:N")
    run.add_argument("--name", help="gateway name sent to the ledger and used in the "
                                    "MQTT client id (default: host name)")
    run.add_argument("--command-keys", metavar="PATH",
                     help="JSON object {dev_eui: 16-byte command key in hex}; without it no "
                          "downlink commands are sent")
    run.add_argument("--fragment-ttl", type=_seconds, default=48 * 3600.0, metavar="S",
                     help="drop a fragment set still incomplete after S seconds (default 48 h)")
    run.add_argument("--resend-after", type=_seconds, default=2 * 3600.0, metavar="S",
                     help="ask for missing readings once their gap is S seconds old "
                          "(default 2 h)")
    run.add_argument("--resend-max-per-day", type=_count, default=4, metavar="N",
                     help="at most N resend requests per device in 24 h (default 4, 0: none)")
    run.add_argument("--resend-min-interval", type=_seconds, default=3600.0, metavar="S",
                     help="at least S seconds between resend requests to one device "
                          "(default 1 h)")
    run.add_argument("--log-level", default="INFO",
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gw = Gateway(args.mqtt_host, args.mqtt_port, args.ledger, args.state_dir,
                     application_id=args.application_id, ledger_token=args.ledger_token,
                     status_port=args.status_port, name=args.name,
                     command_keys=args.command_keys, fragment_ttl_s=args.fragment_ttl,
                     resend_after_s=args.resend_after,
                     resend_max_per_day=args.resend_max_per_day,
                     resend_min_interval_s=args.resend_min_interval)
        gw.start()
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"meter-gateway: {exc}", file=sys.stderr)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    status = f", status on 127.0.0.1:{gw.status_port}" if gw.status_port is not None else ""
    logging.getLogger("gateway").info("running: MQTT %s:%d topic %s, ledger %s%s",
                                      args.mqtt_host, args.mqtt_port, gw.topic, args.ledger,
                                      status)
    try:
        while not done.wait(1.0):
            pass
    finally:
        gw.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
