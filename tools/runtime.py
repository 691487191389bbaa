"""Where the real runtimes are, and how to start them for the demo and tests.

One place that knows the MicroPython executable, mpy-cross, Mosquitto and
how to pick free loopback ports, so the demo, the benchmarks and the tests
start processes the same way.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIRMWARE = REPO / "firmware"
SIM_MPY = REPO / "hardware" / "sim" / "mpy"


def _venv_tool(name: str) -> str:
    """A tool installed beside the running interpreter (the project venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found beside {sys.executable} or on PATH; run `make deps`"
        )
    return found


def micropython() -> str:
    return _venv_tool("micropython")


def mpy_cross() -> str:
    return _venv_tool("mpy-cross")


def mosquitto() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError("mosquitto not found; run `make deps` (installs it with apt)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """Terminate politely, then kill; never leaves a stray process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


class Broker:
    """A real Mosquitto on a loopback port, with its own config and no persistence on disk
    outside its temporary directory."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            # Started as root, Mosquitto would switch to user `mosquitto`, which
            # cannot write its session store into this directory.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "max_queued_messages 100000\n"
            # The gateway acknowledges a QoS 1 message once it is on disk, a
            # batch at a time: a wider in-flight window than Mosquitto's 20
            # lets whole batches build up (docs/gateway-install.md).
            "max_inflight_messages 1000\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        self.proc = subprocess.Popen(
            [mosquitto(), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "mosquitto.log", "wb"),
        )
        wait_for_port(self.port)
        return self

    def restart(self, down_s: float = 0.0) -> None:
        """Stop Mosquitto (it saves its sessions and the QoS 1 messages they
        hold on the way down) and start it again on the same port and store."""
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_micropython(script: str | Path, *args: str, code: str | None = None,
                    heapsize: str | None = None, cwd: str | Path | None = None,
                    timeout: float = 120, path: list[Path] | None = None,
                    input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a script (or `code`) in the MicroPython unix port with the firmware and the
    simulated hardware on MICROPYPATH."""
    env = dict(os.environ)
    mpath = [str(p) for p in (path or [FIRMWARE, SIM_MPY])]
    env["MICROPYPATH"] = ":".join(mpath + [".frozen"])
    cmd = [micropython()]
    if heapsize:
        cmd += ["-X", f"heapsize={heapsize}"]
    if code is not None:
        cmd += ["-c", code]
    else:
        cmd += [str(script)]
    cmd += list(args)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout,
                          input=input)
