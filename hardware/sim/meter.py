"""A simulated meter: the real firmware in the MicroPython unix port, on the
simulated hardware in hardware/sim/mpy, as a child process.

`SimMeter` writes the simulation description (SIM.json, see
hardware/sim/mpy/run_meter.py), starts `micropython run_meter.py SIM.json`
and hands back the firmware's readings as dicts. The flash directory plays the
meter's flash: keys, registers and sequence numbers persist in it across runs,
exactly as they would across reboots.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from tools import runtime

RUN_METER = runtime.SIM_MPY / "run_meter.py"
BOARDS = ("esp32", "pico")


@dataclass
class ModemLink:
    host: str
    port: int
    dev_eui: str
    join_eui: str = "0000000000000000"
    app_key: str = "00000000000000000000000000000000"
    dialect: str = "rak3172"


@dataclass
class SimMeter:
    board: str
    trace: Path
    flash: Path
    config: dict = field(default_factory=dict)
    speed: float = 0.0
    max_sim_s: float = 0.0
    loop: bool = False
    modem: ModemLink | None = None
    hardware: dict | None = None
    rtc_epoch: int = 1767225600
    true_epoch: int | None = None  # what time it really is at boot (default: rtc_epoch)
    clock_ppm: float = 0.0  # the board crystal's error
    command_key: bytes | None = None  # provisioned at first boot if the meter has none
    seed: int = 1
    heapsize: str | None = None
    stats: bool = True
    power_cut: bool = False
    proc: subprocess.Popen | None = None
    stderr_path: Path | None = None

    def __post_init__(self):
        if self.board not in BOARDS:
            raise ValueError(f"board must be one of {', '.join(BOARDS)}, got {self.board!r}")
        self.trace = Path(self.trace).resolve()
        self.flash = Path(self.flash).resolve()
        if not self.trace.is_file():
            raise FileNotFoundError(f"trace {self.trace} does not exist")

    def sim_description(self) -> dict:
        d = {
            "board": self.board,
            "trace": str(self.trace),
            "loop": self.loop,
            "flash": str(self.flash),
            "speed": self.speed,
            "max_sim_s": self.max_sim_s,
            "rtc_epoch": self.rtc_epoch,
            "seed": self.seed,
            "config": self.config,
            "emit": "json",
            "stats": self.stats,
            "power_cut": self.power_cut,
        }
        if self.true_epoch is not None:
            d["true_epoch"] = self.true_epoch
        if self.clock_ppm:
            d["clock_ppm"] = self.clock_ppm
        if self.command_key:
            d["command_key"] = self.command_key.hex()
        if self.hardware:
            d["hardware"] = self.hardware
        if self.modem:
            d["modem"] = self.modem.__dict__
        return d

    def start(self) -> "SimMeter":
        self.flash.mkdir(parents=True, exist_ok=True)
        sim_path = self.flash.parent / f"{self.flash.name}.sim.json"
        sim_path.write_text(json.dumps(self.sim_description(), indent=1))
        env = dict(os.environ)
        env["MICROPYPATH"] = f"{runtime.FIRMWARE}:{runtime.SIM_MPY}:.frozen"
        cmd = [runtime.micropython()]
        if self.heapsize:
            cmd += ["-X", f"heapsize={self.heapsize}"]
        cmd += [str(RUN_METER), str(sim_path)]
        self.stderr_path = self.flash.parent / f"{self.flash.name}.log"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=open(self.stderr_path, "wb"), env=env, text=True,
                                     bufsize=1)
        return self

    def lines(self) -> Iterator[dict]:
        """Parsed output lines until the process ends: readings, then {"stats": ...}."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line:
                yield json.loads(line)
        self.proc.wait()

    def run(self) -> tuple[list[dict], dict]:
        """Run to completion; return (readings, stats). stats also carries the "boot"
        registers and, with power_cut, the "power_cut" registers. Raises with the
        firmware's own log when MicroPython exits with an error. A meter already
        started (start()) is collected, not started again."""
        if self.proc is None:
            self.start()
        readings, stats, extra = [], {}, {}
        for rec in self.lines():
            if "stats" in rec:
                stats = rec["stats"]
            elif "boot" in rec or "power_cut" in rec:
                extra.update(rec)
            else:
                readings.append(rec)
        stats.update(extra)
        if self.proc.returncode != 0:
            raise RuntimeError(f"firmware exited {self.proc.returncode}:\n{self.log_tail()}")
        return readings, stats

    def log_tail(self, n: int = 30) -> str:
        if self.stderr_path and self.stderr_path.exists():
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def calibrate(self, known_w: float = 0.0, known_a: float = 0.0, known_v: float = 0.0,
                  resistive: bool = True, seconds: float = 10.0) -> dict:
        """One-point calibration with the known load the trace holds; the firmware stores the
        result on the meter's flash, so later runs on the same flash are calibrated."""
        self.flash.mkdir(parents=True, exist_ok=True)
        desc = self.sim_description()
        desc["action"] = "calibrate"
        desc["calibrate"] = {"known_w": known_w, "known_a": known_a, "known_v": known_v,
                             "resistive": resistive, "seconds": seconds}
        sim_path = self.flash.parent / f"{self.flash.name}.cal.json"
        sim_path.write_text(json.dumps(desc))
        res = runtime.run_micropython(RUN_METER, str(sim_path), timeout=300)
        if res.returncode != 0:
            err = (res.stderr.decode() + res.stdout.decode()).strip().splitlines()
            raise RuntimeError("calibration failed: " + (err[-1] if err else f"exit {res.returncode}"))
        out = [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]
        return out[-1]["calibration"]

    def provision_key(self) -> bytes:
        """First boot at provisioning: the firmware creates its key on the meter and reports
        the public half (on a board the technician reads it over the serial console)."""
        self.flash.mkdir(parents=True, exist_ok=True)
        desc = self.sim_description()
        desc["action"] = "keys"
        sim_path = self.flash.parent / f"{self.flash.name}.keys.json"
        sim_path.write_text(json.dumps(desc))
        res = runtime.run_micropython(RUN_METER, str(sim_path), timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"key generation failed:\n{res.stderr.decode()[-2000:]}")
        out = [json.loads(x) for x in res.stdout.decode().splitlines() if x.strip()]
        return bytes.fromhex(out[-1]["public_key"])

    def stop(self) -> None:
        if self.proc is not None:
            runtime.stop_process(self.proc)
