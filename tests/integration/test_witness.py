"""Witnesses (ledger_node.witness) following a log over real HTTP on loopback.

The honest log is a real LedgerServer. The dishonest ones are the operator
forging a new database under the same key and port, and FakeLog below: a log
server run by the test that signs whatever tree it is told to (a bad device
signature under the root, another root for a size already cosigned, a
smaller tree) or serves entries that are not the ones it signed. Roots in
FakeLog come from merkle.root_of, the plain recursive definition, not from
the Frontier the witness keeps.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from nacl.signing import SigningKey

from ledger_node import checkpoint as ckpt
from ledger_node import cli, entries, merkle, note
from ledger_node.server import LedgerServer
from ledger_node.witness import StatusServer, Witness, WitnessError
from meter import frame

TOKEN = "witness-test-token"
T0 = 1_767_225_600
OWNER = "5e3f1c0a9b8d7e6f"
LOG_SKEY, LOG_VKEY = note.generate_key("test.example/log")
A_SKEY, A_VKEY = ckpt.generate_cosigner_key("witness-a.example")
B_SKEY, B_VKEY = ckpt.generate_cosigner_key("witness-b.example")
POLICY_2 = ckpt.parse_policy(f'log = "{LOG_VKEY}"\nquorum = 2\n'
                             f'witnesses = ["{A_VKEY}", "{B_VKEY}"]\n')


class Meter:
    def __init__(self, dev_eui: str, seed: int):
        self.dev_eui = dev_eui
        self.eui = bytes.fromhex(dev_eui)
        self.key = SigningKey(bytes([seed]) * 32)
        self.public_key = bytes(self.key.verify_key)

    def bundle(self, *seqs: int, offset: int = 0, key: SigningKey | None = None) -> bytes:
        """Consecutive readings every 900 s; import grows 1000 dWh a reading."""
        body = frame.encode_body([(s, T0 + 900 * s, 1000 * s + offset, 0, 0) for s in seqs])
        sig = (key or self.key).sign(frame.signed_message(self.eui, body)).signature
        return frame.assemble(body, sig)

    def item(self, *seqs: int, **kw) -> dict:
        return {"dev_eui": self.dev_eui, "bundle": self.bundle(*seqs, **kw).hex()}

    def enrollment(self) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key.hex(), "owner": OWNER,
                "community": "north"}

    def enroll_entry(self) -> bytes:
        return entries.encode(entries.Enroll(self.eui, self.public_key, T0, 60, "", "", "north",
                                             OWNER))

    def readings_entry(self, *seqs: int, **kw) -> bytes:
        return b"\x01" + self.eui + self.bundle(*seqs, **kw)


M1 = Meter("70b3d57ed0000001", 1)
M2 = Meter("70b3d57ed0000002", 2)
INTRUDER = SigningKey(bytes([99]) * 32)


def call(url: str, method: str = "GET", body=None, token: str | None = TOKEN):
    """(status, JSON or text) of one request; HTTP errors are returned."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw, ctype, status = resp.read(), resp.headers.get("Content-Type", ""), resp.status
    except urllib.error.HTTPError as err:
        with err:
            raw, ctype, status = err.read(), err.headers.get("Content-Type", ""), err.code
    return status, (json.loads(raw) if "json" in ctype else raw.decode())


class Appender:
    """Writes to a real log and counts the entries it appended, from the
    answers (an enrollment that is new, a bundle with a new reading)."""

    def __init__(self, url: str):
        self.url = url
        self.size = 0

    def enroll(self, m: Meter) -> None:
        status, body = call(self.url + "/v1/devices", "POST", m.enrollment())
        assert status == 201, body
        assert body["entry"] == self.size
        self.size += 1

    def bundles(self, *items: dict) -> None:
        status, body = call(self.url + "/v1/bundles", "POST", {"bundles": list(items)})
        assert status == 200, body
        for r in body["results"]:
            assert r["status"] == "ok" and r["entry"] == self.size, r
            self.size += 1


def checkpoint_size(text: str) -> int:
    return ckpt.Checkpoint.parse(note.split(text)[0]).size


def wait_checkpoint(url: str, size: int) -> str:
    """The log's checkpoint note once it covers `size` entries."""
    deadline = time.monotonic() + 5
    while True:
        status, text = call(url + "/v1/checkpoint", token=None)
        if status == 200 and checkpoint_size(text) == size:
            return text
        assert time.monotonic() < deadline, f"no checkpoint of size {size}: {status} {text}"
        time.sleep(0.02)


def start_log(db, port: int = 0) -> LedgerServer:
    return LedgerServer(db, port=port, token=TOKEN, key=LOG_SKEY, witnesses=[A_VKEY, B_VKEY],
                        checkpoint_interval_s=0.05).start()


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


# -- the honest log and the forger ----------------------------------------------------


def test_two_witnesses_cosign_and_refuse_a_rewritten_history(tmp_path, servers):
    srv = start_log(tmp_path / "ledger.db")
    servers.append(srv)
    port, url = srv.port, srv.url
    log = Appender(srv.url)
    log.enroll(M1)
    log.enroll(M2)
    log.bundles(M1.item(1, 2), M2.item(1))
    log.bundles(M1.item(3), M2.item(2, 3))
    assert log.size == 6
    wait_checkpoint(srv.url, 6)

    wa = Witness(srv.url, A_SKEY, LOG_VKEY, tmp_path / "a.json")
    wb = Witness(srv.url, B_SKEY, LOG_VKEY, tmp_path / "b.json")
    assert wa.poll_once() == "cosigned 6"
    # One cosignature is not a quorum of two.
    _, text = call(srv.url + "/v1/checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="1 valid cosignature"):
        ckpt.verify_checkpoint(text, POLICY_2)
    assert wb.poll_once() == "cosigned 6"
    _, text = call(srv.url + "/v1/checkpoint")
    cp, names = ckpt.verify_checkpoint(text, POLICY_2)
    assert cp.size == 6 and sorted(names) == ["witness-a.example", "witness-b.example"]
    status, page = call(srv.url + "/v1/entries?start=0&end=6")
    assert cp.root == merkle.root_of([merkle.leaf_hash(bytes.fromhex(e["data"]))
                                      for e in page["entries"]])

    # Growth: the witnesses check the log's consistency proof from 6 on.
    log.bundles(M1.item(4, 5))
    wait_checkpoint(srv.url, 7)
    assert wa.poll_once() == "cosigned 7"
    assert wb.poll_once() == "cosigned 7"
    assert wa.poll_once() == "up to date"
    _, honest = call(srv.url + "/v1/checkpoint")
    assert ckpt.verify_checkpoint(honest, POLICY_2)[0].size == 7
    assert wa.status()["requests"]["consistency"] == 1

    # The operator rewrites history: a new database under the same key on the
    # same address, the same devices, fewer readings with other values, then
    # more, so the forged tree is larger than the one cosigned.
    srv.stop()
    forged = start_log(tmp_path / "forged.db", port)
    servers.append(forged)
    assert forged.url == url
    log = Appender(forged.url)
    log.enroll(M1)
    log.enroll(M2)
    log.bundles(M1.item(1, offset=7), M2.item(1, 2, offset=7))
    log.bundles(*(M1.item(s, offset=7) for s in range(2, 7)))
    assert log.size == 9
    forged_note = wait_checkpoint(forged.url, 9)

    for w in (wa, wb):
        result = w.poll_once()
        assert result.startswith("flagged: inconsistent"), result
        flag = w.status()["flag"]
        assert w.status()["flagged"] and flag["reason"] == "inconsistent"
        # The evidence is two statements signed by the log's key that can not
        # both be true: the old tree of 7 and a tree of 9 that does not extend it.
        old = ckpt.verify_checkpoint(flag["cosigned_note"], ckpt.Policy(note.Verifier(LOG_VKEY)))[0]
        new = ckpt.verify_checkpoint(flag["note"], ckpt.Policy(note.Verifier(LOG_VKEY)))[0]
        assert (old.size, old.root) == (7, cp_root(honest)) and new.size == 9
        assert note.split(flag["note"])[0] == note.split(forged_note)[0]
        with pytest.raises(merkle.ProofError):
            proof = call(forged.url + "/v1/proof/consistency?from=7&to=9")[1]["proof"]
            merkle.check_consistency([bytes.fromhex(h) for h in proof], 7, 9, old.root, new.root)

    # Flagged is for good: no more requests, no cosignature reaches the forger.
    before = dict(wa.status()["requests"])
    assert wa.poll_once().startswith("flagged: inconsistent")
    assert wa.status()["requests"] == before
    _, text = call(forged.url + "/v1/checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="0 valid cosignature"):
        ckpt.verify_checkpoint(text, POLICY_2)
    assert call(forged.url + "/v1/stats")[1]["checkpoint_cosignatures"] == 0

    # A witness restarted from its state is still flagged, with the evidence.
    evidence = wa.status()["flag"]
    wa.close()
    again = Witness(forged.url, A_SKEY, LOG_VKEY, tmp_path / "a.json")
    try:
        assert again.poll_once().startswith("flagged: inconsistent")
        assert again.status()["flag"] == evidence
        assert again.status()["requests"] == {}
    finally:
        again.close()
        wb.close()


def cp_root(text: str) -> bytes:
    return ckpt.Checkpoint.parse(note.split(text)[0]).root


# -- restarts and outages ------------------------------------------------------------


class Proxy:
    """Forwards to the log and writes down every request; can answer 503
    (mode "down") or nonsense (mode "garbage") instead."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.mode = "pass"
        self.requests: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.requests.append((self.command, self.path))
                if proxy.mode == "down":
                    return self._answer(503, b'{"error":"unavailable","message":"down"}')
                if proxy.mode == "garbage":
                    return self._answer(200, b'{"entries": [{"index": "zero"')
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=10)
                try:
                    conn.request(self.command, self.path, body=body,
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    self._answer(resp.status, resp.read(), resp.getheader("Content-Type"))
                finally:
                    conn.close()

            def _answer(self, status, data, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def paths(self, prefix: str) -> list[str]:
        return [p for _, p in self.requests if p.startswith(prefix)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def proxies():
    made = []
    yield made
    for p in made:
        p.close()


def test_restart_resumes_from_state_and_outages_are_not_flags(tmp_path, servers, proxies):
    db = tmp_path / "ledger.db"
    srv = start_log(db)
    servers.append(srv)
    proxy = Proxy(srv.url)
    proxies.append(proxy)
    log = Appender(srv.url)
    log.enroll(M1)
    log.bundles(*(M1.item(s) for s in range(1, 5)))
    wait_checkpoint(srv.url, 5)

    state = tmp_path / "w.json"
    w = Witness(proxy.url, A_SKEY, LOG_VKEY, state)
    assert w.poll_once() == "cosigned 5"
    assert proxy.paths("/v1/entries") == ["/v1/entries?start=0&end=5"]
    # One state, one witness: a second one could cosign behind its back.
    with pytest.raises(WitnessError, match="in use"):
        Witness(proxy.url, B_SKEY, LOG_VKEY, state)
    w.close()

    # Restarted with nothing new: no entry is fetched again, and the
    # cosignature the log shows already is not sent again.
    proxy.requests.clear()
    w = Witness(proxy.url, A_SKEY, LOG_VKEY, state)
    assert w.poll_once() == "up to date"
    assert proxy.requests == [("GET", "/v1/checkpoint")]
    w.close()

    # Restarted after growth: only the new entries are fetched, and the
    # consistency proof starts at the size cosigned before the restart.
    log.bundles(M1.item(5), M1.item(6, 7))
    wait_checkpoint(srv.url, 7)
    proxy.requests.clear()
    w = Witness(proxy.url, A_SKEY, LOG_VKEY, state)
    assert w.poll_once() == "cosigned 7"
    assert proxy.paths("/v1/entries") == ["/v1/entries?start=5&end=7"]
    assert proxy.paths("/v1/proof/consistency") == ["/v1/proof/consistency?from=5&to=7"]
    _, text = call(srv.url + "/v1/checkpoint")
    assert ckpt.cosigned_by(text, [ckpt.CosignatureVerifier(A_VKEY)]).keys() == {
        "witness-a.example"}

    # 5xx, nonsense and a log that is gone: counted, retried, never a flag.
    log.bundles(M1.item(8))
    wait_checkpoint(srv.url, 8)
    proxy.mode = "down"
    assert w.poll_once().startswith("unreachable: GET /v1/checkpoint: HTTP 503")
    proxy.mode = "garbage"
    assert w.poll_once().startswith("malformed: ")
    proxy.mode = "pass"
    port = srv.port
    srv.stop()
    assert w.poll_once().startswith("unreachable: ")
    srv = start_log(db, port)
    servers.append(srv)
    proxy.mode = "pass"
    assert w.poll_once() == "cosigned 8"
    counters = w.status()["counters"]
    assert counters["unreachable"] == 2 and counters["malformed"] == 1
    assert "flagged" not in counters and not w.status()["flagged"]
    w.close()

    # The state on disk holds what was cosigned last, and the log shows it.
    saved = json.loads(state.read_text())
    assert saved["size"] == 8 and saved["flag"] is None
    assert merkle.Frontier.from_bytes(bytes.fromhex(saved["frontier"])).root() == bytes.fromhex(
        saved["root"])
    _, text = call(srv.url + "/v1/checkpoint")
    assert ckpt.cosigned_by(text, [ckpt.CosignatureVerifier(A_VKEY)])


# -- logs that lie ---------------------------------------------------------------------


class FakeLog:
    """A log server that signs (with the test log key) whatever entries it is
    given, and can serve entries other than the ones it signed."""

    def __init__(self, witnesses=(A_VKEY, B_VKEY)):
        self.signer = note.Signer(LOG_SKEY)
        self.entries: list[bytes] = []
        self.serve_instead: dict[int, bytes] = {}
        self.note: str | None = None
        self.size = 0
        self.mode = "ok"
        self.fail_once: set[str] = set()  # paths answered 503 the next time they are asked
        self.bad_consistency = False
        self.requests: list[str] = []
        self.cosignatures: dict[int, list[str]] = {}
        self.verifiers = [ckpt.CosignatureVerifier(v) for v in witnesses]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                fake.requests.append(self.path)
                url = urlsplit(self.path)
                q = {k: int(v[0]) for k, v in parse_qs(url.query).items()}
                if fake.mode == "down" or self.path in fake.fail_once:
                    fake.fail_once.discard(self.path)
                    return self._json(503, {"error": "unavailable", "message": "down"})
                if url.path == "/v1/checkpoint":
                    if fake.note is None:
                        return self._json(404, {"error": "no_checkpoint", "message": "none"})
                    text = ckpt.add_cosignatures(fake.note, fake.cosignatures.get(fake.size, []))
                    return self._send(200, text.encode(), "text/plain; charset=utf-8")
                if url.path == "/v1/entries":
                    if fake.mode == "garbage":
                        return self._send(200, b"<html>oops</html>", "text/html")
                    end = min(q["end"], q["start"] + 1000)
                    return self._json(200, {"entries": [{"index": i, "data": fake.served(i).hex()}
                                                         for i in range(q["start"], end)]})
                if url.path == "/v1/proof/consistency":
                    proof = merkle.prove_consistency(q["from"], q["to"], fake.hashes())
                    if fake.bad_consistency:
                        proof[0] = bytes(32)
                    return self._json(200, {"from": q["from"], "to": q["to"],
                                            "proof": [h.hex() for h in proof]})
                if url.path == "/v1/proof/inclusion":
                    proof = merkle.prove_inclusion(q["index"], q["size"], fake.hashes())
                    return self._json(200, {"index": q["index"], "size": q["size"],
                                            "proof": [h.hex() for h in proof]})
                return self._json(404, {"error": "not_found", "message": self.path})

            def do_POST(self):
                fake.requests.append(self.path)
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                sig = note.parse_signature_line(doc["cosignature"])
                body = ckpt.Checkpoint.parse(note.split(fake.note)[0]).body()
                assert doc["size"] == fake.size
                if fake.verifiers and not any(v.name == sig.name and v.verify(body, sig.signature)
                                              is not None for v in fake.verifiers):
                    return self._json(403, {"error": "unknown_witness", "message": sig.name})
                fake.cosignatures.setdefault(doc["size"], []).append(doc["cosignature"])
                return self._json(200, {"status": "stored", "witness": sig.name,
                                        "size": doc["size"]})

            def _json(self, status, payload):
                self._send(status, json.dumps(payload).encode(), "application/json")

            def _send(self, status, data, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def served(self, index: int) -> bytes:
        return self.serve_instead.get(index, self.entries[index])

    def hashes(self) -> merkle.MemoryHashes:
        frontier, stored = merkle.Frontier(), merkle.MemoryHashes()
        for data in self.entries:
            stored.append(frontier.append(merkle.leaf_hash(data)))
        return stored

    def publish(self, size: int | None = None) -> str:
        """Sign a checkpoint of the first `size` entries (default: all)."""
        self.size = len(self.entries) if size is None else size
        root = merkle.root_of([merkle.leaf_hash(d) for d in self.entries[:self.size]])
        self.note = ckpt.sign_checkpoint(ckpt.Checkpoint(self.signer.name, self.size, root),
                                         self.signer)
        return self.note

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeLog()
    f.entries = [M1.enroll_entry(), M1.readings_entry(1, 2), M1.readings_entry(3)]
    yield f
    f.close()


@pytest.fixture
def witness(tmp_path, fake):
    w = Witness(fake.url, A_SKEY, LOG_VKEY, tmp_path / "w.json")
    yield w
    w.close()


def signed_by_log(text: str) -> ckpt.Checkpoint:
    return ckpt.verify_checkpoint(text, ckpt.Policy(note.Verifier(LOG_VKEY)))[0]


def test_a_bad_device_signature_under_the_signed_root_is_flagged_from_the_first_run(
        fake, witness):
    bad = M1.readings_entry(4, key=INTRUDER)
    fake.entries.append(bad)
    fake.entries.append(M1.readings_entry(5))
    fake.publish()
    result = witness.poll_once()
    assert result.startswith("flagged: bad_signature: entry 3,"), result
    flag = witness.status()["flag"]
    assert flag["entry"] == 3 and bytes.fromhex(flag["entry_data"]) == bad
    assert flag["cosigned_note"] is None  # nothing was cosigned before
    # The evidence stands on its own: the log signed a root over the bad entry.
    cp = signed_by_log(flag["note"])
    merkle.check_inclusion([bytes.fromhex(h) for h in flag["inclusion"]], 3, cp.size,
                           merkle.leaf_hash(bad), cp.root)
    assert fake.cosignatures == {}


def test_entries_that_do_not_hash_to_the_signed_root_are_flagged(fake, witness):
    fake.publish()
    assert witness.poll_once() == "cosigned 3"
    fake.entries += [M1.readings_entry(4), M1.readings_entry(5)]
    fake.publish()
    # Served in place of entry 4: a validly signed reading, but not the one
    # under the root.
    fake.serve_instead[4] = M1.readings_entry(5, offset=3)
    result = witness.poll_once()
    assert result.startswith("flagged: root_mismatch: entries 3..4"), result
    flag = witness.status()["flag"]
    assert signed_by_log(flag["cosigned_note"]).size == 3
    assert signed_by_log(flag["note"]).size == 5
    assert list(fake.cosignatures) == [3]


def test_another_root_for_a_cosigned_size_is_a_fork(fake, witness):
    fake.publish()
    assert witness.poll_once() == "cosigned 3"
    first = fake.note
    fake.entries[2] = M1.readings_entry(3, offset=5)
    fake.publish()
    result = witness.poll_once()
    assert result.startswith("flagged: fork: the log signed two roots for size 3"), result
    flag = witness.status()["flag"]
    a, b = signed_by_log(flag["cosigned_note"]), signed_by_log(flag["note"])
    assert a.size == b.size == 3 and a.root != b.root
    assert note.split(flag["cosigned_note"])[0] == note.split(first)[0]


def test_a_smaller_tree_after_a_bigger_one_is_a_rollback(fake, witness):
    fake.publish()
    assert witness.poll_once() == "cosigned 3"
    fake.publish(2)
    assert witness.poll_once().startswith("flagged: rollback")
    assert signed_by_log(witness.status()["flag"]["note"]).size == 2


def test_a_consistency_proof_that_does_not_check_is_flagged(fake, witness):
    fake.publish()
    assert witness.poll_once() == "cosigned 3"
    fake.entries.append(M1.readings_entry(4))
    fake.publish()
    fake.bad_consistency = True
    assert witness.poll_once().startswith("flagged: inconsistent")
    assert [p for p in fake.requests if p.startswith("/v1/entries")] == [
        "/v1/entries?start=0&end=3"]  # refused before fetching more


def test_no_checkpoint_bad_answers_and_foreign_signatures_are_retried(fake, witness):
    assert witness.poll_once().startswith("waiting: ")
    fake.publish()
    fake.mode = "garbage"
    assert witness.poll_once().startswith("malformed: GET /v1/entries")
    fake.mode = "down"
    assert witness.poll_once().startswith("unreachable: ")
    fake.mode = "ok"
    # A checkpoint signed by another key is nobody's statement about this log.
    other = note.Signer(note.generate_key("test.example/log")[0])
    honest = fake.note
    fake.note = ckpt.sign_checkpoint(ckpt.Checkpoint("test.example/log", 3, bytes(32)), other)
    assert witness.poll_once().startswith("malformed: GET /v1/checkpoint: not a checkpoint")
    fake.note = honest
    assert witness.poll_once() == "cosigned 3"
    counters = witness.status()["counters"]
    assert counters["malformed"] == 2 and counters["unreachable"] == 1
    assert not witness.status()["flagged"] and list(fake.cosignatures) == [3]


def test_a_long_catch_up_goes_on_where_the_network_broke_it(fake, witness):
    fake.entries = [M1.enroll_entry()] + [M1.readings_entry(s) for s in range(1, 1501)]
    fake.publish()
    fake.fail_once.add("/v1/entries?start=1000&end=1501")
    assert witness.poll_once().startswith("unreachable: GET /v1/entries?start=1000&end=1501")
    assert witness.poll_once() == "cosigned 1501"
    assert [p for p in fake.requests if p.startswith("/v1/entries")] == [
        "/v1/entries?start=0&end=1000", "/v1/entries?start=1000&end=1501",
        "/v1/entries?start=1000&end=1501"]
    assert witness.status()["counters"]["entries_verified"] == 1501


def test_a_log_that_does_not_answer_times_out(tmp_path):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel; nothing ever answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    w = Witness(url, A_SKEY, LOG_VKEY, tmp_path / "w.json", timeout_s=0.2)
    try:
        began = time.monotonic()
        assert w.poll_once().startswith("unreachable: GET /v1/checkpoint: ")
        assert time.monotonic() - began < 2 and not w.status()["flagged"]
    finally:
        w.close()
        silent.close()


def test_a_refused_delivery_is_sent_again(tmp_path):
    fake = FakeLog(witnesses=(B_VKEY,))  # does not know witness A yet
    fake.entries = [M1.enroll_entry()]
    fake.publish()
    w = Witness(fake.url, A_SKEY, LOG_VKEY, tmp_path / "w.json")
    try:
        result = w.poll_once()
        assert result.startswith("cosigned 1, not delivered yet: HTTP 403"), result
        fake.verifiers.append(ckpt.CosignatureVerifier(A_VKEY))
        assert w.poll_once() == "up to date"
        assert ckpt.cosigned_by(ckpt.add_cosignatures(fake.note, fake.cosignatures[1]),
                                [ckpt.CosignatureVerifier(A_VKEY)])
        posts = fake.requests.count("/v1/cosignatures")
        assert w.poll_once() == "up to date"  # the log shows it now: not sent again
        assert fake.requests.count("/v1/cosignatures") == posts == 2
    finally:
        w.close()
        fake.close()


def test_a_damaged_state_file_stops_the_witness(tmp_path, fake):
    state = tmp_path / "w.json"
    fake.publish()
    w = Witness(fake.url, A_SKEY, LOG_VKEY, state)
    assert w.poll_once() == "cosigned 3"
    w.close()
    doc = json.loads(state.read_text())
    doc["size"] = 2
    state.write_text(json.dumps(doc))
    with pytest.raises(WitnessError, match="not a valid witness state"):
        Witness(fake.url, A_SKEY, LOG_VKEY, state)
    state.write_text("{")
    with pytest.raises(WitnessError, match="unreadable"):
        Witness(fake.url, A_SKEY, LOG_VKEY, state)
    other_log = note.generate_key("test.example/other")[1]
    state.write_text(json.dumps(doc | {"size": 3}))
    with pytest.raises(WitnessError, match="state is for log key"):
        Witness(fake.url, A_SKEY, other_log, state)


# -- running, status endpoint, command line ---------------------------------------------


def test_run_and_the_status_endpoint_report_the_flag(tmp_path, fake):
    fake.publish()
    w = Witness(fake.url, A_SKEY, LOG_VKEY, tmp_path / "w.json", interval_s=0.02)
    status_srv = StatusServer(w).start()
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    try:
        def status():
            return call(status_srv.url + "/status", token=None)[1]

        deadline = time.monotonic() + 5
        def wait_for(done):
            while True:
                s = status()
                if done(s):
                    return s
                assert time.monotonic() < deadline, s
                time.sleep(0.02)

        s = wait_for(lambda s: s["cosigned"] and s["cosigned"]["delivered"])
        assert s["cosigned"]["size"] == 3 and not s["flagged"] and fake.cosignatures[3]
        fake.entries[1] = M1.readings_entry(1, 2, offset=1)
        fake.publish()
        s = wait_for(lambda s: s["last_poll"]["result"].startswith("flagged"))
        assert s["flagged"] and s["flag"]["reason"] == "fork"
        assert signed_by_log(s["flag"]["note"]).root != signed_by_log(
            s["flag"]["cosigned_note"]).root
        assert call(status_srv.url + "/other", token=None)[0] == 404
    finally:
        stop.set()
        thread.join(timeout=5)
        status_srv.stop()
        w.close()
    assert not thread.is_alive()


def test_command_line_once_with_a_new_key(tmp_path, fake, capsys):
    fake.verifiers = []  # the key is made by the command: accept any witness
    fake.publish()
    key, state = tmp_path / "witness.key", tmp_path / "w.json"
    argv = ["witness", "--log", fake.url, "--key", str(key), "--new-key", "witness-c.example",
            "--log-key", LOG_VKEY, "--state", str(state), "--once"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    vkey = out[0]
    assert out[-1] == "cosigned 3"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert ckpt.Cosigner(key.read_text().strip()).vkey == vkey
    line = fake.cosignatures[3][0]
    assert ckpt.cosigned_by(ckpt.add_cosignatures(fake.note, [line]),
                            [ckpt.CosignatureVerifier(vkey)]).keys() == {"witness-c.example"}

    # The same key file again: up to date; a forked log: exit 1.
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "up to date"
    fake.entries[2] = M1.readings_entry(3, offset=9)
    fake.publish()
    assert cli.main(argv) == 1
    assert capsys.readouterr().out.startswith(vkey + "\nflagged: fork")
    fake.mode = "down"
    os.unlink(state)
    assert cli.main(argv) == 2
    assert cli.main(["witness", "--log", fake.url, "--key", str(key), "--log-key", "nonsense",
                     "--state", str(state), "--once"]) == 2
