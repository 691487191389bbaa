# Driver for the Seeed Wio-E5 / LoRa-E5 LoRaWAN modem (Seeed AT firmware).
#
# Every answer names its command: `AT+DR=5` -> `+DR: DR5`, errors as
# `+DR: ERROR(-1)`; there is no OK line, so the final line of a command is
# the first one that starts with "+<COMMAND>:" (AtModem._fin). Join and send
# answer at once (`+JOIN: Start`, `+MSGHEX: Start`) and then keep printing
# under the same prefix until `... Done`; those lines are events here. The
# flows are in at.py; this file spells them in the Seeed dialect
# (LoRa-E5 AT Command Specification):
#
#   AT+MSGHEX="0102"               +MSGHEX: Start
#                                  +MSGHEX: PORT: 10; RX: "0708AB"   (a downlink, if any)
#                                  +MSGHEX: RXWIN1, RSSI -70, SNR 8.0
#                                  +MSGHEX: Link 15, 1               (after AT+LW=LCR)
#                                  +MSGHEX: Done
#
# Older firmware puts spaces between the hex bytes of a downlink
# (RX: "07 08 AB"); both are understood. Downlinks outside an uplink
# (Class C) come with any of the +MSG/+MSGHEX/+CMSG/+CMSGHEX prefixes.

from binascii import hexlify

from .at import (AtModem, ints, unix, EV_JOINED, EV_JOIN_FAILED, EV_JOIN_DONE, EV_TX_DONE,
                 EV_CONF_OK, EV_CONF_FAILED, REQ_LINK, REQ_TIME)

_MSG = ("+MSGHEX: ", "+CMSGHEX: ", "+MSG: ", "+CMSG: ")
# Answers that mean the command did not do its job.
_FAILED = ("ERROR", "busy", "join network first", "No free channel", "No band", "DR error",
           "Length error")


class WioE5(AtModem):

    def __init__(self, uart, log=None):
        super().__init__(uart, log)
        self._acked = False  # "ACK Received" seen for the uplink in progress
        self._rxwin = False  # the network answered in a receive window of it

    # -- line classification ---------------------------------------------

    def _final_for(self, line):
        i = line.find("=")
        name = line[3:] if i < 0 else line[3:i]
        return "+" + (name.upper() or "AT") + ":"

    def _is_final(self, line) -> bool:
        return self._fin is not None and line.startswith(self._fin)

    def _stray(self, line) -> bool:
        # AT+DR=<n> answers "+DR: DR5" and then "+DR: EU868 DR5 SF7 BW125K".
        return self._fin is not None and line.startswith(self._fin)

    def _ok(self, r) -> bool:
        if r is None:
            return False
        for f in _FAILED:
            if f in r:
                return False
        return True

    def _busy(self, r) -> int:
        if r is None:
            return 0
        if "busy" in r or "No free channel" in r:
            return 1
        if "No band" in r:
            # "No band in 2486ms": the duty cycle frees a channel then.
            n = ints(r)
            return n[0] if n else 1
        return 0

    def _not_joined(self, r) -> bool:
        return "join network first" in r

    def _event(self, line) -> bool:
        if line.startswith("+JOIN: "):
            e = line[7:]
            if e == "Network joined":
                self._push(EV_JOINED)
            elif e == "Join failed":
                self.stats["join_failed"] += 1
                self._push(EV_JOIN_FAILED)
            elif e == "Done":
                self._push(EV_JOIN_DONE)
            elif not (e == "NORMAL" or e.startswith("NetID")):
                return False  # Start, Joined already, busy, errors: the answer
            return True
        if line.startswith("+INFO:") or line.startswith("+LOG:"):
            return True  # the modem's own chatter ("+INFO: Input timeout")
        i = line.find(": ")
        if i < 0 or line[:i + 2] not in _MSG:
            return False
        e = line[i + 2:]
        if e == "Done":
            c = self._carry
            if c & REQ_TIME:
                # DeviceTimeAns came in the receive window, if anything did.
                self._time_answer(self._rxwin)
            if c & REQ_LINK:
                self._link_answer(None)  # no "Link" line: no answer
            self._carry = 0
            if line[1] == "C":
                self._push(EV_CONF_OK if self._acked else EV_CONF_FAILED)
            else:
                self._push(EV_TX_DONE)
        elif e == "ACK Received":
            self._acked = True
        elif e.startswith("PORT:"):
            # PORT: 100; RX: "07080708" (older firmware: "07 08 07 08")
            j = e.find(";")
            q = e.find('"')
            k = e.rfind('"')
            if j < 0 or k <= q:
                self._unknown(line)
            else:
                self._downlink(line, e[5:j].strip(), e[q + 1:k].replace(" ", ""))
        elif e.startswith("RXWIN"):
            self._rxwin = self._meta(line, e)
        elif e.startswith("Link "):
            n = ints(e)
            if len(n) < 2:
                self._unknown(line)
            else:
                self._carry &= ~REQ_LINK
                self._link_answer((n[0], n[1]))
        elif not (e == "Wait ACK" or e == "FPENDING"):
            return False  # Start, busy, errors: the answer to the command
        return True

    # -- the steps, in the Seeed dialect -----------------------------------

    async def _read_dev_eui(self):
        # +ID: DevEui, 2C:F7:F1:20:32:30:84:63
        r = await self._cmd("AT+ID=DevEui")
        if r is None or not self._ok(r):
            return None
        return r[r.find(",") + 1:].strip().replace(":", "")

    async def _set_keys(self, join_eui, app_key):
        await self._must('AT+ID=AppEui,"%s"' % hexlify(join_eui).decode())
        await self._must('AT+KEY=APPKEY,"%s"' % hexlify(app_key).decode())

    async def _configure(self, region, dr, device_class, confirmed, adr):
        # Switching the mode resets the LoRaWAN stack: only when needed.
        r = await self._cmd("AT+MODE")
        if r is None or "LWOTAA" not in r:
            await self._must("AT+MODE=LWOTAA")
            self._joined = False
        await self._must("AT+DR=" + region)
        await self._must("AT+ADR=" + ("ON" if adr else "OFF"))
        await self._must("AT+DR=%d" % dr)
        await self._must("AT+CLASS=" + device_class)
        # Confirmed or not is chosen per uplink (AT+CMSGHEX / AT+MSGHEX).

    async def _join_once(self, retries, interval_s, timeout_ms):
        # One AT+JOIN is one join request; the modem does not retry by itself.
        for k in range(retries + 1):
            self._evq.clear()
            r = await self._cmd("AT+JOIN")
            if r is None:
                return False
            if r.endswith("Joined already"):
                return True
            if "busy" in r:
                self.stats["busy"] += 1  # a join is running: wait for its outcome
            elif not r.endswith("Start"):
                self._say("modem: AT+JOIN -> %s" % r)
                return None
            got = await self._next_event((EV_JOINED, EV_JOIN_DONE), timeout_ms)
            if got == EV_JOINED:
                return True
            if got == 0:
                self.stats["timeouts"] += 1
                self.last_error = "timeout: no join result"
                return False
            if k < retries:
                await self._pause(int(interval_s * 1000))
        return False

    async def _send_line(self, port, data, confirmed):
        if self._port != port:
            if not self._ok(await self._cmd("AT+PORT=%d" % port)):
                return None
            self._port = port
        self._acked = False
        self._rxwin = False
        return '%s="%s"' % ("AT+CMSGHEX" if confirmed else "AT+MSGHEX", hexlify(data).decode())

    def _request_line(self, req):
        # Buffered MAC commands: they go with the next MSG/MSGHEX uplink.
        return "AT+LW=LCR" if req == REQ_LINK else "AT+LW=DTR"

    async def _read_time(self):
        # +RTC: 2026-04-30 12:30:49 (UTC: the driver sets no time zone)
        r = await self._cmd("AT+RTC")
        n = ints(r or "")
        if not self._ok(r) or len(n) < 6:
            return None
        t = unix(n[0], n[1], n[2], n[3], n[4], n[5])
        if t is None:
            self._unknown(r)
        return t
