# The simulated board's UART: a machine.UART look-alike whose wires end in a
# TCP connection to the modem simulator (hardware/sim/modem_sim.py).
#
# Runs in the MicroPython unix port as part of the simulated hardware, never on
# a meter. The harness calls attach() before the firmware starts, saying where
# the modem simulator listens and which modem chip (DevEUI, JoinEUI, AppKey)
# sits on that UART, and which AT dialect it speaks; the first line on the
# connection tells the simulator the same thing. When the simulated board
# (simhw) is loaded, a `#SIM-TIME <unix>` line before each command line gives
# the simulator the true time outside the board, which the network answers a
# DeviceTimeReq with. The firmware never sees these lines: they only go
# modem-ward.
#
# Behaves like machine.UART with timeout=0: every call returns at once. A
# simulator that goes away leaves a silent UART, as a modem without power
# would: reads return None, writes vanish, nothing raises into the firmware.

import socket
import sys

try:
    import select
except ImportError:  # only needed for timeout > 0
    select = None

try:
    from time import ticks_ms, ticks_diff
except ImportError:  # CPython, for tools that import this module to read it
    from time import monotonic as _mono

    def ticks_ms():
        return int(_mono() * 1000)

    def ticks_diff(a, b):
        return a - b

_EAGAIN = (11, 35)  # Linux, BSD/macOS
_IPPROTO_TCP = 6
_TCP_NODELAY = 1
_RX_LIMIT = 8192  # beyond this the "FIFO" overflows and new bytes are dropped
_SEND_TRIES = 200  # bounded retries of a full socket buffer (about 0.2 s)

try:
    from simhw import true_unix as _true_unix
except ImportError:  # not on the simulated board: no time stamps
    _true_unix = None

DIALECTS = ("rak3172", "wioe5")

_attached = {}


def attach(uart_id, host, port, dev_eui_hex, join_eui_hex, app_key_hex, dialect="rak3172"):
    """Wire UART `uart_id` to the modem simulator at host:port, as the modem
    chip with these identities speaking `dialect` (rak3172 or wioe5). Called by
    the harness before the firmware runs."""
    for name, value, n in (("dev_eui_hex", dev_eui_hex, 16),
                           ("join_eui_hex", join_eui_hex, 16),
                           ("app_key_hex", app_key_hex, 32)):
        if len(value) != n or not _is_hex(value):
            raise ValueError("sim_uart.attach: %s must be %d hex digits, got %r" % (name, n, value))
    if dialect not in DIALECTS:
        raise ValueError("sim_uart.attach: dialect %r, want one of %s" % (dialect, DIALECTS))
    _attached[uart_id] = (host, int(port), dev_eui_hex.lower(), join_eui_hex.lower(),
                          app_key_hex.lower(), dialect)


def detach(uart_id):
    _attached.pop(uart_id, None)


def _is_hex(s):
    for c in s:
        if c not in "0123456789abcdefABCDEF":
            return False
    return True


def _warn(msg):
    # Diagnostics of the simulated hardware go to stderr, out of the
    # firmware's console output.
    try:
        sys.stderr.write("sim_uart: " + msg + "\n")
    except Exception:  # noqa: BLE001 - a diagnostic must never break the board
        pass


class TcpUart:
    def __init__(self, id, baudrate=115200, tx=None, rx=None, timeout=0, **kw):
        cfg = _attached.get(id)
        if cfg is None:
            # A harness mistake, not a firmware condition: say so loudly.
            raise ValueError("UART(%r): nothing attached; call sim_uart.attach(%r, ...) "
                             "before the firmware opens it" % (id, id))
        self.id = id
        self.baudrate = baudrate
        self.timeout = timeout
        self._host, self._port, dev_eui, join_eui, app_key, dialect = cfg
        self._rx = bytearray()
        self._bol = True  # the next byte written starts a line
        self._sock = None
        self.connected = False
        self.overruns = 0  # bytes dropped because the receive buffer was full
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.connect(socket.getaddrinfo(self._host, self._port)[0][-1])
            try:
                # Bytes on a UART leave at once; without this, Nagle plus the
                # peer's delayed ACK hold a command's "\r\n" back ~40 ms.
                s.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
            except OSError:
                pass
            s.setblocking(False)
            self._sock = s
            self.connected = True
        except OSError as e:
            _warn("UART(%r): no modem simulator at %s:%d (%s); the UART stays silent"
                  % (id, self._host, self._port, e))
            return
        self._send(("#SIM-ATTACH deveui=%s joineui=%s appkey=%s dialect=%s\r\n"
                    % (dev_eui, join_eui, app_key, dialect)).encode())

    def init(self, baudrate=115200, timeout=None, **kw):
        self.baudrate = baudrate
        if timeout is not None:
            self.timeout = timeout

    # -- plumbing --------------------------------------------------------

    def _lost(self, why):
        if self.connected:
            _warn("UART(%r): modem simulator connection lost (%s)" % (self.id, why))
        self.connected = False
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _fill(self):
        """Move whatever the socket holds into the receive buffer."""
        while self._sock is not None:
            try:
                chunk = self._sock.recv(512)
            except OSError as e:
                if e.args and e.args[0] in _EAGAIN:
                    return
                self._lost(e)
                return
            if not chunk:
                self._lost("closed by peer")
                return
            room = _RX_LIMIT - len(self._rx)
            if len(chunk) > room:
                self.overruns += len(chunk) - max(room, 0)
                chunk = chunk[:max(room, 0)]
            self._rx.extend(chunk)

    def _wait(self, ready):
        """With timeout > 0, wait until ready() or the timeout; timeout 0 just polls."""
        self._fill()
        if self.timeout <= 0 or ready() or self._sock is None or select is None:
            return
        start = ticks_ms()
        p = select.poll()
        p.register(self._sock, select.POLLIN)
        while not ready() and self._sock is not None:
            left = self.timeout - ticks_diff(ticks_ms(), start)
            if left <= 0:
                break
            p.poll(left)
            self._fill()

    def _send(self, data):
        sent = 0
        tries = 0
        mv = memoryview(data)
        while sent < len(data) and self._sock is not None:
            try:
                n = self._sock.send(mv[sent:])
            except OSError as e:
                if e.args and e.args[0] in _EAGAIN and tries < _SEND_TRIES:
                    tries += 1
                    if select is not None:
                        select.poll().poll(1)
                    continue
                self._lost(e)
                break
            sent += n

    def _take(self, n):
        out = bytes(self._rx[:n])
        self._rx = self._rx[n:]
        return out

    # -- machine.UART API ------------------------------------------------

    def any(self):
        self._fill()
        return len(self._rx)

    def read(self, n=None):
        self._wait(lambda: len(self._rx) >= (n or 1))
        if not self._rx:
            return None
        return self._take(len(self._rx) if n is None else min(n, len(self._rx)))

    def readinto(self, buf, nbytes=None):
        want = len(buf) if nbytes is None else min(nbytes, len(buf))
        self._wait(lambda: len(self._rx) >= want)
        n = min(want, len(self._rx))
        if n == 0:
            return None
        buf[:n] = self._rx[:n]
        self._rx = self._rx[n:]
        return n

    def readline(self):
        """A complete line including its b'\\n', or None while there is none."""
        self._wait(lambda: self._rx.find(b"\n") >= 0)
        i = self._rx.find(b"\n")
        if i < 0:
            return None
        return self._take(i + 1)

    def write(self, buf):
        # A real UART clocks the bytes out whether or not anyone listens.
        if self._sock is not None:
            if _true_unix is None:
                self._send(buf)
            else:
                self._send_stamped(buf)
        return len(buf)

    def _send_stamped(self, buf):
        """Send buf, putting a #SIM-TIME line before each line it starts (the
        firmware may write a command and its line end in separate calls)."""
        buf = buf.encode() if isinstance(buf, str) else bytes(buf)
        start = 0
        n = len(buf)
        while start < n:
            i = buf.find(b"\n", start)
            end = n if i < 0 else i + 1
            piece = buf[start:end]
            if self._bol and piece.strip():
                self._send(("#SIM-TIME %.3f\r\n" % _true_unix()).encode())
            self._send(piece)
            self._bol = i >= 0
            start = end

    def flush(self):
        pass

    def txdone(self):
        return True

    def deinit(self):
        self.connected = False  # a deliberate close is not a lost connection
        self._lost("deinit")
        self._rx = bytearray()
