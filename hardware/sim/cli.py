"""meter-sim: run the real firmware (MicroPython) against simulated hardware.

  meter-sim replay --trace FILE.csv --board esp32|pico [--json]
                   [--interval S] [--voltage] [--flash DIR] [--max-sim-s S]

`replay` runs the firmware on one trace as fast as the host allows and prints
the firmware's own readings, one per interval (default 1 s). With --json each
line is a JSON object with at least:

  t_s        seconds from the start of the trace to the end of the interval
  irms_a     mean RMS current over the interval (A)
  vrms_v     mean RMS voltage (V), only with a voltage channel (--voltage)
  p_w        mean power over the interval (W): real power with a voltage
             channel, apparent power from the configured voltage without
  energy_wh  cumulative net energy (import - export) since the flash was new

plus seq, t_end (unix seconds), import_wh and export_wh. This output is a
stable interface: other checks drive the firmware through it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hardware.sim.meter import BOARDS, SimMeter


def _replay(args) -> int:
    cfg = {"interval_s": args.interval, "voltage_channel": args.voltage}
    if args.mains_hz:
        cfg["mains_hz"] = args.mains_hz
    with tempfile.TemporaryDirectory(prefix="meter-sim-") as tmp:
        flash = Path(args.flash) if args.flash else Path(tmp) / "flash"
        m = SimMeter(board=args.board, trace=Path(args.trace), flash=flash, config=cfg,
                     max_sim_s=args.max_sim_s or 0.0)
        m.start()
        stats = {}
        if not args.json:
            hdr = f"{'t_s':>8} {'irms_a':>9} {'vrms_v':>8} {'p_w':>10} {'energy_wh':>11}"
            print(hdr)
        for rec in m.lines():
            if "stats" in rec:
                stats.update(rec["stats"])
                continue
            if "boot" in rec or "power_cut" in rec:
                stats.update(rec)
                continue
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                v = rec.get("vrms_v")
                vs = f"{v:.1f}" if v is not None else "-"
                print(f"{rec['t_s']:>8} {rec['irms_a']:>9.3f} {vs:>8}"
                      f" {rec['p_w']:>10.1f} {rec['energy_wh']:>11.3f}", flush=True)
        if m.proc.returncode != 0:
            print(f"meter-sim: firmware exited {m.proc.returncode}\n{m.log_tail()}", file=sys.stderr)
            return 1
        if args.stats:
            print(json.dumps({"stats": stats}), file=sys.stderr)
    return 0


def _calibrate(args) -> int:
    cfg = {"voltage_channel": args.voltage}
    m = SimMeter(board=args.board, trace=Path(args.trace), flash=Path(args.flash), config=cfg)
    try:
        cal = m.calibrate(known_w=args.known_w, known_a=args.known_a, known_v=args.known_v,
                          resistive=not args.not_resistive, seconds=args.seconds)
    except RuntimeError as e:
        print(f"meter-sim: {e}", file=sys.stderr)
        return 1
    print(json.dumps(cal))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meter-sim", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="run the firmware on one trace and print its readings")
    r.add_argument("--trace", required=True, help="CSV t_s,current_a[,voltage_v]")
    r.add_argument("--board", required=True, choices=BOARDS)
    r.add_argument("--json", action="store_true", help="one JSON object per reading")
    r.add_argument("--interval", type=int, default=1, help="reading interval in seconds (default 1)")
    r.add_argument("--voltage", action="store_true",
                   help="fit the voltage module (the trace needs a voltage_v column)")
    r.add_argument("--mains-hz", type=int, default=0, help="50 or 60 (default: firmware's 50)")
    r.add_argument("--flash", help="keep the meter's flash in this directory (default: temporary)")
    r.add_argument("--max-sim-s", type=float, default=0.0, help="stop after this much trace time")
    r.add_argument("--stats", action="store_true", help="print the simulator's counters to stderr")
    c = sub.add_parser("calibrate", help="one-point calibration with the known load in a trace")
    c.add_argument("--trace", required=True, help="CSV of the known load, steady")
    c.add_argument("--board", required=True, choices=BOARDS)
    c.add_argument("--flash", required=True, help="the meter's flash directory (keeps the result)")
    c.add_argument("--known-w", type=float, default=0.0, help="the load's real power in W")
    c.add_argument("--known-a", type=float, default=0.0, help="or its current in A")
    c.add_argument("--known-v", type=float, default=0.0, help="mains voltage from a reference meter")
    c.add_argument("--not-resistive", action="store_true", help="the load's PF is not 1")
    c.add_argument("--voltage", action="store_true", help="the meter has the voltage module")
    c.add_argument("--seconds", type=float, default=10.0, help="seconds of metering to average")
    args = p.parse_args(argv)
    if args.cmd == "replay":
        return _replay(args)
    if args.cmd == "calibrate":
        return _calibrate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
