# What AT-command LoRaWAN modems share: one reader that turns UART bytes into
# lines and dispatches each, one command at a time with a timeout, waits that
# keep reading so no line is lost while waiting, and the LoRaWAN steps every
# modem goes through (configure, join with backoff, send with busy retries,
# link check, network time, noticing a modem that restarted by itself).
#
# A dialect (rak3172.py, wioe5.py) subclasses AtModem and says how each step
# is spelled on the wire, which lines are asynchronous events and which end a
# command. Only uart.any/readline/write are used, polled from asyncio, so a
# real machine.UART with timeout=0 and the simulated one
# (hardware/sim/mpy/sim_uart.py) behave the same. docs/modem.md describes the
# interface.

import asyncio
from binascii import unhexlify
from random import getrandbits
from time import ticks_ms, ticks_diff

from micropython import const

from meter import lorawan

_POLL_MS = const(10)  # a 115200 baud UART fills about 115 bytes in that time
_LINE_MAX = const(800)  # a 242-byte Wio-E5 downlink in spaced hex is ~760
_LINES_PER_PUMP = const(16)  # bound the work done in one call
_EVQ_MAX = const(8)
_DLQ_MAX = const(8)

# Events a dialect reports with _push(); the flows wait for them.
EV_JOINED = const(1)
EV_JOIN_FAILED = const(2)
EV_JOIN_DONE = const(3)  # one join attempt is over (Wio-E5 "+JOIN: Done")
EV_TX_DONE = const(4)
EV_CONF_OK = const(5)
EV_CONF_FAILED = const(6)
EV_REBOOT = const(7)  # the modem restarted: whatever was awaited will not come

# MAC requests the modem adds to its next uplink (bits of _armed / _carry).
REQ_LINK = const(1)  # LinkCheckReq
REQ_TIME = const(2)  # DeviceTimeReq

_STATS = ("unknown_lines", "timeouts", "overlong_lines", "sent", "send_failed", "busy",
          "joins", "join_failed", "downlinks", "downlinks_dropped", "reboots", "mac_uplinks")


class ModemError(Exception):
    """The modem did not do what a step needs; the message names the command
    and the answer (or the timeout)."""


def ints(s):
    """The integers in `s`, in order: "15h08m55s on 08/17/2026" -> [15, 8, 55,
    8, 17, 2026]. A '-' is a sign only when no digit precedes it, so dates
    keep their fields ("2026-04-30" -> [2026, 4, 30]) and "RSSI -70" is -70."""
    out = []
    v = -1
    neg = False
    prev = ""
    for c in s:
        if "0" <= c <= "9":
            v = (0 if v < 0 else v * 10) + ord(c) - 48
        else:
            if v >= 0:
                out.append(-v if neg else v)
                v = -1
            neg = c == "-" and not "0" <= prev <= "9"
        prev = c
    if v >= 0:
        out.append(-v if neg else v)
    return out


def unix(y, mo, d, h, mi, s):
    """Unix seconds of a UTC calendar time (days-from-civil, proleptic
    Gregorian); None when a field is out of range. MicroPython's own mktime
    counts from 2000 on some ports, so it is not used."""
    if not (1970 <= y <= 2200 and 1 <= mo <= 12 and 1 <= d <= 31 and 0 <= h < 24
            and 0 <= mi < 60 and 0 <= s < 61):
        return None
    if mo <= 2:
        y -= 1
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (mo + (-3 if mo > 2 else 9)) + 2) // 5 + d - 1
    days = era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468
    return days * 86400 + h * 3600 + mi * 60 + s


class AtModem:
    # Instance-tunable waits (milliseconds), for slow links and fast tests.
    cmd_timeout_ms = 1500
    busy_wait_ms = 1000  # first wait after a busy answer, doubles each time
    busy_retries = 5
    reboot_ms = 3000  # the modem restarts after a work-mode change
    mac_wait_ms = 2000  # a MAC answer may be printed after the uplink's result
    mac_port = 222  # the one-byte uplink that carries a MAC request on its own
    _interval_min = 0  # shortest join retry interval the modem accepts (s)

    def __init__(self, uart, log=None):
        self._uart = uart
        self._log = log
        # Partial line carried between pumps: a real UART with timeout=0
        # returns what it has, which may end mid-line.
        self._part = bytearray(_LINE_MAX)
        self._plen = 0
        self._overlong = False
        self._pending = None  # the command line awaiting its final result
        self._fin = None  # what the final line starts with, where the dialect knows
        self._result = None
        self._values = []  # lines between a command and its final result
        self._lock = asyncio.Lock()
        self._evq = []
        self._dl = []
        self._cfm = None  # confirmed mode as last set in the modem; None: unknown
        self._port = None  # uplink port as last set in the modem; None: unknown
        self._joined = False  # the session as far as the driver knows
        self._armed = 0  # MAC requests the modem holds for its next uplink
        self._carry = 0  # those the uplink in progress carries
        self._link = None
        self._link_n = 0  # LinkCheck outcomes seen (answers and failures)
        self._time_ok = False
        self._time_n = 0  # DeviceTime outcomes seen
        self.needs_setup = True  # configure() (and join()) before anything else
        self.region = None
        self.dr = None
        self.device_class = None
        self.last_rssi = None
        self.last_snr = None
        self.last_error = None
        self.stats = {}
        for k in _STATS:
            self.stats[k] = 0

    # -- to be provided by the dialect ------------------------------------

    def _event(self, line) -> bool:
        """Handle `line` if it is an asynchronous event; True when consumed."""
        return False

    def _final_for(self, line) -> "str | None":
        """What the final line of command `line` starts with, if the dialect
        can tell (kept in self._fin for _is_final)."""
        return None

    def _is_final(self, line) -> bool:
        """True when `line` ends the pending command (success or error)."""
        return line == "OK" or line == "ERROR"

    def _ok(self, r) -> bool:
        """True when final line `r` (None: no answer) means success."""
        return r == "OK"

    def _stray(self, line) -> bool:
        """True for a line that belongs to an answered command (not unknown)."""
        return False

    def _busy(self, r) -> int:
        """Milliseconds to wait when answer `r` says busy (duty cycle, a
        receive window still open), else 0."""
        return 0

    def _not_joined(self, r) -> bool:
        """True when answer `r` says the modem holds no session."""
        return False

    async def _read_dev_eui(self) -> "str | None":
        return None

    async def _set_keys(self, join_eui, app_key):
        pass

    async def _configure(self, region, dr, device_class, confirmed, adr):
        pass

    async def _is_joined(self) -> "bool | None":
        return self._joined

    async def _join_once(self, retries, interval_s, timeout_ms) -> "bool | None":
        """One join attempt: True joined, False failed, None refused for good."""
        return None

    async def _send_line(self, port, data, confirmed) -> "str | None":
        """Prepare the modem for this uplink; the command that sends it, or None."""
        return None

    def _request_line(self, req) -> str:
        return ""

    async def _read_time(self) -> "int | None":
        return None

    # -- reading ----------------------------------------------------------

    def _say(self, msg):
        if self._log is not None:
            self._log(msg)

    def _unknown(self, line):
        self.stats["unknown_lines"] += 1
        self._say("modem: ignored %r" % line)

    def _pump(self):
        """Read every complete line the UART holds and dispatch it. Never waits."""
        u = self._uart
        for _ in range(_LINES_PER_PUMP):
            if not u.any():
                return
            chunk = u.readline()
            if not chunk:
                return
            # readline() ends at a line end, but a UART that only offers
            # read() may hand over several lines at once: split anyway.
            start = 0
            n = len(chunk)
            while start < n:
                i = chunk.find(b"\n", start)
                end = n if i < 0 else i + 1
                self._feed(chunk[start:end] if start or end < n else chunk, i >= 0)
                start = end

    def _feed(self, piece, complete):
        n = len(piece)
        if self._overlong:
            # Drop the rest of a line that did not fit.
            if complete:
                self._overlong = False
            return
        if self._plen + n > _LINE_MAX:
            self.stats["overlong_lines"] += 1
            self._say("modem: dropped a line longer than %d bytes" % _LINE_MAX)
            self._plen = 0
            self._overlong = not complete
            return
        if not complete:
            self._part[self._plen:self._plen + n] = piece
            self._plen += n
            return
        if self._plen:
            self._part[self._plen:self._plen + n] = piece
            raw = bytes(self._part[:self._plen + n])
            self._plen = 0
        else:
            raw = piece
        try:
            line = raw.decode().strip()
        except UnicodeError:
            self._unknown(raw)
            return
        if line:
            self._line(line)

    def _line(self, line):
        if self._event(line):
            return
        if self._pending is not None and self._result is None:
            if self._is_final(line):
                self._result = line
            elif line != self._pending:  # an echo (ATE) is not an answer
                self._values.append(line)
            return
        if not self._stray(line):
            self._unknown(line)

    def _push(self, code):
        q = self._evq
        if len(q) >= _EVQ_MAX:
            q.pop(0)  # nobody is waiting for the oldest one any more
        q.append(code)

    def _take(self, codes):
        """Pop the oldest queued event whose code is in `codes`, else 0."""
        q = self._evq
        for i in range(len(q)):
            if q[i] in codes:
                return q.pop(i)
        return 0

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

    def _meta(self, line, e):
        """'<window>, RSSI <rssi>, SNR <snr>' (both dialects print it so)."""
        try:
            parts = e.split(",")
            self.last_rssi = int(parts[1].split()[-1])
            self.last_snr = int(float(parts[2].split()[-1]))
        except (ValueError, IndexError):
            self._unknown(line)
            return False
        return True

    def _link_answer(self, result):
        self._link = result
        self._link_n += 1

    def _time_answer(self, ok):
        self._time_ok = ok
        self._time_n += 1

    def _rebooted(self, why):
        """The modem restarted or lost its session by itself: what the driver
        set up is gone. A banner before any setup is just the power-up."""
        if self.needs_setup and not self._joined:
            return
        self.stats["reboots"] += 1
        self._say("modem: restarted (%s); configure and join again" % why)
        self._joined = False
        self._armed = 0
        self._cfm = None
        self._port = None
        self.device_class = None
        self.needs_setup = True
        self._push(EV_REBOOT)

    # -- waiting ----------------------------------------------------------

    async def _wait(self, done, timeout_ms):
        """Poll the UART until done() or timeout_ms; True when done."""
        start = ticks_ms()
        while True:
            self._pump()
            if done():
                return True
            if ticks_diff(ticks_ms(), start) >= timeout_ms:
                return False
            await asyncio.sleep_ms(_POLL_MS)

    async def _pause(self, ms):
        """Sleep while still reading the UART (downlinks keep arriving)."""
        await self._wait(_never, ms)

    async def _next_event(self, codes, timeout_ms):
        """The next event among `codes`, or 0 after timeout_ms."""
        got = [0]

        def done():
            got[0] = self._take(codes)
            return got[0] != 0

        await self._wait(done, timeout_ms)
        return got[0]

    async def _cmd(self, line, timeout_ms=0, keep_values=False):
        """Send one command; return its final result line, or None on timeout.
        With keep_values the lines between the command and its result stay in
        self._values for the caller; otherwise they are unexpected."""
        self._pump()  # a stale line must not be taken for this command's answer
        self._pending = line
        self._fin = self._final_for(line)
        self._result = None
        self._values = []
        self._uart.write(line)
        self._uart.write(b"\r\n")
        ok = await self._wait(self._answered, timeout_ms or self.cmd_timeout_ms)
        self._pending = None
        if not ok or not keep_values:
            for v in self._values:
                self._unknown(v)
        if not ok:
            self.stats["timeouts"] += 1
            self.last_error = "timeout: " + line
            self._say("modem: no answer to %s" % line)
            return None
        if not self._ok(self._result):
            self.last_error = "%s: %s" % (line, self._result)
        return self._result

    def _answered(self):
        return self._result is not None

    async def _must(self, line):
        r = await self._cmd(line)
        if not self._ok(r):
            raise ModemError("%s -> %s" % (line, r or "no answer"))
        return r

    # -- the interface (docs/modem.md) -------------------------------------

    async def probe(self, attempts=2, timeout_ms=0):
        """True when the modem answers AT."""
        async with self._lock:
            return await self._probe(attempts, timeout_ms)

    async def _probe(self, attempts, timeout_ms=0):
        for _ in range(attempts):
            if self._ok(await self._cmd("AT", timeout_ms)):
                return True
        return False

    async def dev_eui(self):
        """The modem's DevEUI, 8 bytes. Raises ModemError when unreadable."""
        async with self._lock:
            v = await self._read_dev_eui()
        if v is None:
            raise ModemError("DevEUI query failed (%s)" % self.last_error)
        try:
            b = unhexlify(v)
        except ValueError:
            b = b""
        if len(b) != 8:
            raise ModemError("DevEUI query answered %r, want 16 hex digits" % v)
        return b

    async def set_keys(self, join_eui, app_key):
        """Provision OTAA keys (8-byte JoinEUI, 16-byte AppKey)."""
        if len(join_eui) != 8:
            raise ValueError("join_eui must be 8 bytes, got %d" % len(join_eui))
        if len(app_key) != 16:
            raise ValueError("app_key must be 16 bytes, got %d" % len(app_key))
        async with self._lock:
            await self._set_keys(join_eui, app_key)

    async def configure(self, region="EU868", dr=5, device_class="A", confirmed=False,
                        adr=False):
        """LoRaWAN mode, region, fixed data rate, class, confirmed uplinks.
        Raises ValueError on a bad argument, ModemError naming the command
        the modem refused. Clears needs_setup when it succeeds."""
        lorawan.check(region, dr)
        if device_class not in ("A", "C"):
            # Class B needs beacon tracking this meter does not do.
            raise ValueError("device_class: %r, want 'A' or 'C'" % device_class)
        async with self._lock:
            self.needs_setup = True  # until every step went through
            await self._configure(region, dr, device_class, bool(confirmed), bool(adr))
            self.region = region
            self.dr = dr
            self.device_class = device_class
            self.needs_setup = False
        return True

    async def set_dr(self, dr):
        """Change the uplink data rate (within the configured region)."""
        lorawan.check(self.region or "EU868", dr)
        async with self._lock:
            await self._must("AT+DR=%d" % dr)
        self.dr = dr

    def max_payload(self):
        """The largest application payload the current region and data rate
        carry; before configure() the smallest of any (the modem's is unknown)."""
        if self.region is None or self.dr is None:
            return min([min(t) for t in lorawan.MAX_PAYLOAD.values()])
        return lorawan.max_payload(self.region, self.dr)

    async def joined(self):
        """True when the modem holds a network session."""
        async with self._lock:
            j = await self._is_joined()
        if j is False and self._joined:
            self._rebooted("no session")
        return j is True

    async def join(self, attempts=3, timeout_s=120, backoff_s=30, retries=8, interval_s=10):
        """OTAA join. Each attempt lets the modem try 1 + retries times,
        interval_s apart (RUI3 does that itself, the driver does it for the
        Wio-E5); between attempts we back off backoff_s * 2**n plus jitter
        (many meters restart together after an outage). True when joined."""
        if not self._interval_min <= interval_s <= 255:
            raise ValueError("interval_s: %r, want %d..255" % (interval_s, self._interval_min))
        if not 0 <= retries <= 255:
            raise ValueError("retries: %r, want 0..255" % retries)
        timeout_ms = int(timeout_s * 1000)
        async with self._lock:
            for n in range(attempts):
                r = await self._join_once(retries, interval_s, timeout_ms)
                if r:
                    return self._now_joined()
                if r is None:
                    return False  # refused (wrong mode, bad parameter): retrying won't help
                if n + 1 < attempts:
                    wait = int(backoff_s * 1000) << min(n, 4)
                    wait += getrandbits(16) % (wait // 4 + 1)
                    self._say("modem: join attempt %d failed, next in %d ms" % (n + 1, wait))
                    # A late success from the modem's own retries still counts.
                    if await self._next_event((EV_JOINED,), wait):
                        return self._now_joined()
        return False

    def _now_joined(self):
        self._joined = True
        self.stats["joins"] += 1
        return True

    async def send(self, port, data, confirmed=False, timeout_s=30):
        """Uplink `data` on `port`. True when sent (unconfirmed) or
        acknowledged (confirmed). On False, last_error says why. A payload
        the current data rate cannot carry is refused with ValueError."""
        if not 1 <= port <= 223:
            raise ValueError("port: %r, application ports are 1..223" % port)
        limit = self.max_payload()
        if len(data) > limit:
            raise ValueError("data: %d bytes, %s DR%s carries at most %d"
                             % (len(data), self.region, self.dr, limit))
        async with self._lock:
            ok = await self._send(port, data, bool(confirmed), int(timeout_s * 1000))
        self.stats["sent" if ok else "send_failed"] += 1
        return ok

    async def _send(self, port, data, confirmed, timeout_ms):
        line = await self._send_line(port, data, confirmed)
        if line is None:
            return False
        wait = self.busy_wait_ms
        r = None
        for n in range(self.busy_retries + 1):
            self._evq.clear()
            self._carry = self._armed
            r = await self._cmd(line)
            ms = self._busy(r)
            if not ms:
                break
            # Duty cycle or an open receive window: it will pass.
            self.stats["busy"] += 1
            if n < self.busy_retries:
                await self._pause(max(wait, ms))
                wait *= 2
        if not self._ok(r):
            self._carry = 0
            if r is not None and self._joined and self._not_joined(r):
                self._rebooted(r)
            return False
        self._armed &= ~self._carry  # the MAC requests went out with this uplink
        if confirmed:
            got = await self._next_event((EV_CONF_OK, EV_CONF_FAILED, EV_REBOOT), timeout_ms)
            if got == EV_CONF_FAILED:
                self.last_error = "no acknowledgement"
            ok = got == EV_CONF_OK
        else:
            got = await self._next_event((EV_TX_DONE, EV_REBOOT), timeout_ms)
            ok = got == EV_TX_DONE
        self._carry = 0
        if got == EV_REBOOT:
            self.last_error = "modem restarted"
        elif got == 0:
            self.stats["timeouts"] += 1
            self.last_error = "timeout: no send result"
        return ok

    async def _request(self, req, wait_s, timeout_s):
        """Arm a MAC request for the next uplink. An application send() within
        wait_s carries it; else a one-byte uplink on mac_port does."""
        async with self._lock:
            if not self._ok(await self._cmd(self._request_line(req))):
                return False
            self._armed |= req
        if wait_s > 0:
            await self._wait(lambda: not self._armed & req, int(wait_s * 1000))
        if self._armed & req:
            self.stats["mac_uplinks"] += 1
            return await self.send(self.mac_port, b"\x00", False, timeout_s)
        return True

    async def link_check(self, wait_s=0, timeout_s=30):
        """LinkCheckReq: (margin_db, gateway_count) from the network's answer,
        or None (no answer, uplink lost, not joined)."""
        n = self._link_n
        if not await self._request(REQ_LINK, wait_s, timeout_s):
            return None
        await self._wait(lambda: self._link_n != n, self.mac_wait_ms)
        return self._link if self._link_n != n else None

    async def network_time(self, wait_s=0, timeout_s=30):
        """DeviceTimeReq: the network's time (unix seconds, UTC) as the modem
        holds it after the answer, or None."""
        n = self._time_n
        if not await self._request(REQ_TIME, wait_s, timeout_s):
            return None
        await self._wait(lambda: self._time_n != n, self.mac_wait_ms)
        if self._time_n == n or not self._time_ok:
            return None
        async with self._lock:
            return await self._read_time()

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


def _never():
    return False
