"""A RAK3172 modem (RUI3 AT dialect) and the ChirpStack v4 network server behind it.

Simulated meters reach it over TCP (one connection per modem, see
hardware/sim/mpy/sim_uart.py); what a real network would deliver to the
gateway daemon comes out as ChirpStack v4 MQTT integration events on a real
broker, and downlinks enqueued on `command/down` reach the modems. The modem
side follows the RUI3 AT Command Manual; the network side follows ChirpStack's
MQTT integration (topics, JSON marshaler, event semantics). docs/modem.md lists
what is simulated and what is not.

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
import math
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

log = logging.getLogger("hardware.sim.modem_sim")

# LoRaWAN 1.0.x MAC layer facts used for timing and sizes.
LORAWAN_OVERHEAD = 13  # MHDR 1 + FHDR 7 (no FOpts) + FPort 1 + MIC 4
JOIN_REQUEST_LEN = 23
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


def time_on_air_s(phy_len: int, sf: int, bw_hz: int, cr: int = 1, preamble: int = 8,
                  explicit_header: bool = True, crc: bool = True) -> float:
    """LoRa time on air (Semtech AN1200.13, section 4): `phy_len` bytes of PHY
    payload (application payload + LORAWAN_OVERHEAD), coding rate 4/(4+cr).
    Low data rate optimisation (DE) is on at SF11 and SF12 on 125 kHz."""
    t_sym = (1 << sf) / bw_hz
    de = 1 if bw_hz <= 125_000 and sf >= 11 else 0
    h = 0 if explicit_header else 1
    t_preamble = (preamble + 4.25) * t_sym
    num = 8 * phy_len - 4 * sf + 28 + (16 if crc else 0) - 20 * h
    n_payload = 8 + max(math.ceil(num / (4 * (sf - 2 * de))) * (cr + 4), 0)
    return t_preamble + n_payload * t_sym


@dataclass(frozen=True)
class Region:
    name: str
    band: int  # AT+BAND number in RUI3
    config_id: str  # ChirpStack region_config_id
    data_rates: dict  # uplink DR -> (spreading factor, bandwidth Hz)
    max_payload: dict  # uplink DR -> max FRMPayload (repeater compatible)
    uplink_hz: tuple  # channels the modem hops over
    default_dr: int
    rx2: tuple  # (frequency, sf, bw) of RX2, also Class C's continuous window

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
    {0: (12, 125_000), 1: (11, 125_000), 2: (10, 125_000), 3: (9, 125_000),
     4: (8, 125_000), 5: (7, 125_000), 6: (7, 250_000)},
    {0: 51, 1: 51, 2: 51, 3: 115, 4: 222, 5: 222, 6: 222},
    (868_100_000, 868_300_000, 868_500_000, 867_100_000, 867_300_000,
     867_500_000, 867_700_000, 867_900_000),
    0,
    (869_525_000, 12, 125_000),
)
US915 = Region(
    "US915", 5, "us915_1",
    {0: (10, 125_000), 1: (9, 125_000), 2: (8, 125_000), 3: (7, 125_000), 4: (8, 500_000)},
    {0: 11, 1: 53, 2: 125, 3: 222, 4: 222},
    # Sub-band 2 (channels 8-15), the one ChirpStack enables by default.
    tuple(903_900_000 + 200_000 * i for i in range(8)),
    0,
    (923_300_000, 12, 500_000),
)
REGIONS = {r.band: r for r in (EU868, US915)}

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
    """One simulated RAK3172 on one TCP connection: its AT state and its
    LoRaWAN session."""

    def __init__(self, sim: "ModemSimulator", writer: asyncio.StreamWriter, peer):
        self.sim = sim
        self.writer = writer
        self.peer = peer
        self.attached = False
        self.dev_eui = "0" * 16
        self.join_eui = "0" * 16
        self.app_key = "0" * 32
        self.echo = False
        self.nwm = 1
        self.region = EU868
        self.dr = EU868.default_dr
        self.adr = True
        self.cls = "A"
        self.cfm = False
        self.cfs = False  # last confirmed uplink acknowledged
        self.joined = False
        self.joining = False
        self.join_params = (0, 0, 8, 0)
        self.dev_addr = ""
        self.f_cnt = 0
        self.busy_until = 0.0  # loop time until which AT+SEND answers busy
        self.dc_until = 0.0  # loop time until which the duty cycle forbids sending
        self.channel = 0
        self.join_failures_left = sim.fail_joins
        self.last_rx = None  # (port, hex) for AT+RECV=?
        self.timers: set[asyncio.TimerHandle] = set()
        self.closed = False

    def write(self, line: str) -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(line.encode() + b"\r\n")

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
    """RUI3 modems over TCP plus a ChirpStack v4 MQTT integration.

    Fault injection: `fail_joins=N` makes each modem's first N join attempts
    fail (+EVT:JOIN_FAILED_RX_TIMEOUT), `drop_ack` loses every acknowledgement
    (confirmed uplinks end in +EVT:SEND_CONFIRMED_FAILED, confirmed downlinks
    give an `ack` event with acknowledged=false). `legacy_events` switches to
    the older event format (+EVT:JOIN FAILED, +EVT:RX_1, RSSI x, SNR y then
    +EVT:<port>:<hex>)."""

    def __init__(self, listen_port: int = 0, mqtt_host: str | None = "127.0.0.1",
                 mqtt_port: int = 1883, application_id: str = "", speed: float = 1.0, *,
                 listen_host: str = "127.0.0.1",
                 tenant_id: str = DEFAULT_TENANT_ID, tenant_name: str = "meters",
                 application_name: str = "smart-meters",
                 device_profile_id: str = DEFAULT_PROFILE_ID,
                 device_profile_name: str = "rak3172-meter",
                 gateway_id: str = DEFAULT_GATEWAY_ID,
                 rssi: int = -70, snr: float = 8.0,
                 legacy_events: bool = False, fail_joins: int = 0, drop_ack: bool = False,
                 duty_cycle: float = 0.0, boot_banner: bool = True,
                 mqtt_client_id: str | None = None):
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if not application_id:
            raise ValueError("application_id is required (the ChirpStack application UUID)")
        if not 0.0 <= duty_cycle < 1.0:
            raise ValueError(f"duty_cycle must be in [0, 1), got {duty_cycle}")
        if not _is_hex(gateway_id, 16):
            raise ValueError(f"gateway_id must be 16 hex digits, got {gateway_id!r}")
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
        self.fail_joins = int(fail_joins)
        self.drop_ack = drop_ack
        self.duty_cycle = duty_cycle
        self.boot_banner = boot_banner
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

    def call(self, fn, *args, timeout: float = 5.0):
        """Run fn(*args) on the simulator's loop (where all state lives) and
        return its result; for tests and the demo to inspect or poke state."""
        async def run():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def inject_lines(self, dev_eui: str, *lines: str) -> None:
        """Fault injection: the modem prints `lines` (unsolicited output, line
        noise) just before its next answer. Works for a modem not attached yet."""
        def add():
            self._noise.setdefault(dev_eui.lower(), []).extend(lines)
        if self._loop is None:
            add()
        else:
            self.call(add)

    def devices(self) -> dict:
        """A snapshot of the attached modems: dev_eui -> session facts."""
        return self.call(lambda: {
            eui: dict(joined=m.joined, dev_addr=m.dev_addr, f_cnt=m.f_cnt, dr=m.dr,
                      cls=m.cls, queued=len(self._queues.get(eui, ())))
            for eui, m in self._modems.items()})

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
        # ChirpStack's JSON marshaler: camelCase names, bytes in base64, enums by name.
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
        log.info("downlink %s queued for %s (port %d, %d bytes%s)", cmd.id, dev_eui, cmd.f_port,
                 len(cmd.data), ", confirmed" if cmd.confirmed else "")
        m = self._modems.get(dev_eui)
        if m is not None and m.cls == "C":
            self._class_c_flush(m)

    def _parse_down(self, topic: str, payload: bytes) -> tuple[str, integration.DownlinkCommand]:
        parts = topic.split("/")
        if (len(parts) != 6 or parts[0] != "application" or parts[1] != self.application_id
                or parts[2] != "device" or parts[4:] != ["command", "down"]):
            raise _Reject("topic", f"unexpected topic {topic!r}")
        topic_eui = parts[3].lower()
        if not _is_hex(topic_eui, 16):
            raise _Reject("dev_eui", f"topic DevEUI {parts[3]!r} is not 16 hex digits")
        try:
            obj = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _Reject("json", f"payload is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise _Reject("json", f"payload is a JSON {type(obj).__name__}, want an object")
        dev_eui = obj.get("devEui")
        if not isinstance(dev_eui, str) or not _is_hex(dev_eui, 16):
            raise _Reject("dev_eui", f"devEui {dev_eui!r} is not 16 hex digits")
        if dev_eui.lower() != topic_eui:
            raise _Reject("dev_eui_mismatch",
                          f"devEui {dev_eui} does not match the topic's {parts[3]}")
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
        item_id = obj.get("id") or str(uuid.uuid4())
        try:
            item_id = str(uuid.UUID(item_id))
        except (ValueError, TypeError, AttributeError):
            raise _Reject("id", f"id {item_id!r} is not a UUID") from None
        return topic_eui, integration.DownlinkCommand(
            id=item_id, dev_eui=topic_eui, confirmed=confirmed, f_port=f_port, data=data)

    def _deliver(self, m: _Modem, cmd: integration.DownlinkCommand, window: str,
                 channel: int, dr: int) -> None:
        hexdata = cmd.data.hex().upper()
        snr = round(self.snr)
        if self.legacy_events:
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
            downlink_id=random.getrandbits(32), device_info=self._device_info(m),
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
                deduplication_id=str(uuid.uuid4()), device_info=self._device_info(m),
                queue_item_id=cmd.id, acknowledged=not self.drop_ack, f_cnt_down=f_cnt_down)
            ack.time.GetCurrentTime()
            self._publish(m.dev_eui, "ack", ack)
            self.counters["acks" if not self.drop_ack else "acks_lost"] += 1

    def _class_c_flush(self, m: _Modem) -> None:
        """Class C: deliver the queue now, or once the uplink in progress ends."""
        if m.closed or not m.joined or m.cls != "C":
            return
        q = self._queues.get(m.dev_eui)
        if not q:
            return
        wait = m.busy_until - asyncio.get_running_loop().time()
        if wait > 0:
            m.later(wait * self.speed, self._class_c_flush, m)
            return
        while q:
            self._deliver(m, q.popleft(), "RX_C", m.channel, m.dr)

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
        self.counters["commands"] += 1
        if m.echo:
            m.write(line)
        name, sep, arg = line.partition("=")
        name = name.strip().upper()
        handler = self._COMMANDS.get(name)
        if handler is None:
            self.counters["unknown_commands"] += 1
            log.info("%s: unknown command %r", m.dev_eui, line)
            m.write("AT_ERROR")
            return
        try:
            result = handler(self, m, arg.strip() if sep else None)
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
        for noise in self._noise.pop(m.dev_eui, ()):
            m.write(noise)
        m.write(result)

    def _sim_line(self, m: _Modem, line: str) -> None:
        words = line.split()
        if words[0] != "#SIM-ATTACH":
            self.counters["unknown_sim_lines"] += 1
            log.warning("%s: unknown simulator line %r", m.peer, line)
            return
        fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        dev_eui = fields.get("deveui", "").lower()
        join_eui = fields.get("joineui", "").lower()
        app_key = fields.get("appkey", "").lower()
        if not (_is_hex(dev_eui, 16) and _is_hex(join_eui, 16) and _is_hex(app_key, 32)):
            self.counters["bad_attach"] += 1
            log.warning("%s: bad attach line %r (want deveui=16 hex, joineui=16 hex, "
                        "appkey=32 hex)", m.peer, line)
            return
        old = self._modems.get(dev_eui)
        if old is not None and old is not m:
            log.warning("%s: DevEUI %s attached again; the newer connection wins",
                        m.peer, dev_eui)
            old.cancel()
        m.attached = True
        m.dev_eui, m.join_eui, m.app_key = dev_eui, join_eui, app_key
        self._registered[dev_eui] = (join_eui, app_key)
        self._modems[dev_eui] = m
        self.counters["attached"] += 1
        log.info("%s: modem %s attached", m.peer, dev_eui)
        if self.boot_banner:
            # What a RAK3172 prints when it powers up with the board.
            m.write("RAKwireless RAK3172-E Example")
            m.write("------------------------------------------------------")
            m.write("Current Work Mode: LoRaWAN.")

    # Command handlers: (sim, modem, arg) -> "OK" | "AT_..." | (value, "OK").
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
        # Downlinks and Class C delivery find the modem by its DevEUI.
        if self._modems.get(m.dev_eui) is m:
            del self._modems[m.dev_eui]
        m.dev_eui = arg.lower()
        if m.attached:
            self._modems[m.dev_eui] = m
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

    def _class(self, m, arg):
        if m.nwm != 1:
            return "AT_MODE_NO_SUPPORT"
        if arg == "?":
            return m.cls, "OK"
        if arg is None or arg.upper() not in ("A", "C"):
            return "AT_PARAM_ERROR"  # Class B (beacons) is not simulated
        m.cls = arg.upper()
        if m.cls == "C":
            self._class_c_flush(m)
        return "OK"

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
        m.joining = True
        m.joined = False
        self._join_attempt(m, retries)
        return "OK"

    def _join_attempt(self, m: _Modem, retries_left: int) -> None:
        sf, bw = m.region.data_rates[m.dr]
        toa = time_on_air_s(JOIN_REQUEST_LEN, sf, bw)
        self.counters["join_requests"] += 1
        registered = self._registered.get(m.dev_eui)
        accepted = registered == (m.join_eui, m.app_key)
        if accepted and m.join_failures_left > 0:
            m.join_failures_left -= 1
            accepted = False
        if accepted:
            accept = time_on_air_s(JOIN_ACCEPT_LEN, sf, bw)
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
        m.dev_addr = "%08x" % (0x26000000 | random.getrandbits(25))  # NetID 0x13 style
        self.counters["joins"] += 1
        m.write("+EVT:JOINED")
        ev = integration.JoinEvent(deduplication_id=str(uuid.uuid4()),
                                   device_info=self._device_info(m), dev_addr=m.dev_addr,
                                   region_config_id=m.region.config_id)
        ev.time.GetCurrentTime()
        self._publish(m.dev_eui, "join", ev)
        self._class_c_flush(m)

    def _join_failed(self, m: _Modem, retries_left: int) -> None:
        if not m.joining:
            return
        self.counters["join_failures"] += 1
        m.write("+EVT:JOIN FAILED" if self.legacy_events else "+EVT:JOIN_FAILED_RX_TIMEOUT")
        if retries_left > 0:
            m.later(m.join_params[2], self._join_attempt, m, retries_left - 1)
        else:
            m.joining = False

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
        if not m.joined:
            self.counters["uplinks_rejected"] += 1
            return "AT_NO_NETWORK_JOINED"
        now = asyncio.get_running_loop().time()
        if now < max(m.busy_until, m.dc_until):
            self.counters["busy"] += 1
            return "AT_BUSY_ERROR"
        limit = m.region.max_payload[m.dr]
        if len(data) > limit:
            self.counters["uplinks_rejected"] += 1
            log.info("%s: %d-byte payload exceeds %d at DR%d", m.dev_eui, len(data), limit, m.dr)
            return "AT_PARAM_ERROR"
        sf, bw = m.region.data_rates[m.dr]
        toa = time_on_air_s(len(data) + LORAWAN_OVERHEAD, sf, bw)
        channel = m.channel
        m.channel = (m.channel + 1) % len(m.region.uplink_hz)
        f_cnt = m.f_cnt
        m.f_cnt += 1
        # Busy through the airtime and both receive windows; the network may
        # shorten that to RX1 when it has something to send (_uplink_received).
        m.busy_until = now + (toa + RECEIVE_DELAY2_S + RX_WINDOW_S) / self.speed
        if self.duty_cycle:
            # After T on air the sub-band stays closed for T/DC - T.
            m.dc_until = now + toa / self.duty_cycle / self.speed
        m.later(toa, self._uplink_received, m, port, data, m.cfm, f_cnt, channel, m.dr)
        return "OK"

    def _uplink_received(self, m, port, data, confirmed, f_cnt, channel, dr) -> None:
        sf, bw = m.region.data_rates[dr]
        self.counters["uplinks"] += 1
        # Class A: the network answers in RX1 with a queued downlink, or with
        # the acknowledgement of a confirmed uplink; else the modem waits
        # through RX2 for nothing.
        q = self._queues.get(m.dev_eui)
        downlink = q.popleft() if q and m.cls == "A" else None
        if downlink is not None or (confirmed and not self.drop_ack):
            rest = RECEIVE_DELAY1_S + RX_WINDOW_S
        else:
            rest = RECEIVE_DELAY2_S + RX_WINDOW_S
        m.busy_until = asyncio.get_running_loop().time() + rest / self.speed
        m.later(rest, self._uplink_done, m, confirmed, downlink, channel, dr)
        ev = integration.UplinkEvent(
            deduplication_id=str(uuid.uuid4()), device_info=self._device_info(m),
            dev_addr=m.dev_addr, adr=m.adr, dr=dr, f_cnt=f_cnt, f_port=port,
            confirmed=confirmed, data=data, region_config_id=m.region.config_id)
        ev.time.GetCurrentTime()
        rx = ev.rx_info.add()
        rx.gateway_id = self.gateway_id
        rx.uplink_id = random.getrandbits(32)
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

    def _uplink_done(self, m, confirmed, downlink, channel, dr) -> None:
        # The modem prints what it received before the result of its uplink.
        m.busy_until = 0.0
        if downlink is not None:
            self._deliver(m, downlink, "RX_1", channel, dr)
        if confirmed:
            m.cfs = not self.drop_ack
            if self.drop_ack:
                self.counters["uplink_acks_lost"] += 1
                m.write("+EVT:SEND_CONFIRMED_FAILED(4)")
            else:
                m.write("+EVT:SEND_CONFIRMED_OK")
        else:
            m.write("+EVT:TX_DONE")
        self._class_c_flush(m)

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
    p.add_argument("--fail-joins", type=int, default=0, metavar="N",
                   help="each modem's first N join attempts fail")
    p.add_argument("--drop-ack", action="store_true", help="lose every acknowledgement")
    p.add_argument("--duty-cycle", type=float, default=0.0,
                   help="enforce this duty cycle per modem (0.01 = 1%%; default off)")
    p.add_argument("--no-boot-banner", action="store_true",
                   help="modems do not print their power-up banner")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        sim = ModemSimulator(a.listen[1], a.mqtt_host, a.mqtt_port, a.application_id,
                             speed=a.speed, listen_host=a.listen[0], tenant_id=a.tenant_id,
                             gateway_id=a.gateway_id, legacy_events=a.legacy_events,
                             fail_joins=a.fail_joins, drop_ack=a.drop_ack,
                             duty_cycle=a.duty_cycle, boot_banner=not a.no_boot_banner)
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
