"""The ledger node over real HTTP on loopback: a LedgerServer in this process.

Meters sign their bundles with real Ed25519 keys (PyNaCl) through meter.frame,
as the firmware does. Proofs are checked with ledger_node.merkle's checkers
against roots taken from checkpoints whose signatures are verified with the
log's verifier key; entry bytes and tree roots are recomputed here from the
layout of the design (type byte, DevEUI, the meter's bytes) and from SHA-256
directly. Checkpoints are signed by calling the log's signer
(`srv.log.sign_checkpoint()`), not by waiting for its one-second cadence, so
what is covered when is decided by the test.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import socket
import sqlite3
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest
from nacl.signing import SigningKey

from ledger_node import checkpoint as ckpt
from ledger_node import merkle, note
from ledger_node.server import MAX_BODY, LedgerServer
from meter import frame

WRITER = "writer-token-7f3a"
ADMIN = "admin-token-91c2"
ORIGIN = "ledger.test/north"
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z
OWNER = "9f2c4e0b7d1a3c55"
W_SKEY, W_VKEY = ckpt.generate_cosigner_key("witness.example")
STRANGER_SKEY, _ = ckpt.generate_cosigner_key("stranger.example")


def leaf(data: bytes) -> bytes:
    """RFC 6962 leaf hash, written out here rather than taken from merkle."""
    return hashlib.sha256(b"\x00" + data).digest()


def R(seq: int, import_dwh: int | None = None, t_end: int | None = None, flags: int = 0,
      export_dwh: int = 0) -> tuple:
    """A reading: by default every 900 s, 100.0 Wh (1000 dWh) per interval."""
    return (seq, T0 + 900 * seq if t_end is None else t_end,
            1000 * seq if import_dwh is None else import_dwh, export_dwh, flags)


class Meter:
    def __init__(self, dev_eui: str, seed: int):
        self.dev_eui = dev_eui
        self.eui = bytes.fromhex(dev_eui)
        self.key = SigningKey(bytes([seed]) * 32)
        self.public_key = bytes(self.key.verify_key).hex()

    def bundle(self, *readings, key: SigningKey | None = None, sign_as: bytes | None = None
               ) -> bytes:
        """Readings are seqs (default values) or R(...) tuples."""
        body = frame.encode_body([R(r) if isinstance(r, int) else r for r in readings])
        sig = (key or self.key).sign(frame.signed_message(sign_as or self.eui, body)).signature
        return frame.assemble(body, sig)

    def item(self, *readings, **kw) -> dict:
        extra = {k: kw.pop(k) for k in ("received_at", "gateway") if k in kw}
        return {"dev_eui": self.dev_eui, "bundle": self.bundle(*readings, **kw).hex(), **extra}

    def entry(self, *readings, **kw) -> bytes:
        """The log entry of a bundle: type 0x01, the DevEUI, the meter's bytes."""
        return b"\x01" + self.eui + self.bundle(*readings, **kw)

    def enrollment(self, **over) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key, "owner": OWNER,
                "community": "north", "meter_model": "SCT013-000", "board": "esp32",
                "ct_rating_a": 60, **over}


M1 = Meter("70b3d57ed0000001", 1)
M2 = Meter("70b3d57ed0000002", 2)
M3 = Meter("70b3d57ed0000003", 3)
NEW_KEY = SigningKey(bytes([41]) * 32)
INTRUDER = SigningKey(bytes([99]) * 32)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: object  # parsed JSON, or text

    def __iter__(self):  # status, body = call(...)
        return iter((self.status, self.body))


def call(url: str, method: str = "GET", body=None, token: str | None = None,
         raw: bytes | None = None) -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, headers, payload = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            status, headers, payload = err.code, err.headers, err.read()
    if headers.get_content_type() == "application/json":
        return Answer(status, headers, json.loads(payload))
    return Answer(status, headers, payload.decode())


def raw_http(srv: LedgerServer, request: bytes) -> Answer:
    """Send bytes as they are (headers the client libraries would fix up)."""
    with socket.create_connection((srv.host, srv.port), timeout=30) as sock:
        sock.sendall(request)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return Answer(resp.status, resp.headers, json.loads(resp.read()))


class Client:
    """The node's API as a gateway and an operator use it."""

    def __init__(self, srv: LedgerServer):
        self.srv = srv
        self.url = srv.url

    def get(self, path: str) -> Answer:
        return call(self.url + path)

    def enroll(self, m: Meter, **over) -> Answer:
        return call(self.url + "/v1/devices", "POST", m.enrollment(**over), token=ADMIN)

    def rotate(self, m: Meter, body: dict, token: str = ADMIN) -> Answer:
        return call(self.url + f"/v1/devices/{m.dev_eui}/rotate", "POST", body, token=token)

    def revoke(self, m: Meter, body: dict, token: str = ADMIN) -> Answer:
        return call(self.url + f"/v1/devices/{m.dev_eui}/revoke", "POST", body, token=token)

    def post(self, *items) -> list[dict]:
        """Results of one batch (the request itself must succeed)."""
        a = call(self.url + "/v1/bundles", "POST", {"bundles": list(items)}, token=WRITER)
        assert a.status == 200, a.body
        assert len(a.body["results"]) == len(items)
        return a.body["results"]

    def sign(self) -> ckpt.Checkpoint:
        """Sign a checkpoint of everything committed; return it as the API serves it."""
        self.srv.log.sign_checkpoint()
        return self.checkpoint()

    def checkpoint(self, size: int | None = None) -> ckpt.Checkpoint:
        a = self.get("/v1/checkpoint" + ("" if size is None else f"?size={size}"))
        assert a.status == 200, a.body
        text, _ = note.open_note(a.body, [note.Verifier(self.srv.vkey)])
        return ckpt.Checkpoint.parse(text)

    def entries(self, start: int, end: int) -> list[bytes]:
        a = self.get(f"/v1/entries?start={start}&end={end}")
        assert a.status == 200, a.body
        assert [e["index"] for e in a.body["entries"]] == list(range(start, start + len(
            a.body["entries"])))
        return [bytes.fromhex(e["data"]) for e in a.body["entries"]]


def start(db, **kw) -> LedgerServer:
    args = dict(token=WRITER, admin_token=ADMIN, origin=ORIGIN, witnesses=[W_VKEY],
                checkpoint_interval_s=3600)
    args.update(kw)
    return LedgerServer(db, **args).start()


@pytest.fixture
def db(tmp_path):
    return tmp_path / "ledger.db"


@pytest.fixture
def srv(db):
    s = start(db)
    yield s
    s.stop()


@pytest.fixture
def api(srv):
    return Client(srv)


def ok(result: dict, entry, stored: dict | None = None, duplicate: dict | None = None) -> None:
    """An admitted bundle: its entry and, per seq, the entry holding it."""
    readings = {**{s: ("stored", e) for s, e in (stored or {}).items()},
                **{s: ("duplicate", e) for s, e in (duplicate or {}).items()}}
    assert result["status"] == "ok" and result["reason"] is None, result
    assert result["entry"] == entry
    assert {r["seq"]: (r["status"], r["entry"]) for r in result["readings"]} == readings
    assert [r["seq"] for r in result["readings"]] == sorted(readings)
    assert (result["stored"], result["duplicate"]) == (len(stored or {}), len(duplicate or {}))


def rejected(result: dict, reason: str) -> None:
    assert result["status"] == "rejected" and result["reason"] == reason, result
    assert result["entry"] is None and result["readings"] == [] and result["message"]


# -- health, stats, errors ----------------------------------------------------------------


def test_health_and_stats(api):
    assert api.get("/v1/health").body == {"status": "ok", "size": 0}
    assert api.enroll(M1).status == 201
    results = api.post(M1.item(1, 2), M1.item(1, 2), M1.item(3, key=INTRUDER), M2.item(1),
                       {"dev_eui": M1.dev_eui, "bundle": "%%"})
    assert [r["status"] for r in results] == ["ok", "ok", "rejected", "rejected", "rejected"]
    assert api.get("/v1/nowhere").status == 404
    assert api.get("/v1/health").body == {"status": "ok", "size": 2}

    stats = api.get("/v1/stats").body
    assert stats["origin"] == ORIGIN
    assert (stats["size"], stats["entries"], stats["devices"], stats["readings"]) == (2, 2, 1, 2)
    assert (stats["bundles"], stats["stored"], stats["duplicate"]) == (1, 2, 2)
    assert stats["rejected"] == 3
    assert stats["rejected_by_reason"] == {"bad_signature": 1, "unknown_device": 1,
                                           "malformed": 1}
    assert stats["http_errors"] == {"not_found": 1}
    # The checkpoint signed at start covers the empty log.
    assert (stats["checkpoint_size"], stats["checkpoint_cosignatures"]) == (0, 0)
    assert stats["halted"] is None
    assert stats["per_device"] == {M1.dev_eui: {"readings": 2, "latest_seq": 2,
                                                "latest_t_end": T0 + 1800, "import_dwh": 2000,
                                                "export_dwh": 0}}


def test_unknown_paths_and_methods(api):
    a = api.get("/v2/everything")
    assert a.status == 404 and a.body["error"] == "not_found"
    assert "/v2/everything" in a.body["message"]
    for method, path, allow in [("DELETE", "/v1/readings", "GET"), ("GET", "/v1/bundles", "POST"),
                                ("PUT", "/v1/devices", "GET, POST"),
                                ("PATCH", f"/v1/devices/{M1.dev_eui}", "GET"),
                                ("GET", f"/v1/devices/{M1.dev_eui}/rotate", "POST")]:
        a = call(api.url + path, method, token=ADMIN)
        assert a.status == 405 and a.body["error"] == "method_not_allowed", (method, path)
        assert a.headers["Allow"] == allow


def test_writers_need_the_writer_token_and_registry_changes_the_admin_token(api):
    assert api.enroll(M1).status == 201
    for token in (None, "wrong", WRITER + "x", ADMIN):
        a = call(api.url + "/v1/bundles", "POST", {"bundles": [M1.item(1)]}, token=token)
        assert a.status == 401 and a.body["error"] == "unauthorized", token
        assert a.headers["WWW-Authenticate"] == 'Bearer realm="ledger"'
        assert "writer" in a.body["message"]
    for token in (None, "wrong", WRITER):
        a = call(api.url + "/v1/devices", "POST", M2.enrollment(), token=token)
        assert a.status == 401 and "administrator" in a.body["message"], token
        assert api.rotate(M1, {"public_key": bytes(NEW_KEY.verify_key).hex()},
                          token=token).status == 401
        assert api.revoke(M1, {}, token=token).status == 401
    assert api.get("/v1/health").body["size"] == 1  # nothing was written
    ok(api.post(M1.item(1))[0], 1, {1: 1})
    # Reading needs no token.
    for path in ("/v1/readings", "/v1/devices", "/v1/stats", "/v1/checkpoint",
                 "/v1/entries?start=0&end=1", f"/v1/devices/{M1.dev_eui}"):
        assert api.get(path).status == 200, path


def test_the_admin_token_defaults_to_the_writer_token(db):
    srv = start(db, admin_token=None)
    try:
        url = srv.url + "/v1/devices"
        assert call(url, "POST", M1.enrollment(), token=None).status == 401
        assert call(url, "POST", M1.enrollment(), token=ADMIN).status == 401
        assert call(url, "POST", M1.enrollment(), token=WRITER).status == 201
    finally:
        srv.stop()


def test_without_tokens_writes_are_open(db):
    srv = start(db, token=None, admin_token=None)
    try:
        assert call(srv.url + "/v1/devices", "POST", M1.enrollment()).status == 201
        a = call(srv.url + "/v1/bundles", "POST", {"bundles": [M1.item(1)]})
        assert a.status == 200 and a.body["results"][0]["entry"] == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("raw, code, says", [
    (b"{not json", "bad_json", "not JSON"),
    (b'{"bundles": [NaN]}', "bad_json", "NaN"),
    (b"\xff\xfe{}", "bad_json", "UTF-8"),
    (b"[]", "bad_request", "JSON object"),
    (b'{"bundle": []}', "bad_request", "bundles"),
    (b'{"bundles": {"dev_eui": "70b3d57ed0000001"}}', "bad_request", "bundles: expected a list"),
    (b"", "bad_json", "not JSON"),
])
def test_a_malformed_batch_is_refused_whole(api, raw, code, says):
    a = call(api.url + "/v1/bundles", "POST", raw=raw, token=WRITER)
    assert a.status == 400 and a.body["error"] == code and says in a.body["message"], a.body


def test_too_many_items_in_one_batch(api):
    assert api.enroll(M1).status == 201
    a = call(api.url + "/v1/bundles", "POST", {"bundles": [M1.item(1)] * 1001}, token=WRITER)
    assert a.status == 413 and a.body["error"] == "too_many_items" and "1001" in a.body["message"]
    assert len(api.post(*[M1.item(1)] * 1000)) == 1000


def test_transport_limits(api, srv):
    head = (f"POST /v1/bundles HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {WRITER}\r\n"
            "Content-Type: application/json\r\n")
    too_big = b"x" * (MAX_BODY + 1)
    a = raw_http(srv, (head + f"Content-Length: {len(too_big)}\r\n\r\n").encode() + too_big)
    assert a.status == 413 and a.body["error"] == "too_large"
    a = raw_http(srv, (head + "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").encode())
    assert a.status == 411 and a.body["error"] == "length_required"
    for bad in ("abc", "-1", "1.5"):
        a = raw_http(srv, (head + f"Content-Length: {bad}\r\n\r\n").encode())
        assert a.status == 400 and a.body["error"] == "bad_request", bad
        assert "Content-Length" in a.body["message"]
    assert api.get("/v1/health").status == 200
    assert api.get("/v1/stats").body["http_errors"] == {"bad_request": 3, "length_required": 1,
                                                        "too_large": 1}


def test_unknown_and_repeated_query_parameters(api):
    a = api.get("/v1/readings?dev_eui=70b3d57ed0000001&colour=red")
    assert a.status == 400 and a.body["error"] == "bad_request"
    assert "colour" in a.body["message"] and "dev_eui, from, to, limit" in a.body["message"]
    a = api.get("/v1/readings?limit=1&limit=2")
    assert a.status == 400 and "given twice: limit" in a.body["message"]
    a = api.get("/v1/health?verbose=1")
    assert a.status == 400 and "verbose" in a.body["message"]


# -- the registry -----------------------------------------------------------------------------


def test_enroll_is_idempotent_and_never_changes_an_enrollment(api):
    a = api.enroll(M1)
    assert a.status == 201 and a.body["status"] == "enrolled" and a.body["entry"] == 0
    device = a.body["device"]
    at = device["enrolled"]["at"]
    assert device == {
        "dev_eui": M1.dev_eui, "status": "active", "public_key": M1.public_key,
        "ct_rating_a": 60, "meter_model": "SCT013-000", "board": "esp32", "community": "north",
        "owner": OWNER, "enrolled": {"entry": 0, "at": at},
        "keys": [{"from_seq": 0, "public_key": M1.public_key, "entry": 0}],
        "last_seq": None, "latest_seq": None, "revoked": None}
    # The entry's bytes, from the layout table: type, EUI, key, at, rating, four strings.
    assert api.entries(0, 1) == [
        struct.pack(">B8s32sIH", 2, M1.eui, bytes.fromhex(M1.public_key), at, 60)
        + b"\x0aSCT013-000" + b"\x05esp32" + b"\x05north" + b"\x10" + OWNER.encode()]

    a = api.enroll(M1)
    assert a.status == 200 and a.body["status"] == "already_enrolled"
    assert a.body["entry"] is None and a.body["device"] == device
    a = api.enroll(M1, public_key=M2.public_key)
    assert a.status == 409 and a.body["error"] == "key_conflict"
    a = api.enroll(M1, community="south")
    assert a.status == 409 and a.body["error"] == "metadata_conflict"
    assert "community" in a.body["message"]
    assert api.get("/v1/health").body["size"] == 1

    assert api.get(f"/v1/devices/{M1.dev_eui}").body == {"device": device}
    assert api.get(f"/v1/devices/{M1.dev_eui.upper()}").body == {"device": device}
    a = api.get("/v1/devices/00000000000000ff")
    assert a.status == 404 and a.body["error"] == "unknown_device"
    a = api.get("/v1/devices/not-an-eui")
    assert a.status == 400 and a.body["error"] == "malformed"
    # Defaults: ct_rating_a 100, empty model and board.
    a = call(api.url + "/v1/devices", "POST", {"dev_eui": M2.dev_eui, "public_key": M2.public_key,
                                               "owner": OWNER, "community": "north"}, token=ADMIN)
    assert a.status == 201 and a.body["entry"] == 1
    assert (a.body["device"]["ct_rating_a"], a.body["device"]["meter_model"],
            a.body["device"]["board"]) == (100, "", "")
    assert [d["dev_eui"] for d in api.get("/v1/devices").body["devices"]] == [M1.dev_eui,
                                                                                M2.dev_eui]


SMALL_ORDER_KEY = (1).to_bytes(32, "little").hex()  # the neutral point


@pytest.mark.parametrize("field, value", [
    ("owner", "Jane Doe"),
    ("owner", "9F2C4E0B7D1A3C55"),  # upper case: not the canonical pseudonym
    ("owner", "9f2c4e0b"),  # too short to be a pseudonym
    ("owner", "jane.doe@example.org"),
    ("community", "North Side"),
    ("community", ""),
    ("community", "-north"),
    ("public_key", "00" * 31),
    ("public_key", "zz" * 32),
    ("public_key", SMALL_ORDER_KEY),
    ("dev_eui", "70b3d57ed000001"),
    ("ct_rating_a", 0),
    ("ct_rating_a", "60"),
    ("meter_model", "SCT013-000 \u00e9"),
    ("board", "x" * 41),
    ("owner", None),
])
def test_enroll_refuses_a_bad_field_naming_it(api, field, value):
    a = api.enroll(M1, **{field: value})
    assert a.status == 400 and a.body["error"] == "malformed", a.body
    assert a.body["message"].startswith(field + ":"), a.body["message"]
    assert api.get("/v1/health").body["size"] == 0


def test_enroll_refuses_missing_and_unknown_fields(api):
    body = M1.enrollment()
    del body["owner"]
    a = call(api.url + "/v1/devices", "POST", body, token=ADMIN)
    assert a.status == 400 and a.body["message"] == "owner: missing"
    a = call(api.url + "/v1/devices", "POST", M1.enrollment(name="Jane Doe"), token=ADMIN)
    assert a.status == 400 and a.body["message"].startswith("name: unknown field")
    a = call(api.url + "/v1/devices", "POST", [M1.enrollment()], token=ADMIN)
    assert a.status == 400 and a.body["error"] == "bad_request"


def test_rotation_defaults_to_one_past_the_last_seq(api):
    assert api.enroll(M1).status == 201
    ok(api.post(M1.item(1, 2, 3))[0], 1, {1: 1, 2: 1, 3: 1})
    new = bytes(NEW_KEY.verify_key).hex()
    a = api.rotate(M1, {"public_key": new})
    assert a.status == 200 and a.body["status"] == "rotated" and a.body["entry"] == 2
    assert a.body["device"]["keys"] == [
        {"from_seq": 0, "public_key": M1.public_key, "entry": 0},
        {"from_seq": 4, "public_key": new, "entry": 2}]
    assert a.body["device"]["public_key"] == new
    # The old key signs nothing from seq 4 on; the new one does.
    rejected(api.post(M1.item(4))[0], "bad_signature")
    ok(api.post(M1.item(4, key=NEW_KEY))[0], 3, {4: 3})
    # Below seq 4 the old key still proves what it signed.
    ok(api.post(M1.item(2, 3))[0], None, duplicate={2: 1, 3: 1})
    rejected(api.post(M1.item(5, key=M1.key))[0], "bad_signature")


def test_rotation_from_a_later_seq_leaves_the_gap_to_the_old_key(api):
    assert api.enroll(M1).status == 201
    api.post(M1.item(1, 2))
    new = bytes(NEW_KEY.verify_key).hex()
    a = api.rotate(M1, {"public_key": new, "from_seq": 10})
    assert a.status == 200 and a.body["device"]["keys"][1]["from_seq"] == 10
    ok(api.post(M1.item(5))[0], 3, {5: 3})  # old key, below the rotation
    rejected(api.post(M1.item(10))[0], "bad_signature")  # old key at it
    rejected(api.post(M1.item(9, 10, key=NEW_KEY))[0], "straddles_rotation")
    ok(api.post(M1.item(10, 11, key=NEW_KEY))[0], 4, {10: 4, 11: 4})

    a = api.rotate(M1, {"public_key": new, "from_seq": 20})
    assert a.status == 409 and a.body["error"] == "rotate_same_key"
    a = api.rotate(M1, {"public_key": M1.public_key, "from_seq": 20})
    assert a.status == 409 and a.body["error"] == "rotate_same_key"
    other = bytes(SigningKey(bytes([42]) * 32).verify_key).hex()
    a = api.rotate(M1, {"public_key": other, "from_seq": 11})
    assert a.status == 409 and a.body["error"] == "rotate_from_seq" and "11" in a.body["message"]
    a = api.rotate(M1, {"public_key": SMALL_ORDER_KEY})
    assert a.status == 400 and a.body["message"].startswith("public_key:")
    a = api.rotate(M1, {"from_seq": 30})
    assert a.status == 400 and a.body["message"] == "public_key: missing"
    a = api.rotate(M1, {"public_key": other, "from_seq": -1})
    assert a.status == 400 and a.body["message"].startswith("from_seq:")
    a = api.rotate(M2, {"public_key": other})
    assert a.status == 404 and a.body["error"] == "unknown_device"
    assert api.get("/v1/health").body["size"] == 5


def test_revocation_ends_a_device(api):
    assert api.enroll(M1).status == 201
    ok(api.post(M1.item(1))[0], 1, {1: 1})
    a = api.revoke(M1, {"reason": "key_compromise"})
    assert a.status == 200 and a.body["status"] == "revoked" and a.body["entry"] == 2
    assert a.body["device"]["status"] == "revoked"
    assert a.body["device"]["revoked"]["entry"] == 2
    assert a.body["device"]["revoked"]["reason"] == "key_compromise"

    # Nothing of it is admitted any more, not even a resend of what was logged.
    rejected(api.post(M1.item(2))[0], "revoked_device")
    rejected(api.post(M1.item(1))[0], "revoked_device")
    for a in (api.enroll(M1), api.revoke(M1, {}),
              api.rotate(M1, {"public_key": bytes(NEW_KEY.verify_key).hex()})):
        assert a.status == 409 and a.body["error"] == "revoked_device", a.body
    # What was logged before stays readable.
    assert [r["seq"] for r in api.get("/v1/readings").body["readings"]] == [1]
    assert api.get("/v1/health").body["size"] == 3

    assert api.enroll(M2).status == 201
    assert [d["dev_eui"] for d in api.get("/v1/devices?status=revoked").body["devices"]] == [
        M1.dev_eui]
    assert [d["dev_eui"] for d in api.get("/v1/devices?status=active").body["devices"]] == [
        M2.dev_eui]
    assert api.get("/v1/devices?status=gone").status == 400
    a = api.revoke(M3, {})
    assert a.status == 404 and a.body["error"] == "unknown_device"


@pytest.mark.parametrize("body, says", [
    ({"reason": "lost"}, "reason:"),
    ({"reason": ["key_compromise"]}, "reason:"),
    ({"reason": {"code": 1}}, "reason:"),
    ({"reason": None}, "reason:"),
    ({"why": "lost"}, "why: unknown field"),
])
def test_revoke_refuses_a_bad_reason(api, body, says):
    assert api.enroll(M1).status == 201
    a = api.revoke(M1, body)
    assert a.status == 400 and a.body["error"] == "malformed", a.body
    assert a.body["message"].startswith(says)
    assert api.get(f"/v1/devices/{M1.dev_eui}").body["device"]["status"] == "active"


def test_revoke_reason_defaults_to_unspecified(api):
    assert api.enroll(M1).status == 201
    a = api.revoke(M1, {})
    assert a.status == 200 and a.body["device"]["revoked"]["reason"] == "unspecified"


# -- bundles --------------------------------------------------------------------------------


def test_bundle_outcomes_in_one_batch(api):
    assert api.enroll(M1).status == 201 and api.enroll(M2).status == 201
    results = api.post(
        M1.item(1, 2),  # 0: new
        M1.item(2, 3),  # 1: overlaps item 0 of the same batch
        M1.item(1, 2),  # 2: nothing new
        M1.item(R(3, import_dwh=3001)),  # 3: seq 3 logged with other values
        M1.item(4, key=INTRUDER),  # 4: not the device's key
        {"dev_eui": M2.dev_eui, "bundle": M1.bundle(4).hex()},  # 5: M1's bundle under M2's EUI
        M3.item(1),  # 6: not enrolled
        {"dev_eui": M1.dev_eui, "bundle": "xyz"},  # 7: not hex
        {"bundle": M1.bundle(5).hex()},  # 8: no dev_eui
        7,  # 9: not an object
        {"dev_eui": M1.dev_eui, "bundle": M1.bundle(5).hex()[:40]},  # 10: cut short
        {"dev_eui": M1.dev_eui, "bundle": M1.bundle(5).hex(), "received_at": "yesterday"},  # 11
        M2.item(1, 2),  # 12: new, after all the refusals
    )
    ok(results[0], 2, {1: 2, 2: 2})
    ok(results[1], 3, {3: 3}, duplicate={2: 2})
    ok(results[2], None, duplicate={1: 2, 2: 2})
    rejected(results[3], "conflict")
    assert "entry 3" in results[3]["message"]
    rejected(results[4], "bad_signature")
    rejected(results[5], "bad_signature")
    rejected(results[6], "unknown_device")
    for i, field in [(7, "bundle"), (8, "dev_eui"), (9, "item"), (11, "received_at")]:
        rejected(results[i], "malformed")
        assert results[i]["message"].startswith(field + ":"), results[i]
    rejected(results[10], "truncated")
    ok(results[12], 4, {1: 4, 2: 4})
    # The log holds the bundles exactly as the meters signed them.
    assert api.entries(2, 5) == [M1.entry(1, 2), M1.entry(2, 3), M2.entry(1, 2)]


def test_resubmission_returns_the_original_entries(api):
    assert api.enroll(M1).status == 201
    first = api.post(M1.item(1, 2), M1.item(3, 4))
    again = api.post(M1.item(3, 4), M1.item(1, 2), M1.item(2, 3))
    ok(again[0], None, duplicate={3: first[1]["entry"], 4: first[1]["entry"]})
    ok(again[1], None, duplicate={1: first[0]["entry"], 2: first[0]["entry"]})
    ok(again[2], None, duplicate={2: first[0]["entry"], 3: first[1]["entry"]})
    assert api.get("/v1/health").body["size"] == 3


def test_order_rules_for_late_bundles(api):
    assert api.enroll(M1).status == 201
    api.post(M1.item(1), M1.item(5))  # entries 1, 2
    # A gap fill that fits between its neighbours is admitted.
    ok(api.post(M1.item(3))[0], 3, {3: 3})
    rejected(api.post(M1.item(R(4, import_dwh=5001)))[0], "registers_backwards")  # above seq 5
    rejected(api.post(M1.item(R(2, import_dwh=999)))[0], "registers_backwards")  # below seq 1
    rejected(api.post(M1.item(R(4, export_dwh=1)))[0], "registers_backwards")  # seq 5 exports 0
    rejected(api.post(M1.item(R(4, t_end=T0 + 900 * 5 + 1)))[0], "time_backwards")
    rejected(api.post(M1.item(R(6, t_end=T0)))[0], "time_backwards")
    # A reading stamped by a free-running clock is left out of the time order.
    unsynced = R(4, t_end=12, flags=frame.FLAG_CLOCK_UNSYNCED)
    ok(api.post(M1.item(unsynced))[0], 4, {4: 4})
    ok(api.post(M1.item(6))[0], 5, {6: 5})


def test_a_gateway_name_that_is_not_text_is_refused_not_fatal(api):
    assert api.enroll(M1).status == 201
    raw = json.dumps({"bundles": [M1.item(1), {**M1.item(2), "gateway": "gw-\ud800"}]}).encode()
    a = call(api.url + "/v1/bundles", "POST", raw=raw, token=WRITER)
    assert a.status == 200, a.body
    ok(a.body["results"][0], 1, {1: 1})
    rejected(a.body["results"][1], "malformed")
    assert a.body["results"][1]["message"].startswith("gateway:")


# -- readings ------------------------------------------------------------------------------


def test_readings_query(api):
    assert api.enroll(M1).status == 201 and api.enroll(M2).status == 201
    b12, b345, c12 = M1.bundle(1, 2), M1.bundle(3, 4, 5), M2.bundle(1, 2)
    api.post({"dev_eui": M1.dev_eui, "bundle": b12.hex(), "received_at": T0 + 1802.5,
              "gateway": "gw-roof"},
             {"dev_eui": M1.dev_eui, "bundle": b345.hex()},
             {"dev_eui": M2.dev_eui, "bundle": c12.hex(), "gateway": "gw-cellar"})

    def expect(m, seq, entry, bundle, received_at=None, gateway=None):
        return {"entry": entry, "dev_eui": m.dev_eui, "seq": seq, "t_end": T0 + 900 * seq,
                "import_dwh": 1000 * seq, "export_dwh": 0, "flags": 0, "bundle": bundle.hex(),
                "received_at": received_at, "gateway": gateway}

    m1 = [expect(M1, 1, 2, b12, T0 + 1802.5, "gw-roof"), expect(M1, 2, 2, b12, T0 + 1802.5,
                                                                  "gw-roof")]
    m1 += [expect(M1, s, 3, b345) for s in (3, 4, 5)]
    m2 = [expect(M2, s, 4, c12, None, "gw-cellar") for s in (1, 2)]
    assert api.get("/v1/readings").body == {"readings": m1 + m2, "more": False}
    assert api.get(f"/v1/readings?dev_eui={M2.dev_eui}").body == {"readings": m2, "more": False}
    # from <= t_end < to
    a = api.get(f"/v1/readings?dev_eui={M1.dev_eui}&from={T0 + 1800}&to={T0 + 3600}")
    assert [r["seq"] for r in a.body["readings"]] == [2, 3]
    a = api.get(f"/v1/readings?from={T0 + 1800.5}")
    assert [(r["dev_eui"][-1], r["seq"]) for r in a.body["readings"]] == [
        ("1", 3), ("1", 4), ("1", 5)]
    assert api.get("/v1/readings?limit=2").body == {"readings": m1[:2], "more": True}
    assert api.get("/v1/readings?limit=7").body == {"readings": m1 + m2, "more": False}
    assert api.get("/v1/readings?dev_eui=00000000000000ff").body == {"readings": [],
                                                                      "more": False}
    for query, name in [("limit=0", "limit"), ("limit=10001", "limit"), ("limit=ten", "limit"),
                        ("limit=-1", "limit"), ("from=nan", "from"), ("to=inf", "to"),
                        ("from=", "from"), ("dev_eui=70b3", "dev_eui"),
                        ("dev_eui=70b3d57ed000000g", "dev_eui")]:
        a = api.get("/v1/readings?" + query)
        assert a.status == 400 and a.body["error"] == "malformed", query
        assert a.body["message"].startswith(name + ":"), (query, a.body["message"])


# -- the log: checkpoints, proofs, entries ---------------------------------------------------


def test_checkpoint_is_a_c2sp_signed_note_over_the_entries(api, srv):
    assert api.enroll(M1).status == 201
    api.post(M1.item(1, 2), M1.item(3))
    a = api.get("/v1/checkpoint")
    assert a.headers.get_content_type() == "text/plain"
    # Signed at start, before anything was appended.
    text, sigs = note.open_note(a.body, [note.Verifier(srv.vkey)])
    assert text == f"{ORIGIN}\n0\n{base64.b64encode(hashlib.sha256(b'').digest()).decode()}\n"
    assert [s.name for s in sigs] == [ORIGIN]

    cp = api.sign()
    data = api.entries(0, 3)
    assert data[1:] == [M1.entry(1, 2), M1.entry(3)]
    want_root = merkle.node_hash(merkle.node_hash(leaf(data[0]), leaf(data[1])), leaf(data[2]))
    assert (cp.origin, cp.size, cp.root) == (ORIGIN, 3, want_root)
    a = api.get("/v1/checkpoint")
    body, sig_block = a.body.split("\n\n")
    assert body == f"{ORIGIN}\n3\n{base64.b64encode(want_root).decode()}"
    assert sig_block.startswith(f"\u2014 {ORIGIN} ") and sig_block.endswith("\n")
    # An old one stays retrievable by size; nothing was signed at size 2.
    assert api.checkpoint(0).size == 0
    assert api.checkpoint(3) == cp
    a = api.get("/v1/checkpoint?size=2")
    assert a.status == 404 and a.body["error"] == "unknown_checkpoint"
    a = api.get("/v1/checkpoint?size=-3")
    assert a.status == 400 and a.body["message"].startswith("size:")
    # Signing again without growth signs nothing new.
    assert srv.log.sign_checkpoint() is None


def test_inclusion_proofs_against_the_signed_root(api):
    assert api.enroll(M1).status == 201 and api.enroll(M2).status == 201
    api.post(M1.item(1, 2), M2.item(1), M1.item(3), M2.item(2, 3))
    cp = api.sign()
    assert cp.size == 6
    data = api.entries(0, 6)
    assert merkle.root_of([leaf(d) for d in data]) == cp.root
    for i in range(6):
        a = api.get(f"/v1/proof/inclusion?index={i}&size=6")
        assert a.status == 200 and (a.body["index"], a.body["size"]) == (i, 6)
        merkle.check_inclusion([bytes.fromhex(h) for h in a.body["proof"]], i, 6, leaf(data[i]),
                               cp.root)
    # By reading: the entry that holds it, in the log's current tree.
    for m, seq, index in [(M1, 2, 2), (M2, 3, 5), (M1, 3, 4)]:
        a = api.get(f"/v1/proof/inclusion?dev_eui={m.dev_eui}&seq={seq}")
        assert a.status == 200 and (a.body["index"], a.body["size"]) == (index, 6)
        merkle.check_inclusion([bytes.fromhex(h) for h in a.body["proof"]], index, 6,
                               leaf(data[index]), cp.root)
    # Against an older, smaller tree.
    a = api.get("/v1/proof/inclusion?index=2&size=3")
    merkle.check_inclusion([bytes.fromhex(h) for h in a.body["proof"]], 2, 3, leaf(data[2]),
                           merkle.root_of([leaf(d) for d in data[:3]]))

    for query, status in [("index=6&size=6", 400), ("index=0&size=7", 400), ("size=6", 400),
                          (f"index=1&dev_eui={M1.dev_eui}&seq=1", 400),
                          (f"dev_eui={M1.dev_eui}", 400), (f"dev_eui={M1.dev_eui}&seq=9", 404),
                          ("index=-1", 400)]:
        a = api.get("/v1/proof/inclusion?" + query)
        assert a.status == status, (query, a.body)


def test_consistency_proof_between_two_checkpoints(api):
    assert api.enroll(M1).status == 201
    api.post(M1.item(1), M1.item(2))
    old = api.sign()
    api.post(M1.item(3), M1.item(4, 5), M1.item(6))
    new = api.sign()
    assert (old.size, new.size) == (3, 6)
    a = api.get(f"/v1/proof/consistency?from={old.size}&to={new.size}")
    assert a.status == 200 and (a.body["from"], a.body["to"]) == (3, 6)
    merkle.check_consistency([bytes.fromhex(h) for h in a.body["proof"]], 3, 6, old.root,
                             new.root)
    # `to` defaults to the log's size; every older signed size is consistent with it.
    assert api.get("/v1/proof/consistency?from=3").body == a.body
    assert api.get("/v1/proof/consistency?from=0&to=6").body["proof"] == []
    for query in ("from=4&to=3", "from=3&to=7", "to=6", "from=x"):
        a = api.get("/v1/proof/consistency?" + query)
        assert a.status == 400 and a.body["error"] == "malformed", query


def test_entries_come_in_pages_of_at_most_1000(api):
    assert api.enroll(M1).status == 201
    items = [M1.item(s) for s in range(1, 1001)]
    results = api.post(*items)
    assert [r["entry"] for r in results] == list(range(1, 1001))
    first = api.entries(0, 1001)
    assert len(first) == 1000
    assert first[1] == M1.entry(1) and first[999] == M1.entry(999)
    assert api.entries(1000, 1001) == [M1.entry(1000)]
    assert api.entries(1001, 1001) == []
    for query in ("start=2&end=1", "start=0&end=1002", "start=0", "end=5", "start=a&end=b"):
        a = api.get("/v1/entries?" + query)
        assert a.status == 400 and a.body["error"] == "malformed", query


def test_proof_bundle_of_a_reading(api, srv):
    assert api.enroll(M1).status == 201  # entry 0
    api.post(M1.item(1, 2))  # entry 1
    assert api.rotate(M1, {"public_key": bytes(NEW_KEY.verify_key).hex()}).status == 200  # 2
    api.post(M1.item(3, key=NEW_KEY))  # entry 3
    assert api.enroll(M2).status == 201  # entry 4: another device's, not in the bundle
    cp = api.sign()
    assert cp.size == 5
    data = api.entries(0, 5)

    a = api.get(f"/v1/proof-bundle?dev_eui={M1.dev_eui}&seq=2")
    assert a.status == 200, a.body
    b = a.body
    assert set(b) == {"format", "checkpoint", "seq", "entry", "registry"}
    assert b["format"] == "meter-ledger-proof/1" and b["seq"] == 2
    text, _ = note.open_note(b["checkpoint"], [note.Verifier(srv.vkey)])
    assert ckpt.Checkpoint.parse(text) == cp
    assert (b["entry"]["index"], bytes.fromhex(b["entry"]["data"])) == (1, M1.entry(1, 2))
    assert [(r["index"], bytes.fromhex(r["data"])) for r in b["registry"]] == [(0, data[0]),
                                                                               (2, data[2])]
    for e in [b["entry"]] + b["registry"]:
        merkle.check_inclusion([bytes.fromhex(h) for h in e["inclusion"]], e["index"], cp.size,
                               leaf(bytes.fromhex(e["data"])), cp.root)

    # A new entry has no proof bundle until a checkpoint covers it.
    api.post(M1.item(4, key=NEW_KEY))  # entry 5
    a = api.get(f"/v1/proof-bundle?dev_eui={M1.dev_eui}&seq=4")
    assert a.status == 404 and a.body["error"] == "no_checkpoint"
    api.sign()
    a = api.get(f"/v1/proof-bundle?dev_eui={M1.dev_eui}&seq=4")
    assert a.status == 200 and a.body["entry"]["index"] == 5 and a.body["seq"] == 4
    a = api.get(f"/v1/proof-bundle?dev_eui={M1.dev_eui}&seq=9")
    assert a.status == 404 and a.body["error"] == "not_found"
    a = api.get(f"/v1/proof-bundle?dev_eui={M1.dev_eui}")
    assert a.status == 400 and a.body["message"].startswith("seq:")


def test_cosignatures_from_configured_witnesses(api, srv):
    assert api.enroll(M1).status == 201
    cp = api.sign()
    url = api.url + "/v1/cosignatures"
    line = ckpt.Cosigner(W_SKEY).cosign(cp, T0 + 5)
    a = call(url, "POST", {"size": cp.size, "cosignature": line})
    assert a.status == 200 and a.body == {"status": "stored", "witness": "witness.example",
                                          "size": 1}
    a = call(url, "POST", {"size": cp.size, "cosignature": line})
    assert a.status == 200 and a.body["status"] == "duplicate"
    policy = ckpt.parse_policy(f'log = "{srv.vkey}"\nquorum = 1\nwitnesses = ["{W_VKEY}"]\n')
    served, names = ckpt.verify_checkpoint(api.get("/v1/checkpoint").body, policy)
    assert served == cp and names == ["witness.example"]
    assert api.get("/v1/stats").body["checkpoint_cosignatures"] == 1

    stranger = ckpt.Cosigner(STRANGER_SKEY).cosign(cp, T0)
    a = call(url, "POST", {"size": cp.size, "cosignature": stranger})
    assert a.status == 403 and a.body["error"] == "unknown_witness"
    forged = ckpt.Cosigner(W_SKEY).cosign(ckpt.Checkpoint(ORIGIN, 1, b"\x07" * 32), T0)
    a = call(url, "POST", {"size": cp.size, "cosignature": forged})
    assert a.status == 400 and a.body["error"] == "bad_cosignature"
    a = call(url, "POST", {"size": 5, "cosignature": line})
    assert a.status == 404 and a.body["error"] == "unknown_checkpoint"
    for body, field in [({"size": 1, "cosignature": "not a signature line"}, "cosignature"),
                        ({"size": -1, "cosignature": line}, "size"),
                        ({"size": "1", "cosignature": line}, "size"),
                        ({"size": True, "cosignature": line}, "size"),
                        ({"size": 2**63, "cosignature": line}, "size"),
                        ({"size": 2**64, "cosignature": line}, "size"),
                        ({"size": 1}, "cosignature")]:
        a = call(url, "POST", body)
        assert a.status == 400 and a.body["error"] == "malformed", (body, a.body)
        assert a.body["message"].startswith(field + ":"), (body, a.body)
    # Nothing but the witness's line was kept.
    _, sigs = note.split(api.get("/v1/checkpoint").body)
    assert [s.name for s in sigs] == [ORIGIN, "witness.example"]


# -- restarts -----------------------------------------------------------------------------


def test_a_restart_keeps_the_key_the_tree_and_the_readings(db):
    srv = start(db)
    try:
        api = Client(srv)
        vkey = srv.vkey
        assert api.enroll(M1).status == 201
        api.post(M1.item(1, 2), M1.item(3))
        old = api.sign()
        readings = api.get("/v1/readings").body
    finally:
        srv.stop()
    assert (db.parent / "ledger.db.key").exists()

    srv = start(db)
    try:
        api = Client(srv)
        assert srv.vkey == vkey
        assert api.get("/v1/health").body == {"status": "ok", "size": 3}
        assert api.checkpoint() == old
        assert api.get("/v1/readings").body == readings
        assert api.get(f"/v1/devices/{M1.dev_eui}").body["device"]["latest_seq"] == 3
        # The log goes on where it stopped, and its new tree extends the old one.
        ok(api.post(M1.item(3, 4))[0], 3, {4: 3}, duplicate={3: 2})
        new = api.sign()
        proof = api.get(f"/v1/proof/consistency?from={old.size}&to={new.size}").body["proof"]
        merkle.check_consistency([bytes.fromhex(h) for h in proof], old.size, new.size,
                                 old.root, new.root)
        assert new.root == merkle.root_of([leaf(d) for d in api.entries(0, 4)])
        rejected(api.post(M1.item(R(5, import_dwh=1)))[0], "registers_backwards")
    finally:
        srv.stop()


def test_a_log_whose_hashes_were_edited_halts(db):
    srv = start(db)
    try:
        api = Client(srv)
        assert api.enroll(M1).status == 201
        api.post(M1.item(1), M1.item(2), M1.item(3))
        assert api.sign().size == 4
    finally:
        srv.stop()
    # Edit the stored tree: every hash of the first page gets one bit flipped,
    # so the tree at the signed size no longer has the signed root.
    with sqlite3.connect(db) as conn:
        (page,) = conn.execute("SELECT data FROM hash_pages WHERE page = 0").fetchone()
        edited = bytearray(page)
        for i in range(0, len(edited), 32):
            edited[i] ^= 0x01
        conn.execute("UPDATE hash_pages SET data = ? WHERE page = 0", (bytes(edited),))
    conn.close()

    srv = start(db)
    try:
        a = call(srv.url + "/v1/health")
        assert a.status == 503 and a.body["status"] == "halted"
        assert "size 4" in a.body["problem"]
        a = call(srv.url + "/v1/bundles", "POST", {"bundles": [M1.item(4)]}, token=WRITER)
        assert a.status == 503 and a.body["error"] == "halted"
        a = call(srv.url + "/v1/devices", "POST", M2.enrollment(), token=ADMIN)
        assert a.status == 503 and a.body["error"] == "halted"
        assert call(srv.url + "/v1/stats").body["halted"] == call(srv.url + "/v1/health").body[
            "problem"]
        # Reads still work: the evidence stays available.
        assert call(srv.url + "/v1/entries?start=0&end=4").status == 200
    finally:
        srv.stop()
