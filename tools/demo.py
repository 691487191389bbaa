"""The simulated deployment, end to end, for a bounded time.

    make demo [DEMO_SECONDS=60] [DEMO_METERS=3]
    python -m tools.demo --seconds 60 --meters 3

Starts Mosquitto, the ledger node, the modem simulator, the gateway and the
meters (the real firmware in MicroPython: two ESP32 boards and a Pico on
different homes), shows a live table of readings per meter, injects a few
malformed and forged uplinks to show they are refused, then stops the meters,
lets the gateway drain, prints a summary (sent, verified, stored, rejected)
and the ledger's consistency check, and shuts everything down.
Exit status 0 only if every reading the gateway verified reached the ledger and
the ledger is consistent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tools.deployment import Deployment, default_fleet


def _table(dep: Deployment) -> list[str]:
    try:
        led = dep.ledger_stats().get("per_device", {})
    except OSError:
        led = {}
    rows = [f"  {'meter':<16} {'board':<6} {'seq':>4} {'Irms A':>7} {'P W':>8} {'meter Wh':>10}"
            f" {'ledger seq':>10} {'ledger Wh':>10}"]
    for m in dep.fleet:
        recs = dep.readings.get(m.name) or []
        last = recs[-1] if recs else {}
        d = led.get(m.dev_eui, {})
        lwh = (d.get("import_dwh", 0) - d.get("export_dwh", 0)) / 10 if d else None
        rows.append(
            f"  {m.name:<16} {m.board:<6} {last.get('seq', '-'):>4} "
            f"{last.get('irms_a', 0):>7.2f} {last.get('p_w', 0):>8.0f} "
            f"{last.get('energy_wh', 0):>10.1f} {d.get('latest_seq', '-'):>10} "
            f"{f'{lwh:.1f}' if lwh is not None else '-':>10}")
    return rows


def run(seconds: float, n_meters: int, workdir: Path, speed: float, interval_s: int,
        out=sys.stdout) -> int:
    fleet = default_fleet(n_meters)
    trace_s = seconds * speed + 4 * interval_s
    dep = Deployment(workdir, fleet, speed=speed, interval_s=interval_s, trace_s=trace_s)
    print(f"demo: {n_meters} meters, {seconds:.0f} s at {speed:g}x "
          f"({seconds * speed / 60:.0f} simulated minutes, a reading every {interval_s} s); "
          f"working in {workdir}", file=out, flush=True)
    t_start = time.monotonic()
    rc = 1
    try:
        print("demo: generating traces, starting broker, ledger, modem simulator, gateway; "
              "provisioning meters", file=out, flush=True)
        dep.start()
        print(f"demo: ledger {dep.ledger_url}, gateway status {dep.gateway_status_url}, "
              f"broker 127.0.0.1:{dep.broker.port}", file=out, flush=True)
        injected = False
        deadline = time.monotonic() + seconds
        next_print = 0.0
        while time.monotonic() < deadline:
            if not dep.meters_alive():
                print("demo: a meter stopped early; its log:", file=out)
                for sm in dep.meters.values():
                    if sm.proc.poll() is not None:
                        print(sm.log_tail(), file=out)
                break
            if not injected and time.monotonic() > deadline - seconds / 2:
                dep.inject_bad_uplinks()
                injected = True
                print("demo: injected forged and malformed uplinks", file=out, flush=True)
            if time.monotonic() >= next_print:
                el = time.monotonic() - t_start
                print(f"\n[{el:5.0f} s]", file=out)
                print("\n".join(_table(dep)), file=out, flush=True)
                next_print = time.monotonic() + max(2.0, seconds / 15)
            time.sleep(0.25)
        if not injected:
            dep.inject_bad_uplinks()
        print("\ndemo: stopping meters, draining the gateway", file=out, flush=True)
        dep.stop_meters()
        drained = dep.drain(timeout=30)
        rc = summary(dep, drained, out)
    finally:
        dep.stop()
        print(f"demo: all processes stopped ({time.monotonic() - t_start:.0f} s)", file=out, flush=True)
    return rc


def summary(dep: Deployment, drained: bool, out) -> int:
    g = dep.gateway_stats()
    led = dep.ledger_stats()
    check = dep.ledger_check()
    produced = sum(len(v) for v in dep.readings.values())
    enrolled = {m.dev_eui for m in dep.fleet}
    sent = sum(n - dep.injected.get(eui, 0) for eui, n in dep.network_uplinks.items()
               if eui in enrolled)
    print("\nSummary", file=out)
    print("\n".join(_table(dep)), file=out)
    print(f"  readings closed by the meters  {produced}", file=out)
    print(f"  uplinks from the meters        {sent} (ChirpStack up events on the broker)", file=out)
    print(f"  uplinks seen by the gateway    {g.get('received', 0)} (with the injected ones)", file=out)
    print(f"  verified by the gateway        {g.get('verified', 0)}", file=out)
    print(f"  stored in the ledger           {led.get('stored', 0)}"
          f" (duplicates refused: {led.get('duplicate', 0)})", file=out)
    rej = g.get("rejected", {})
    print(f"  rejected by the gateway        {sum(rej.values())} "
          f"{dict(sorted(rej.items())) if rej else ''}", file=out)
    lrej = led.get("rejected_by_reason", {})
    print(f"  rejected by the ledger         {sum(lrej.values()) if lrej else 0} "
          f"{lrej if lrej else ''}", file=out)
    print(f"  gateway outbox drained         {'yes' if drained else 'NO'}", file=out)
    print(f"  ledger consistency check       {'OK' if check.get('ok') else 'FAILED'}: "
          f"{check.get('readings')} readings of {check.get('devices')} devices re-verified"
          + ("" if check.get("ok") else f"; problems: {check.get('problems')}"), file=out)
    proven = _prove_one(dep, out)
    ok = bool(check.get("ok")) and drained and led.get("stored", 0) == g.get("verified", 0) \
        and g.get("verified", 0) > 0 and proven
    if not ok:
        print("demo: FAILED (see above; logs in the working directory)", file=out)
    return 0 if ok else 1


def _prove_one(dep: Deployment, out) -> bool:
    """What an auditor does: take one reading's proof bundle and check it
    offline against the policy (the log's key, 2 of 2 witnesses)."""
    from ledger_node import checkpoint, verify

    policy = checkpoint.load_policy(dep.policy_path)
    size = dep.ledger_stats().get("size", 0)
    deadline = time.monotonic() + 20
    witnesses: list = []
    while time.monotonic() < deadline:  # the witnesses cosign within a second or two
        try:
            cp, witnesses = checkpoint.verify_checkpoint(dep.ledger_checkpoint(), policy)
            if cp.size >= size:
                break
        except checkpoint.CheckpointError:
            pass
        time.sleep(0.5)
    print(f"  log checkpoint                 size {size}, cosigned by {len(witnesses)} of "
          f"{len(policy.witnesses)} witnesses", file=out)
    for m in dep.fleet:
        rows = dep.ledger_readings(m.dev_eui)
        if rows:
            last = rows[-1]
            report = verify.verify_proof_bundle(
                dep.ledger_proof_bundle(m.dev_eui, last["seq"]), policy)
            verdict = "verified offline" if report["ok"] else f"REFUSED: {report['message']}"
            print(f"  one reading's proof bundle     {verdict}: {m.dev_eui} seq {last['seq']} "
                  f"against {dep.policy_path.name}", file=out)
            return bool(report["ok"]) and len(witnesses) == len(policy.witnesses)
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meter-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=90.0, help="how long the meters run (real time)")
    p.add_argument("--meters", type=int, default=3, help="number of simulated meters")
    p.add_argument("--speed", type=float, default=10.0,
                   help="simulated seconds per real second (default 10)")
    p.add_argument("--interval", type=int, default=30, help="reading interval, simulated seconds")
    p.add_argument("--workdir", help="keep logs, traces, flash and databases here")
    args = p.parse_args(argv)
    if args.workdir:
        wd = Path(args.workdir)
        wd.mkdir(parents=True, exist_ok=True)
        return run(args.seconds, args.meters, wd, args.speed, args.interval)
    with tempfile.TemporaryDirectory(prefix="meter-demo-") as tmp:
        return run(args.seconds, args.meters, Path(tmp), args.speed, args.interval)


if __name__ == "__main__":
    sys.exit(main())
