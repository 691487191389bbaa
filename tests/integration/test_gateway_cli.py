"""The `meter-gateway` command line, run as operators run it (`python -m
gateway.cli` in a subprocess): check-config, run with a config file under a
stand-in for systemd's notify socket, status against a live gateway and a
stopped one, and dead-letters on a state file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
# Helpers and fixtures shared with the other gateway tests (tests/integration
# is on sys.path, as pytest puts a test folder without __init__.py there).
from test_gateway_mqtt import Meter, ledger_readings, ledger_seqs, publisher, wait_for  # noqa: F401

from gateway.daemon import OUTBOX_FILE, Gateway
from gateway.outbox import Outbox
from ledger_node.server import LedgerServer
from tools import runtime

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], cwd=runtime.REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


# -- check-config -------------------------------------------------------------------

def test_check_config_says_ok_and_what_would_run(tmp_path):
    secret(tmp_path / "ledger.token", "tok\n")
    secret(tmp_path / "keys.json", json.dumps({"70b3d57ed0000a01": "11" * 16,
                                               "70b3d57ed0000b02": "22" * 16}))
    path = tmp_path / "gateway.toml"
    path.write_text(f"""
name = "pi-7"
state_dir = "{tmp_path / 'state'}"
[mqtt]
host = "broker.lan"
port = 1884
[[ledger]]
url = "http://ledger.lan:8480"
token_file = "ledger.token"
[[ledger]]
url = "https://backup.example"
token_env = "GW_CLI_TEST_TOKEN"
[downlink]
command_keys = "keys.json"
[status]
listen = "127.0.0.1:9191"
""")
    res = cli("check-config", str(path), env={"GW_CLI_TEST_TOKEN": "x"})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"ok: {path}"
    out = res.stdout
    for words in ("pi-7", "mqtt://broker.lan:1884", "http://ledger.lan:8480",
                  f"token {tmp_path / 'ledger.token'}", "https://backup.example",
                  "token $GW_CLI_TEST_TOKEN", f"state dir   {tmp_path / 'state'}",
                  f"via mqtt, 2 command keys from {tmp_path / 'keys.json'}",
                  "http://127.0.0.1:9191"):
        assert words in out, (words, out)
    assert "tok\n" not in out and "warning" not in out


def test_check_config_prints_every_error(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('state_dir = "s"\n[mqtt]\nport = 70000\n[[ledger]]\nurl = "http://a"\n'
                    '[[ledger]]\ntoken_env = "X"\n[delivery]\nbatch_sze = 5\n')
    res = cli("check-config", str(path), env={"X": "set"})
    assert res.returncode == 2
    assert res.stdout.splitlines() == [
        f"{path}: 3 errors",
        "  mqtt.port: 70000 is outside 1..65535",
        "  ledger[1].url: missing (the ledger node's base URL, e.g. http://127.0.0.1:8480)",
        "  delivery.batch_sze: unknown key (did you mean batch_size?)",
    ]


def test_check_config_warnings_do_not_fail(tmp_path):
    token = secret(tmp_path / "ledger.token", "tok\n", 0o644)
    path = tmp_path / "gateway.toml"
    path.write_text('state_dir = "s"\n[[ledger]]\nurl = "http://a"\ntoken_file = "ledger.token"\n'
                    '[status]\nlisten = ""\n')
    res = cli("check-config", str(path))
    assert res.returncode == 0, res.stdout
    assert f"warning: ledger[0].token_file: {token} can be read by other users" in res.stdout
    assert "  status      off" in res.stdout


# -- run ------------------------------------------------------------------------------

def test_run_refuses_bad_resend_settings(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text(f'state_dir = "{tmp_path}"\n[[ledger]]\nurl = "http://127.0.0.1:9"\n'
                    '[resend]\nafter_s = 0\nmax_per_day = -1\n')
    res = cli("run", "--config", str(path))
    assert res.returncode == 2
    assert "resend.after_s: 0 is not a positive number of seconds" in res.stderr
    assert "resend.max_per_day: -1 is outside 0..1000" in res.stderr
    assert not (tmp_path / OUTBOX_FILE).exists()  # nothing started


@pytest.mark.parametrize("content,words", [
    (None, "cannot read"),
    ("[]", "JSON object"),
    ('{"70b3d57ed0000a01": "00"}', "70b3d57ed0000a01"),
])
def test_run_refuses_a_bad_keys_file(tmp_path, content, words):
    keys = tmp_path / "keys.json"
    if content is not None:
        secret(keys, content)
    path = tmp_path / "gateway.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n[[ledger]]\n'
                    f'url = "http://127.0.0.1:9"\n[downlink]\ncommand_keys = "{keys}"\n')
    res = cli("run", "--config", str(path))
    assert res.returncode == 2
    error = next(line for line in res.stderr.splitlines() if "downlink.command_keys" in line)
    assert str(keys) in error and words in error


def test_run_refuses_a_missing_config_file(tmp_path):
    res = cli("run", "--config", str(tmp_path / "absent.toml"))
    assert res.returncode == 2 and "absent.toml: cannot read" in res.stderr


def test_run_with_a_config_file_under_systemd(broker, publisher, tmp_path):
    """The daemon from a config file: ledger token from the environment, a
    bundle delivered and a bad uplink refused and logged, and systemd told
    READY once started, STATUS when subscribed, WATCHDOG while running and
    STOPPING at SIGTERM."""
    token = "s3cret-token"
    srv = LedgerServer(tmp_path / "ledger.db", port=0, token=token).start()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"meter-gateway-test-{uuid.uuid4().hex}"
    notify.bind(b"\0" + address.encode())
    notify.settimeout(0.1)
    try:
        m = Meter("70b3d57ed0000c03")
        m.enroll(srv.url, token=token)
        status_port = runtime.free_port()
        path = tmp_path / "gateway.toml"
        path.write_text(f"""
name = "cli-gw"
state_dir = "state"
[mqtt]
port = {broker.port}
application_id = "app-1"
[[ledger]]
url = "{srv.url}"
token_env = "GW_TEST_LEDGER_TOKEN"
[status]
listen = "127.0.0.1:{status_port}"
[log]
level = "warning"
""")
        env = dict(os.environ, GW_TEST_LEDGER_TOKEN=token, NOTIFY_SOCKET="@" + address,
                   WATCHDOG_USEC="400000")
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config",
                                 str(path), "--log-level", "INFO"],
                                env=env, cwd=runtime.REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        said: list[str] = []

        def heard(state: str) -> bool:
            try:
                while True:
                    said.append(notify.recv(4096).decode())
            except (socket.timeout, BlockingIOError):
                pass
            return state in said

        try:
            wait_for(lambda: heard("READY=1"), "READY=1 from the daemon")
            wait_for(lambda: heard("STATUS=subscribed to application/app-1/device/+/event/up"),
                     "the daemon to say it is subscribed")
            publisher.publish(m.topic, m.uplink(1, 2))
            publisher.publish(m.topic, b"not json")
            status = ["--url", f"http://127.0.0.1:{status_port}", "--json"]
            wait_for(lambda: json.loads(cli("status", *status).stdout)["ledgers"][0]
                     ["forwarded"] == 1, "the bundle forwarded by the daemon", timeout=30)
            assert json.loads(cli("status", *status).stdout)["rejected"] == \
                {"malformed_json": 1}
            assert ledger_seqs(srv.url, m.dev_eui) == [1, 2]
            assert {r["gateway"] for r in ledger_readings(srv.url, m.dev_eui)} == {"cli-gw"}
            # Pings every 0.2 s (half of WATCHDOG_USEC) while healthy.
            wait_for(lambda: heard("WATCHDOG=1") and said.count("WATCHDOG=1") >= 3,
                     "watchdog pings")
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out.decode()
        assert b"malformed_json" in out  # the rejection was logged (--log-level INFO)
        heard("STOPPING=1")
        assert said[0] == "READY=1" and said[-1] == "STOPPING=1", said
        assert {s for s in said if not s.startswith("STATUS=")} == \
            {"READY=1", "WATCHDOG=1", "STOPPING=1"}
    finally:
        notify.close()
        srv.stop()


# -- status ----------------------------------------------------------------------------

def test_status_of_a_running_gateway(broker, publisher, tmp_path):
    ledger = LedgerServer(tmp_path / "l.db", port=0).start()
    gw = None
    try:
        m = Meter("70b3d57ed0000d04")
        m.enroll(ledger.url)
        gw = Gateway("127.0.0.1", broker.port, None, tmp_path / "state", name="status-gw",
                     ledgers=[(ledger.url, None)], status_port=0, backoff_cap=0.5).start()
        assert gw.wait_ready(10)
        publisher.publish(m.topic, m.uplink(1, 3))
        publisher.publish(m.topic, b"not json")
        publisher.publish(m.topic, b"[]")
        wait_for(lambda: gw.stats()["forwarded"] == 1 and gw.stats()["rejected_total"] == 2,
                 "one bundle forwarded, two uplinks refused", gw=gw)
        url = f"http://127.0.0.1:{gw.status_port}"
        ledger_url = ledger.url

        res = cli("status", "--url", url)
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        assert out.splitlines()[0].startswith(f"gateway status-gw at {url}: ok")
        assert "broker        connected" in out
        assert f"{ledger.url}: reachable, last success 20" in out and "1 forwarded" in out
        assert "verified      3 readings in 1 bundles" in out
        assert "rejected      2: malformed_event 1, malformed_json 1" in out
        assert "dead letters  2" in out

        view = json.loads(cli("status", "--url", url, "--json").stdout)
        assert (view["status"], view["mqtt_connected"], view["name"]) == ("ok", True, "status-gw")
        assert view["rejected"] == {"malformed_json": 1, "malformed_event": 1}
        assert view["verified"] == 3 and view["dead_letters"] == 2
        assert [(led["url"], led["failing"]) for led in view["ledgers"]] == [(ledger.url, False)]
        assert view["queue"]["depth"] == 0

        # The ledger goes away: the next bundle cannot be delivered.
        ledger.stop()
        publisher.publish(m.topic, m.uplink(4))
        wait_for(lambda: gw.stats()["ledgers"][0]["failing"], "the ledger failing", gw=gw)
        res = cli("status", "--url", url)
        assert res.returncode == 1, res.stdout
        assert f"{url}: degraded" in res.stdout
        assert f"{ledger_url}: FAILING" in res.stdout
        assert "queue         1 of 1000000 bundles waiting" in res.stdout
    finally:
        if gw is not None:
            gw.stop()
        ledger.stop()


def _stopped_gateway_state(state_dir: Path) -> None:
    """A state file as a stopped gateway leaves it: two bundles waiting for
    the ledger, three dead letters."""
    state_dir.mkdir()
    box = Outbox(state_dir / OUTBOX_FILE)
    try:
        box.store_bundle("70b3d57ed0000a01", b"\x01" * 80, 1, 4, T0 + 60)
        box.store_bundle("70b3d57ed0000a01", b"\x02" * 80, 5, 8, T0 + 960)
        with box.batch() as b:
            for i, reason in enumerate(("malformed_json", "bad_signature", "malformed_json")):
                b.dead_letter(T0 + i, "application/a/device/70b3d57ed0000a01/event/up",
                              "70b3d57ed0000a01", reason, "what was wrong", b"x")
    finally:
        box.close()


def test_status_when_the_daemon_does_not_answer(tmp_path):
    _stopped_gateway_state(tmp_path / "state")
    port = runtime.free_port()  # nothing listens there
    path = tmp_path / "gateway.toml"
    # The token variable is not set: status reads no secrets.
    path.write_text(f'state_dir = "state"\n[[ledger]]\nurl = "http://a"\n'
                    f'token_env = "GW_CLI_SURELY_UNSET"\n[status]\nlisten = "127.0.0.1:{port}"\n')
    res = cli("status", "--config", str(path))
    assert res.returncode == 3, res.stdout + res.stderr
    out = res.stdout
    assert f"the gateway is not answering: no answer from http://127.0.0.1:{port}" in out
    assert f"its state file {tmp_path / 'state' / OUTBOX_FILE} says:" in out
    assert f"queue         2 bundles waiting for the ledgers, the oldest from {utc(T0 + 60)} UTC" \
        in out
    assert "dead letters  3: malformed_json 2, bad_signature 1" in out

    res = cli("status", "--config", str(path), "--json")
    assert res.returncode == 3
    doc = json.loads(res.stdout)
    assert doc["reachable"] is False and doc["url"] == f"http://127.0.0.1:{port}"
    state = doc["state"]
    assert (state["queue_depth"], state["oldest_pending_at"], state["dead_letters"]) == \
        (2, T0 + 60, 3)
    assert state["dead_letters_by_reason"] == {"malformed_json": 2, "bad_signature": 1}

    # --url alone knows no state directory; with the status endpoint off, only the state.
    res = cli("status", "--url", f"http://127.0.0.1:{port}")
    assert res.returncode == 3 and "no state directory given" in res.stdout
    path.write_text('state_dir = "state"\n[[ledger]]\nurl = "http://a"\n[status]\nlisten = ""\n')
    res = cli("status", "--config", str(path))
    assert res.returncode == 3 and "status endpoint is off" in res.stdout
    assert "queue         2 bundles" in res.stdout


# -- dead-letters ------------------------------------------------------------------------

A, B = "70b3d57ed0000a01", "70b3d57ed0000b02"
EVENT = json.dumps({"deviceInfo": {"devEui": B}, "fPort": 1, "data": "AAEC"}).encode()
BIG = bytes(range(256)) * 300  # 76800 bytes, binary


@pytest.fixture
def dead_letters(tmp_path) -> Path:
    """A state file with three dead letters an hour apart (oldest first)."""
    state = tmp_path / "state"
    state.mkdir()
    box = Outbox(state / OUTBOX_FILE)
    try:
        with box.batch() as b:
            b.dead_letter(T0, f"application/x/device/{A}/event/up", A, "malformed_json",
                          "not JSON: Expecting value", b"not json")
            b.dead_letter(T0 + 3600, f"application/x/device/{B}/event/up", B, "bad_signature",
                          "the signature does not verify", EVENT)
            b.dead_letter(T0 + 7200, "application/x/device/zz/event/up", None,
                          "oversized_message", "80 KiB", BIG)
    finally:
        box.close()
    return state


def test_dead_letters_table_newest_first(dead_letters):
    res = cli("dead-letters", "--state-dir", str(dead_letters))
    assert res.returncode == 0, res.stderr
    header, *rows = res.stdout.splitlines()
    assert header.split() == ["time", "(UTC)", "device", "reason", "size", "message"]
    assert [r.split()[:5] for r in rows] == [
        [*utc(T0 + 7200).split(), "-", "oversized_message", str(len(BIG))],
        [*utc(T0 + 3600).split(), B, "bad_signature", str(len(EVENT))],
        [*utc(T0).split(), A, "malformed_json", "8"],
    ]
    assert rows[0].endswith("80 KiB") and rows[2].endswith("not JSON: Expecting value")


@pytest.mark.parametrize("args,reasons", [
    (["--reason", "bad_signature"], ["bad_signature"]),
    (["--device", A.upper()], ["malformed_json"]),
    (["--since", "2026-01-01T00:30:00Z"], ["oversized_message", "bad_signature"]),
    (["--since", "2026-01-01T01:30"], ["oversized_message"]),
    (["--since", str(T0 + 3600)], ["oversized_message", "bad_signature"]),
    (["--limit", "1"], ["oversized_message"]),
    (["--reason", "replay"], []),
])
def test_dead_letters_filters(dead_letters, args, reasons):
    res = cli("dead-letters", "--state-dir", str(dead_letters), "--json", *args)
    assert res.returncode == 0, res.stderr
    assert [json.loads(line)["reason"] for line in res.stdout.splitlines()] == reasons


def test_dead_letters_as_json_with_payloads(dead_letters):
    res = cli("dead-letters", "--state-dir", str(dead_letters), "--json", "--payload")
    docs = [json.loads(line) for line in res.stdout.splitlines()]
    big, event, garbage = docs
    assert event == {"id": event["id"], "received_at": T0 + 3600,
                     "time": "2026-01-01T01:00:00+00:00",
                     "topic": f"application/x/device/{B}/event/up", "dev_eui": B,
                     "reason": "bad_signature", "message": "the signature does not verify",
                     "size": len(EVENT), "payload": EVENT.hex(), "payload_text": EVENT.decode()}
    assert garbage["payload"] == b"not json".hex() and "payload_text" not in garbage
    # Only the first 4 KiB of a payload is kept.
    assert big["size"] == len(BIG) and big["payload"] == BIG[:4096].hex()
    assert big["dev_eui"] is None and "payload_text" not in big


def test_dead_letters_table_with_payloads(dead_letters, tmp_path):
    # Through the config file this time: its secrets are not needed.
    path = tmp_path / "gateway.toml"
    path.write_text('state_dir = "state"\n[[ledger]]\nurl = "http://a"\n'
                    'token_file = "absent.token"\n')
    res = cli("dead-letters", "--config", str(path), "--payload")
    assert res.returncode == 0, res.stderr
    payloads = [line.strip() for line in res.stdout.splitlines() if line.startswith("    ")]
    assert payloads == [f"payload (first 4096 of {len(BIG)} bytes): {BIG[:4096].hex()}",
                        f"payload: {EVENT.decode()}",
                        f"payload: {b'not json'.hex()}"]


def test_dead_letters_refuses_what_it_cannot_read(tmp_path):
    res = cli("dead-letters", "--state-dir", str(tmp_path))
    assert res.returncode == 1 and f"no state file {tmp_path / OUTBOX_FILE}" in res.stderr
    res = cli("dead-letters", "--state-dir", str(tmp_path), "--since", "last tuesday")
    assert res.returncode == 2 and "is not a time" in res.stderr
    res = cli("dead-letters", "--state-dir", str(tmp_path), "--device", "70b3")
    assert res.returncode == 2 and "is not a DevEUI" in res.stderr
    res = cli("dead-letters")
    assert res.returncode == 2 and "--config" in res.stderr
