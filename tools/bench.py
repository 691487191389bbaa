"""Benchmarks: `make bench` -> bench/results.json (flat keys, numbers) and bench/results.md.

Keys:
  firmware.mpy_bytes_xtensawin   all firmware compiled with mpy-cross for the ESP32
  firmware.mpy_bytes_armv6m      the same for the RP2040
  firmware.heap_peak_bytes       highest live heap (after a collection) of the firmware
                                 plus the simulated board, MicroPython unix port (64-bit),
                                 over a simulated hour of metering and sending readings
  firmware.sim_speedup           simulated seconds per real second in that run
  e2e.readings_per_s             readings stored in the ledger per second of wall time,
                                 demo path with 50 simulated meters
  e2e.meters                     meters in that run
  metering.*                     the accuracy report's keys (tools/accuracy.py, docs/accuracy.md)

Tests assert behaviour; the numbers live here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hardware.sim.meter import ModemLink, SimMeter
from tools import runtime, traces
from tools.deployment import Deployment, default_fleet

BENCH_DIR = runtime.REPO / "bench"


def bench_firmware_size() -> dict:
    res = subprocess.run([sys.executable, "-m", "tools.firmware_check", "compile", "--json",
                          "--out", str(runtime.REPO / "build" / "mpy")],
                         capture_output=True, text=True, check=True, cwd=runtime.REPO)
    d = json.loads(res.stdout)
    return {"firmware.mpy_bytes_xtensawin": d["xtensawin"], "firmware.mpy_bytes_armv6m": d["armv6m"]}


def bench_firmware_hour(tmp: Path, sim_s: float = 3600.0) -> dict:
    """One ESP32 meter with the voltage channel, a reading a minute through the modem
    simulator, for a simulated hour (a 120 s home trace, looped)."""
    from hardware.sim.modem_sim import ModemSimulator

    trace = tmp / "home.csv"
    traces.generate(trace, "pv", 120.0, rate_hz=3200, seed=7, with_voltage=True)
    with runtime.Broker() as broker, ModemSimulator(0, "127.0.0.1", broker.port,
                                                    "00000000-0000-0000-0000-000000000001",
                                                    speed=1000.0) as modem:
        m = SimMeter(board="esp32", trace=trace, flash=tmp / "flash-hour",
                     config={"interval_s": 60, "voltage_channel": True},
                     loop=True, max_sim_s=sim_s,
                     modem=ModemLink("127.0.0.1", modem.port, "70b3d57ed00f0001"))
        t0 = time.monotonic()
        readings, stats = m.run()
        wall = time.monotonic() - t0
        uplinks = modem.counters.get("uplinks", 0)
    return {
        "firmware.heap_peak_bytes": stats["heap_live_peak_bytes"],
        "firmware.sim_speedup": round(stats["sim_s"] / wall, 2),
        "firmware.hour_readings": len(readings),
        "firmware.hour_uplinks": uplinks,
    }


def bench_e2e(tmp: Path, meters: int = 50, seconds: float = 60.0) -> dict:
    """The demo's path with 50 meters running as fast as the host allows, a reading every
    simulated 2 s; counts readings stored in the ledger over a steady window."""
    dep = Deployment(tmp / "e2e", default_fleet(meters), speed=0.0, interval_s=2,
                     trace_s=120.0, modem_speed=1000.0)
    dep.start()
    try:
        time.sleep(min(10.0, seconds / 4))  # let every meter boot and join
        n0, t0 = dep.ledger_stats()["stored"], time.monotonic()
        time.sleep(seconds)
        n1, t1 = dep.ledger_stats()["stored"], time.monotonic()
        check = dep.ledger_check()
    finally:
        dep.stop()
    if not check.get("ok"):
        raise RuntimeError(f"ledger inconsistent after the e2e benchmark: {check.get('problems')}")
    return {"e2e.readings_per_s": round((n1 - n0) / (t1 - t0), 2), "e2e.meters": meters}


def write(results: dict) -> None:
    BENCH_DIR.mkdir(exist_ok=True)
    (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["| key | value |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in sorted(results.items())]
    (BENCH_DIR / "results.md").write_text("# Benchmark results\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["size", "hour", "e2e", "accuracy"], action="append")
    p.add_argument("--e2e-meters", type=int, default=50)
    p.add_argument("--e2e-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    want = set(args.only or ["size", "hour", "e2e", "accuracy"])
    path = BENCH_DIR / "results.json"
    results = json.loads(path.read_text()) if path.exists() and args.only else {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        tmpd = Path(tmp)
        if "size" in want:
            results.update(bench_firmware_size())
        if "hour" in want:
            results.update(bench_firmware_hour(tmpd))
        if "e2e" in want:
            results.update(bench_e2e(tmpd, args.e2e_meters, args.e2e_seconds))
        if "accuracy" in want:
            from tools import accuracy
            results.update(accuracy.run())
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
