"""The gateway's operations surface: /metrics (Prometheus text, read back with
prometheus_client's own parser), the status server, JSON logs, systemd
notifications over a real datagram socket, and the systemd unit checked by
systemd-analyze itself."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import logs, metrics, sdnotify
from gateway.status import StatusServer

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "gateway" / "deploy" / "meter-gateway.service"
INSTALL_DOC = ROOT / "docs" / "gateway-install.md"


# -- metrics -------------------------------------------------------------------

def full_stats() -> dict:
    """A stats() dict as the daemon reports it, every value different so a
    value landing under the wrong metric shows."""
    return {
        "name": 'pi-"north"',
        "received": 1001, "bundles": 902, "verified": 4507, "duplicates": 33,
        "rejected": {"bad_signature": 4, "malformed_json": 2, "unknown_device": 7},
        "rejected_total": 13,
        "other_ports": {"222": 5, "10": 1},
        "dead_letters": 13, "outbox_depth": 250,
        "queue": {"depth": 250, "capacity": 1000, "fill_pct": 25.0, "full": False},
        "devices": 41, "storage_errors": 3, "mqtt_connected": True, "uptime_s": 3600.5,
        "fragments": {"received": 60, "repeated": 6, "joined": 19, "incomplete_sets": 2},
        "gaps": {"devices": 3, "missing": 17, "given_up": 1},
        "commands": {"sent": 9, "by_op": {"resend": 8, "relay": 1},
                     "failed": {"no_key": 2}, "resend_requests": 8, "keys": 40},
        "downlinks": {"sent": 9, "acked": 6, "nacked": 1, "retried": 2, "expired": 1,
                      "failed": 1, "pending": 2},
        "forwarded": 900,
        "ledger": {"stored": 4500, "duplicate": 7, "rejected": 1, "errors": 12,
                   "failing": False, "last_error": None, "last_success_at": 1700000000.25},
        "ledgers": [
            {"name": "main", "url": "http://10.0.0.5:8480", "forwarded": 900, "stored": 4500,
             "duplicate": 7, "rejected": 1, "errors": 12, "failing": False,
             "last_success_at": 1700000000.25,
             "latency": {"buckets": {"0.005": 0, "0.01": 1, "0.025": 3, "0.05": 10, "0.1": 20,
                                     "0.25": 30, "0.5": 35, "1": 38, "2.5": 39, "5": 40,
                                     "10": 40, "+Inf": 41},
                         "sum": 9.75, "count": 41}},
            {"name": 'back\\up "2"', "url": "https://backup.example:8480", "forwarded": 880,
             "stored": 4400, "duplicate": 100, "rejected": 0, "errors": 250, "failing": True,
             "last_success_at": None,
             "latency": {"buckets": {"0.005": 0, "0.01": 0, "0.025": 0, "0.05": 0, "0.1": 0,
                                     "0.25": 0, "0.5": 0, "1": 1, "2.5": 2, "5": 2, "10": 3,
                                     "+Inf": 4},
                         "sum": 31.5, "count": 4}},
        ],
    }


def parse(text: str) -> tuple[dict, dict]:
    """(families by name, samples as {(sample name, sorted labels): value})."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {}
    for fam in families.values():
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"sample {key} written twice"
            samples[key] = s.value
    return families, samples


def value(samples, name, /, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_values_types_and_help():
    text = metrics.render(full_stats())
    families, samples = parse(text)
    p = "meter_gateway_"
    assert value(samples, p + "uplinks_received_total") == 1001
    assert value(samples, p + "bundles_queued_total") == 902
    assert value(samples, p + "readings_verified_total") == 4507
    assert value(samples, p + "duplicates_dropped_total") == 33
    assert value(samples, p + "storage_errors_total") == 3
    assert value(samples, p + "uplinks_rejected_total", reason="bad_signature") == 4
    assert value(samples, p + "uplinks_rejected_total", reason="malformed_json") == 2
    assert value(samples, p + "uplinks_rejected_total", reason="unknown_device") == 7
    # Known reasons that never happened are there, at 0, so alerts on them work.
    assert value(samples, p + "uplinks_rejected_total", reason="replay") == 0
    assert value(samples, p + "uplinks_other_port_total", port="222") == 5
    assert value(samples, p + "uplinks_other_port_total", port="10") == 1
    for key, n in {"sent": 9, "acked": 6, "nacked": 1, "retried": 2, "expired": 1,
                   "failed": 1}.items():
        assert value(samples, f"{p}downlinks_{key}_total") == n
    assert value(samples, p + "commands_sent_total", op="resend") == 8
    assert value(samples, p + "commands_failed_total", reason="no_key") == 2

    assert value(samples, p + "queue_depth") == 250
    assert value(samples, p + "queue_capacity") == 1000
    assert value(samples, p + "queue_fill_ratio") == pytest.approx(0.25)
    assert value(samples, p + "queue_full") == 0
    assert value(samples, p + "dead_letters") == 13
    assert value(samples, p + "devices") == 41
    assert value(samples, p + "mqtt_connected") == 1
    assert value(samples, p + "uptime_seconds") == 3600.5
    assert value(samples, p + "gaps_missing_readings") == 17
    assert value(samples, p + "fragment_sets_incomplete") == 2
    assert value(samples, p + "downlinks_pending") == 2
    assert value(samples, p + "info", name='pi-"north"') == 1

    backup = 'back\\up "2"'  # a backslash and quotes, escaped and read back
    for metric, main_v, backup_v in (("ledger_forwarded_bundles_total", 900, 880),
                                     ("ledger_stored_readings_total", 4500, 4400),
                                     ("ledger_duplicate_readings_total", 7, 100),
                                     ("ledger_rejected_bundles_total", 1, 0),
                                     ("ledger_errors_total", 12, 250),
                                     ("ledger_failing", 0, 1)):
        assert value(samples, p + metric, ledger="main") == main_v
        assert value(samples, p + metric, ledger=backup) == backup_v
    assert value(samples, p + "ledger_last_success_timestamp_seconds",
                 ledger="main") == 1700000000.25
    # Never succeeded: no sample rather than a 0 that reads as 1970.
    assert (p + "ledger_last_success_timestamp_seconds",
            (("ledger", backup),)) not in samples

    kinds = {name: fam.type for name, fam in families.items()}
    assert kinds[p + "uplinks_received"] == "counter"
    assert kinds[p + "uplinks_rejected"] == "counter"
    assert kinds[p + "ledger_errors"] == "counter"
    assert kinds[p + "queue_depth"] == "gauge"
    assert kinds[p + "ledger_failing"] == "gauge"
    assert kinds[p + "ledger_latency_seconds"] == "histogram"
    for name, fam in families.items():
        assert name.startswith(p), name
        assert fam.documentation, f"{name} has no HELP"
    # Every family once, HELP then TYPE right before its samples.
    declared = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(declared) == len(set(declared)) == len(families)
    assert text.endswith("\n")


def test_metrics_latency_histogram():
    _, samples = parse(metrics.render(full_stats()))
    h = "meter_gateway_ledger_latency_seconds"
    assert value(samples, h + "_bucket", ledger="main", le="0.05") == 10
    assert value(samples, h + "_bucket", ledger="main", le="1.0") == 38
    assert value(samples, h + "_bucket", ledger="main", le="+Inf") == 41
    assert value(samples, h + "_sum", ledger="main") == 9.75
    assert value(samples, h + "_count", ledger="main") == 41
    assert value(samples, h + "_bucket", ledger='back\\up "2"', le="10.0") == 3
    assert value(samples, h + "_count", ledger='back\\up "2"') == 4


def test_metrics_histogram_buckets_sorted_and_closed_with_inf():
    stats = {"ledgers": [{"name": "a", "latency": {
        "buckets": {"2.5": 3, "0.1": 1, "10": 4, "0.5": 2}, "sum": 7.0, "count": 5}}]}
    text = metrics.render(stats)
    les = re.findall(r'_bucket\{ledger="a",le="([^"]+)"\} (\d+)', text)
    # Numeric order (not the dict's, not the strings'), +Inf added as the count.
    assert les == [("0.1", "1"), ("0.5", "2"), ("2.5", "3"), ("10.0", "4"), ("+Inf", "5")]
    parse(text)  # and Prometheus' parser takes it


def test_metrics_skip_what_the_stats_do_not_have():
    assert metrics.render({}) == ""
    # A stats dict of the single-ledger daemon: what it has is rendered, the
    # rest (queue, downlinks, dead letters, latency) is simply absent.
    old = {"name": "gw", "received": 5, "bundles": 4, "verified": 12,
           "rejected": {"duplicate": 1}, "rejected_total": 1, "other_ports": {},
           "storage_errors": 0, "forwarded": 4,
           "ledger": {"stored": 12, "duplicate": 0, "rejected": 0, "errors": 2,
                      "failing": True, "last_error": "down", "last_success_at": None},
           "outbox_depth": None, "devices": 3, "mqtt_connected": False, "uptime_s": 1.0}
    families, samples = parse(metrics.render(old))
    p = "meter_gateway_"
    assert value(samples, p + "uplinks_received_total") == 5
    assert value(samples, p + "mqtt_connected") == 0
    assert value(samples, p + "ledger_forwarded_bundles_total", ledger="0") == 4
    assert value(samples, p + "ledger_errors_total", ledger="0") == 2
    assert value(samples, p + "ledger_failing", ledger="0") == 1
    for absent in ("queue_depth", "queue_capacity", "dead_letters", "downlinks_sent",
                   "duplicates_dropped", "ledger_latency_seconds", "uplinks_other_port",
                   "ledger_last_success_timestamp_seconds"):
        assert p + absent not in families, absent
    # Odd values are left out, not errors.
    families, _ = parse(metrics.render({"received": "many", "queue": None, "ledgers": [
        None, {"name": "x", "latency": {"buckets": {"fast": 1}, "sum": 1, "count": 1}}]}))
    assert families == {}


def test_metrics_label_escaping():
    name = 'a\\b"c\nd'
    text = metrics.render({"name": name})
    assert r'name="a\\b\"c\nd"' in text
    _, samples = parse(text)
    assert value(samples, "meter_gateway_info", name=name) == 1


# -- status server -------------------------------------------------------------

def get(url: str, method: str = "GET"):
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture
def status_server():
    servers = []

    def start(*args, **kw) -> StatusServer:
        srv = StatusServer(*args, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_status_metrics_health_stats(status_server):
    healthy = [True]
    srv = status_server(0, full_stats, lambda: (healthy[0], {"status": "ok"}),
                        metrics=lambda: metrics.render(full_stats()))
    base = f"http://127.0.0.1:{srv.port}"

    code, headers, body = get(base + "/metrics")
    assert code == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    _, samples = parse(body.decode())
    assert value(samples, "meter_gateway_readings_verified_total") == 4507

    code, headers, body = get(base + "/stats?pretty=1")
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["received"] == 1001
    assert get(base + "/health")[0] == 200
    healthy[0] = False
    code, _, body = get(base + "/health")
    assert code == 503 and json.loads(body) == {"status": "ok"}

    code, _, body = get(base + "/nope")
    assert code == 404
    assert json.loads(body)["endpoints"] == ["/health", "/metrics", "/stats"]

    for method in ("POST", "PUT", "DELETE", "BREW"):
        code, headers, body = get(base + "/metrics", method)
        assert code == 405, method
        assert headers["Allow"] == "GET"
        assert "GET" in json.loads(body)["error"]
    code, headers, body = get(base + "/stats", "HEAD")
    assert code == 405 and body == b""


def test_status_keeps_serving_after_a_failing_endpoint(status_server):
    def broken():
        raise RuntimeError("stats gone")

    srv = status_server(0, lambda: {"ok": 1}, lambda: (True, {}), metrics=broken)
    base = f"http://127.0.0.1:{srv.port}"
    code, _, body = get(base + "/metrics")
    assert code == 500 and json.loads(body) == {"error": "stats gone"}
    assert get(base + "/stats")[0] == 200


def test_status_old_signature_and_hosts(status_server):
    # Positional host and no metrics callable, as before /metrics existed.
    srv = status_server(0, lambda: {"a": 1}, lambda: (True, {}), "127.0.0.1")
    code, _, body = get(f"http://127.0.0.1:{srv.port}/metrics")
    assert code == 404 and json.loads(body)["endpoints"] == ["/health", "/stats"]

    srv = status_server(0, lambda: {"a": 2}, lambda: (True, {}), host="0.0.0.0")
    assert srv._server.server_address[0] == "0.0.0.0"
    assert json.loads(get(f"http://127.0.0.1:{srv.port}/stats")[2]) == {"a": 2}

    srv = status_server(0, lambda: {"a": 3}, lambda: (True, {}), host="::1")
    assert srv._server.socket.family == socket.AF_INET6
    assert json.loads(get(f"http://[::1]:{srv.port}/stats")[2]) == {"a": 3}

    srv = status_server(0, lambda: {"a": 4}, lambda: (True, {}), host="localhost")
    assert srv._server.server_address[0] == "127.0.0.1"

    with pytest.raises(OSError, match="no-such-host.invalid"):
        StatusServer(0, dict, lambda: (True, {}), host="no-such-host.invalid")


def test_daemon_serves_its_stats_as_metrics(tmp_path):
    """The real daemon's /metrics: its own stats() rendered, one series per
    ledger node (no broker or ledger is reachable: it runs all the same)."""
    from gateway.daemon import Gateway

    ledgers = [("http://127.0.0.1:9", None), ("http://127.0.0.1:10", "token")]
    gw = Gateway("127.0.0.1", 1, None, tmp_path / "state", status_port=0, name="ops-test",
                 ledgers=ledgers, queue_capacity=5000, backoff_cap=1.0)
    gw.start()
    try:
        code, headers, body = get(f"http://127.0.0.1:{gw.status_port}/metrics")
    finally:
        gw.stop()
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families, samples = parse(body.decode())
    p = "meter_gateway_"
    assert value(samples, p + "info", name="ops-test") == 1
    assert value(samples, p + "queue_capacity") == 5000
    assert value(samples, p + "queue_depth") == 0
    assert value(samples, p + "mqtt_connected") == 0
    assert value(samples, p + "uplinks_received_total") == 0
    labels = {dict(k[1])["ledger"] for k in samples if k[0] == p + "ledger_failing"}
    assert labels == {url for url, _ in ledgers}
    assert families[p + "ledger_latency_seconds"].type == "histogram"


# -- logs -----------------------------------------------------------------------

def make_record(msg="uplink %s from %s", args=("rejected", "70b3d57ed0000001"), **extra):
    logger = logging.getLogger("gateway.daemon")
    record = logger.makeRecord("gateway.daemon", logging.WARNING, "daemon.py", 10, msg, args,
                               None, extra=extra or None)
    return record


def test_json_log_fields():
    record = make_record(dev_eui="70b3d57ed0000001", reason="bad_signature", seq=17)
    doc = json.loads(logs.JsonFormatter().format(record))
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "gateway.daemon"
    assert doc["msg"] == "uplink rejected from 70b3d57ed0000001"
    assert doc["dev_eui"] == "70b3d57ed0000001"
    assert doc["reason"] == "bad_signature" and doc["seq"] == 17
    assert "exc" not in doc
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    ts = datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(ts.timestamp() - record.created) < 0.001


def test_json_log_exception_and_odd_records():
    fmt = logs.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("gateway").makeRecord(
            "gateway", logging.ERROR, "x.py", 1, "failed", (), sys.exc_info())
    doc = json.loads(fmt.format(record))
    assert doc["msg"] == "failed"
    assert "Traceback" in doc["exc"] and "ValueError: boom" in doc["exc"]

    class Unprintable:
        def __str__(self):
            raise RuntimeError("no")

        def __repr__(self):
            raise RuntimeError("no")

    circular: list = []
    circular.append(circular)
    record = make_record("%d readings", ("many",), payload=b"\x01\x02", when={1, 2},
                         ratio=float("nan"), loop=circular, odd=Unprintable(),
                         level="shadowed")
    line = fmt.format(record)
    assert "\n" not in line
    doc = json.loads(line)  # strict JSON: no NaN
    assert doc["msg"].startswith("%d readings") and "'many'" in doc["msg"]
    assert doc["payload"] == "b'\\x01\\x02'"
    assert doc["ratio"] == "nan"
    assert doc["odd"] == "<unprintable Unprintable>"
    assert isinstance(doc["loop"], str)
    # An extra named like a core field does not replace it.
    assert doc["level"] == "WARNING" and doc["x_level"] == "shadowed"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_setup_json_and_text_on_stderr():
    res = run_python(
        "import logging\n"
        "from gateway import logs\n"
        "logs.setup('info', 'json')\n"
        "log = logging.getLogger('gateway.daemon')\n"
        "log.debug('hidden')\n"
        "log.warning('rejected uplink from %s', 'ab', extra={'dev_eui': 'ab', 'reason': 'replay'})\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    log.exception('chore failed')\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 2, res.stderr
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "rejected uplink from ab" and first["reason"] == "replay"
    assert first["level"] == "WARNING" and first["logger"] == "gateway.daemon"
    assert second["level"] == "ERROR" and "ZeroDivisionError" in second["exc"]

    res = run_python("import logging\nfrom gateway import logs\nlogs.setup('DEBUG')\n"
                     "logging.getLogger('gateway.x').debug('seen %d', 5)\n")
    assert res.returncode == 0, res.stderr
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} DEBUG gateway\.x: seen 5\n",
                        res.stderr)

    with pytest.raises(ValueError, match="log level"):
        logs.setup("LOUD")
    with pytest.raises(ValueError, match="log format"):
        logs.setup("INFO", "xml")


# -- sd_notify ------------------------------------------------------------------

@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket where systemd's would be; returns a receive function."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def test_notify_path_socket(notify_socket):
    assert sdnotify.notify("READY=1\nSTATUS=running")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=running"


def test_notify_abstract_socket(monkeypatch):
    name = f"meter-gateway-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_without_systemd(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")  # WatchdogSec=60
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "sixty", ""):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None, bad


# -- systemd unit ---------------------------------------------------------------

def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, val = line.partition("=")
            settings.setdefault(key, []).append(val)
    return settings


@pytest.fixture
def runnable_unit(tmp_path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here
    (verify checks it), under the same name."""
    exe = Path(sys.executable).parent / "meter-gateway"
    assert exe.exists(), exe
    text = UNIT.read_text()
    assert "/opt/meter-stack/.venv/bin/meter-gateway " in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace("/opt/meter-stack/.venv/bin/meter-gateway", str(exe)))
    return copy


def test_unit_verifies(runnable_unit):
    res = subprocess.run(["systemd-analyze", "verify", str(runnable_unit)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    # Unknown keys and bad values are only warnings: none may name this unit
    # (units it names, such as mosquitto.service, have their own).
    ours = [ln for ln in (res.stdout + res.stderr).splitlines()
            if UNIT.name in ln or str(runnable_unit) in ln]
    assert ours == []


def test_unit_security_exposure(runnable_unit):
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                          str(runnable_unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", res.stdout)
    assert m, res.stdout
    assert float(m.group(1)) <= 2.0 and m.group(2) == "OK", res.stdout


def test_unit_settings_the_daemon_relies_on():
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [
        "/opt/meter-stack/.venv/bin/meter-gateway run --config /etc/meter-gateway/config.toml"]
    assert s["User"] == s["Group"] == ["meter-gateway"]
    assert "DynamicUser" not in s
    assert s["StateDirectory"] == ["meter-gateway"] and s["StateDirectoryMode"] == ["0700"]
    assert s["WatchdogSec"] == ["60s"] and s["Restart"] == ["always"]
    assert s["MemoryDenyWriteExecute"] == ["yes"] and s["CapabilityBoundingSet"] == [""]


def test_python_runs_without_writable_executable_memory():
    """MemoryDenyWriteExecute=yes: the daemon's imports and its crypto work
    when no mapping may be writable and executable (the kernel's own MDWE
    switch, the same rule systemd enforces)."""
    res = run_python(
        "import ctypes, mmap\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1\n"
        "assert libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0, ctypes.get_errno()\n"
        "try:\n"
        "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "    raise SystemExit('W+X mapping allowed: MDWE is not on')\n"
        "except PermissionError:\n"
        "    pass\n"
        "import gateway.daemon, gateway.cli, gateway.metrics, gateway.logs, gateway.sdnotify\n"
        "import sqlite3, ssl, grpc\n"
        "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
        "key = ed25519.Ed25519PrivateKey.generate()\n"
        "key.public_key().verify(key.sign(b'reading'), b'reading')\n"
        "db = sqlite3.connect(':memory:'); db.execute('create table t (x)')\n"
        "print('ok')\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout == "ok\n"


def test_unit_command_line_is_the_clis():
    from gateway import cli

    exec_start = unit_settings(UNIT.read_text())["ExecStart"][0]
    args = cli.build_parser().parse_args(shlex.split(exec_start)[1:])
    assert args.command == "run" and args.config == "/etc/meter-gateway/config.toml"


def test_install_guide_config_passes_the_checks(tmp_path):
    """The config.toml the install guide shows uses the keys and values the
    gateway accepts (files are not looked at: they are the Pi's)."""
    from gateway import config

    blocks = re.findall(r"```toml\n(.*?)```", INSTALL_DOC.read_text(), re.S)
    shown = [b for b in blocks if "state_dir" in b]
    assert len(shown) == 1
    path = tmp_path / "config.toml"
    path.write_text(shown[0])
    cfg, errors = config.check(path, files=False)
    assert errors == [] and cfg is not None
    assert cfg.log.format == "json" and cfg.status.listen == "127.0.0.1:8481"
    # The one directory the unit lets the daemon write (StateDirectory=).
    state = unit_settings(UNIT.read_text())["StateDirectory"][0]
    assert cfg.state_dir == Path("/var/lib") / state
