"""Shared fixtures: real runtimes only (MicroPython unix port, Mosquitto, SQLite)."""

from __future__ import annotations

import pytest

from tools import runtime


@pytest.fixture
def mpy():
    """Run MicroPython code with firmware/ and hardware/sim/mpy on the path.

    Returns stdout (text); fails the test with MicroPython's own traceback
    when the interpreter exits non-zero."""

    def run(code: str, *args: str, heapsize: str | None = None, cwd=None, timeout: float = 120,
            check: bool = True) -> str:
        res = runtime.run_micropython(None, *args, code=code, heapsize=heapsize, cwd=cwd,
                                      timeout=timeout)
        out = res.stdout.decode()
        if check and res.returncode != 0:
            pytest.fail(f"MicroPython exited {res.returncode}:\n{out}\n{res.stderr.decode()}")
        return out

    return run


@pytest.fixture
def broker():
    """A real Mosquitto on a free loopback port."""
    with runtime.Broker() as b:
        yield b
