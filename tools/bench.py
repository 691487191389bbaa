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
  radio.bytes_per_reading        application bytes per signed 15-min reading, amortised, EU868
                                 DR3 (SF9) with the bundle size the meter plans for a 30 s budget
  radio.readings_per_bundle_sf9  that bundle size
  radio.max_frame_bytes          the largest radio frame of that day
  radio.airtime_s_day_sf9        uplink airtime of the day's 96 readings at SF9/125 kHz: the
                                 real frames (codec, signature, fragments) + 13 bytes LoRaWAN
                                 overhead through the AN1200.13 formula
  radio.airtime_s_day_sf12       the same at DR0 (SF12, 51-byte frames: fragments)
  firmware.sign_ms               one Ed25519 signature of a bundle, unix-port MicroPython
  gateway.*                      the gateway daemon through a real Mosquitto (tools/gateway_bench.py)
  ledger.*                       the ledger node: ingest, append latency, proofs, audit and
                                 bytes on disk at 10^6 readings (tools/ledger_bench.py)

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


def _household_day(seed: int = 4) -> list[tuple]:
    """96 quarter-hour register snapshots of a household: a night base load, morning and
    evening peaks, a little noise; export stays 0."""
    import math
    import random
    rng = random.Random(seed)
    out, imp, t = [], 1_234_567, 1_767_225_600
    for k in range(96):
        h = k / 4
        kw = 0.25 + 1.2 * math.exp(-((h - 7.5) / 1.2) ** 2) + 2.0 * math.exp(-((h - 19) / 2) ** 2)
        imp += int(kw * 1000 * 0.25 * 10 * rng.uniform(0.7, 1.3))  # dWh in 15 min
        t += 900
        out.append((k + 1, t, imp, 0, 0x01))
    return out


def bench_radio() -> dict:
    """The day's readings through the codec as the meter bundles them, signed, fragmented
    for each data rate, timed on air."""
    from Crypto.Signature import eddsa

    from meter import airtime, frame, lorawan
    signer = eddsa.new(eddsa.import_private_key(bytes(range(32))), "rfc8032")
    eui = bytes.fromhex("70b3d57ed0051b02")
    day = _household_day()
    res = {}
    for dr, key in ((3, "sf9"), (0, "sf12")):
        n = airtime.plan("EU868", dr, 900, 30.0)
        frames = []
        for i in range(0, len(day), n):
            body = frame.encode_body(day[i:i + n])
            data = frame.assemble(body, signer.sign(frame.signed_message(eui, body)))
            frames += frame.fragment(data, lorawan.max_payload("EU868", dr))
        air = sum(lorawan.time_on_air_ms(len(f), "EU868", dr) for f in frames) / 1000
        res[f"radio.airtime_s_day_{key}"] = round(air, 2)
        if key == "sf9":
            res["radio.readings_per_bundle_sf9"] = n
            res["radio.max_frame_bytes"] = max(len(f) for f in frames)
            res["radio.bytes_per_reading"] = round(sum(len(f) for f in frames) / len(day), 1)
    return res


def bench_sign() -> dict:
    """One signature over a 3-reading bundle message in the unix-port interpreter, the
    median of 5."""
    code = (
        "import time\n"
        "from meter.crypto import ed25519\n"
        "k = ed25519.SigningKey(bytes(range(32)))\n"
        "msg = bytes(range(43))\n"
        "ts = []\n"
        "for _ in range(5):\n"
        "    t0 = time.ticks_us(); s = k.signer(msg)\n"
        "    while not s.step(): pass\n"
        "    ts.append(time.ticks_diff(time.ticks_us(), t0))\n"
        "ts.sort(); print(ts[2] / 1000)\n")
    out = runtime.run_micropython(None, code=code, path=[runtime.FIRMWARE])
    return {"firmware.sign_ms": round(float(out.stdout.strip().splitlines()[-1]), 1)}


def write(results: dict) -> None:
    BENCH_DIR.mkdir(exist_ok=True)
    (BENCH_DIR / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    lines = ["| key | value |", "|---|---:|"]
    lines += [f"| `{k}` | {v} |" for k, v in sorted(results.items())]
    (BENCH_DIR / "results.md").write_text("# Benchmark results\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=["size", "hour", "e2e", "accuracy", "radio", "gateway", "ledger"],
                   action="append")
    p.add_argument("--e2e-meters", type=int, default=50)
    p.add_argument("--e2e-seconds", type=float, default=60.0)
    args = p.parse_args(argv)
    want = set(args.only or ["size", "hour", "e2e", "accuracy", "radio", "gateway", "ledger"])
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
        if "radio" in want:
            results.update(bench_radio())
            results.update(bench_sign())
        if "gateway" in want:
            from tools import gateway_bench
            results.update(gateway_bench.run(tmpd))
        if "ledger" in want:
            from tools import ledger_bench
            results.update(ledger_bench.run(tmpd))
        if "accuracy" in want:
            from tools import accuracy
            results.update(accuracy.run())
    write(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
