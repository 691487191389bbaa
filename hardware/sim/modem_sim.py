"""AT-command LoRaWAN modems (RAK3172 with RUI3, Seeed Wio-E5) and the ChirpStack
v4 network server behind them.

Simulated meters reach it over TCP (one connection per modem, see
hardware/sim/mpy/sim_uart.py); the first line of a connection names the modem
and its AT dialect. What a real network would deliver to the gateway daemon
comes out as ChirpStack v4 MQTT integration events on a real broker, and
downlinks enqueued on `command/down` reach the modems. The modem side follows
the RUI3 AT Command Manual and the LoRa-E5 AT Command Specification; the
network side follows ChirpStack's MQTT integration (topics, JSON or protobuf
marshaler, event semantics, downlink expiry). Faults (busy modems, lost
frames and acknowledgements, a network outage, modem restarts, line noise, a
modem that hangs) can be injected, at start or while meters run.
docs/modem.md lists what is simulated and what is not.

    python -m hardware.sim.modem_sim --listen 127.0.0.1:7000 \
        --mqtt-host 127.0.0.1 --mqtt-port 1883 --application-id <uuid> --speed 10

All simulated delays (airtime, receive windows, join) are divided by `speed`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import logging
import random
import signal
import struct
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from chirpstack_api import common, gw, integration
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from meter import lorawan

log = logging.getLogger("hardware.sim.modem_sim")

# LoRaWAN 1.0.x MAC layer facts used for timing and sizes.
JOIN_REQUEST_LEN = 23  # PHY bytes (time_on_air_ms adds lorawan.OVERHEAD to what it is given)
JOIN_ACCEPT_LEN = 17
RECEIVE_DELAY1_S = 1.0
RECEIVE_DELAY2_S = 2.0
JOIN_ACCEPT_DELAY1_S = 5.0
JOIN_ACCEPT_DELAY2_S = 6.0
RX_WINDOW_S = 0.05  # how long a receive window stays open without a preamble
MAX_LINE = 2048  # longer input without a line end is garbage, not a command
MAX_QUEUE = 32  # downlinks queued per device (ChirpStack has no fixed limit)
# The largest FRMPayload of any data rate here; ChirpStack rejects larger
# downlinks when it schedules them.
MAX_DOWNLINK = 242
# SNR a LoRa demodulator needs per spreading factor (Semtech SX126x data
# sheet); a LinkCheckAns margin is the SNR above it.
REQUIRED_SNR = {7: -7.5, 8: -10.0, 9: -12.5, 10: -15.0, 11: -17.5, 12: -20.0}

RAK3172 = "rak3172"
WIOE5 = "wioe5"
DIALECTS = (RAK3172, WIOE5)
# What each modem's clock says at power-up, before the network set it.
BOOT_EPOCH = {RAK3172: 0.0, WIOE5: 1577836800.0}  # 1970, and 2020-01-01 for the Wio-E5

REQ_LINK = 1  # MAC requests waiting for a modem's next uplink (bits)
REQ_TIME = 2

MARSHALERS = ("json", "protobuf")  # ChirpStack's integration marshalers
_JSON_SPACE = b" \t\r\n"


def airtime_s(phy_len: int, region: "Region", dr: int) -> float:
    """Seconds on the air for `phy_len` PHY bytes (meter.lorawan owns the formula)."""
    return lorawan.time_on_air_ms(phy_len - lorawan.OVERHEAD, region.name, dr) / 1000.0


@dataclass(frozen=True)
class Region:
    name: str
    band: int  # AT+BAND number in RUI3
    config_id: str  # ChirpStack region_config_id
    uplink_hz: tuple  # channels the modem hops over
    default_dr: int
    rx2: tuple  # (frequency, sf, bw) of RX2, also Class C's continuous window

    @property
    def data_rates(self) -> dict:
        """Uplink DR -> (spreading factor, bandwidth Hz), from meter.lorawan."""
        return {dr: (sf, bw * 1000) for dr, (sf, bw) in enumerate(lorawan.DATA_RATES[self.name])}

    def max_payload(self, dr: int) -> int:
        return lorawan.max_payload(self.name, dr)

    def rx1(self, channel: int, dr: int) -> tuple[int, int, int]:
        """(frequency, sf, bw) of the RX1 downlink for an uplink (RX1DROffset 0)."""
        if self.name == "US915":
            # Downlink channels 923.3 + 0.6 k MHz, uplink DR0-4 -> DR10-13 on 500 kHz.
            sf = {0: 10, 1: 9, 2: 8, 3: 7, 4: 7}[dr]
            return 923_300_000 + 600_000 * (channel % 8), sf, 500_000
        sf, bw = self.data_rates[dr]
        return self.uplink_hz[channel], sf, bw


EU868 = Region(
    "EU868", 4, "eu868",
    (868_100_000, 868_300_000, 868_500_000, 867_100_000, 867_300_000,
     867_500_000, 867_700_000, 867_900_000),
    0,
    (869_525_000, 12, 125_000),
)
US915 = Region(
    "US915", 5, "us915_1",
    # Sub-band 2 (channels 8-15), the one ChirpStack enables by default.
    tuple(903_900_000 + 200_000 * i for i in range(8)),
    0,
    (923_300_000, 12, 500_000),
)
REGIONS = {r.band: r for r in (EU868, US915)}
REGIONS_BY_NAME = {r.name: r for r in (EU868, US915)}

DEFAULT_TENANT_ID = "52f14cd4-c6f1-4fbd-8f87-4025e1d49242"
DEFAULT_PROFILE_ID = "0c8e0e3c-6bd3-4b8e-9c3a-1f3d5c9e2a10"
DEFAULT_GATEWAY_ID = "0016c001ff10a235"


class _Reject(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _is_hex(s: str, n: int) -> bool:
    if len(s) != n:
        return False
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


def _probability(name: str, p) -> float:
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return p


def _hex_setting(attr: str, n: int):
    """Handler for a `name=?` / `name=<n hex digits>` modem setting."""
    def handler(sim, m, arg):
        if arg == "?":
            return getattr(m, attr), "OK"
        if arg is None or not _is_hex(arg, n):
            return "AT_PARAM_ERROR"
        setattr(m, attr, arg.lower())
        return "OK"
    return handler


def _flag_setting(attr: str):
    """Handler for a `name=?` / `name=0|1` LoRaWAN setting."""
    def handler(sim, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return int(getattr(m, attr)), "OK"
        if arg not in ("0", "1"):
            return "AT_PARAM_ERROR"
        setattr(m, attr, arg == "1")
        return "OK"
    return handler


class _Modem:
    """One simulated modem on one TCP connection: its AT state and its
    LoRaWAN session."""

    def __init__(self, sim: "ModemSimulator", writer: asyncio.StreamWriter, peer):
        self.sim = sim
        self.writer = writer
        self.peer = peer
        self.attached = False
        self.dialect = RAK3172
        self.dev_eui = "0" * 16
        self.join_eui = "0" * 16
        self.app_key = "0" * 32
        self.echo = False
        self.nwm = 1
        self.mode = "LWOTAA"  # Wio-E5 AT+MODE
        self.region = EU868
        self.dr = EU868.default_dr
        self.adr = True
        self.cls = "A"
        self.cfm = False
        self.port = 8  # Wio-E5 AT+PORT (its default)
        self.join_params = (0, 0, 8, 0)
        self.join_failures_left = sim.fail_joins
        self.last_rx = None  # (port, hex) for AT+RECV=?
        self.sim_time = None  # the board's true time from its last #SIM-TIME line
        self.silent_until = 0.0  # loop time until which the modem is hung
        self.timers: set[asyncio.TimerHandle] = set()
        self.closed = False
        self.forget()

    def forget(self) -> None:
        """Power-up: no session, nothing in flight, the clock at its boot value.
        Settings stored in the modem's flash (region, data rate, class, keys)
        survive."""
        for h in self.timers:
            h.cancel()
        self.timers.clear()
        self.cfs = False  # last confirmed uplink acknowledged
        self.joined = False
        self.joining = False
        self.dev_addr = ""
        self.f_cnt = 0
        self.busy_until = 0.0  # loop time until which a send answers busy
        self.dc_until = 0.0  # loop time until which the duty cycle forbids sending
        self.channel = 0
        self.reqs = 0  # MAC requests for the next uplink
        self.linkcheck_every = False  # RUI3 AT+LINKCHECK=2
        # The modem's clock = the true time + this offset (0 once the
        # network has answered a DeviceTimeReq).
        self.clock_offset = BOOT_EPOCH[self.dialect] - self.now()

    def now(self) -> float:
        """The true unix time for this modem: the board's last #SIM-TIME, else
        the host clock."""
        return self.sim_time if self.sim_time is not None else time.time()

    def clock(self) -> float:
        return self.now() + self.clock_offset

    def write(self, line: str) -> None:
        if self.closed or self.writer.is_closing():
            return
        sim = self.sim
        if sim._loop_time() < self.silent_until:
            sim.counters["fault_silenced_lines"] += 1
            return
        raw = line.encode()
        if sim.corrupt_prob and sim._rng.random() < sim.corrupt_prob:
            raw = sim._garble(raw)
        self.writer.write(raw + b"\r\n")

    def later(self, delay_s: float, fn, *args) -> None:
        """Run fn after a simulated delay (divided by the simulator speed)."""
        loop = asyncio.get_running_loop()

        def fire():
            self.timers.discard(handle)
            if not self.closed:
                fn(*args)

        handle = loop.call_later(delay_s / self.sim.speed, fire)
        self.timers.add(handle)

    def cancel(self) -> None:
        self.closed = True
        for h in self.timers:
            h.cancel()
        self.timers.clear()


class ModemSimulator:
    """Modems over TCP plus a ChirpStack v4 MQTT integration.

    Each connection is one modem speaking the dialect its #SIM-ATTACH line
    names (rak3172 by default, or wioe5). `legacy_events` switches RUI3 to
    the older event format (+EVT:JOIN FAILED, +EVT:RX_1, RSSI x, SNR y then
    +EVT:<port>:<hex>, comma-separated LINKCHECK, the manual's LTIME);
    `wio_spaced_hex` makes the Wio-E5 print downlinks as older firmware did
    (RX: "07 08 AB").

    Faults, as constructor options and at run time (set_faults, set_outage,
    reboot, silence, inject_lines), all random draws from
    random.Random(seed), each injected fault counted in `counters` under
    fault_*: `fail_joins=N` (each modem's first N join attempts fail),
    `busy_prob` (a send answers busy although the modem is free),
    `ack_loss` (the network's answer to a confirmed uplink is lost: no ACK),
    `drop_ack` (every acknowledgement lost, also the device's ACKs of
    confirmed downlinks), `uplink_loss` (the frame never reaches the network;
    the modem still reports the transmission done), `corrupt_prob` (output
    lines garbled: flipped bits, garbage bytes, truncated), `duty_cycle`.

    `marshaler` is how events are published: "json" (ChirpStack's default)
    or "protobuf". `command/down` takes either encoding, whatever it is."""

    def __init__(self, listen_port: int = 0, mqtt_host: str | None = "127.0.0.1",
                 mqtt_port: int = 1883, application_id: str = "", speed: float = 1.0, *,
                 listen_host: str = "127.0.0.1",
                 tenant_id: str = DEFAULT_TENANT_ID, tenant_name: str = "meters",
                 application_name: str = "smart-meters",
                 device_profile_id: str = DEFAULT_PROFILE_ID,
                 device_profile_name: str = "rak3172-meter",
                 gateway_id: str = DEFAULT_GATEWAY_ID,
                 rssi: int = -70, snr: float = 8.0,
                 legacy_events: bool = False, wio_spaced_hex: bool = False,
                 fail_joins: int = 0, drop_ack: bool = False, ack_loss: float = 0.0,
                 busy_prob: float = 0.0, uplink_loss: float = 0.0, corrupt_prob: float = 0.0,
                 duty_cycle: float = 0.0, boot_banner: bool = True, seed: int | None = None,
                 mqtt_client_id: str | None = None, marshaler: str = "json"):
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if not application_id:
            raise ValueError("application_id is required (the ChirpStack application UUID)")
        if not 0.0 <= duty_cycle < 1.0:
            raise ValueError(f"duty_cycle must be in [0, 1), got {duty_cycle}")
        if not _is_hex(gateway_id, 16):
            raise ValueError(f"gateway_id must be 16 hex digits, got {gateway_id!r}")
        if fail_joins < 0:
            raise ValueError(f"fail_joins must be >= 0, got {fail_joins}")
        if marshaler not in MARSHALERS:
            raise ValueError(f"marshaler must be one of {', '.join(MARSHALERS)}, got {marshaler!r}")
        self.marshaler = marshaler
        self.listen_host = listen_host
        self.port = listen_port
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.application_id = application_id
        self.speed = float(speed)
        self.tenant_id = tenant_id
        self.tenant_name = tenant_name
        self.application_name = application_name
        self.device_profile_id = device_profile_id
        self.device_profile_name = device_profile_name
        self.gateway_id = gateway_id
        self.rssi = int(rssi)
        self.snr = float(snr)
        self.legacy_events = legacy_events
        self.wio_spaced_hex = wio_spaced_hex
        self.fail_joins = int(fail_joins)
        self.drop_ack = drop_ack
        self.ack_loss = _probability("ack_loss", ack_loss)
        self.busy_prob = _probability("busy_prob", busy_prob)
        self.uplink_loss = _probability("uplink_loss", uplink_loss)
        self.corrupt_prob = _probability("corrupt_prob", corrupt_prob)
        self.duty_cycle = duty_cycle
        self.boot_banner = boot_banner
        self.outage = False
        self._rng = random.Random(seed)
        self._client_id = mqtt_client_id or f"modem-sim-{uuid.uuid4().hex[:8]}"

        self.counters: Counter = Counter()
        self.rejections: Counter = Counter()  # command/down rejections by reason
        self._modems: dict[str, _Modem] = {}  # dev_eui -> modem currently attached
        self._registered: dict[str, tuple[str, str]] = {}  # dev_eui -> (join_eui, app_key)
        self._queues: dict[str, deque] = {}  # dev_eui -> queued DownlinkCommand
        self._f_cnt_down: Counter = Counter()
        self._noise: dict[str, list[str]] = {}  # dev_eui -> lines for before its next answer
        self._conns: set[_Modem] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._mqtt: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._down_topic = f"application/{application_id}/device/+/command/down"

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> "ModemSimulator":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modem-sim",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(timeout)
        if self.mqtt_host:
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self._client_id)
            c.on_connect = self._on_connect
            c.on_subscribe = self._on_subscribe
            c.on_message = self._on_message
            c.on_disconnect = self._on_disconnect
            self._mqtt = c
            c.connect_async(self.mqtt_host, self.mqtt_port, keepalive=30)
            c.loop_start()
            if not self._subscribed.wait(timeout):
                self.stop()
                raise RuntimeError(f"no MQTT broker answered at {self.mqtt_host}:{self.mqtt_port}"
                                   f" within {timeout}s")
        log.info("modem simulator listening on %s:%d (speed %g)", self.listen_host, self.port,
                 self.speed)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
            except (TimeoutError, RuntimeError) as e:
                log.warning("closing connections: %s", e)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._loop is not None and not self._loop.is_running():
            self._loop.close()
        self._loop = None
        if self._mqtt is not None:
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
            self._mqtt = None

    def __enter__(self) -> "ModemSimulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for m in list(self._conns):
            m.cancel()
            m.writer.close()
        # A closed transport ends each reader with EOF; cancel only stragglers.
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=2)
            for t in pending:
                t.cancel()
        self._conns.clear()

    def _loop_time(self) -> float:
        return self._loop.time() if self._loop is not None else 0.0

    def call(self, fn, *args, timeout: float = 5.0):
        """Run fn(*args) on the simulator's loop (where all state lives) and
        return its result; for tests and the demo to inspect or poke state.
        Before start() it runs at once."""
        if self._loop is None:
            return fn(*args)

        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def devices(self) -> dict:
        """A snapshot of the attached modems: dev_eui -> session facts."""
        return self.call(lambda: {
            eui: dict(joined=m.joined, dev_addr=m.dev_addr, f_cnt=m.f_cnt, dr=m.dr,
                      cls=m.cls, queued=len(self._queues.get(eui, ())))
            for eui, m in self._modems.items()})

    # ------------------------------------------------------- fault injection
    # Thread-safe: each runs on the simulator's loop (call), so tests can
    # change faults while meters run.

    def inject_lines(self, dev_eui: str, *lines: str) -> None:
        """The modem prints `lines` (unsolicited output, line noise) just
        before its next answer. Works for a modem not attached yet."""
        def add():
            self._noise.setdefault(dev_eui.lower(), []).extend(lines)
            self.counters["fault_injected_lines"] += len(lines)
        self.call(add)

    def set_faults(self, *, busy_prob: float | None = None, ack_loss: float | None = None,
                   uplink_loss: float | None = None, corrupt_prob: float | None = None,
                   drop_ack: bool | None = None, fail_joins: int | None = None) -> None:
        """Change fault probabilities (None: unchanged). fail_joins=N also
        applies to the modems connected now: their next N join attempts fail."""
        new = {}
        for name, p in (("busy_prob", busy_prob), ("ack_loss", ack_loss),
                        ("uplink_loss", uplink_loss), ("corrupt_prob", corrupt_prob)):
            if p is not None:
                new[name] = _probability(name, p)
        if drop_ack is not None:
            new["drop_ack"] = bool(drop_ack)
        if fail_joins is not None:
            if fail_joins < 0:
                raise ValueError(f"fail_joins must be >= 0, got {fail_joins}")
            new["fail_joins"] = int(fail_joins)

        def apply():
            for k, v in new.items():
                setattr(self, k, v)
            if fail_joins is not None:
                for m in self._conns:
                    m.join_failures_left = int(fail_joins)
        self.call(apply)

    def set_outage(self, on: bool) -> None:
        """Network outage: no uplink reaches the network, joins fail,
        confirmed uplinks get no ACK, no downlink is delivered. Queued
        downlinks wait and go out (Class C) when it ends."""
        def apply():
            if on and not self.outage:
                self.counters["fault_outages"] += 1
            self.outage = bool(on)
            if not on:
                for m in list(self._modems.values()):
                    self._class_c_flush(m)
        self.call(apply)

    def reboot(self, dev_eui: str) -> None:
        """The modem restarts by itself: it forgets its session and anything
        in flight, and prints its power-up banner."""
        def apply():
            m = self._modems.get(dev_eui.lower())
            if m is None:
                raise KeyError(f"no modem {dev_eui} attached")
            self.counters["fault_reboots"] += 1
            m.forget()
            self._banner(m)
        self.call(apply)

    def silence(self, dev_eui: str, seconds: float) -> None:
        """The modem hangs for `seconds` (simulated): it reads nothing and
        prints nothing; what it would have printed is lost."""
        def apply():
            m = self._modems.get(dev_eui.lower())
            if m is None:
                raise KeyError(f"no modem {dev_eui} attached")
            self.counters["fault_silences"] += 1
            m.silent_until = self._loop_time() + seconds / self.speed
        self.call(apply)

    def _garble(self, raw: bytes) -> bytes:
        """A line as UART noise leaves it: bits flipped, garbage bytes in it,
        or cut short. It stays one line."""
        r = self._rng
        self.counters["fault_corrupted_lines"] += 1
        b = bytearray(raw)
        kind = r.randrange(3)
        if kind == 0 and b:
            for _ in range(r.randint(1, 3)):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        elif kind == 1:
            i = r.randint(0, len(b))
            b[i:i] = bytes(r.randrange(0x80, 0x100) for _ in range(r.randint(1, 4)))
        else:
            del b[r.randint(0, max(len(b) - 1, 0)):]
        return bytes(b).replace(b"\n", b"?").replace(b"\r", b"?")

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))

    # ----------------------------------------------------------------- MQTT

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("MQTT connect refused: %s", reason_code)
            return
        client.subscribe(self._down_topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self._subscribed.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.warning("MQTT disconnected (%s); paho reconnects", reason_code)

    def _on_message(self, client, userdata, msg):
        # All state lives on the simulator loop; hand the message over.
        loop = self._loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(self._command_down, msg.topic, bytes(msg.payload))

    def _publish(self, dev_eui: str, event: str, message) -> None:
        topic = f"application/{self.application_id}/device/{dev_eui}/event/{event}"
        if self.marshaler == "protobuf":
            payload = message.SerializeToString()
        else:
            # ChirpStack's JSON marshaler: camelCase names, bytes in base64,
            # enums by name, zero values left out.
            payload = json.dumps(json_format.MessageToDict(message), separators=(",", ":"))
        if self._mqtt is None:
            self.counters["events_unpublished"] += 1
            return
        info = self._mqtt.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
            # Without a connection paho keeps QoS 1 messages and sends them later.
            self.counters["events_published"] += 1
        else:
            self.counters["publish_errors"] += 1
            log.error("publish %s failed: %s", topic, mqtt.error_string(info.rc))

    def _device_info(self, m: _Modem) -> integration.DeviceInfo:
        return integration.DeviceInfo(
            tenant_id=self.tenant_id, tenant_name=self.tenant_name,
            application_id=self.application_id, application_name=self.application_name,
            device_profile_id=self.device_profile_id,
            device_profile_name=self.device_profile_name,
            device_name=f"meter-{m.dev_eui}", dev_eui=m.dev_eui,
            device_class_enabled=common.CLASS_C if m.cls == "C" else common.CLASS_A)

    # ------------------------------------------------------------- downlinks

    def _command_down(self, topic: str, payload: bytes) -> None:
        try:
            dev_eui, cmd = self._parse_down(topic, payload)
        except _Reject as e:
            self.counters["downlinks_rejected"] += 1
            self.rejections[e.reason] += 1
            log.warning("command/down rejected (%s) on %s: %s", e.reason, topic, e)
            return
        q = self._queues.setdefault(dev_eui, deque())
        if len(q) >= MAX_QUEUE:
            self.counters["downlinks_rejected"] += 1
            self.rejections["queue_full"] += 1
            log.warning("command/down for %s rejected: %d downlinks already queued",
                        dev_eui, len(q))
            return
        q.append(cmd)
        self.counters["downlinks_queued"] += 1
        log.info("downlink %s queued for %s (port %d, %d bytes%s%s)", cmd.id, dev_eui, cmd.f_port,
                 len(cmd.data), ", confirmed" if cmd.confirmed else "",
                 ", expires " + cmd.expires_at.ToJsonString() if cmd.HasField("expires_at")
                 else "")
        m = self._modems.get(dev_eui)
        if m is not None:
            self._class_c_flush(m)

    def _parse_down(self, topic: str, payload: bytes) -> tuple[str, integration.DownlinkCommand]:
        parts = topic.split("/")
        if (len(parts) != 6 or parts[0] != "application" or parts[1] != self.application_id
                or parts[2] != "device" or parts[4:] != ["command", "down"]):
            raise _Reject("topic", f"unexpected topic {topic!r}")
        topic_eui = parts[3].lower()
        if not _is_hex(topic_eui, 16):
            raise _Reject("dev_eui", f"topic DevEUI {parts[3]!r} is not 16 hex digits")
        # JSON is an object; a protobuf DownlinkCommand starts with a field
        # tag, never "{". Blank is neither and reads best as JSON.
        if payload.lstrip(_JSON_SPACE)[:1] in (b"{", b""):
            return topic_eui, self._parse_down_json(parts[3], payload)
        cmd = integration.DownlinkCommand()
        try:
            cmd.ParseFromString(payload)
        except DecodeError as e:
            # Neither encoding: the JSON parser says better what is wrong
            # (it refuses anything that does not start with "{").
            self._parse_down_json(parts[3], payload)
            raise _Reject("json", f"payload is neither JSON nor a DownlinkCommand: {e}") from None
        self._check_dev_eui(cmd.dev_eui, parts[3])
        if not 1 <= cmd.f_port <= 223:
            raise _Reject("f_port", f"fPort {cmd.f_port} is not an application port 1..223")
        if len(cmd.data) > MAX_DOWNLINK:
            raise _Reject("too_large", f"data is {len(cmd.data)} bytes, at most {MAX_DOWNLINK}")
        item = integration.DownlinkCommand(
            id=self._item_id(cmd.id), dev_eui=topic_eui, confirmed=cmd.confirmed,
            f_port=cmd.f_port, data=cmd.data)
        if cmd.HasField("expires_at"):
            try:
                cmd.expires_at.ToJsonString()  # checks the range, as the JSON parser does
            except ValueError as e:
                raise _Reject("expires_at", f"expires_at is not a valid time: {e}") from None
            item.expires_at.CopyFrom(cmd.expires_at)
        return topic_eui, item

    def _parse_down_json(self, topic_word: str, payload: bytes) -> integration.DownlinkCommand:
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise _Reject("json", f"payload is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _Reject("json", f"payload is a JSON {type(obj).__name__}, want an object")
        dev_eui = obj.get("devEui")
        self._check_dev_eui(dev_eui, topic_word)
        f_port = obj.get("fPort")
        if isinstance(f_port, bool) or not isinstance(f_port, int) or not 1 <= f_port <= 223:
            raise _Reject("f_port", f"fPort {f_port!r} is not an application port 1..223")
        data_b64 = obj.get("data", "")
        if not isinstance(data_b64, str):
            raise _Reject("data", f"data {data_b64!r} is not a base64 string")
        try:
            data = base64.b64decode(data_b64, validate=True)
        except binascii.Error as e:
            raise _Reject("data", f"data is not valid base64: {e}") from None
        if len(data) > MAX_DOWNLINK:
            raise _Reject("too_large", f"data is {len(data)} bytes, at most {MAX_DOWNLINK}")
        confirmed = obj.get("confirmed", False)
        if not isinstance(confirmed, bool):
            raise _Reject("confirmed", f"confirmed {confirmed!r} is not a boolean")
        cmd = integration.DownlinkCommand(
            id=self._item_id(obj.get("id")), dev_eui=dev_eui.lower(), confirmed=confirmed,
            f_port=f_port, data=data)
        # protobuf's JSON form of a google.protobuf.Timestamp: RFC 3339 text.
        # ChirpStack's parser takes the proto field name as well.
        expires = obj.get("expiresAt", obj.get("expires_at"))
        if expires is not None:
            try:
                cmd.expires_at.FromJsonString(expires)
            except (ValueError, TypeError) as e:
                raise _Reject("expires_at",
                              f"expiresAt {expires!r} is not an RFC 3339 time: {e}") from None
        return cmd

    @staticmethod
    def _check_dev_eui(dev_eui, topic_word: str) -> None:
        if not isinstance(dev_eui, str) or not _is_hex(dev_eui, 16):
            raise _Reject("dev_eui", f"devEui {dev_eui!r} is not 16 hex digits")
        if dev_eui.lower() != topic_word.lower():
            raise _Reject("dev_eui_mismatch",
                          f"devEui {dev_eui} does not match the topic's {topic_word}")

    def _item_id(self, item_id) -> str:
        """The queue item id: the command's (a UUID), else a new one."""
        item_id = item_id or self._uuid()
        try:
            return str(uuid.UUID(item_id))
        except (ValueError, TypeError, AttributeError):
            raise _Reject("id", f"id {item_id!r} is not a UUID") from None

    def _expired(self, m: _Modem, cmd: integration.DownlinkCommand) -> bool:
        # ChirpStack compares with its own clock; here that is the true time
        # the simulator keeps for the device.
        if not cmd.HasField("expires_at"):
            return False
        return cmd.expires_at.seconds + cmd.expires_at.nanos / 1e9 < m.now()

    def _next_downlink(self, m: _Modem) -> integration.DownlinkCommand | None:
        """The next queued downlink to send, dropping the expired ones before
        it as ChirpStack does (with an error log event for each)."""
        q = self._queues.get(m.dev_eui)
        while q:
            cmd = q.popleft()
            if not self._expired(m, cmd):
                return cmd
            self.counters["downlinks_expired"] += 1
            log.info("downlink %s for %s expired at %s; dropped", cmd.id, m.dev_eui,
                     cmd.expires_at.ToJsonString())
            ev = integration.LogEvent(
                device_info=self._device_info(m), level=integration.ERROR,
                code=integration.EXPIRED,
                description="Device queue-item discarded because it has expired",
                context={"queue_item_id": cmd.id})
            ev.time.GetCurrentTime()
            self._publish(m.dev_eui, "log", ev)
        return None

    def _deliver(self, m: _Modem, cmd: integration.DownlinkCommand, window: str,
                 channel: int, dr: int, prefix: str = "+MSG") -> None:
        """The modem receives a downlink and prints it; ChirpStack reports the
        transmission (txack) and, for a confirmed one, the device's ACK."""
        hexdata = cmd.data.hex().upper()
        snr = round(self.snr)
        if m.dialect == WIOE5:
            shown = " ".join(hexdata[i:i + 2] for i in range(0, len(hexdata), 2)) \
                if self.wio_spaced_hex else hexdata
            m.write(f'{prefix}: PORT: {cmd.f_port}; RX: "{shown}"')
            if window == "RX_C":  # in an uplink's windows _uplink_done prints it
                m.write(f"{prefix}: RXWIN2, RSSI {self.rssi}, SNR {self.snr:.1f}")
        elif self.legacy_events:
            m.write(f"+EVT:{window}, RSSI {self.rssi}, SNR {snr}")
            m.write(f"+EVT:{cmd.f_port}:{hexdata}")
        else:
            m.write(f"+EVT:{window}:{self.rssi}:{snr}:UNICAST:{cmd.f_port}:{hexdata}")
        m.last_rx = (cmd.f_port, hexdata)
        f_cnt_down = self._f_cnt_down[m.dev_eui]
        self._f_cnt_down[m.dev_eui] += 1
        self.counters["downlinks_delivered"] += 1
        if window == "RX_C":
            freq, sf, bw = m.region.rx2
        else:
            freq, sf, bw = m.region.rx1(channel, dr)
        txack = integration.TxAckEvent(
            downlink_id=self._rng.getrandbits(32), device_info=self._device_info(m),
            queue_item_id=cmd.id, f_cnt_down=f_cnt_down, gateway_id=self.gateway_id)
        txack.time.GetCurrentTime()
        txack.tx_info.frequency = freq
        txack.tx_info.power = 14
        lora = txack.tx_info.modulation.lora
        lora.bandwidth, lora.spreading_factor = bw, sf
        lora.code_rate = gw.CR_4_5
        lora.polarization_inversion = True
        self._publish(m.dev_eui, "txack", txack)
        if cmd.confirmed:
            # The modem acknowledges a confirmed downlink by itself; a lost
            # acknowledgement is what drop_ack simulates.
            ack = integration.AckEvent(
                deduplication_id=self._uuid(), device_info=self._device_info(m),
                queue_item_id=cmd.id, acknowledged=not self.drop_ack, f_cnt_down=f_cnt_down)
            ack.time.GetCurrentTime()
            self._publish(m.dev_eui, "ack", ack)
            self.counters["acks" if not self.drop_ack else "acks_lost"] += 1

    def _class_c_flush(self, m: _Modem) -> None:
        """Class C: deliver the queue now, or once the uplink in progress ends."""
        if m.closed or not m.joined or m.cls != "C" or self.outage:
            return
        if not self._queues.get(m.dev_eui):
            return
        wait = m.busy_until - asyncio.get_running_loop().time()
        if wait > 0:
            m.later(wait * self.speed, self._class_c_flush, m)
            return
        while (cmd := self._next_downlink(m)) is not None:
            self._deliver(m, cmd, "RX_C", m.channel, m.dr)

    # ------------------------------------------------------- the modem core
    # Shared by both dialects; the handlers below only spell it.

    def _banner(self, m: _Modem) -> None:
        if not self.boot_banner:
            return
        if m.dialect == RAK3172:
            # What a RAK3172 prints when it powers up with the board.
            m.write("RAKwireless RAK3172-E Example")
            m.write("------------------------------------------------------")
            m.write("Current Work Mode: LoRaWAN.")
        # The Wio-E5's AT firmware prints nothing at power-up.

    def _start_join(self, m: _Modem, retries: int) -> None:
        m.joining = True
        m.joined = False
        self._join_attempt(m, retries)

    def _join_attempt(self, m: _Modem, retries_left: int) -> None:
        toa = airtime_s(JOIN_REQUEST_LEN, m.region, m.dr)
        self.counters["join_requests"] += 1
        registered = self._registered.get(m.dev_eui)
        accepted = registered == (m.join_eui, m.app_key)
        if accepted and self.outage:
            self.counters["fault_outage_joins"] += 1
            accepted = False
        elif accepted and m.join_failures_left > 0:
            m.join_failures_left -= 1
            self.counters["fault_join_failures"] += 1
            accepted = False
        if accepted:
            accept = airtime_s(JOIN_ACCEPT_LEN, m.region, m.dr)
            m.later(toa + JOIN_ACCEPT_DELAY1_S + accept, self._joined, m)
        else:
            if registered is None:
                log.info("%s: join request from a device the network does not know", m.dev_eui)
            elif registered != (m.join_eui, m.app_key):
                log.info("%s: join request with other keys than registered", m.dev_eui)
            m.later(toa + JOIN_ACCEPT_DELAY2_S + RX_WINDOW_S, self._join_failed, m, retries_left)

    def _joined(self, m: _Modem) -> None:
        if not m.joining:
            return
        m.joining = False
        m.joined = True
        m.f_cnt = 0
        m.dev_addr = "%08x" % (0x26000000 | self._rng.getrandbits(25))  # NetID 0x13 style
        self.counters["joins"] += 1
        if m.dialect == WIOE5:
            a = m.dev_addr.upper()
            m.write("+JOIN: Network joined")
            m.write("+JOIN: NetID 000013 DevAddr " + ":".join(a[i:i + 2] for i in range(0, 8, 2)))
            m.write("+JOIN: Done")
        else:
            m.write("+EVT:JOINED")
        ev = integration.JoinEvent(deduplication_id=self._uuid(),
                                   device_info=self._device_info(m), dev_addr=m.dev_addr,
                                   region_config_id=m.region.config_id)
        ev.time.GetCurrentTime()
        self._publish(m.dev_eui, "join", ev)
        self._class_c_flush(m)

    def _join_failed(self, m: _Modem, retries_left: int) -> None:
        if not m.joining:
            return
        self.counters["join_failures"] += 1
        if m.dialect == WIOE5:
            m.write("+JOIN: Join failed")
            m.write("+JOIN: Done")
        else:
            m.write("+EVT:JOIN FAILED" if self.legacy_events else "+EVT:JOIN_FAILED_RX_TIMEOUT")
        if retries_left > 0:
            m.later(m.join_params[2], self._join_attempt, m, retries_left - 1)
        else:
            m.joining = False

    def _uplink(self, m: _Modem, port: int, data: bytes, confirmed: bool) -> str:
        """Start an uplink: "ok", or why not ("not_joined", "busy", "duty",
        "too_long")."""
        if not m.joined:
            self.counters["uplinks_rejected"] += 1
            return "not_joined"
        now = asyncio.get_running_loop().time()
        if now < m.busy_until or now < m.dc_until:
            self.counters["busy"] += 1
            return "busy" if now < m.busy_until else "duty"
        if self.busy_prob and self._rng.random() < self.busy_prob:
            self.counters["busy"] += 1
            self.counters["fault_busy"] += 1
            return "busy"
        limit = m.region.max_payload(m.dr)
        if len(data) > limit:
            self.counters["uplinks_rejected"] += 1
            log.info("%s: %d-byte payload exceeds %d at DR%d", m.dev_eui, len(data), limit, m.dr)
            return "too_long"
        toa = airtime_s(len(data) + lorawan.OVERHEAD, m.region, m.dr)
        channel = m.channel
        m.channel = (m.channel + 1) % len(m.region.uplink_hz)
        f_cnt = m.f_cnt
        m.f_cnt += 1
        reqs = m.reqs | (REQ_LINK if m.linkcheck_every else 0)
        m.reqs = 0
        # Busy through the airtime and both receive windows; the network may
        # shorten that to RX1 when it has something to send (_uplink_received).
        m.busy_until = now + (toa + RECEIVE_DELAY2_S + RX_WINDOW_S) / self.speed
        if self.duty_cycle:
            # After T on air the sub-band stays closed for T/DC - T.
            m.dc_until = now + toa / self.duty_cycle / self.speed
        m.later(toa, self._uplink_received, m, port, data, confirmed, f_cnt, channel, m.dr,
                reqs)
        return "ok"

    def _uplink_received(self, m, port, data, confirmed, f_cnt, channel, dr, reqs) -> None:
        loop = asyncio.get_running_loop()
        if self.outage or (self.uplink_loss and self._rng.random() < self.uplink_loss):
            # Lost on the air: nobody answers, the modem waits through RX2.
            self.counters["fault_outage_uplinks" if self.outage else "fault_uplinks_lost"] += 1
            rest = RECEIVE_DELAY2_S + RX_WINDOW_S
            m.busy_until = loop.time() + rest / self.speed
            m.later(rest, self._uplink_done, m, confirmed, None, channel, dr, False, reqs)
            return
        sf, bw = m.region.data_rates[dr]
        self.counters["uplinks"] += 1
        # The network answers in RX1 with the acknowledgement of a confirmed
        # uplink, its answers to MAC requests and (Class A) a queued downlink,
        # all in one frame; a lost acknowledgement loses that frame.
        lost = confirmed and (self.drop_ack or (self.ack_loss and self._rng.random() < self.ack_loss))
        if lost:
            self.counters["fault_ack_lost"] += 1
        downlink = self._next_downlink(m) if m.cls == "A" and not lost else None
        answered = not lost and (downlink is not None or confirmed or reqs != 0)
        rest = (RECEIVE_DELAY1_S if answered else RECEIVE_DELAY2_S) + RX_WINDOW_S
        m.busy_until = loop.time() + rest / self.speed
        m.later(rest, self._uplink_done, m, confirmed, downlink, channel, dr, answered, reqs)
        ev = integration.UplinkEvent(
            deduplication_id=self._uuid(), device_info=self._device_info(m),
            dev_addr=m.dev_addr, adr=m.adr, dr=dr, f_cnt=f_cnt, f_port=port,
            confirmed=confirmed, data=data, region_config_id=m.region.config_id)
        ev.time.GetCurrentTime()
        rx = ev.rx_info.add()
        rx.gateway_id = self.gateway_id
        rx.uplink_id = self._rng.getrandbits(32)
        rx.gw_time.GetCurrentTime()
        rx.ns_time.GetCurrentTime()
        rx.rssi = self.rssi
        rx.snr = self.snr
        rx.channel = channel
        # The concentrator's opaque context: its microsecond counter.
        rx.context = struct.pack(">I", int(time.monotonic() * 1e6) & 0xFFFFFFFF)
        rx.crc_status = gw.CRC_OK
        ev.tx_info.frequency = m.region.uplink_hz[channel]
        lora = ev.tx_info.modulation.lora
        lora.bandwidth, lora.spreading_factor = bw, sf
        lora.code_rate = gw.CR_4_5
        self._publish(m.dev_eui, "up", ev)

    def _uplink_done(self, m, confirmed, downlink, channel, dr, answered, reqs) -> None:
        # The modem prints what it received before the result of its uplink.
        m.busy_until = 0.0
        if confirmed:
            m.cfs = answered
        margin = None
        if answered:
            if reqs & REQ_TIME:
                # DeviceTimeAns: the modem's clock takes the network's time.
                m.clock_offset = 0.0
                self.counters["time_answers"] += 1
            if reqs & REQ_LINK:
                sf = m.region.data_rates[dr][0]
                margin = max(0, int(self.snr - REQUIRED_SNR[sf]))
                self.counters["link_answers"] += 1
        if m.dialect == WIOE5:
            p = "+CMSGHEX" if confirmed else "+MSGHEX"
            if confirmed and answered:
                m.write(f"{p}: ACK Received")
            if downlink is not None:
                if self._queues.get(m.dev_eui):
                    m.write(f"{p}: FPENDING")
                self._deliver(m, downlink, "RX_1", channel, dr, p)
            if answered:
                m.write(f"{p}: RXWIN1, RSSI {self.rssi}, SNR {self.snr:.1f}")
            if margin is not None:
                m.write(f"{p}: Link {margin}, 1")
            m.write(f"{p}: Done")
        else:
            if downlink is not None:
                self._deliver(m, downlink, "RX_1", channel, dr)
            if reqs & REQ_TIME:
                m.write("+EVT:TIMEREQ_OK" if answered else "+EVT:TIMEREQ_FAILED")
            if confirmed:
                m.write("+EVT:SEND_CONFIRMED_OK" if answered else "+EVT:SEND_CONFIRMED_FAILED(4)")
            else:
                m.write("+EVT:TX_DONE")
            if reqs & REQ_LINK:
                # After the send result: RUI3 reports it from the MAC indication.
                f = [0, margin, 1, self.rssi, round(self.snr)] if margin is not None else [1, 0, 0, 0, 0]
                m.write("+EVT:LINKCHECK:" + ("," if self.legacy_events else ":").join(map(str, f)))
        self._class_c_flush(m)

    # ------------------------------------------------------------ the modem

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m = _Modem(self, writer, writer.get_extra_info("peername"))
        task = asyncio.current_task()
        self._tasks.add(task)
        self._conns.add(m)
        self.counters["connections"] += 1
        buf = bytearray()
        skipping = False  # inside a line that was too long: drop up to its end
        try:
            while not m.closed:
                chunk = await reader.read(1024)
                if not chunk:
                    break
                buf += chunk
                while True:
                    ends = [i for i in (buf.find(b"\r"), buf.find(b"\n")) if i >= 0]
                    if not ends:
                        if len(buf) > MAX_LINE:
                            if not skipping:
                                self.counters["overlong_lines"] += 1
                                log.warning("%s: dropping a line longer than %d bytes",
                                            m.peer, MAX_LINE)
                            skipping = True
                            buf.clear()
                        break
                    i = min(ends)
                    raw = bytes(buf[:i])
                    del buf[:i + 1]
                    if skipping:
                        skipping = False
                        continue
                    line = raw.decode("ascii", "replace").strip()
                    if line:
                        self._line(m, line)
        except (ConnectionError, OSError) as e:
            log.info("%s: connection error %s", m.peer, e)
        finally:
            m.cancel()
            self._tasks.discard(task)
            self._conns.discard(m)
            if m.attached and self._modems.get(m.dev_eui) is m:
                del self._modems[m.dev_eui]
            writer.close()

    def _line(self, m: _Modem, line: str) -> None:
        if line.startswith("#"):
            self._sim_line(m, line)
            return
        if self._loop_time() < m.silent_until:
            self.counters["fault_silenced_lines"] += 1  # a hung modem reads nothing
            return
        self.counters["commands"] += 1
        if m.echo:
            m.write(line)
        name, sep, arg = line.partition("=")
        name = name.strip().upper()
        arg = arg.strip() if sep else None
        if m.dialect == WIOE5:
            self._wio_line(m, line, name, arg)
            return
        handler = self._COMMANDS.get(name)
        if handler is None:
            self.counters["unknown_commands"] += 1
            log.info("%s: unknown command %r", m.dev_eui, line)
            m.write("AT_ERROR")
            return
        try:
            result = handler(self, m, arg)
        except Exception:  # noqa: BLE001 - a simulator bug must not take the other modems down
            self.counters["internal_errors"] += 1
            log.exception("%s: handling %r failed", m.dev_eui, line)
            m.write("AT_ERROR")
            return
        if isinstance(result, tuple):
            value, result = result
            m.write(f"{name}={value}")
        if result != "OK":
            self.counters["at_errors"] += 1
            log.info("%s: %s -> %s", m.dev_eui, line, result)
        self._flush_noise(m)
        m.write(result)

    def _flush_noise(self, m: _Modem) -> None:
        for noise in self._noise.pop(m.dev_eui, ()):
            m.write(noise)

    def _sim_line(self, m: _Modem, line: str) -> None:
        words = line.split()
        if words[0] == "#SIM-TIME":
            try:
                m.sim_time = float(words[1])
            except (IndexError, ValueError):
                self.counters["bad_sim_lines"] += 1
                log.warning("%s: bad time line %r", m.peer, line)
            return
        if words[0] != "#SIM-ATTACH":
            self.counters["unknown_sim_lines"] += 1
            log.warning("%s: unknown simulator line %r", m.peer, line)
            return
        fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        dev_eui = fields.get("deveui", "").lower()
        join_eui = fields.get("joineui", "").lower()
        app_key = fields.get("appkey", "").lower()
        dialect = fields.get("dialect", RAK3172).lower()
        if not (_is_hex(dev_eui, 16) and _is_hex(join_eui, 16) and _is_hex(app_key, 32)
                and dialect in DIALECTS):
            self.counters["bad_attach"] += 1
            log.warning("%s: bad attach line %r (want deveui=16 hex, joineui=16 hex, "
                        "appkey=32 hex, dialect=%s)", m.peer, line, "|".join(DIALECTS))
            return
        old = self._modems.get(dev_eui)
        if old is not None and old is not m:
            log.warning("%s: DevEUI %s attached again; the newer connection wins",
                        m.peer, dev_eui)
            old.cancel()
        m.attached = True
        m.dev_eui, m.join_eui, m.app_key = dev_eui, join_eui, app_key
        m.dialect = dialect
        m.clock_offset = BOOT_EPOCH[dialect] - m.now()
        self._registered[dev_eui] = (join_eui, app_key)
        self._modems[dev_eui] = m
        self.counters["attached"] += 1
        log.info("%s: modem %s (%s) attached", m.peer, dev_eui, dialect)
        self._banner(m)

    def _move(self, m: _Modem, dev_eui: str) -> None:
        """The modem's DevEUI changed: downlinks and Class C delivery find the
        modem by it."""
        if self._modems.get(m.dev_eui) is m:
            del self._modems[m.dev_eui]
        m.dev_eui = dev_eui.lower()
        if m.attached:
            self._modems[m.dev_eui] = m

    # RUI3 command handlers: (sim, modem, arg) -> "OK" | "AT_..." | (value, "OK").
    # arg is None for a bare command, "?" for a query.

    def _at(self, m, arg):
        return "OK" if arg is None else "AT_PARAM_ERROR"

    def _ate(self, m, arg):
        if arg is not None:
            return "AT_PARAM_ERROR"
        m.echo = not m.echo
        return "OK"

    def _ver(self, m, arg):
        return ("RUI_4.0.6_RAK3172-E (simulated)", "OK") if arg == "?" else "AT_PARAM_ERROR"

    def _deveui(self, m, arg):
        if arg == "?" or arg is None or not _is_hex(arg, 16):
            return _hex_setting("dev_eui", 16)(self, m, arg)
        self._move(m, arg)
        return "OK"

    def _nwm(self, m, arg):
        if arg == "?":
            return m.nwm, "OK"
        if arg not in ("0", "1"):
            return "AT_PARAM_ERROR"
        if int(arg) != m.nwm:
            m.nwm = int(arg)
            m.joined = m.joining = False
            # A real RAK3172 restarts into the new mode and says so.
            m.later(0.1, m.write, "Current Work Mode: %s." % ("LoRaWAN" if m.nwm else "LoRa P2P"))
        return "OK"

    def _njm(self, m, arg):
        if arg == "?":
            return 1, "OK"
        # ABP is not simulated: ChirpStack devices here join by OTAA.
        return "OK" if arg == "1" else "AT_PARAM_ERROR"

    def _band(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return m.region.band, "OK"
        try:
            region = REGIONS[int(arg)]
        except (KeyError, ValueError, TypeError):
            log.info("%s: AT+BAND=%s: the simulator knows bands %s", m.dev_eui, arg,
                     sorted(REGIONS))
            return "AT_PARAM_ERROR"
        if region is not m.region:
            m.region, m.dr, m.joined = region, region.default_dr, False
        return "OK"

    def _dr(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return m.dr, "OK"
        try:
            dr = int(arg)
        except (ValueError, TypeError):
            return "AT_PARAM_ERROR"
        if dr not in m.region.data_rates:
            return "AT_PARAM_ERROR"
        m.dr = dr
        return "OK"

    def _set_class(self, m, cls) -> bool:
        if cls is None or cls.upper() not in ("A", "C"):
            return False  # Class B (beacons) is not simulated
        m.cls = cls.upper()
        self._class_c_flush(m)
        return True

    def _class(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return m.cls, "OK"
        return "OK" if self._set_class(m, arg) else "AT_PARAM_ERROR"

    def _cfs(self, m, arg):
        return (int(m.cfs), "OK") if arg == "?" else "AT_PARAM_ERROR"

    def _njs(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        return (int(m.joined), "OK") if arg == "?" else "AT_PARAM_ERROR"

    def _recv(self, m, arg):
        if arg != "?":
            return "AT_PARAM_ERROR"
        value = "%d:%s" % m.last_rx if m.last_rx else ""
        m.last_rx = None
        return value, "OK"

    def _join(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return ":".join(str(x) for x in m.join_params), "OK"
        try:
            vals = [int(x) for x in (arg or "").split(":")]
        except ValueError:
            return "AT_PARAM_ERROR"
        # Trailing parameters keep their current values.
        if not 1 <= len(vals) <= 4:
            return "AT_PARAM_ERROR"
        params = vals + list(m.join_params[len(vals):])
        start, auto, interval, retries = params
        if start not in (0, 1) or auto not in (0, 1) or not 7 <= interval <= 255 \
                or not 0 <= retries <= 255:
            return "AT_PARAM_ERROR"
        m.join_params = (start, auto, interval, retries)
        if start == 0:
            m.joining = False  # the pending attempt's result is ignored
            return "OK"
        if m.joining:
            return "AT_BUSY_ERROR"
        self._start_join(m, retries)
        return "OK"

    def _send(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        port_s, sep, hexdata = (arg or "").partition(":")
        try:
            port = int(port_s)
            data = bytes.fromhex(hexdata)
        except ValueError:
            return "AT_PARAM_ERROR"
        if not sep or not 1 <= port <= 223 or not data:
            return "AT_PARAM_ERROR"
        return {"ok": "OK", "not_joined": "AT_NO_NETWORK_JOINED", "busy": "AT_BUSY_ERROR",
                "duty": "AT_BUSY_ERROR", "too_long": "AT_PARAM_ERROR"}[
            self._uplink(m, port, data, m.cfm)]

    def _linkcheck(self, m, arg):
        if arg == "?":
            return (2 if m.linkcheck_every else int(bool(m.reqs & REQ_LINK))), "OK"
        if arg not in ("0", "1", "2"):
            return "AT_PARAM_ERROR"
        m.linkcheck_every = arg == "2"
        m.reqs = m.reqs | REQ_LINK if arg == "1" else m.reqs & ~REQ_LINK
        return "OK"

    def _timereq(self, m, arg):
        if arg == "?":
            return int(bool(m.reqs & REQ_TIME)), "OK"
        if arg not in ("0", "1"):
            return "AT_PARAM_ERROR"
        if not m.joined:
            return "AT_NO_NETWORK_JOINED"
        m.reqs = m.reqs | REQ_TIME if arg == "1" else m.reqs & ~REQ_TIME
        return "OK"

    def _ltime(self, m, arg):
        if arg != "?":
            return "AT_PARAM_ERROR"
        t = time.gmtime(m.clock())
        if self.legacy_events:
            # The manual's form, a bare value: "LTIME: 00h37m58s 2018-11-14".
            m.write(time.strftime("LTIME: %Hh%Mm%Ss %Y-%m-%d", t))
            return "OK"
        return time.strftime("%Hh%Mm%Ss on %m/%d/%Y", t), "OK"

    _COMMANDS = {
        "AT": _at,
        "ATE": _ate,
        "AT+VER": _ver,
        "AT+DEVEUI": _deveui,
        "AT+APPEUI": _hex_setting("join_eui", 16),
        "AT+JOINEUI": _hex_setting("join_eui", 16),
        "AT+APPKEY": _hex_setting("app_key", 32),
        "AT+NWM": _nwm,
        "AT+NJM": _njm,
        "AT+BAND": _band,
        "AT+DR": _dr,
        "AT+ADR": _flag_setting("adr"),
        "AT+CLASS": _class,
        "AT+CFM": _flag_setting("cfm"),
        "AT+CFS": _cfs,
        "AT+NJS": _njs,
        "AT+JOIN": _join,
        "AT+SEND": _send,
        "AT+RECV": _recv,
        "AT+LINKCHECK": _linkcheck,
        "AT+TIMEREQ": _timereq,
        "AT+LTIME": _ltime,
    }

    # Wio-E5 (Seeed AT firmware): every answer is "+<CMD>: ..."; handlers
    # return the answer line(s) after the prefix, errors as "ERROR(-n)".

    def _wio_line(self, m: _Modem, line: str, name: str, arg: str | None) -> None:
        cmd = name[3:] or "AT"
        handler = self._WIO_COMMANDS.get(name)
        if handler is None:
            self.counters["unknown_commands"] += 1
            log.info("%s: unknown command %r", m.dev_eui, line)
            out = ["ERROR(-10)"]
        else:
            try:
                out = handler(self, m, arg)
            except Exception:  # noqa: BLE001 - as for RUI3
                self.counters["internal_errors"] += 1
                log.exception("%s: handling %r failed", m.dev_eui, line)
                out = ["ERROR(-1)"]
        if isinstance(out, str):
            out = [out]
        if "ERROR" in out[0] or out[0] in self._WIO_REFUSALS:
            self.counters["at_errors"] += 1
            log.info("%s: %s -> %s", m.dev_eui, line, out[0])
        self._flush_noise(m)
        for text in out:
            m.write(f"+{cmd}: {text}")

    _WIO_REFUSALS = ("Please join network first", "LoRaWAN modem is busy", "No free channel")

    @staticmethod
    def _wio_value(arg: str) -> str:
        """'"70B3D57E..."' or '70:B3:...' -> '70b3d57e...'."""
        return arg.strip().strip('"').replace(":", "").replace(" ", "").lower()

    def _wio_at(self, m, arg):
        return "OK" if arg is None else "ERROR(-1)"

    def _wio_ver(self, m, arg):
        return "4.0.11"

    def _wio_id(self, m, arg):
        def show(label, value):
            return f"{label}, " + ":".join(value[i:i + 2] for i in range(0, len(value), 2)).upper()
        key, sep, value = (arg or "").partition(",")
        key = key.strip().lower()
        if not sep:
            ids = {"devaddr": ("DevAddr", m.dev_addr or "00000000"), "deveui": ("DevEui", m.dev_eui),
                   "appeui": ("AppEui", m.join_eui)}
            if arg is None:
                return [show(*v) for v in ids.values()]
            return show(*ids[key]) if key in ids else "ERROR(-1)"
        value = self._wio_value(value)
        if key == "deveui" and _is_hex(value, 16):
            self._move(m, value)
            return show("DevEui", m.dev_eui)
        if key == "appeui" and _is_hex(value, 16):
            m.join_eui = value
            return show("AppEui", value)
        return "ERROR(-1)"

    def _wio_key(self, m, arg):
        key, _, value = (arg or "").partition(",")
        value = self._wio_value(value)
        if key.strip().upper() != "APPKEY" or not _is_hex(value, 32):
            return "ERROR(-1)"
        m.app_key = value
        return "APPKEY " + value.upper()

    def _wio_mode(self, m, arg):
        if arg is None:
            return m.mode
        mode = arg.upper()
        if mode not in ("LWOTAA", "LWABP", "TEST"):
            return "ERROR(-1)"
        if mode != m.mode:
            m.mode = mode
            m.forget()  # switching the mode resets the LoRaWAN stack
        return mode

    def _wio_dr(self, m, arg):
        def now():
            sf, bw = m.region.data_rates[m.dr]
            return [f"DR{m.dr}", f"{m.region.name} DR{m.dr}  SF{sf} BW{bw // 1000}K"]
        if arg is None:
            return now()
        a = arg.upper()
        if a == "SCHEME":
            return m.region.name
        if a in REGIONS_BY_NAME:
            region = REGIONS_BY_NAME[a]
            if region is not m.region:
                m.region, m.dr, m.joined = region, region.default_dr, False
            return region.name
        try:
            dr = int(a[2:] if a.startswith("DR") else a)
        except ValueError:
            return "ERROR(-1)"
        if dr not in m.region.data_rates:
            return "ERROR(-1)"
        m.dr = dr
        return now()

    def _wio_class(self, m, arg):
        if arg is None:
            return m.cls
        return m.cls if self._set_class(m, arg) else "ERROR(-1)"

    def _wio_adr(self, m, arg):
        if arg is not None:
            if arg.upper() not in ("ON", "OFF"):
                return "ERROR(-1)"
            m.adr = arg.upper() == "ON"
        return "ON" if m.adr else "OFF"

    def _wio_port(self, m, arg):
        if arg is not None:
            try:
                port = int(arg)
            except ValueError:
                return "ERROR(-1)"
            if not 1 <= port <= 223:
                return "ERROR(-1)"
            m.port = port
        return str(m.port)

    def _wio_join(self, m, arg):
        if arg is not None and arg.upper() != "FORCE":
            return "ERROR(-1)"
        if m.mode != "LWOTAA":
            return "ERROR(-12)"
        if m.joining:
            return "LoRaWAN modem is busy"
        if m.joined and arg is None:
            return "Joined already"
        self._start_join(m, 0)  # one join request per AT+JOIN
        return ["Start", "NORMAL"]

    def _wio_msg(self, m, arg, confirmed):
        try:
            data = bytes.fromhex((arg or "").strip().strip('"').replace(" ", ""))
        except ValueError:
            return "ERROR(-1)"
        status = self._uplink(m, m.port, data, confirmed)
        if status == "ok":
            return ["Start", "Wait ACK"] if confirmed else "Start"
        if status == "too_long":
            return f"Length error {m.region.max_payload(m.dr)}"
        return {"not_joined": "Please join network first", "busy": "LoRaWAN modem is busy",
                "duty": "No free channel"}[status]

    def _wio_msghex(self, m, arg):
        return self._wio_msg(m, arg, False)

    def _wio_cmsghex(self, m, arg):
        return self._wio_msg(m, arg, True)

    def _wio_lw(self, m, arg):
        a = (arg or "").upper()
        if a == "LCR":
            m.reqs |= REQ_LINK
        elif a == "DTR":
            m.reqs |= REQ_TIME
        elif a == "VER":
            return "VER, v1.0.2"
        else:
            return "ERROR(-1)"
        return a

    def _wio_rtc(self, m, arg):
        if arg is not None:
            return "ERROR(-1)"  # setting the clock by hand is not simulated
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.clock()))

    def _wio_reset(self, m, arg):
        m.forget()
        return "OK"

    _WIO_COMMANDS = {
        "AT": _wio_at,
        "AT+VER": _wio_ver,
        "AT+ID": _wio_id,
        "AT+KEY": _wio_key,
        "AT+MODE": _wio_mode,
        "AT+DR": _wio_dr,
        "AT+CLASS": _wio_class,
        "AT+ADR": _wio_adr,
        "AT+PORT": _wio_port,
        "AT+JOIN": _wio_join,
        "AT+MSGHEX": _wio_msghex,
        "AT+CMSGHEX": _wio_cmsghex,
        "AT+LW": _wio_lw,
        "AT+RTC": _wio_rtc,
        "AT+RESET": _wio_reset,
    }


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {value!r}")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hardware.sim.modem_sim",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 7000),
                   help="HOST:PORT the simulated modems' UARTs connect to")
    p.add_argument("--mqtt-host", default="127.0.0.1")
    p.add_argument("--mqtt-port", type=int, default=1883)
    p.add_argument("--application-id", required=True, help="ChirpStack application UUID")
    p.add_argument("--tenant-id", default=DEFAULT_TENANT_ID)
    p.add_argument("--gateway-id", default=DEFAULT_GATEWAY_ID)
    p.add_argument("--speed", type=float, default=1.0,
                   help="divide every simulated delay by this (default 1: real time)")
    p.add_argument("--legacy-events", action="store_true",
                   help="older RUI3 event format (+EVT:RX_1, RSSI x, SNR y / +EVT:port:hex)")
    p.add_argument("--wio-spaced-hex", action="store_true",
                   help="Wio-E5 downlinks as older firmware prints them (RX: \"07 08\")")
    p.add_argument("--fail-joins", type=int, default=0, metavar="N",
                   help="each modem's first N join attempts fail")
    p.add_argument("--drop-ack", action="store_true", help="lose every acknowledgement")
    p.add_argument("--ack-loss", type=float, default=0.0, metavar="P",
                   help="probability that a confirmed uplink gets no acknowledgement")
    p.add_argument("--busy-prob", type=float, default=0.0, metavar="P",
                   help="probability that a send is answered busy")
    p.add_argument("--uplink-loss", type=float, default=0.0, metavar="P",
                   help="probability that an uplink never reaches the network")
    p.add_argument("--corrupt-prob", type=float, default=0.0, metavar="P",
                   help="probability that a line the modem prints is garbled")
    p.add_argument("--duty-cycle", type=float, default=0.0,
                   help="enforce this duty cycle per modem (0.01 = 1%%; default off)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw")
    p.add_argument("--no-boot-banner", action="store_true",
                   help="modems do not print their power-up banner")
    p.add_argument("--marshaler", choices=MARSHALERS, default="json",
                   help="how events are published, as ChirpStack's MQTT integration is set "
                   "(command/down takes both)")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sim = ModemSimulator(a.listen[1], a.mqtt_host, a.mqtt_port, a.application_id,
                             speed=a.speed, listen_host=a.listen[0], tenant_id=a.tenant_id,
                             gateway_id=a.gateway_id, legacy_events=a.legacy_events,
                             wio_spaced_hex=a.wio_spaced_hex, fail_joins=a.fail_joins,
                             drop_ack=a.drop_ack, ack_loss=a.ack_loss, busy_prob=a.busy_prob,
                             uplink_loss=a.uplink_loss, corrupt_prob=a.corrupt_prob,
                             duty_cycle=a.duty_cycle, seed=a.seed,
                             boot_banner=not a.no_boot_banner, marshaler=a.marshaler)
        sim.start()
    except (ValueError, RuntimeError, OSError) as e:
        log.error("cannot start: %s", e)
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    sim.stop()
    log.info("stopped; counters %s", dict(sim.counters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
