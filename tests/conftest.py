"""Shared fixtures: real runtimes only (MicroPython unix port, Mosquitto, SQLite)."""

from __future__ import annotations

import pytest

from hardware.sim.modem_sim import ModemSimulator
# tests/ has no __init__.py, so pytest puts this folder on sys.path to import
# this file; that is what makes the helper module importable by its bare name.
from mqtt_tap import MqttTap
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


@pytest.fixture
def mqtt_tap(broker):
    """Factory for MqttTap clients: `mqtt_tap(topic_filter=None, *, application_id=None,
    client_id=None, port=None)`, on the `broker` fixture unless `port` names another
    broker. Every client is closed at teardown, before the broker stops."""
    taps = []

    def connect(topic_filter: str | None = None, *, port: int | None = None, **kw) -> MqttTap:
        tap = MqttTap(broker.port if port is None else port, topic_filter, **kw)
        taps.append(tap)
        return tap

    yield connect
    for tap in taps:
        tap.close()


@pytest.fixture
def start_modem_sim(broker):
    """Factory: `start_modem_sim(application_id, **kw)` starts a ModemSimulator
    (keyword arguments as its constructor's) on a free port, publishing to the
    `broker` fixture; every simulator is stopped at teardown."""
    sims = []

    def start(application_id: str, **kw) -> ModemSimulator:
        sim = ModemSimulator(0, "127.0.0.1", broker.port, application_id, **kw).start()
        sims.append(sim)
        return sim

    yield start
    for sim in sims:
        sim.stop()
