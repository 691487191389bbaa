# Driver for the RAKwireless RAK3172 LoRaWAN modem (RUI3 AT firmware).
#
# The meter talks to the modem over a UART: configure the region and data
# rate, join by OTAA, send uplinks, pick up downlinks. Results of join and send
# arrive later as "+EVT:" lines; downlinks may arrive at any time (Class C),
# also while a command is waiting, so one line reader (AtModem._pump) files
# every line where it belongs and nothing is lost.
#
# RUI3 has printed events in two formats over its releases (docs/modem.md):
#   +EVT:JOIN FAILED                    +EVT:JOIN_FAILED_RX_TIMEOUT
#   +EVT:RX_1, RSSI -70, SNR 8          +EVT:RX_1:-70:8:UNICAST:2:0102
#   +EVT:2:0102
# Both are understood. The RUI3 AT Command Manual is the reference for the
# commands; band numbers are those of AT+BAND.

from binascii import hexlify, unhexlify

from .at import AtModem, ModemError

from micropython import const
from random import getrandbits

_EV_JOINED = const(1)
_EV_JOIN_FAILED = const(2)
_EV_TX_DONE = const(3)
_EV_CONF_OK = const(4)
_EV_CONF_FAILED = const(5)

_EVQ_MAX = const(8)
_DLQ_MAX = const(8)
_MAX_PAYLOAD = const(242)  # the largest FRMPayload of any region and data rate

BANDS = {
    "EU433": 0, "CN470": 1, "RU864": 2, "IN865": 3, "EU868": 4, "US915": 5,
    "AU915": 6, "KR920": 7, "AS923-1": 8, "AS923-2": 9, "AS923-3": 10,
    "AS923-4": 11, "LA915": 12,
}

# Lines that end a command. RUI3 reports every failure as AT_<reason>.
_FINAL_OK = "OK"
_BUSY = "AT_BUSY_ERROR"


class Rak3172(AtModem):
    # Instance-tunable waits (milliseconds), for slow links and fast tests.
    busy_wait_ms = 1000  # first wait after AT_BUSY_ERROR, doubles each time
    busy_retries = 5
    reboot_ms = 3000  # the modem restarts after a work-mode change

    def __init__(self, uart, log=None):
        super().__init__(uart, log)
        self._evq = []
        self._dl = []
        self._rx_meta = False  # old format: an RX header came, its payload line follows
        self._cfm = None  # AT+CFM as last set by us; None: unknown
        self.device_class = None
        self.last_rssi = None
        self.last_snr = None
        s = self.stats
        for k in ("sent", "send_failed", "busy", "joins", "join_failed", "downlinks",
                  "downlinks_dropped"):
            s[k] = 0

    # -- line classification ---------------------------------------------

    def _is_final(self, line) -> bool:
        return line == _FINAL_OK or line.startswith("AT_")

    def _event(self, line) -> bool:
        if not line.startswith("+EVT:"):
            return False
        e = line[5:]
        if e == "JOINED":
            self._push(_EV_JOINED)
        elif e.startswith("JOIN FAILED") or e.startswith("JOIN_FAILED"):
            self._push(_EV_JOIN_FAILED)
        elif e == "TX_DONE":
            self._push(_EV_TX_DONE)
        elif e == "SEND_CONFIRMED_OK":
            self._push(_EV_CONF_OK)
        elif e.startswith("SEND_CONFIRMED_FAILED"):
            self._push(_EV_CONF_FAILED)
        elif e.startswith("RX_"):
            self._rx(line, e)
        elif e and "0" <= e[0] <= "9":
            # Old format: "+EVT:<port>:<hex>" after an "+EVT:RX_x, RSSI .." line.
            i = e.find(":")
            self._rx_meta = False
            if i < 0:
                self._unknown(line)
            else:
                self._downlink(line, e[:i], e[i + 1:])
        else:
            self._unknown(line)
        return True

    def _push(self, code):
        q = self._evq
        if len(q) >= _EVQ_MAX:
            q.pop(0)  # nobody is waiting for the oldest one any more
        q.append(code)

    def _rx(self, line, e):
        try:
            if "," in e:
                # "RX_1, RSSI -70, SNR 8": the payload follows on its own line.
                parts = e.split(",")
                self.last_rssi = int(parts[1].split()[-1])
                self.last_snr = int(float(parts[2].split()[-1]))
                self._rx_meta = True
                return
            # "RX_1:<rssi>:<snr>:UNICAST:<port>:<hex>" (hex may be empty)
            parts = e.split(":")
            if len(parts) < 6:
                raise ValueError("want 6 fields")
            self.last_rssi = int(parts[1])
            self.last_snr = int(float(parts[2]))
        except (ValueError, IndexError):
            self._unknown(line)
            return
        self._downlink(line, parts[4], parts[5])

    def _downlink(self, line, port, hexdata):
        try:
            port = int(port)
            data = unhexlify(hexdata)
        except ValueError:
            self._unknown(line)
            return
        if port <= 0:
            return  # port 0 carries MAC commands only, nothing for the application
        if len(self._dl) >= _DLQ_MAX:
            self._dl.pop(0)
            self.stats["downlinks_dropped"] += 1
            self._say("modem: downlink queue full, dropped the oldest")
        self._dl.append((port, data))
        self.stats["downlinks"] += 1

    def _take(self, codes):
        """Pop the oldest queued event whose code is in `codes`, else 0."""
        q = self._evq
        for i in range(len(q)):
            if q[i] in codes:
                return q.pop(i)
        return 0

    async def _next_event(self, codes, timeout_ms):
        """The next event among `codes`, or 0 after timeout_ms."""
        got = [0]

        def done():
            got[0] = self._take(codes)
            return got[0] != 0

        await self._wait(done, timeout_ms)
        return got[0]

    # -- public API ------------------------------------------------------

    async def probe(self, attempts=2, timeout_ms=0):
        """True when the modem answers AT with OK."""
        async with self._lock:
            return await self._probe(attempts, timeout_ms)

    async def _probe(self, attempts, timeout_ms=0):
        for _ in range(attempts):
            if await self._cmd("AT", timeout_ms) == _FINAL_OK:
                return True
        return False

    async def dev_eui(self):
        """The modem's DevEUI, 8 bytes. Raises ModemError when unreadable."""
        async with self._lock:
            v = await self._query("AT+DEVEUI")
        if v is None:
            raise ModemError("AT+DEVEUI=? failed (%s)" % self.last_error)
        try:
            b = unhexlify(v)
        except ValueError:
            b = b""
        if len(b) != 8:
            raise ModemError("AT+DEVEUI=? answered %r, want 16 hex digits" % v)
        return b

    async def set_keys(self, join_eui, app_key):
        """Provision OTAA keys (8-byte JoinEUI, 16-byte AppKey)."""
        if len(join_eui) != 8:
            raise ValueError("join_eui must be 8 bytes, got %d" % len(join_eui))
        if len(app_key) != 16:
            raise ValueError("app_key must be 16 bytes, got %d" % len(app_key))
        async with self._lock:
            await self._must("AT+APPEUI=" + hexlify(join_eui).decode())
            await self._must("AT+APPKEY=" + hexlify(app_key).decode())

    async def _must(self, line):
        r = await self._cmd(line)
        if r != _FINAL_OK:
            raise ModemError("%s -> %s" % (line, r or "no answer"))

    async def configure(self, region="EU868", dr=5, device_class="A", confirmed=False,
                        adr=False):
        """LoRaWAN mode, band, fixed data rate, class, confirmed uplinks.
        Raises ValueError on a bad argument, ModemError naming the command
        the modem refused."""
        band = BANDS.get(region)
        if band is None:
            raise ValueError("region: unknown %r (one of %s)" % (region, ", ".join(BANDS)))
        if not 0 <= dr <= 15:
            raise ValueError("dr: %r is not a data rate 0..15" % dr)
        if device_class not in ("A", "C"):
            # Class B needs beacon tracking this meter does not do.
            raise ValueError("device_class: %r, want 'A' or 'C'" % device_class)
        async with self._lock:
            nwm = await self._query("AT+NWM")
            if nwm != "1":
                # The modem restarts into LoRaWAN mode; wait until it answers.
                await self._must("AT+NWM=1")
                await self._pause(self.reboot_ms // 4)
                if not await self._probe(4, self.reboot_ms // 4):
                    raise ModemError("no answer after AT+NWM=1 (restart)")
            await self._must("AT+BAND=%d" % band)
            # ADR first: with ADR on, the network, not AT+DR, picks the rate.
            await self._must("AT+ADR=%d" % (1 if adr else 0))
            await self._must("AT+DR=%d" % dr)
            await self._must("AT+CLASS=" + device_class)
            await self._must("AT+CFM=%d" % (1 if confirmed else 0))
            self._cfm = bool(confirmed)
            self.device_class = device_class
        return True

    async def joined(self):
        """AT+NJS=? -> True when the modem holds a network session."""
        async with self._lock:
            return await self._query("AT+NJS") == "1"

    async def join(self, attempts=3, timeout_s=120, backoff_s=30, retries=8, interval_s=10):
        """OTAA join. Each attempt is one AT+JOIN=1:0:<interval_s>:<retries>:
        the modem itself tries 1 + retries times, interval_s apart, printing a
        failure event each time. Between our attempts we back off
        backoff_s * 2**n plus jitter (many meters restart together after an
        outage). True when joined."""
        if not 7 <= interval_s <= 255:
            raise ValueError("interval_s: %r, RUI3 accepts 7..255" % interval_s)
        if not 0 <= retries <= 255:
            raise ValueError("retries: %r, RUI3 accepts 0..255" % retries)
        line = "AT+JOIN=1:0:%d:%d" % (interval_s, retries)
        timeout_ms = int(timeout_s * 1000)
        async with self._lock:
            for n in range(attempts):
                self._evq.clear()
                r = await self._cmd(line)
                if r == _BUSY:
                    # A join sequence is already running: wait for its outcome.
                    self.stats["busy"] += 1
                    r = _FINAL_OK
                if r == _FINAL_OK:
                    if await self._join_outcome(retries + 1, timeout_ms):
                        self.stats["joins"] += 1
                        return True
                elif r is not None:
                    # AT_PARAM_ERROR and the like will not change by retrying.
                    self._say("modem: %s -> %s" % (line, r))
                    return False
                # The JOINED line may have been lost: ask for the state.
                if await self._query("AT+NJS") == "1":
                    self.stats["joins"] += 1
                    return True
                if n + 1 < attempts:
                    wait = int(backoff_s * 1000) << min(n, 4)
                    wait += getrandbits(16) % (wait // 4 + 1)
                    self._say("modem: join attempt %d failed, next in %d ms" % (n + 1, wait))
                    # A late success from the modem's own retries still counts.
                    if await self._next_event((_EV_JOINED,), wait):
                        self.stats["joins"] += 1
                        return True
        return False

    async def _join_outcome(self, tries, timeout_ms):
        fails = [0]
        joined = [False]

        def done():
            while True:
                code = self._take((_EV_JOINED, _EV_JOIN_FAILED))
                if code == 0:
                    return False
                if code == _EV_JOINED:
                    joined[0] = True
                    return True
                fails[0] += 1
                self.stats["join_failed"] += 1
                if fails[0] >= tries:
                    return True

        if not await self._wait(done, timeout_ms):
            self.stats["timeouts"] += 1
            self.last_error = "timeout: no join result"
        return joined[0]

    async def send(self, port, data, confirmed=False, timeout_s=30):
        """Uplink `data` on `port`. True when sent (unconfirmed) or
        acknowledged (confirmed). On False, last_error says why."""
        if not 1 <= port <= 223:
            raise ValueError("port: %r, application ports are 1..223" % port)
        if len(data) > _MAX_PAYLOAD:
            raise ValueError("data: %d bytes, no data rate carries more than %d"
                             % (len(data), _MAX_PAYLOAD))
        confirmed = bool(confirmed)
        async with self._lock:
            ok = await self._send(port, data, confirmed, int(timeout_s * 1000))
        self.stats["sent" if ok else "send_failed"] += 1
        return ok

    async def _send(self, port, data, confirmed, timeout_ms):
        if self._cfm is not confirmed:
            if await self._cmd("AT+CFM=%d" % confirmed) != _FINAL_OK:
                return False
            self._cfm = confirmed
        line = "AT+SEND=%d:%s" % (port, hexlify(data).decode())
        wait = self.busy_wait_ms
        r = None
        for n in range(self.busy_retries + 1):
            self._evq.clear()
            r = await self._cmd(line)
            if r != _BUSY:
                break
            # Duty cycle or an open receive window: it will pass.
            self.stats["busy"] += 1
            if n < self.busy_retries:
                await self._pause(wait)
                wait *= 2
        if r != _FINAL_OK:
            return False
        if confirmed:
            got = await self._next_event((_EV_CONF_OK, _EV_CONF_FAILED), timeout_ms)
            if got == _EV_CONF_FAILED:
                self.last_error = "no acknowledgement"
            ok = got == _EV_CONF_OK
        else:
            got = await self._next_event((_EV_TX_DONE,), timeout_ms)
            ok = got == _EV_TX_DONE
        if got == 0:
            self.stats["timeouts"] += 1
            self.last_error = "timeout: no send result"
        return ok

    def downlink(self):
        """Pop the oldest received downlink as (port, bytes), or None."""
        self._pump()
        if self._dl:
            return self._dl.pop(0)
        return None

    async def wait_downlink(self, timeout_ms):
        """The next downlink, waiting up to timeout_ms; None if none came."""
        if await self._wait(self._has_downlink, timeout_ms):
            return self._dl.pop(0)
        return None

    def _has_downlink(self):
        return len(self._dl) > 0
