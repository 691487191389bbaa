"""Ledger node benchmarks (`make bench`, keys ledger.*).

  ledger.ingest_per_s       verified, durably committed readings a second: two gateways
                            posting batches of 500 one-reading bundles over HTTP to
                            `ledger-node serve` in its own process
  ledger.append_p99_ms      POST /v1/bundles round trip at 1,000 readings/s (4 clients,
                            batches of 10 every 40 ms each, timed from the scheduled send so
                            a slow answer cannot hide the requests queued behind it), p99
                            (ledger.append_p50_ms: median)
  ledger.proof_ms_1e6       one inclusion proof in a log of 10^6 readings, cold page cache,
                            median of 1,000 random entries (ledger.proof_http_ms_1e6: the
                            same through GET /v1/proof/inclusion, round trip)
  ledger.audit_s_1e6        `ledger-verify audit` of the exported 10^6-reading log: every
                            device signature, every hash, every checkpoint
  ledger.bytes_per_reading  the 10^6-reading database on disk (after a WAL checkpoint) per
                            reading

The 10^6-reading log is built through the same admission code as the server (1,000 meters,
1,000 readings each, one reading a bundle: the worst case, one signature per reading).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import multiprocessing
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import nacl.signing

from meter import frame
from tools import runtime

T0 = 1767225600
TOKEN = "bench-token"


def _meter(i: int) -> tuple[bytes, nacl.signing.SigningKey]:
    seed = hashlib.sha256(b"ledger-bench-meter:%d" % i).digest()
    return (0x70B3D57ED0000000 + i).to_bytes(8, "big"), nacl.signing.SigningKey(seed)


def _bundles(args) -> list[dict]:
    """One-reading bundles of meter i, seqs first..first+count-1, as POST items."""
    i, first, count = args
    eui, sk = _meter(i)
    out = []
    for seq in range(first, first + count):
        r = frame.Reading(seq, T0 + 900 * seq, 1000 + 37 * seq, 0, 0)
        body = frame.encode_body([r])
        sig = sk.sign(frame.signed_message(eui, body)).signature
        out.append({"dev_eui": eui.hex(), "bundle": frame.assemble(body, sig).hex(),
                    "received_at": T0 + 900 * seq + 2, "gateway": "gw-%d" % (i % 3)})
    return out


def _signed(meters: int, per_meter: int, first: int = 1) -> list[dict]:
    """Seq-major (every meter's seq s before any meter's s+1), signed on all cores."""
    with multiprocessing.Pool() as pool:
        per = pool.map(_bundles, [(i, first, per_meter) for i in range(meters)], chunksize=8)
    return [per[i][k] for k in range(per_meter) for i in range(meters)]


def _enrollment(i: int) -> dict:
    eui, sk = _meter(i)
    return {"dev_eui": eui.hex(), "public_key": bytes(sk.verify_key).hex(),
            "community": "bench", "owner": hashlib.sha256(eui).hexdigest()[:32],
            "meter_model": "SCT013-000", "ct_rating_a": 100}


class _Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body, separators=(",", ":"))
        self.conn.request(method, path, data, {"Authorization": f"Bearer {TOKEN}",
                                               "Content-Type": "application/json"})
        resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, raw


def _serve(tmp: Path, name: str) -> tuple[subprocess.Popen, int]:
    port = runtime.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ledger_node.cli", "serve", "--db",
                             str(tmp / f"{name}.db"), "--listen", f"127.0.0.1:{port}",
                             "--token", TOKEN, "--log-level", "WARNING"],
                            cwd=runtime.REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "ab"))
    runtime.wait_for_port(port)
    return proc, port


def _enroll_all(port: int, meters: int) -> None:
    c = _Client(port)
    for i in range(meters):
        status, raw = c.call("POST", "/v1/devices", _enrollment(i))
        assert status == 201, raw


def _post_all(port: int, batches: list[list[dict]]) -> None:
    c = _Client(port)
    for b in batches:
        status, raw = c.call("POST", "/v1/bundles", {"bundles": b})
        doc = json.loads(raw)
        assert status == 200 and all(r["status"] == "ok" for r in doc["results"]), raw[:300]


def bench_ingest(tmp: Path, meters: int = 1000, per_meter: int = 40) -> dict:
    items = _signed(meters, per_meter)
    batches = [items[k:k + 500] for k in range(0, len(items), 500)]
    proc, port = _serve(tmp, "ingest")
    try:
        _enroll_all(port, meters)
        start = time.perf_counter()
        threads = [threading.Thread(target=_post_all, args=(port, batches[k::2]))
                   for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        status, raw = _Client(port).call("GET", "/v1/stats")
        assert json.loads(raw)["stored"] == len(items), raw[:300]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return {"ledger.ingest_per_s": round(len(items) / elapsed)}


def bench_append_latency(tmp: Path, rate: float = 1000.0, seconds: float = 20.0,
                         clients: int = 4, batch: int = 10) -> dict:
    meters = 1000
    total = int(rate * seconds)
    items = _signed(meters, -(-total // meters))[:total]
    batches = [items[k:k + batch] for k in range(0, len(items), batch)]
    period = clients * batch / rate  # each client's interval between batches
    proc, port = _serve(tmp, "latency")
    lat: list[float] = []
    lock = threading.Lock()

    def client(k: int, start: float) -> None:
        c = _Client(port)
        mine = []
        for j, b in enumerate(batches[k::clients]):
            due = start + k * period / clients + j * period
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status, raw = c.call("POST", "/v1/bundles", {"bundles": b})
            assert status == 200, raw[:200]
            mine.append((time.perf_counter() - due) * 1000)
        with lock:
            lat.extend(mine)

    try:
        _enroll_all(port, meters)
        start = time.perf_counter() + 0.2
        threads = [threading.Thread(target=client, args=(k, start)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    lat.sort()
    return {"ledger.append_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1),
            "ledger.append_p50_ms": round(lat[len(lat) // 2], 1)}


def build_million(tmp: Path, meters: int = 1000, per_meter: int = 1000) -> Path:
    """A ledger database of meters * per_meter one-reading entries, built with
    the node's own admission code (in this process, no HTTP)."""
    from ledger_node import note
    from ledger_node.admission import Admission
    from ledger_node.log import Log
    from ledger_node.store import Store

    db = tmp / "million.db"
    key = tmp / "million.key"
    skey, vkey = note.generate_key("bench.example/ledger")
    key.write_text(skey + "\n")
    store = Store(db)
    log_ = Log(store, note.Signer(skey))
    adm = Admission(log_)
    for i in range(meters):
        adm.enroll(_enrollment(i))
    log_.sign_checkpoint()
    step = 50  # readings per meter signed at a time, to bound memory
    with multiprocessing.Pool() as pool:
        for first in range(1, per_meter + 1, step):
            count = min(step, per_meter + 1 - first)
            per = pool.map(_bundles, [(i, first, count) for i in range(meters)], chunksize=16)
            items = [per[i][k] for k in range(count) for i in range(meters)]
            for k in range(0, len(items), 1000):
                results = adm.admit(items[k:k + 1000])
                assert all(r.status == "ok" for r in results)
            log_.sign_checkpoint()
    log_.stop()
    store.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    (tmp / "million.vkey").write_text(vkey + "\n")
    return db


def bench_million(tmp: Path) -> dict:
    from ledger_node import note
    from ledger_node.log import Log
    from ledger_node.store import Store

    db = build_million(tmp)
    readings = 10 ** 6
    size_bytes = os.path.getsize(db)
    out = {"ledger.bytes_per_reading": round(size_bytes / readings, 1)}

    store = Store(db, create=False)
    log_ = Log(store, note.Signer((tmp / "million.key").read_text().strip()))
    size = log_.size
    rng = random.Random(6)
    times = []
    for _ in range(1000):
        idx = rng.randrange(size)
        t = time.perf_counter()
        log_.prove_inclusion(idx, size)
        times.append((time.perf_counter() - t) * 1000)
    out["ledger.proof_ms_1e6"] = round(statistics.median(times), 3)
    out["ledger.proof_p99_ms_1e6"] = round(sorted(times)[989], 3)
    log_.stop()
    store.close()

    proc = subprocess.Popen([sys.executable, "-m", "ledger_node.cli", "serve", "--db", str(db),
                             "--key", str(tmp / "million.key"), "--listen",
                             f"127.0.0.1:{(port := runtime.free_port())}",
                             "--log-level", "WARNING"], cwd=runtime.REPO,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "million.log", "ab"))
    try:
        runtime.wait_for_port(port, timeout=60)
        c = _Client(port)
        times = []
        for _ in range(300):
            idx = rng.randrange(size)
            t = time.perf_counter()
            status, _raw = c.call("GET", f"/v1/proof/inclusion?index={idx}&size={size}")
            times.append((time.perf_counter() - t) * 1000)
            assert status == 200
        out["ledger.proof_http_ms_1e6"] = round(statistics.median(times), 3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    export = tmp / "million.export"
    subprocess.run([sys.executable, "-m", "ledger_node.cli", "export", "--db", str(db),
                    "--out", str(export)], cwd=runtime.REPO, check=True,
                   stderr=subprocess.DEVNULL)
    policy = tmp / "million-policy.toml"
    policy.write_text(f'log = "{(tmp / "million.vkey").read_text().strip()}"\nquorum = 0\n')
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ledger_node.verify", "audit", str(export),
                           "--policy", str(policy)], cwd=runtime.REPO, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    out["ledger.audit_s_1e6"] = round(elapsed, 1)
    return out


def run(tmp: Path) -> dict:
    results = {}
    results.update(bench_ingest(tmp))
    results.update(bench_append_latency(tmp))
    results.update(bench_million(tmp))
    return results


if __name__ == "__main__":
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        which = sys.argv[1:] or ["ingest", "latency", "million"]
        res = {}
        for w in which:
            res.update({"ingest": bench_ingest, "latency": bench_append_latency,
                        "million": bench_million}[w](Path(d)))
        print(json.dumps(res, indent=1))
