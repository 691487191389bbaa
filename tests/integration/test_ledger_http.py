"""The ledger node over real HTTP on loopback: a LedgerServer in this process, and the
`ledger-node` command in a child process for crash and offline-check behaviour."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from ledger_node.server import LedgerServer
from ledger_node.store import Store
from meter import frame
from tools import runtime

TOKEN = "correct-horse-battery"
EUI = "70b3d57ed0000001"
T0 = 1_767_225_600


class Meter:
    def __init__(self, dev_eui: str = EUI):
        self.dev_eui = dev_eui
        self.key = ECC.generate(curve="Ed25519")
        self.public_key = self.key.public_key().export_key(format="raw")

    def frame(self, seq: int, import_dwh: int | None = None, key=None) -> bytes:
        body = frame.encode_body(seq=seq, t_end=T0 + 900 * seq, interval_s=900,
                                 import_dwh=1000 * seq if import_dwh is None else import_dwh,
                                 export_dwh=0, irms_ca=420, vrms_dv=2310, flags=0)
        sig = eddsa.new(key or self.key, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(self.dev_eui), body))
        return frame.assemble(body, sig)

    def item(self, seq: int, **kw) -> dict:
        return {"dev_eui": self.dev_eui,
                "frame": base64.b64encode(self.frame(seq, **kw)).decode(),
                "received_at": T0 + 900 * seq + 2.5, "gateway": "gw-1"}

    def enrollment(self) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key.hex(),
                "meter_model": "SCT013-000", "board": "esp32", "community": "north"}


def call(url: str, method: str = "GET", body=None, token: str | None = TOKEN,
         raw: bytes | None = None, timeout: float = 30):
    """(status, decoded JSON) for one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def server(db):
    with LedgerServer(db, host="127.0.0.1", port=0, token=TOKEN) as srv:
        yield srv


@pytest.fixture
def meter(server):
    m = Meter()
    status, _ = call(server.url + "/v1/devices", "POST", m.enrollment())
    assert status == 201
    return m


def post_readings(server, items, token=TOKEN):
    return call(server.url + "/v1/readings", "POST", {"readings": items}, token=token)


def test_health_and_unknown_paths(server):
    assert call(server.url + "/v1/health") == (200, {"status": "ok"})
    status, body = call(server.url + "/v2/everything")
    assert status == 404 and body["error"] == "not_found" and "/v2/everything" in body["message"]
    status, body = call(server.url + "/v1/readings", "DELETE")
    assert status == 405 and body["error"] == "method_not_allowed"


def test_enrollment_over_http(server):
    m = Meter()
    url = server.url + "/v1/devices"
    status, body = call(url, "POST", m.enrollment())
    assert status == 201 and body["status"] == "enrolled"
    status, body = call(url, "POST", m.enrollment())
    assert status == 200 and body["status"] == "already_enrolled"
    status, body = call(url, "POST", Meter(EUI).enrollment())
    assert status == 409 and body["error"] == "key_conflict"
    status, body = call(url, "POST", {"dev_eui": EUI})
    assert status == 400 and body["error"] == "malformed" and "public_key" in body["message"]

    status, body = call(url)
    assert status == 200
    assert body["devices"] == [{**m.enrollment(), "enrolled_at": body["devices"][0]["enrolled_at"]}]


def test_writers_need_the_token_readers_do_not(server, meter):
    for token in (None, "wrong-token", TOKEN + "x"):
        status, body = post_readings(server, [meter.item(1)], token=token)
        assert status == 401 and body["error"] == "unauthorized"
        status, body = call(server.url + "/v1/devices", "POST", Meter("00000000000000aa")
                            .enrollment(), token=token)
        assert status == 401
    assert call(server.url + "/v1/readings", token=None) == (200, {"readings": [],
                                                                   "more": False})
    status, body = post_readings(server, [meter.item(1)])
    assert status == 200 and body["results"][0]["status"] == "stored"


def test_without_a_token_writes_are_open(db):
    with LedgerServer(db) as srv:
        m = Meter()
        assert call(srv.url + "/v1/devices", "POST", m.enrollment(), token=None)[0] == 201


def test_batch_results_keep_item_order(server, meter, caplog):
    caplog.set_level(logging.WARNING, logger="ledger_node")
    intruder = ECC.generate(curve="Ed25519")
    items = [meter.item(1), meter.item(2), meter.item(1), meter.item(3, key=intruder),
             {"dev_eui": EUI, "frame": "%%%"}, Meter("00000000000000bb").item(1),
             meter.item(2, import_dwh=5)]
    status, body = post_readings(server, items)
    assert status == 200
    got = [(r["status"], r["reason"]) for r in body["results"]]
    assert got == [("stored", None), ("stored", None), ("duplicate", None),
                   ("rejected", "bad_signature"), ("rejected", "malformed"),
                   ("rejected", "unknown_device"), ("rejected", "conflict")]
    assert body["results"][2]["entry_id"] == body["results"][0]["entry_id"]
    assert all(r["entry_id"] is None and r["message"] for r in body["results"][3:])
    logged = caplog.text
    for reason in ("bad_signature", "malformed", "unknown_device", "conflict"):
        assert reason in logged


def test_query_readings(server, meter):
    other = Meter("70b3d57ed0000002")
    call(server.url + "/v1/devices", "POST", other.enrollment())
    post_readings(server, [meter.item(s) for s in range(1, 11)] + [other.item(1)])

    status, body = call(server.url + f"/v1/readings?dev_eui={EUI}&from={T0 + 900 * 3}"
                                     f"&to={T0 + 900 * 6}", token=None)
    assert status == 200 and not body["more"]
    assert [r["seq"] for r in body["readings"]] == [3, 4, 5]
    r = body["readings"][0]
    assert (r["dev_eui"], r["t_end"], r["interval_s"], r["import_dwh"], r["export_dwh"],
            r["irms_ca"], r["vrms_dv"], r["flags"], r["gateway"]) == \
        (EUI, T0 + 2700, 900, 3000, 0, 420, 2310, 0, "gw-1")
    assert base64.b64decode(r["frame"]) == meter.frame(3)
    assert r["received_at"] == T0 + 2700 + 2.5 and isinstance(r["entry_id"], int)

    status, body = call(server.url + f"/v1/readings?dev_eui={EUI.upper()}&limit=4")
    assert [r["seq"] for r in body["readings"]] == [1, 2, 3, 4] and body["more"]
    status, body = call(server.url + "/v1/readings")
    assert len(body["readings"]) == 11

    for query, word in [("dev_eui=xyz", "dev_eui"), ("limit=0", "limit"),
                        ("limit=ten", "limit"), ("from=yesterday", "from"),
                        ("to=nan", "to"), ("since=1", "since"), ("limit=1&limit=2", "limit")]:
        status, body = call(server.url + "/v1/readings?" + query)
        assert status == 400, query
        assert word in body["message"]


@pytest.mark.parametrize("raw,code", [
    (b"this is not json", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    (b'{"readings": [NaN]}', "bad_json"),
    (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
    (b"[]", "bad_request"),
    (b'{"items": []}', "bad_request"),
    (b'{"readings": {"dev_eui": "x"}}', "bad_request"),
])
def test_bodies_that_are_not_a_batch_get_400(server, raw, code):
    status, body = call(server.url + "/v1/readings", "POST", raw=raw)
    assert status == 400 and body["error"] == code and body["message"]
    assert call(server.url + "/v1/health")[0] == 200


def test_enrollment_body_must_be_json(server):
    status, body = call(server.url + "/v1/devices", "POST", raw=b"{dev_eui: 1}")
    assert (status, body["error"]) == (400, "bad_json")


def test_oversized_body_and_batch_get_413(server, meter):
    status, body = call(server.url + "/v1/readings", "POST",
                        raw=b" " * (4 * 1024 * 1024 + 1))
    assert (status, body["error"]) == (413, "too_large")
    status, body = post_readings(server, [meter.item(1)] * 1001)
    assert (status, body["error"]) == (413, "too_many_items")
    assert "1001" in body["message"]
    status, body = post_readings(server, [meter.item(1)] * 1000)
    assert status == 200 and len(body["results"]) == 1000
    assert call(server.url + "/v1/readings")[1]["readings"][0]["seq"] == 1


def test_garbage_on_the_socket_does_not_stop_the_server(server):
    host, port = server.url.rsplit("/", 1)[1].split(":")
    for junk in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET\r\n\r\n",
                 b"POST /v1/readings HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                 b"POST /v1/readings HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"rea"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    assert call(server.url + "/v1/health") == (200, {"status": "ok"})


def test_stats_count_every_outcome(server, meter):
    post_readings(server, [meter.item(1), meter.item(2), meter.item(2),
                           meter.item(3, import_dwh=1), {"dev_eui": EUI}])
    post_readings(server, [meter.item(4)], token="nope")
    call(server.url + "/nowhere")
    status, stats = call(server.url + "/v1/stats")
    assert status == 200
    assert (stats["devices"], stats["readings"], stats["stored"], stats["duplicate"],
            stats["rejected"]) == (1, 2, 2, 1, 2)
    assert stats["rejected_by_reason"] == {"registers_backwards": 1, "malformed": 1}
    assert stats["http_errors"] == {"unauthorized": 1, "not_found": 1}
    assert stats["per_device"] == {EUI: {"readings": 2, "latest_seq": 2,
                                         "latest_t_end": T0 + 1800, "import_dwh": 2000,
                                         "export_dwh": 0}}


def test_check_endpoint_sees_a_row_edited_in_the_file(server, db, meter):
    status, body = post_readings(server, [meter.item(s) for s in range(1, 4)])
    target = body["results"][1]["entry_id"]
    assert call(server.url + "/v1/check") == (200, {"ok": True, "readings": 3, "devices": 1,
                                                    "problems": [], "problems_total": 0})
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE readings SET import_dwh = import_dwh + 10000 WHERE entry_id = ?",
                     (target,))
    conn.close()
    status, report = call(server.url + "/v1/check")
    assert status == 200 and report["ok"] is False
    assert [(p["kind"], p["entry_id"], p["seq"]) for p in report["problems"]] == \
        [("column_mismatch", target, 2)]
    assert "import_dwh" in report["problems"][0]["message"]


def test_stop_closes_the_port_and_idle_keep_alive_connections(db):
    srv = LedgerServer(db).start()
    url = srv.url
    idle = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    idle.request("GET", "/v1/health")
    with idle.getresponse() as resp:
        assert resp.status == 200 and resp.getheader("Connection") != "close"
        resp.read()
    srv.stop()
    srv.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + "/v1/health", timeout=5)
    with pytest.raises(ConnectionError):
        idle.request("GET", "/v1/health")
        idle.getresponse()
    idle.close()


# -- the ledger-node command -------------------------------------------------------

def _ledger_node(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ledger_node.cli", *args], cwd=runtime.REPO,
                          capture_output=True, text=True, timeout=60, **kw)


def test_accepted_readings_survive_a_killed_server_and_check_offline(tmp_path):
    db = tmp_path / "ledger.db"
    port = runtime.free_port()
    env = {**os.environ, "LEDGER_NODE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-m", "ledger_node.cli", "serve", "--db", str(db),
                             "--listen", f"127.0.0.1:{port}"], cwd=runtime.REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        runtime.wait_for_port(port, timeout=20)
        url = f"http://127.0.0.1:{port}"
        m = Meter()
        assert call(url + "/v1/devices", "POST", m.enrollment(), token=None)[0] == 401
        assert call(url + "/v1/devices", "POST", m.enrollment())[0] == 201
        status, body = call(url + "/v1/readings", "POST",
                            {"readings": [m.item(s) for s in range(1, 6)]})
        assert status == 200
        ids = [r["entry_id"] for r in body["results"]]
        # No shutdown at all: whatever was acknowledged must already be on disk.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        runtime.stop_process(proc)

    with Store(db, create=False) as store:
        assert [(r.entry_id, r.seq) for r in store.readings(EUI)] == list(zip(ids, range(1, 6)))

    ok = _ledger_node("check", "--db", str(db))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "5 readings from 1 devices" in ok.stdout

    forged = bytearray(m.frame(1))
    forged[-5] ^= 0x01
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE readings SET frame = ? WHERE entry_id = ?", (bytes(forged), ids[0]))
    conn.close()
    bad = _ledger_node("check", "--db", str(db), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [(p["kind"], p["entry_id"]) for p in report["problems"]] == \
        [("bad_signature", ids[0])]


def test_check_command_refuses_a_missing_database(tmp_path):
    res = _ledger_node("check", "--db", str(tmp_path / "nothing.db"))
    assert res.returncode == 2 and "no ledger database" in res.stderr
    assert not (tmp_path / "nothing.db").exists()
