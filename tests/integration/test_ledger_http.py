"""The ledger node over real HTTP on loopback: a LedgerServer in this process, and the
`ledger-node` command in a child process for crash and offline-check behaviour."""

from __future__ import annotations

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

    def bundle(self, *seqs: int, import_dwh: dict | None = None, key=None) -> bytes:
        """Consecutive readings every 900 s, 100.0 Wh each unless import_dwh
        {seq: value} says otherwise."""
        over = import_dwh or {}
        body = frame.encode_body([(s, T0 + 900 * s, over.get(s, 1000 * s), 0, 0) for s in seqs])
        sig = eddsa.new(key or self.key, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(self.dev_eui), body))
        return frame.assemble(body, sig)

    def item(self, *seqs: int, **kw) -> dict:
        return {"dev_eui": self.dev_eui, "bundle": self.bundle(*seqs, **kw).hex(),
                "received_at": T0 + 900 * seqs[-1] + 2.5, "gateway": "gw-1"}

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


def post_bundles(server, items, token=TOKEN):
    return call(server.url + "/v1/bundles", "POST", {"bundles": items}, token=token)


def test_health_and_unknown_paths(server):
    assert call(server.url + "/v1/health") == (200, {"status": "ok"})
    status, body = call(server.url + "/v2/everything")
    assert status == 404 and body["error"] == "not_found" and "/v2/everything" in body["message"]
    status, body = call(server.url + "/v1/readings", "DELETE")
    assert status == 405 and body["error"] == "method_not_allowed"
    # Readings are written only as bundles now.
    status, body = call(server.url + "/v1/readings", "POST", {"readings": []})
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
    assert body["devices"] == [{**m.enrollment(), "enrolled_at": body["devices"][0]["enrolled_at"],
                                "latest_seq": None}]
    assert post_bundles(server, [m.item(4, 5, 6), m.item(1)])[0] == 200
    assert [d["latest_seq"] for d in call(url)[1]["devices"]] == [6]


def test_writers_need_the_token_readers_do_not(server, meter):
    for token in (None, "wrong-token", TOKEN + "x"):
        status, body = post_bundles(server, [meter.item(1)], token=token)
        assert status == 401 and body["error"] == "unauthorized"
        status, body = call(server.url + "/v1/devices", "POST", Meter("00000000000000aa")
                            .enrollment(), token=token)
        assert status == 401
    assert call(server.url + "/v1/readings", token=None) == (200, {"readings": [],
                                                                   "more": False})
    status, body = post_bundles(server, [meter.item(1)])
    assert status == 200 and body["results"][0]["status"] == "ok"


def test_without_a_token_writes_are_open(db):
    with LedgerServer(db) as srv:
        m = Meter()
        assert call(srv.url + "/v1/devices", "POST", m.enrollment(), token=None)[0] == 201


def test_batch_results_keep_item_order(server, meter, caplog):
    caplog.set_level(logging.WARNING, logger="ledger_node")
    intruder = ECC.generate(curve="Ed25519")
    items = [meter.item(1, 2), meter.item(2, 3), meter.item(1, 2), meter.item(4, key=intruder),
             {"dev_eui": EUI, "bundle": "%%%"}, Meter("00000000000000bb").item(1),
             meter.item(3, import_dwh={3: 5})]
    status, body = post_bundles(server, items)
    assert status == 200
    res = body["results"]
    assert [(r["status"], r["reason"]) for r in res] == [
        ("ok", None), ("ok", None), ("ok", None), ("rejected", "bad_signature"),
        ("rejected", "malformed"), ("rejected", "unknown_device"), ("rejected", "conflict")]
    assert [(r["stored"], r["duplicate"]) for r in res[:3]] == [(2, 0), (1, 1), (0, 2)]
    assert [(r["seq"], r["status"]) for r in res[1]["readings"]] == [(2, "duplicate"),
                                                                    (3, "stored")]
    first_ids = [r["entry_id"] for r in res[0]["readings"]]
    assert [r["entry_id"] for r in res[2]["readings"]] == first_ids
    assert res[1]["readings"][0]["entry_id"] == first_ids[1]
    assert isinstance(res[0]["bundle_id"], int) and res[2]["bundle_id"] is None
    assert all(r["bundle_id"] is None and r["readings"] == [] and r["message"]
               for r in res[3:])
    logged = caplog.text
    for reason in ("bad_signature", "malformed", "unknown_device", "conflict"):
        assert reason in logged


def test_query_readings(server, meter):
    other = Meter("70b3d57ed0000002")
    call(server.url + "/v1/devices", "POST", other.enrollment())
    post_bundles(server, [meter.item(1, 2, 3), meter.item(4, 5, 6), meter.item(7, 8, 9, 10),
                          other.item(1)])

    status, body = call(server.url + f"/v1/readings?dev_eui={EUI}&from={T0 + 900 * 3}"
                                     f"&to={T0 + 900 * 6}", token=None)
    assert status == 200 and not body["more"]
    assert [r["seq"] for r in body["readings"]] == [3, 4, 5]
    r = body["readings"][0]
    assert (r["dev_eui"], r["t_end"], r["import_dwh"], r["export_dwh"], r["flags"],
            r["gateway"]) == (EUI, T0 + 2700, 3000, 0, 0, "gw-1")
    assert "interval_s" not in r and "irms_ca" not in r
    # Each reading comes with the bundle that proves it.
    assert bytes.fromhex(r["bundle"]) == meter.bundle(1, 2, 3)
    assert bytes.fromhex(body["readings"][1]["bundle"]) == meter.bundle(4, 5, 6)
    assert body["readings"][1]["bundle_id"] == body["readings"][2]["bundle_id"] != r["bundle_id"]
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
    (b'{"bundles": [NaN]}', "bad_json"),
    (b"[" * 100_000 + b"]" * 100_000, "bad_json"),
    (b"[]", "bad_request"),
    (b'{"readings": []}', "bad_request"),
    (b'{"bundles": {"dev_eui": "x"}}', "bad_request"),
])
def test_bodies_that_are_not_a_batch_get_400(server, raw, code):
    status, body = call(server.url + "/v1/bundles", "POST", raw=raw)
    assert status == 400 and body["error"] == code and body["message"]
    assert call(server.url + "/v1/health")[0] == 200


def test_enrollment_body_must_be_json(server):
    status, body = call(server.url + "/v1/devices", "POST", raw=b"{dev_eui: 1}")
    assert (status, body["error"]) == (400, "bad_json")


def test_oversized_body_and_batch_get_413(server, meter):
    status, body = call(server.url + "/v1/bundles", "POST",
                        raw=b" " * (4 * 1024 * 1024 + 1))
    assert (status, body["error"]) == (413, "too_large")
    status, body = post_bundles(server, [meter.item(1)] * 1001)
    assert (status, body["error"]) == (413, "too_many_items")
    assert "1001" in body["message"]
    status, body = post_bundles(server, [meter.item(1)] * 1000)
    assert status == 200 and len(body["results"]) == 1000
    assert call(server.url + "/v1/readings")[1]["readings"][0]["seq"] == 1


def test_garbage_on_the_socket_does_not_stop_the_server(server):
    host, port = server.url.rsplit("/", 1)[1].split(":")
    for junk in (b"\x00\x01\x02 garbage\r\n\r\n", b"GET\r\n\r\n",
                 b"POST /v1/bundles HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                 b"POST /v1/bundles HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"bun"):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(junk)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    assert call(server.url + "/v1/health") == (200, {"status": "ok"})


def test_stats_count_every_outcome(server, meter):
    post_bundles(server, [meter.item(1, 2), meter.item(2, 3), meter.item(2, 3),
                          meter.item(4, import_dwh={4: 1}), {"dev_eui": EUI}])
    post_bundles(server, [meter.item(5)], token="nope")
    call(server.url + "/nowhere")
    status, stats = call(server.url + "/v1/stats")
    assert status == 200
    # Readings 1, 2, 3 stored; 2 once and 2, 3 again duplicates; two bundles kept.
    assert (stats["devices"], stats["bundles"], stats["readings"], stats["bundles_stored"],
            stats["stored"], stats["duplicate"], stats["rejected"]) == (1, 2, 3, 2, 3, 3, 2)
    assert stats["rejected_by_reason"] == {"registers_backwards": 1, "malformed": 1}
    assert stats["http_errors"] == {"unauthorized": 1, "not_found": 1}
    assert stats["per_device"] == {EUI: {"readings": 3, "latest_seq": 3,
                                         "latest_t_end": T0 + 2700, "import_dwh": 3000,
                                         "export_dwh": 0}}


def test_check_endpoint_sees_a_row_edited_in_the_file(server, db, meter):
    status, body = post_bundles(server, [meter.item(1, 2, 3)])
    target = body["results"][0]["readings"][1]["entry_id"]
    assert call(server.url + "/v1/check") == (200, {"ok": True, "bundles": 1, "readings": 3,
                                                    "devices": 1, "problems": [],
                                                    "problems_total": 0})
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE readings SET import_dwh = import_dwh + 10000 WHERE entry_id = ?",
                     (target,))
    conn.close()
    status, report = call(server.url + "/v1/check")
    assert status == 200 and report["ok"] is False
    assert [(p["kind"], p["entry_id"], p["seq"]) for p in report["problems"]] == \
        [("column_mismatch", target, 2)]
    assert "import_dwh" in report["problems"][0]["message"]


def test_in_process_enrollment_and_every_reading_of_a_device(server):
    m = Meter("70b3d57ed00000cc")
    device = server.api.enroll(m.enrollment())
    assert (device["dev_eui"], device["public_key"]) == (m.dev_eui, m.public_key.hex())
    # Past the 1000 a GET returns at once: 33 full bundles of 32 readings.
    items = [m.item(*range(first, first + 32)) for first in range(1, 1057, 32)]
    status, body = post_bundles(server, items)
    assert status == 200 and all(r["stored"] == 32 for r in body["results"])
    rows = server.api.readings_of(m.dev_eui.upper())
    assert [r["seq"] for r in rows] == list(range(1, 1057))
    assert rows[-1]["import_dwh"] == 1056 * 1000
    assert bytes.fromhex(rows[-1]["bundle"]) == m.bundle(*range(1025, 1057))


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
        status, body = call(url + "/v1/bundles", "POST",
                            {"bundles": [m.item(1, 2, 3), m.item(4, 5)]})
        assert status == 200
        ids = [r["entry_id"] for res in body["results"] for r in res["readings"]]
        bundle_ids = [res["bundle_id"] for res in body["results"]]
        # No shutdown at all: whatever was acknowledged must already be on disk.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        runtime.stop_process(proc)

    with Store(db, create=False) as store:
        assert [(r.entry_id, r.seq) for r in store.readings(EUI)] == list(zip(ids, range(1, 6)))

    ok = _ledger_node("check", "--db", str(db))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "5 readings in 2 bundles from 1 devices: consistent" in ok.stdout

    forged = bytearray(m.bundle(1, 2, 3))
    forged[-5] ^= 0x01
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE bundles SET data = ? WHERE bundle_id = ?", (bytes(forged),
                                                                         bundle_ids[0]))
    conn.close()
    bad = _ledger_node("check", "--db", str(db), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False
    assert [(p["kind"], p["bundle_id"]) for p in report["problems"]] == \
        [("bad_signature", bundle_ids[0])]
    text = _ledger_node("check", "--db", str(db))
    assert text.returncode == 1 and "1 problem(s)" in text.stdout
    assert f"bad_signature: dev_eui={EUI} bundle={bundle_ids[0]}" in text.stdout


def test_check_command_refuses_a_missing_database(tmp_path):
    res = _ledger_node("check", "--db", str(tmp_path / "nothing.db"))
    assert res.returncode == 2 and "no ledger database" in res.stderr
    assert not (tmp_path / "nothing.db").exists()
