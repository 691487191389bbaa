"""`ledger-node`: serve the ledger over HTTP, or check a ledger database offline.

    ledger-node serve --db ledger.db --listen 127.0.0.1:8480 [--token TOKEN]
    ledger-node check --db ledger.db [--json]

The writer token can also come from the LEDGER_NODE_TOKEN environment
variable, which keeps it out of the process list. `check` exits 0 when the
database is consistent, 1 when it found problems, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from .check import check_store
from .store import Store, StoreError

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_ERROR = 2


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} outside 0..65535")
    return host, number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger-node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--db", required=True, help="SQLite file (created if missing)")
    serve.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8480),
                       metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8480)")
    serve.add_argument("--token", default=os.environ.get("LEDGER_NODE_TOKEN"),
                       help="bearer token writers must present (default: $LEDGER_NODE_TOKEN; "
                            "none means no authentication)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    check = sub.add_parser("check", help="verify a ledger database offline")
    check.add_argument("--db", required=True, help="SQLite file to check")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def serve(args) -> int:
    from .server import LedgerServer

    host, port = args.listen
    server = LedgerServer(args.db, host=host, port=port, token=args.token)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (StoreError, OSError) as exc:
        print(f"ledger-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not args.token:
        logging.getLogger("ledger_node").warning(
            "no token configured: anyone who can reach %s may write", server.url)
    # Print the bound address so scripts that asked for port 0 can find it.
    print(f"ledger-node listening on {server.url}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return EXIT_OK


def check(args) -> int:
    try:
        store = Store(args.db, create=False)
    except StoreError as exc:
        print(f"ledger-node: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with store:
        report = check_store(store)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for p in report["problems"]:
            print(f"{p['kind']}: dev_eui={p['dev_eui']} bundle={p['bundle_id']} "
                  f"entry={p['entry_id']} seq={p['seq']}: {p['message']}")
        hidden = report["problems_total"] - len(report["problems"])
        if hidden:
            print(f"... and {hidden} more problems")
        verdict = "consistent" if report["ok"] else f"{report['problems_total']} problem(s)"
        print(f"{args.db}: {report['readings']} readings in {report['bundles']} bundles from "
              f"{report['devices']} devices: "
              f"{verdict}")
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        return serve(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
