# Driver for the RAKwireless RAK3172 LoRaWAN modem (RUI3 AT firmware).
#
# Commands answer OK or AT_<reason>; join and send results arrive later as
# "+EVT:" lines; downlinks may arrive at any time (Class C), also while a
# command is waiting, so one line reader (AtModem._pump) files every line
# where it belongs and nothing is lost. The flows are in at.py; this file
# spells them in RUI3.
#
# RUI3 has printed events in two formats over its releases (docs/modem.md):
#   +EVT:JOIN FAILED                    +EVT:JOIN_FAILED_RX_TIMEOUT
#   +EVT:RX_1, RSSI -70, SNR 8          +EVT:RX_1:-70:8:UNICAST:2:0102
#   +EVT:2:0102
#   +EVT:LINKCHECK:0,21,1,-60,11        +EVT:LINKCHECK:0:21:1:-60:11
#   LTIME: 00h37m58s 2018-11-14         AT+LTIME=15h08m55s on 08/17/2026
# All are understood. The RUI3 AT Command Manual is the reference for the
# commands; band numbers are those of AT+BAND.

from binascii import hexlify

from .at import (AtModem, ModemError, ints, unix, EV_JOINED, EV_JOIN_FAILED, EV_TX_DONE,
                 EV_CONF_OK, EV_CONF_FAILED, REQ_LINK)

BANDS = {"EU868": 4, "US915": 5}  # AT+BAND numbers of the regions meter.lorawan knows

_BUSY = "AT_BUSY_ERROR"


class Rak3172(AtModem):
    _interval_min = 7  # AT+JOIN's own limit

    def __init__(self, uart, log=None):
        super().__init__(uart, log)
        self._rx_meta = False  # old format: an RX header came, its payload line follows

    # -- line classification ---------------------------------------------

    def _is_final(self, line) -> bool:
        return line == "OK" or line.startswith("AT_")

    def _busy(self, r) -> int:
        return 1 if r == _BUSY else 0

    def _not_joined(self, r) -> bool:
        return r == "AT_NO_NETWORK_JOINED"

    def _event(self, line) -> bool:
        if not line.startswith("+EVT:"):
            if line.startswith("RAKwireless") or line.startswith("Current Work Mode"):
                # The power-up banner: after a setup, the modem restarted by itself.
                self._rebooted("banner")
                return True
            return line.startswith("-----")  # the banner's rule line
        e = line[5:].strip()
        if e == "JOINED":
            self._push(EV_JOINED)
        elif e.startswith("JOIN FAILED") or e.startswith("JOIN_FAILED"):
            self.stats["join_failed"] += 1
            self._push(EV_JOIN_FAILED)
        elif e == "TX_DONE":
            self._push(EV_TX_DONE)
        elif e.startswith("SEND"):
            e = e.replace(" ", "_")
            if e == "SEND_CONFIRMED_OK":
                self._push(EV_CONF_OK)
            elif e.startswith("SEND_CONFIRMED_FAILED"):
                self._push(EV_CONF_FAILED)
            else:
                self._unknown(line)
        elif e.startswith("RX_"):
            self._rx(line, e)
        elif e.startswith("LINKCHECK"):
            # Y0 (0: answered), margin, gateways, rssi, snr.
            n = ints(e[9:])
            if len(n) < 3:
                self._unknown(line)
            else:
                self._link_answer((n[1], n[2]) if n[0] == 0 else None)
        elif e.startswith("TIMEREQ"):
            self._time_answer(e.endswith("OK"))
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

    def _rx(self, line, e):
        if "," in e:
            # "RX_1, RSSI -70, SNR 8": the payload follows on its own line.
            self._rx_meta = self._meta(line, e)
            return
        # "RX_1:<rssi>:<snr>:UNICAST:<port>:<hex>" (hex may be empty)
        parts = e.split(":")
        try:
            if len(parts) < 6:
                raise ValueError("want 6 fields")
            self.last_rssi = int(parts[1])
            self.last_snr = int(float(parts[2]))
        except ValueError:
            self._unknown(line)
            return
        self._downlink(line, parts[4], parts[5])

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

    # -- the steps, in RUI3 ------------------------------------------------

    async def _read_dev_eui(self):
        return await self._query("AT+DEVEUI")

    async def _set_keys(self, join_eui, app_key):
        await self._must("AT+APPEUI=" + hexlify(join_eui).decode())
        await self._must("AT+APPKEY=" + hexlify(app_key).decode())

    async def _configure(self, region, dr, device_class, confirmed, adr):
        if await self._query("AT+NWM") != "1":
            # The modem restarts into LoRaWAN mode; wait until it answers.
            await self._must("AT+NWM=1")
            await self._pause(self.reboot_ms // 4)
            if not await self._probe(4, self.reboot_ms // 4):
                raise ModemError("no answer after AT+NWM=1 (restart)")
        await self._must("AT+BAND=%d" % BANDS[region])
        # ADR first: with ADR on, the network, not AT+DR, picks the rate.
        await self._must("AT+ADR=%d" % adr)
        await self._must("AT+DR=%d" % dr)
        await self._must("AT+CLASS=" + device_class)
        await self._must("AT+CFM=%d" % confirmed)
        self._cfm = confirmed

    async def _is_joined(self):
        v = await self._query("AT+NJS")
        return None if v is None else v == "1"

    async def _join_once(self, retries, interval_s, timeout_ms):
        # AT+JOIN=1:0:<interval>:<retries>: the modem tries 1 + retries times
        # by itself, printing a failure event after each failed try.
        line = "AT+JOIN=1:0:%d:%d" % (interval_s, retries)
        self._evq.clear()
        r = await self._cmd(line)
        if r == _BUSY:
            # A join sequence is already running: wait for its outcome.
            self.stats["busy"] += 1
            r = "OK"
        if r == "OK":
            if await self._join_outcome(retries + 1, timeout_ms):
                return True
        elif r is not None:
            # AT_PARAM_ERROR and the like will not change by retrying.
            self._say("modem: %s -> %s" % (line, r))
            return None
        # The JOINED line may have been lost: ask for the state.
        return await self._query("AT+NJS") == "1"

    async def _join_outcome(self, tries, timeout_ms):
        fails = [0]
        joined = [False]

        def done():
            while True:
                code = self._take((EV_JOINED, EV_JOIN_FAILED))
                if code == 0:
                    return False
                if code == EV_JOINED:
                    joined[0] = True
                    return True
                fails[0] += 1
                if fails[0] >= tries:
                    return True

        if not await self._wait(done, timeout_ms):
            self.stats["timeouts"] += 1
            self.last_error = "timeout: no join result"
        return joined[0]

    async def _send_line(self, port, data, confirmed):
        # AT+CFM is set only when the wanted mode differs from the last one.
        if self._cfm is not confirmed:
            if await self._cmd("AT+CFM=%d" % confirmed) != "OK":
                return None
            self._cfm = confirmed
        return "AT+SEND=%d:%s" % (port, hexlify(data).decode())

    def _request_line(self, req):
        # 1: once, with the next uplink (the modem then goes back to 0).
        return "AT+LINKCHECK=1" if req == REQ_LINK else "AT+TIMEREQ=1"

    async def _read_time(self):
        # "15h08m55s on 08/17/2026" (RUI3 4.x: month first), "LTIME:
        # 00h37m58s 2018-11-14" (manual), "on 17/08/2026" (day first, when
        # the first field cannot be a month).
        v = await self._query("AT+LTIME")
        n = ints(v or "")
        if len(n) < 6:
            return None
        h, mi, s, a, b, c = n[0], n[1], n[2], n[3], n[4], n[5]
        if a > 31:
            t = unix(a, b, c, h, mi, s)
        elif a > 12:
            t = unix(c, b, a, h, mi, s)
        else:
            t = unix(c, a, b, h, mi, s)
        if t is None:
            self._unknown("AT+LTIME=%s" % v)
        return t
