"""Gateway benchmarks (`make bench`, keys gateway.*), through a real Mosquitto.

  gateway.uplinks_per_s           uplinks verified (Ed25519) and durably queued per second,
                                  the daemon pinned to one core, ChirpStack JSON events
                                  (3 gateways of rxInfo each) waiting in its MQTT session
  gateway.uplinks_per_s_protobuf  the same with ChirpStack's protobuf marshaler
  gateway.e2e_p99_ms              MQTT publish to the bundle's entry seen in the ledger's log, 99th
                                  percentile, at 200 uplinks/s (gateway.e2e_p50_ms: median)
  gateway.drain_s                 a 1,000-meter fleet's hour (4 readings a meter, in bundles
                                  of 2) queued while the ledger is down, then delivered: seconds
                                  from the ledger's return to an empty queue
  gateway.queue_mb_7d             the state file holding 7 days of a 1,000-meter fleet at 15 min,
                                  one reading per bundle (672,000 bundles of real size), MB
                                  after a checkpoint (gateway.queue_bytes_per_bundle: per bundle)

The daemon runs in its own process (`python -m tools.gateway_bench serve KWARGS_JSON`), so the
publisher, Mosquitto and the ledger do not share its core.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from chirpstack_api import integration
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf import json_format

from meter import frame
from tools import runtime

APP = "bench-app"
T0 = 1_767_225_600


class Fleet:
    """Meters with keys, producing ChirpStack up events of signed bundles."""

    def __init__(self, n: int, seed: int = 1):
        self.euis = [f"70b3d57e{seed:02x}{i:06x}" for i in range(n)]
        self.keys = [Ed25519PrivateKey.generate() for _ in range(n)]

    def devices_doc(self) -> dict:
        return {"devices": [{"dev_eui": e, "public_key": k.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw).hex(), "latest_seq": None}
            for e, k in zip(self.euis, self.keys)]}

    def bundle(self, i: int, first: int, n: int) -> bytes:
        body = frame.encode_body([(s, T0 + 900 * s, 1000 + 37 * s, 0, frame.FLAG_VOLTAGE_MEASURED)
                                  for s in range(first, first + n)])
        sig = self.keys[i].sign(frame.signed_message(bytes.fromhex(self.euis[i]), body))
        return frame.assemble(body, sig)

    def event(self, i: int, data: bytes, marshaler: str = "json") -> tuple[str, bytes]:
        ev = integration.UplinkEvent(deduplication_id=str(uuid.uuid4()), f_port=1,
                                     f_cnt=7, data=data, dev_addr="01ab23cd", dr=3, adr=True)
        ev.time.GetCurrentTime()
        d = ev.device_info
        d.tenant_id, d.tenant_name = str(uuid.UUID(int=1)), "community"
        d.application_id, d.application_name = APP, "meters"
        d.device_profile_id, d.device_profile_name = str(uuid.UUID(int=2)), "meter-eu868"
        d.device_name, d.dev_eui = f"meter-{self.euis[i]}", self.euis[i]
        d.tags["site"] = "block-a"
        for g in range(3):
            rx = ev.rx_info.add(gateway_id=f"0016c001f15000{g:02x}", uplink_id=1000 + g,
                                rssi=-90 - g, snr=7.5 - g, channel=g)
            rx.location.latitude, rx.location.longitude = 52.1, 5.1
            rx.context = b"\x00\x01\x02\x03"
            rx.metadata["region_config_id"] = "eu868"
        ev.tx_info.frequency = 868100000
        ev.tx_info.modulation.lora.bandwidth = 125000
        ev.tx_info.modulation.lora.spreading_factor = 9
        topic = f"application/{APP}/device/{self.euis[i]}/event/up"
        if marshaler == "protobuf":
            return topic, ev.SerializeToString()
        return topic, json_format.MessageToJson(ev).encode()


def serve(kwargs_json: str) -> None:
    """Run a Gateway pinned to CPU 0 until SIGTERM."""
    from gateway.daemon import Gateway
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    kw = json.loads(kwargs_json)
    gw = Gateway(**kw)
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(1))
    gw.start()
    while not done:
        time.sleep(0.2)
    gw.stop()


def _spawn_gateway(kw: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tools.gateway_bench", "serve", json.dumps(kw)],
                            cwd=runtime.REPO, stdout=subprocess.DEVNULL,
                            stderr=open(Path(kw["state_dir"]) / "gateway.log", "ab"))


def _stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())


def _wait(pred, timeout: float, what: str, step: float = 0.02) -> float:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return time.monotonic()
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(step)


def _publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"cs-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def _gateway_kw(tmp: Path, broker: runtime.Broker, ledger_url: str, name: str,
                marshaler: str = "auto") -> dict:
    return dict(mqtt_host="127.0.0.1", mqtt_port=broker.port, ledger_url=ledger_url,
                state_dir=str(tmp / name), application_id=APP, status_port=runtime.free_port(),
                name=name, marshaler=marshaler, backoff_cap=1.0, resend_max_per_day=0)


def _prime_session(kw: dict, fleet: Fleet) -> None:
    """Start the daemon once so the broker holds a session for it, with the
    fleet's keys in its cache; stop it again."""
    Path(kw["state_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(kw["state_dir"]) / "devices.json").write_text(json.dumps(fleet.devices_doc()))
    proc = _spawn_gateway(kw)
    try:
        _wait(lambda: _health(kw["status_port"]).get("subscribed"), 30, "the daemon to subscribe")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _health(port: int) -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def bench_throughput(tmp: Path, marshaler: str, n: int = 30_000, meters: int = 1000) -> float:
    """Uplinks a second, verified and committed, from a backlog in the broker."""
    fleet = Fleet(meters)
    with runtime.Broker() as broker:
        # No ledger: delivery fails and backs off, which costs the daemon nothing.
        kw = _gateway_kw(tmp, broker, f"http://127.0.0.1:{runtime.free_port()}",
                         f"tput-{marshaler}", marshaler)
        _prime_session(kw, fleet)
        pub = _publisher(broker.port)
        infos = []
        per = n // meters
        for k in range(per):
            for i in range(meters):
                topic, payload = fleet.event(i, fleet.bundle(i, 1 + 3 * k, 3), marshaler)
                infos.append(pub.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(60)
        pub.loop_stop()
        pub.disconnect()
        total = per * meters
        proc = _spawn_gateway(kw)
        try:
            port = kw["status_port"]
            t_first = _wait(lambda: _stats(port)["received"] > 0, 60, "the first uplink", 0.005)
            first_count = _stats(port)["bundles"]
            t_done = _wait(lambda: _stats(port)["bundles"] >= total, 300, f"{total} bundles")
            stats = _stats(port)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        assert stats["rejected_total"] == 0, stats["rejected"]
        return (total - first_count) / (t_done - t_first)


def _ledger(tmp: Path, name: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or runtime.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ledger_node.cli", "serve", "--db",
                             str(tmp / f"{name}.db"), "--listen", f"127.0.0.1:{port}",
                             "--log-level", "WARNING"],
                            cwd=runtime.REPO, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / f"{name}.log", "ab"))
    runtime.wait_for_port(port)
    return proc, f"http://127.0.0.1:{port}"


def _enroll(url: str, fleet: Fleet) -> None:
    for dev in fleet.devices_doc()["devices"]:
        req = urllib.request.Request(url + "/v1/devices", method="POST",
                                     data=json.dumps({"dev_eui": dev["dev_eui"],
                                                      "public_key": dev["public_key"],
                                                      "community": "bench",
                                                      "owner": dev["dev_eui"] * 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()


def bench_latency(tmp: Path, rate: float = 200.0, seconds: float = 30.0,
                  meters: int = 1000) -> dict:
    """Publish at `rate` uplinks/s; latency = the time the bundle's entry is
    first seen in the ledger's log (polled every millisecond through
    GET /v1/entries, so up to ~2 ms late) minus the publish time."""
    fleet = Fleet(meters, seed=2)
    with runtime.Broker() as broker:
        ledger, url = _ledger(tmp, "lat-ledger")
        try:
            _enroll(url, fleet)
            kw = _gateway_kw(tmp, broker, url, "latency")
            _prime_session(kw, fleet)
            proc = _spawn_gateway(kw)
            try:
                _wait(lambda: _health(kw["status_port"]).get("subscribed"), 30, "subscribe")
                n = int(rate * seconds)
                events = []
                for j in range(n):
                    i, k = j % meters, j // meters
                    events.append((i, 1 + 2 * k, fleet.event(i, fleet.bundle(i, 1 + 2 * k, 2))))
                pub = _publisher(broker.port)
                seen: dict[tuple[str, int], float] = {}
                watching = threading.Event()
                watching.set()
                watcher = threading.Thread(target=_watch_log, args=(url, seen, watching))
                watcher.start()
                sent: dict[tuple[str, int], float] = {}
                start = time.monotonic()
                for j, (i, first, (topic, payload)) in enumerate(events):
                    delay = start + j / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    sent[(fleet.euis[i], first)] = time.time()
                    pub.publish(topic, payload, qos=1)
                _wait(lambda: _stats(kw["status_port"])["forwarded"] >= n, 120, "delivery", 0.1)
                _wait(lambda: len(seen) >= n, 30, "the entries in the log", 0.1)
                watching.clear()
                watcher.join()
                pub.loop_stop()
                pub.disconnect()
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        finally:
            ledger.send_signal(signal.SIGTERM)
            ledger.wait(30)
    lat = sorted((stored - sent[key]) * 1000 for key, stored in seen.items() if key in sent)
    assert len(lat) == len(sent), (len(lat), len(sent))
    return {"gateway.e2e_p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1),
            "gateway.e2e_p50_ms": round(lat[len(lat) // 2], 1)}


def _watch_log(url: str, seen: dict, watching: threading.Event) -> None:
    """Record when each readings entry (dev_eui, first seq) appears in the log."""
    from ledger_node import entries

    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    done = 0
    while watching.is_set():
        conn.request("GET", "/v1/health")
        size = json.loads(conn.getresponse().read())["size"]
        while done < size:
            conn.request("GET", f"/v1/entries?start={done}&end={size}")
            got = json.loads(conn.getresponse().read())["entries"]
            now = time.time()
            for e in got:
                entry = entries.decode(bytes.fromhex(e["data"]))
                if isinstance(entry, entries.ReadingsEntry):
                    seen.setdefault((entry.dev_eui.hex(), entry.decoded().first_seq), now)
            done += len(got)
        time.sleep(0.001)
    conn.close()


def bench_drain(tmp: Path, meters: int = 1000) -> dict:
    """A fleet's hour queued while the ledger is down, then delivered."""
    fleet = Fleet(meters, seed=3)
    with runtime.Broker() as broker:
        ledger, url = _ledger(tmp, "drain-ledger")
        _enroll(url, fleet)
        port = int(url.rsplit(":", 1)[1])
        ledger.send_signal(signal.SIGTERM)
        ledger.wait(30)
        kw = _gateway_kw(tmp, broker, url, "drain")
        _prime_session(kw, fleet)
        proc = _spawn_gateway(kw)
        try:
            _wait(lambda: _health(kw["status_port"]).get("subscribed"), 30, "subscribe")
            pub = _publisher(broker.port)
            infos = [pub.publish(*fleet.event(i, fleet.bundle(i, first, 2)), qos=1)
                     for first in (1, 3) for i in range(meters)]
            for info in infos:
                info.wait_for_publish(60)
            pub.loop_stop()
            pub.disconnect()
            total = len(infos)
            _wait(lambda: _stats(kw["status_port"])["outbox_depth"] >= total, 120, "the backlog")
            ledger, _ = _ledger(tmp, "drain-ledger", port)
            t0 = time.monotonic()
            t1 = _wait(lambda: _stats(kw["status_port"])["outbox_depth"] == 0, 600, "the drain",
                       0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            ledger.send_signal(signal.SIGTERM)
            ledger.wait(30)
    return {"gateway.drain_s": round(t1 - t0, 2)}


def bench_queue_7d(tmp: Path, meters: int = 1000, days: int = 7) -> dict:
    """Fill a state file with a week of a fleet's single-reading bundles, as
    the daemon's batches would, and weigh it."""
    from gateway.outbox import Outbox
    fleet = Fleet(1, seed=4)
    bundle = fleet.bundle(0, 1, 1)
    path = tmp / "week.sqlite"
    box = Outbox(path)
    n = 0
    for slot in range(days * 96):
        with box.batch() as b:
            for m in range(meters):
                b.store_bundle(f"70b3d57e{m:08x}", bundle, slot + 1, slot + 1, float(slot))
                n += 1
    assert box.depth() == n
    box._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    box.close()
    size = sum(f.stat().st_size for f in tmp.glob("week.sqlite*"))
    return {"gateway.queue_mb_7d": round(size / 1e6, 1),
            "gateway.queue_bytes_per_bundle": round(size / n, 1)}


def run(tmp: Path) -> dict:
    results = {
        "gateway.uplinks_per_s": round(bench_throughput(tmp, "json")),
        "gateway.uplinks_per_s_protobuf": round(bench_throughput(tmp, "protobuf")),
    }
    results.update(bench_latency(tmp))
    results.update(bench_drain(tmp))
    results.update(bench_queue_7d(tmp))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="gwbench-") as d:
            print(json.dumps(run(Path(d)), indent=2))
