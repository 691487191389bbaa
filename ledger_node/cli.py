"""`ledger-node`: serve the log, follow one as a witness, export it, check a database, make keys.

    ledger-node serve   --db ledger.db --key ledger.key [--origin NAME] --listen 127.0.0.1:8480
                        [--token T] [--admin-token T] [--witness VKEY ...] [--checkpoint-interval S]
    ledger-node witness --log URL --key witness.key --log-key VKEY --state witness.json
    ledger-node keygen  --name NAME --out FILE [--witness]
    ledger-node export  --db ledger.db --out ledger.export
    ledger-node check   --db ledger.db [--json]
    ledger-node pseudonym --secret-file FILE CUSTOMER_REFERENCE

Tokens can also come from the LEDGER_NODE_TOKEN and LEDGER_NODE_ADMIN_TOKEN
environment variables, which keeps them out of the process list. `check`
exits 0 when the database is consistent, 1 when it found problems, 2 when it
could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import checkpoint, note
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


def _cosigner_vkey(value: str) -> str:
    try:
        return checkpoint.CosignatureVerifier(value).vkey
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a witness (cosignature/v1) key: {exc}") from None


def _parser() -> argparse.ArgumentParser:
    from . import witness

    parser = argparse.ArgumentParser(prog="ledger-node", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the log over HTTP")
    serve.add_argument("--db", required=True, help="SQLite file (created if missing)")
    serve.add_argument("--key", help="the log's note signing key file (created with a new key "
                                     "if missing; default: the database path + '.key')")
    serve.add_argument("--origin", help="the log's name when a new key is created "
                                        "(e.g. ledger.example.org/north)")
    serve.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 8480),
                       metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8480)")
    serve.add_argument("--token", default=os.environ.get("LEDGER_NODE_TOKEN"),
                       help="bearer token gateways present to append readings (default: "
                            "$LEDGER_NODE_TOKEN; none means no authentication)")
    serve.add_argument("--admin-token", default=os.environ.get("LEDGER_NODE_ADMIN_TOKEN"),
                       help="bearer token for registry changes (default: "
                            "$LEDGER_NODE_ADMIN_TOKEN, else the writer token)")
    serve.add_argument("--witness", action="append", default=[], type=_cosigner_vkey,
                       metavar="VKEY", help="a witness's verifier key whose cosignatures the "
                                            "log keeps (repeat for each witness)")
    serve.add_argument("--checkpoint-interval", type=float, default=1.0, metavar="SECONDS",
                       help="sign a checkpoint this often when the log has grown (default 1)")
    serve.add_argument("--log-level", default="INFO",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    wit = sub.add_parser("witness", help="follow a log, check it and cosign its checkpoints")
    witness.add_arguments(wit)
    wit.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    keygen = sub.add_parser("keygen", help="make a note signing key (log or witness)")
    keygen.add_argument("--name", required=True, help="key name: the log's origin, or the "
                                                      "witness's name")
    keygen.add_argument("--out", required=True, help="file for the signing key (mode 0600)")
    keygen.add_argument("--witness", action="store_true",
                        help="a witness key (cosignature/v1) instead of a log key")

    exp = sub.add_parser("export", help="write the whole log to a file for ledger-verify audit")
    exp.add_argument("--db", required=True)
    exp.add_argument("--out", required=True, help="export file ('-' for standard output)")

    check = sub.add_parser("check", help="verify a ledger database offline")
    check.add_argument("--db", required=True, help="SQLite file to check")
    check.add_argument("--json", action="store_true", help="print the report as JSON")

    pseudo = sub.add_parser("pseudonym", help="the owner id to enroll for a customer: an HMAC "
                                              "of the reference under a secret kept off the log")
    pseudo.add_argument("--secret-file", required=True)
    pseudo.add_argument("reference", help="the customer reference (stays out of the log)")
    return parser


def serve(args) -> int:
    from .server import LedgerServer

    host, port = args.listen
    try:
        server = LedgerServer(args.db, host=host, port=port, token=args.token,
                              admin_token=args.admin_token, key_file=args.key,
                              origin=args.origin, witnesses=args.witness,
                              checkpoint_interval_s=args.checkpoint_interval)
    except (StoreError, OSError, ValueError) as exc:
        print(f"ledger-node: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
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
    print(f"ledger-node log key {server.vkey}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return EXIT_OK


def keygen(args) -> int:
    try:
        if args.witness:
            skey, vkey = checkpoint.generate_cosigner_key(args.name)
        else:
            skey, vkey = note.generate_key(args.name)
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except (ValueError, OSError) as exc:
        print(f"ledger-node: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with os.fdopen(fd, "w") as f:
        f.write(skey + "\n")
    print(vkey)
    return EXIT_OK


def export_log(args) -> int:
    from . import export

    try:
        store = Store(args.db, create=False)
    except StoreError as exc:
        print(f"ledger-node: {exc}", file=sys.stderr)
        return EXIT_ERROR
    with store:
        if args.out == "-":
            n = export.write_export(store, sys.stdout.buffer)
        else:
            tmp = Path(args.out + ".part")
            with open(tmp, "wb") as f:
                n = export.write_export(store, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, args.out)
    print(f"exported {n} entries", file=sys.stderr)
    return EXIT_OK


def check(args) -> int:
    from .check import check_store
    from .verify import problem_lines

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
        for line in problem_lines(report):
            print(line)
        verdict = "consistent" if report["ok"] else f"{report['problems_total']} problem(s)"
        print(f"{args.db}: {report['entries']} entries, {report['readings']} readings from "
              f"{report['devices']} devices: {verdict}")
    return EXIT_OK if report["ok"] else EXIT_PROBLEMS


def pseudonym(args) -> int:
    try:
        secret = Path(args.secret_file).read_bytes().strip()
    except OSError as exc:
        print(f"ledger-node: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if len(secret) < 16:
        print("ledger-node: the secret must be at least 16 bytes", file=sys.stderr)
        return EXIT_ERROR
    print(owner_pseudonym(secret, args.reference))
    return EXIT_OK


def owner_pseudonym(secret: bytes, reference: str) -> str:
    """The owner id enrolled for a customer: 32 hex digits of HMAC-SHA256.
    Without the secret nobody can tell whose meter it is; with it, the
    operator can find a customer's meters (and forget them by losing it)."""
    return hmac.new(secret, reference.encode(), hashlib.sha256).hexdigest()[:32]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "witness":
        from . import witness
        return witness.run_cli(args)
    return {"serve": serve, "keygen": keygen, "export": export_log, "check": check,
            "pseudonym": pseudonym}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
