"""A whole simulated deployment on one machine, process by process:

    Mosquitto            real broker on a loopback port
    ledger-node serve    SQLite ledger, HTTP on loopback
    modem simulator      the meters' AT modems + the LoRaWAN/ChirpStack side
    meter-gateway run    ChirpStack MQTT in, verified readings to the ledger
                         (with a generated config file, gateway.toml)
    N meters             the real firmware in MicroPython on simulated boards

The demo (`make demo`), the end-to-end test and the end-to-end benchmark all
drive this class, so they exercise exactly the same path.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from gateway import config
from hardware.sim.meter import ModemLink, SimMeter
from meter import frame
from tools import runtime, traces

APPLICATION_ID = "5b0f7a53-3c55-4c2e-9a3e-6d1f0e6c0a01"
LOG_ORIGIN = "ledger.demo.invalid/community"
LEDGER_TOKEN = "demo-writer-token"
RTC_EPOCH = 1767225600  # the simulated boards' RTC at boot: 2026-01-01T00:00:00Z


@dataclass
class MeterSpec:
    name: str
    board: str
    kind: str  # a tools.traces kind
    voltage: bool = False
    seed: int = 0
    dev_eui: str = ""


def default_fleet(n: int = 3) -> list[MeterSpec]:
    """Two ESP32 meters and a Pico with different homes; more meters cycle through the kinds."""
    base = [
        MeterSpec("kitchen-esp32", "esp32", "home", voltage=False, seed=1),
        MeterSpec("solar-esp32", "esp32", "pv", voltage=True, seed=2),
        MeterSpec("flat-pico", "pico", "fridge", voltage=False, seed=3),
    ]
    fleet = []
    for i in range(n):
        b = base[i % len(base)]
        name = b.name if i < len(base) else f"{b.name}-{i}"
        # Meters of the same kind share a trace (one file per kind), so a large fleet costs
        # no more trace generation than three meters.
        fleet.append(MeterSpec(name, b.board, b.kind, b.voltage, b.seed))
    for i, m in enumerate(fleet):
        m.dev_eui = f"70b3d57ed005{i:04x}"
    return fleet


def _http_json(url: str, body: dict | None = None, token: str | None = None,
               timeout: float = 5.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@dataclass
class Deployment:
    workdir: Path
    fleet: list[MeterSpec]
    speed: float = 5.0  # simulated seconds per real second
    interval_s: int = 15  # meters' reading interval (simulated seconds)
    trace_s: float = 600.0  # length of each generated trace (simulated seconds)
    trace_rate_hz: int = 3200
    modem_speed: float | None = None  # airtime and join delays divided by this
    procs: dict = field(default_factory=dict)
    meters: dict = field(default_factory=dict)
    readings: dict = field(default_factory=dict)  # meter name -> firmware readings
    meter_stats: dict = field(default_factory=dict)

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        self.broker: runtime.Broker | None = None
        self.ledger_url = ""
        self.gateway_status_url = ""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.network_uplinks: dict[str, int] = {}  # dev_eui -> ChirpStack up events seen
        self.injected: dict[str, int] = {}  # dev_eui -> forged/malformed events we published
        # Each meter's downlink command key, written into it at provisioning and
        # given to the gateway in a keys file (the network server never sees it).
        self.command_keys: dict[str, bytes] = {}
        self._observer = None

    # ------------------------------------------------------------- start

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        import subprocess
        self.procs[name] = subprocess.Popen([sys.executable, *args], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=runtime.REPO)

    def _key(self, filename: str, name: str, *, witness: bool) -> str:
        """Write a new note signing key (mode 0600) into the workdir; its vkey."""
        from ledger_node import checkpoint, note

        skey, vkey = (checkpoint.generate_cosigner_key(name) if witness
                      else note.generate_key(name))
        path = self.workdir / filename
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(skey + "\n")
        return vkey

    def trace_path(self, m: MeterSpec) -> Path:
        v = "-v" if m.voltage else ""
        return self.workdir / "traces" / f"{m.kind}{v}-{m.seed}-{self.trace_s:g}s.csv"

    def prepare_traces(self) -> None:
        (self.workdir / "traces").mkdir(parents=True, exist_ok=True)
        for m in self.fleet:
            p = self.trace_path(m)
            if not p.exists():
                traces.generate(p, m.kind, self.trace_s, rate_hz=self.trace_rate_hz,
                                seed=m.seed, with_voltage=m.voltage)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare_traces()
        self.broker = runtime.Broker().start()
        self._observe_network()

        # The ledger's log key and two independent witnesses that cosign its
        # checkpoints; the policy is what an auditor trusts (2 of 2).
        self.log_key = self._key("ledger.key", LOG_ORIGIN, witness=False)
        self.witness_keys = [self._key(f"witness-{w}.key", f"witness-{w}.demo.invalid",
                                       witness=True) for w in ("a", "b")]
        self.policy_path = self.workdir / "policy.toml"
        self.policy_path.write_text(
            f'log = "{self.log_key}"\nquorum = 2\nwitnesses = [\n'
            + "".join(f'  "{vkey}",\n' for vkey in self.witness_keys) + "]\n")
        ledger_port = runtime.free_port()
        self._spawn("ledger", ["-m", "ledger_node.cli", "serve", "--db",
                               str(self.workdir / "ledger.sqlite"), "--key",
                               str(self.workdir / "ledger.key"), "--listen",
                               f"127.0.0.1:{ledger_port}", "--token", LEDGER_TOKEN,
                               *[a for vkey in self.witness_keys for a in ("--witness", vkey)]])
        self.ledger_url = f"http://127.0.0.1:{ledger_port}"
        runtime.wait_for_port(ledger_port)
        for w in ("a", "b"):
            self._spawn(f"witness-{w}", ["-m", "ledger_node.cli", "witness", "--log",
                                         self.ledger_url, "--key",
                                         str(self.workdir / f"witness-{w}.key"), "--log-key",
                                         self.log_key, "--state",
                                         str(self.workdir / f"witness-{w}.json"),
                                         "--interval", "0.5"])

        # Provisioning, as a technician does it: first boot creates the key on
        # the meter, its public half is enrolled in the ledger's registry; the
        # command key is generated here and goes to the meter and the gateway.
        for m in self.fleet:
            self.command_keys[m.dev_eui] = os.urandom(frame.COMMAND_KEY_LEN)
        keys_file = self.workdir / "gateway-command-keys.json"
        keys_file.write_text(json.dumps({eui: k.hex() for eui, k in self.command_keys.items()}))
        os.chmod(keys_file, 0o600)
        for m in self.fleet:
            sm = self._sim_meter(m, modem=None)
            pub = sm.provision_key()
            _http_json(f"{self.ledger_url}/v1/devices",
                       {"dev_eui": m.dev_eui, "public_key": pub.hex(), "board": m.board,
                        "meter_model": "SCT013-000", "community": "demo",
                        # A pseudonym, never a name: the log keeps it forever.
                        "owner": hashlib.sha256(b"demo-owner:" + m.dev_eui.encode()).hexdigest()},
                       token=LEDGER_TOKEN)

        modem_port = runtime.free_port()
        self._spawn("modem-sim", ["-m", "hardware.sim.modem_sim", "--listen",
                                  f"127.0.0.1:{modem_port}", "--mqtt-host", "127.0.0.1",
                                  "--mqtt-port", str(self.broker.port), "--application-id",
                                  APPLICATION_ID, "--speed", str(self.modem_speed or self.speed)])
        runtime.wait_for_port(modem_port)

        # The gateway runs on the real clock, the meters on a faster one: its
        # settle times are a few reading intervals in simulated time (speed 0,
        # "as fast as the host allows", has no fixed ratio: one second).
        settle_s = max(1.0, 4 * self.interval_s / self.speed) if self.speed > 0 else 1.0
        status_port = runtime.free_port()
        token_file = self.workdir / "gateway-ledger.token"
        token_file.write_text(LEDGER_TOKEN + "\n")
        os.chmod(token_file, 0o600)
        gateway_config = self.workdir / "gateway.toml"
        gateway_config.write_text(config.to_toml({
            "state_dir": self.workdir / "gateway",
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port,
                     "application_id": APPLICATION_ID},
            "ledger": [{"url": self.ledger_url, "token_file": token_file}],
            "downlink": {"command_keys": keys_file},
            "resend": {"after_s": settle_s, "min_interval_s": settle_s,
                       "fragment_ttl_s": 4 * settle_s},
            "status": {"listen": f"127.0.0.1:{status_port}"},
        }))
        self._spawn("gateway", ["-m", "gateway.cli", "run", "--config", str(gateway_config)])
        self.gateway_status_url = f"http://127.0.0.1:{status_port}"
        runtime.wait_for_port(status_port)

        for m in self.fleet:
            link = ModemLink("127.0.0.1", modem_port, m.dev_eui)
            sm = self._sim_meter(m, modem=link)
            self.meters[m.name] = sm
            self.readings[m.name] = []
            sm.start()
            t = threading.Thread(target=self._collect, args=(m.name, sm), daemon=True)
            t.start()
            self._threads.append(t)

    def _sim_meter(self, m: MeterSpec, modem: ModemLink | None) -> SimMeter:
        return SimMeter(board=m.board, trace=self.trace_path(m),
                        flash=self.workdir / "flash" / m.name,
                        # Time runs compressed (a reading every few seconds stands
                        # for one every 15 min): the airtime budget, jitter and
                        # time-sync cadence are scaled alike.
                        config={"interval_s": self.interval_s, "voltage_channel": m.voltage,
                                "expect_export": m.kind == "pv", "dr": 5,
                                "airtime_s_day": 30.0 * 900 / self.interval_s,
                                "jitter_s": max(1, self.interval_s // 10),
                                "time_sync_s": 60},
                        speed=self.speed, modem=modem, rtc_epoch=RTC_EPOCH,
                        seed=int(m.dev_eui[-4:], 16) + 1,
                        command_key=self.command_keys[m.dev_eui])

    def _collect(self, name: str, sm: SimMeter) -> None:
        for rec in sm.lines():
            with self._lock:
                if "stats" in rec:
                    self.meter_stats[name] = rec["stats"]
                elif "seq" in rec:
                    self.readings[name].append(rec)

    def _observe_network(self) -> None:
        """Count the `up` events the network publishes, per device: an observer independent of
        the meters and of the gateway."""
        import paho.mqtt.client as mqtt

        def on_message(client, userdata, msg):
            parts = msg.topic.split("/")
            with self._lock:
                self.network_uplinks[parts[3]] = self.network_uplinks.get(parts[3], 0) + 1

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:8]}")
        c.on_message = on_message
        c.on_connect = lambda client, *a: client.subscribe(
            f"application/{APPLICATION_ID}/device/+/event/up", qos=1)
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        self._observer = c

    def inject_bad_uplinks(self) -> None:
        """Publish what an attacker or a broken integration could put on the broker: a
        non-JSON message, a bundle signed by a key nobody enrolled, a real meter's bundle with
        a forged signature, a truncated bundle. The gateway must refuse each, count it by
        reason, and go on."""
        import paho.mqtt.client as mqtt
        from chirpstack_api import integration
        from Crypto.PublicKey import ECC
        from Crypto.Signature import eddsa
        from google.protobuf import json_format

        def up(dev_eui: str, data: bytes) -> bytes:
            ev = integration.UplinkEvent(deduplication_id=str(uuid.uuid4()), f_port=frame.PORT_READING,
                                         f_cnt=1, data=data)
            ev.device_info.dev_eui = dev_eui
            ev.device_info.application_id = APPLICATION_ID
            ev.time.GetCurrentTime()
            return json_format.MessageToJson(ev).encode()

        # One reading (seq, t_end, import_dwh, export_dwh, flags) far beyond any real seq.
        body = frame.encode_body([(1_000_000, RTC_EPOCH + 60, 1, 0, 0)])
        stranger = ECC.generate(curve="Ed25519")
        unknown_eui = "ffffffffffff0001"
        forged = frame.assemble(body, eddsa.new(stranger, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(unknown_eui), body)))
        victim = self.fleet[0].dev_eui
        bad_sig = frame.assemble(body, eddsa.new(stranger, "rfc8032").sign(
            frame.signed_message(bytes.fromhex(victim), body)))
        topic = f"application/{APPLICATION_ID}/device/{{}}/event/up"
        msgs = [
            (topic.format(victim), b"this is not json"),
            (topic.format(unknown_eui), up(unknown_eui, forged)),
            (topic.format(victim), up(victim, bad_sig)),
            (topic.format(victim), up(victim, bad_sig[:40])),
        ]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"intruder-{uuid.uuid4().hex[:8]}")
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        try:
            for t, payload in msgs:
                c.publish(t, payload, qos=1).wait_for_publish(timeout=5)
                eui = t.split("/")[3]
                self.injected[eui] = self.injected.get(eui, 0) + 1
        finally:
            c.loop_stop()
            c.disconnect()

    # ------------------------------------------------------------ observe

    def ledger_stats(self) -> dict:
        return _http_json(f"{self.ledger_url}/v1/stats")

    def ledger_check(self) -> dict:
        return _http_json(f"{self.ledger_url}/v1/check", timeout=60, token=LEDGER_TOKEN)

    def ledger_checkpoint(self) -> str:
        with urllib.request.urlopen(f"{self.ledger_url}/v1/checkpoint", timeout=10) as r:
            return r.read().decode()

    def ledger_proof_bundle(self, dev_eui: str, seq: int) -> dict:
        return _http_json(f"{self.ledger_url}/v1/proof-bundle?dev_eui={dev_eui}&seq={seq}")

    def ledger_readings(self, dev_eui: str) -> list[dict]:
        return _http_json(f"{self.ledger_url}/v1/readings?dev_eui={dev_eui}&limit=10000")["readings"]

    def gateway_stats(self) -> dict:
        return _http_json(f"{self.gateway_status_url}/stats")

    def meters_alive(self) -> bool:
        return all(sm.proc is not None and sm.proc.poll() is None for sm in self.meters.values())

    # -------------------------------------------------------------- stop

    def stop_meters(self) -> None:
        for sm in self.meters.values():
            sm.stop()
        for t in self._threads:
            t.join(timeout=5)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until the gateway has nothing left for the ledger and the MQTT traffic has
        settled (the count of received uplinks stopped moving)."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                g = self.gateway_stats()
            except OSError:
                time.sleep(0.2)
                continue
            key = (g.get("received"), g.get("forwarded"))
            if g.get("outbox_depth", 1) == 0 and key == last:
                return True
            last = key
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.stop_meters()
        for name in ("gateway", "modem-sim", "witness-a", "witness-b", "ledger"):
            p = self.procs.pop(name, None)
            if p is not None:
                runtime.stop_process(p)
        if self._observer is not None:
            self._observer.loop_stop()
            self._observer.disconnect()
            self._observer = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> "Deployment":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
