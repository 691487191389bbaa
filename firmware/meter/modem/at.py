# The line protocol shared by AT-command LoRaWAN modems: one reader that turns
# UART bytes into lines and dispatches each, one command at a time with a
# timeout, and waits that keep reading so no line is lost while waiting.
#
# A modem dialect (rak3172.py) subclasses AtModem and says which lines are
# asynchronous events and which end a command. Only uart.any/readline/write
# are used, polled from asyncio, so a real machine.UART with timeout=0 and the
# simulated one (hardware/sim/mpy/sim_uart.py) behave the same.

import asyncio
from time import ticks_ms, ticks_diff

from micropython import const

_POLL_MS = const(10)  # a 115200 baud UART fills about 115 bytes in that time
_LINE_MAX = const(640)  # AT+SEND / downlink lines for a 242-byte payload are ~500
_LINES_PER_PUMP = const(16)  # bound the work done in one call


class ModemError(Exception):
    """The modem did not do what a step needs; the message names the command
    and the answer (or the timeout)."""


class AtModem:
    # Instance-tunable: a test or a slow modem can change them.
    cmd_timeout_ms = 1500

    def __init__(self, uart, log=None):
        self._uart = uart
        self._log = log
        # Partial line carried between pumps: a real UART with timeout=0
        # returns what it has, which may end mid-line.
        self._part = bytearray(_LINE_MAX)
        self._plen = 0
        self._overlong = False
        self._pending = None  # the command line awaiting its final result
        self._result = None
        self._values = []  # lines between a command and its final result
        self._lock = asyncio.Lock()
        self.last_error = None
        self.stats = {"unknown_lines": 0, "timeouts": 0, "overlong_lines": 0}

    # -- to be provided by the dialect ------------------------------------

    def _event(self, line) -> bool:
        """Handle `line` if it is an asynchronous event; True when consumed."""
        return False

    def _is_final(self, line) -> bool:
        """True when `line` ends the pending command (success or error)."""
        return line == "OK" or line == "ERROR"

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
        if self._pending is not None:
            if self._is_final(line):
                self._result = line
            elif line != self._pending:  # an echo (ATE) is not an answer
                self._values.append(line)
            return
        self._unknown(line)

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

    async def _cmd(self, line, timeout_ms=0, keep_values=False):
        """Send one command; return its final result line, or None on timeout.
        With keep_values the lines between the command and its result stay in
        self._values for the caller; otherwise they are unexpected."""
        self._pump()  # a stale line must not be taken for this command's answer
        self._pending = line
        self._result = None
        self._values = []
        self._uart.write(line)
        self._uart.write(b"\r\n")
        ok = await self._wait(self._answered, timeout_ms or self.cmd_timeout_ms)
        self._pending = None
        if not ok:
            self.stats["timeouts"] += 1
            self.last_error = "timeout: " + line
            self._say("modem: no answer to %s" % line)
            return None
        if not keep_values:
            for v in self._values:
                self._unknown(v)
        if self._result != "OK":
            self.last_error = "%s: %s" % (line, self._result)
        return self._result

    def _answered(self):
        return self._result is not None

    async def _query(self, name, timeout_ms=0):
        """`name=?` -> the value as a string, or None. Answers come as
        `name=value` (RUI3) or as the bare value (older firmware)."""
        r = await self._cmd(name + "=?", timeout_ms, True)
        if r != "OK":
            return None
        # Unsolicited lines (a boot banner) may precede the answer: prefer the
        # line that names the command, else the bare value just before OK.
        prefix = name + "="
        vals = self._values
        pick = -1
        for i in range(len(vals)):
            if vals[i].startswith(prefix):
                pick = i
                break
        if pick < 0 and vals:
            pick = len(vals) - 1
        for i in range(len(vals)):
            if i != pick:
                self._unknown(vals[i])
        if pick < 0:
            return None
        v = vals[pick]
        return v[len(prefix):] if v.startswith(prefix) else v


def _never():
    return False
