# The meter's radio side: readings in, signed bundles out, commands back.
#
#   on_reading   (metering task, at each interval boundary) stores the
#                reading in the flash outbox at once: from then on a power
#                cut cannot lose it.
#   run          (its own asyncio task) brings the modem up and joins, seals
#                readings into bundles and signs them in short slices, sends
#                the outbox oldest first inside the airtime budget and the
#                duty cycle, watches the link with every n-th bundle
#                confirmed, keeps the clock synced (DeviceTimeReq), and
#                executes authenticated downlink commands.
#
# docs/protocol.md ("Delivery: nothing lost") describes the whole scheme;
# docs/firmware.md the states.

import json
import time
from random import getrandbits

import asyncio
from micropython import const

from meter import airtime, frame, identity, lorawan, store
from meter.log import log

_POLL_MS = const(200)
_SIGN_SLICE_MS = const(20)  # a tenth of a 10-cycle block at 50 Hz
_RETRY_MS = const(1000)
_RETRY_MAX_MS = const(60000)
_PROBE_MIN_MS = const(60000)  # link down: first confirmed probe after a minute
# (or an interval, if shorter), doubling up to an hour (or four intervals).
_PROBE_MAX_MS = const(3600000)
_CMD_PATH = "command.json"


def _hex(b):
    return "".join("%02x" % x for x in b)


class Uplink:
    def __init__(self, app, modem, outbox):
        self.app = app
        self.modem = modem
        self.outbox = outbox
        self.cfg = app.cfg
        self.dev_eui = None
        self.joined = False
        self.link_up = True
        # Last seq of the last bundle the network acknowledged. After a reboot
        # it is taken to be the last bundle sent before it (the gateway's
        # resend requests cover one that was lost), so a missing ACK rewinds
        # hours, not the whole ring.
        nxt = outbox.next_to_send()
        self.acked_seq = nxt[0] - 1 if nxt else outbox.last_seq()
        # Times below are App.board_ms(): the sample clock, not ticks_ms.
        self.hold_until = 0  # before this a fresh bundle waits (jitter)
        self.probe_ms = 0
        self.next_sync = 0  # when the next DeviceTimeReq is due
        self.open = [tuple(r) for r in outbox.open_readings()]
        self.n_plan = 1
        self.budget = airtime.Budget(app.cfg["airtime_s_day"],
                                     lorawan.DUTY_CYCLE[app.cfg["region"]])
        self._since_confirmed = 0
        self._nacks = 0  # confirmed sends in a row without an acknowledgement
        self._cmd_counter = 0
        if store.exists(_CMD_PATH):
            try:
                self._cmd_counter = json.loads(store.read(_CMD_PATH))["counter"]
            except (ValueError, KeyError):
                log("uplink: %s unreadable, command counter restarts at 0" % _CMD_PATH)
        self.cmd_key = identity.command_key()
        self.stats = {"bundles": 0, "frames": 0, "sent": 0, "send_failed": 0, "link_down": 0,
                      "probes": 0, "airtime_ms": 0, "budget_waits": 0, "time_syncs": 0,
                      "commands": 0, "commands_rejected": 0, "rejoins": 0}
        self.replan()

    # ---------------------------------------------------------- planning

    def replan(self):
        """Bundle size and budget for the current data rate and interval."""
        cfg = self.cfg
        region = cfg["region"]
        dr = self.modem.dr if getattr(self.modem, "dr", None) is not None else cfg["dr"]
        self.n_plan = airtime.plan(region, dr, cfg["interval_s"], cfg["airtime_s_day"],
                                   cfg["bundle_max"])
        log("uplink: %s DR%d, %d reading(s) per bundle" % (region, dr, self.n_plan))

    # ---------------------------------------------------------- readings

    def on_reading(self, seq, t_end, imp, exp, flags):
        self.outbox.add_reading(seq, t_end, imp, exp, flags)
        self.open.append((seq, t_end, imp, exp, flags))

    def _due(self):
        """How many open readings to seal now (0: wait for more)."""
        o = self.open
        for k in range(1, len(o)):
            if not frame.can_follow(o[k - 1], o[k]):
                return k  # a clock step or a restart ends the bundle before it
        return len(o) if len(o) >= self.n_plan else 0

    async def _seal(self, k):
        readings = self.open[:k]
        body = frame.encode_body(readings)
        signer = self.app.identity.signer(frame.signed_message(self.dev_eui, body))
        t0 = time.ticks_ms()
        while not signer.step():
            # Sign in slices well inside one block's time: the timer keeps
            # filling the other half of the sample buffer meanwhile, and the
            # metering loop takes its block between slices.
            if time.ticks_diff(time.ticks_ms(), t0) >= _SIGN_SLICE_MS:
                await asyncio.sleep_ms(0)
                t0 = time.ticks_ms()
        data = frame.assemble(body, signer.signature)
        self.outbox.add_bundle(readings[0][0], readings[-1][0], data)
        self.open = self.open[k:]
        self.stats["bundles"] += 1
        j = self.cfg["jitter_s"]
        if j:
            self.hold_until = self.app.board_ms() + getrandbits(20) % (j * 1000)

    # ------------------------------------------------------------- modem

    async def _setup(self):
        m = self.modem
        cfg = self.cfg
        wait = _RETRY_MS
        while True:
            try:
                if await m.probe():
                    if self.dev_eui is None:
                        self.dev_eui = await m.dev_eui()
                    await m.configure(region=cfg["region"], dr=cfg["dr"],
                                      device_class=cfg["device_class"], confirmed=False)
                    if await m.join():
                        break
                    log("uplink: join failed, retry in %d ms" % wait)
                else:
                    log("uplink: modem does not answer, retry in %d ms" % wait)
            except Exception as e:  # ModemError, or a modem that answers nonsense
                log("uplink: modem setup: %s" % e)
            await asyncio.sleep_ms(wait)
            wait = min(wait * 2, _RETRY_MAX_MS)
        self.joined = True
        self.next_sync = self.app.board_ms()
        self.replan()
        log("uplink: joined as %s" % _hex(self.dev_eui))

    async def run(self):
        m = self.modem
        await self._setup()
        while True:
            self._downlinks()
            if getattr(m, "needs_setup", False):
                self.joined = False
                self.stats["rejoins"] += 1
                log("uplink: modem restarted, setting it up again")
                await self._setup()
            k = self._due()
            if k:
                await self._seal(k)
                continue
            if self.app.board_ms() >= self.next_sync:
                await self._sync_time()
                continue
            if await self._send_next():
                continue
            await asyncio.sleep_ms(_POLL_MS)

    async def _sync_time(self):
        t = None
        try:
            t = await self.modem.network_time()
        except Exception as e:
            log("uplink: network time: %s" % e)
        if t:
            self.app.set_time(t)
            self.stats["time_syncs"] += 1
            wait = self.cfg["time_sync_s"] * 1000
        else:
            wait = 600000  # ten minutes: the answer rides on a later uplink
        self.next_sync = self.app.board_ms() + wait

    async def _send_next(self):
        """Send the next bundle if the budget, duty cycle and jitter allow;
        True when something was attempted."""
        item = self.outbox.next_to_send()
        if item is None:
            return False
        now = self.app.board_ms()
        if self.link_up and self.hold_until > now:
            return False
        first, last, data = item
        m = self.modem
        frames = frame.fragment(data, m.max_payload())
        region = self.cfg["region"]
        dr = m.dr
        # The link check: every n-th bundle, every probe while down, and the
        # retry after a missing ACK ask for an acknowledgement.
        confirmed = (not self.link_up) or self._nacks > 0 \
            or self._since_confirmed + 1 >= self.cfg["confirm_every"]
        ok = True
        for i in range(len(frames)):
            f = frames[i]
            toa = lorawan.time_on_air_ms(len(f), region, dr)
            wait = self.budget.wait_ms(self.app.board_ms(), toa)
            if wait > 0:
                self.stats["budget_waits"] += 1
                if i == 0:
                    # Nothing sent of this bundle yet: come back later,
                    # meanwhile downlinks and sealing go on.
                    await asyncio.sleep_ms(min(wait, 1000))
                    return True
                await self._pause(wait)
            ok = await m.send(frame.PORT_READING, f,
                              confirmed=confirmed and i == len(frames) - 1)
            self.budget.spend(self.app.board_ms(), toa)
            self.stats["airtime_ms"] += int(toa)
            self.stats["frames"] += 1
            if not ok:
                break
        if ok:
            self.outbox.sent(first)
            self.stats["sent"] += 1
            if confirmed:
                self._since_confirmed = 0
                self._nacks = 0
                self.acked_seq = last
                if not self.link_up:
                    log("uplink: link is back, sending the backlog oldest first")
                self.link_up = True
                self.probe_ms = 0
            else:
                self._since_confirmed += 1
            return True
        self.stats["send_failed"] += 1
        err = m.last_error or ""
        if confirmed and "acknowledg" in err:
            # No ACK: what went out unconfirmed since the last ACK may be lost
            # too, so it all goes again. One missing ACK may be one lost frame:
            # try again at once; a second in a row means the link is down.
            self._nacks += 1
            self.outbox.rewind(self.acked_seq + 1)
            if self._nacks < 2:
                return True
            if self.link_up:
                self.stats["link_down"] += 1
                log("uplink: no acknowledgement twice, link down; rewound to seq %d"
                    % (self.acked_seq + 1))
            self.link_up = False
            self.stats["probes"] += 1
            iv_ms = self.cfg["interval_s"] * 1000
            self.probe_ms = min(self.probe_ms * 2, _PROBE_MAX_MS, 4 * iv_ms) if self.probe_ms \
                else min(_PROBE_MIN_MS, iv_ms)
            await self._pause(self.probe_ms)
        else:
            log("uplink: send failed (%s)" % err)
            await asyncio.sleep_ms(_RETRY_MS)
        return True

    async def _pause(self, ms):
        """Wait, still taking downlinks and sealing new readings (the outbox
        holds them), so a long probe backoff delays nothing but the radio."""
        end = self.app.board_ms() + ms
        while self.app.board_ms() < end:
            self._downlinks()
            k = self._due()
            if k:
                await self._seal(k)
            else:
                await asyncio.sleep_ms(_POLL_MS)

    # ---------------------------------------------------------- commands

    def _downlinks(self):
        while True:
            d = self.modem.downlink()
            if d is None:
                return
            port, data = d
            if port == frame.PORT_COMMAND:
                self.command(data)
            else:
                log("uplink: ignored a %d-byte downlink on port %d" % (len(data), port))

    def command(self, data):
        """Check and run one downlink command; True when it ran."""
        reason = None
        c = None
        if self.cmd_key is None:
            reason = "no command key provisioned"
        else:
            try:
                c = frame.decode_command(self.cmd_key, self.dev_eui, data)
            except frame.FrameError as e:
                reason = "%s: %s" % (e.reason, e.message)
        if c is not None:
            now = self.app.unix_time()
            if c.counter <= self._cmd_counter:
                reason = "replay: counter %d not above %d" % (c.counter, self._cmd_counter)
            elif c.expires and self.app.synced and now > c.expires:
                reason = "expired %d s ago" % (now - c.expires)
            else:
                try:
                    self._run(c)
                except ValueError as e:
                    reason = "refused: %s" % e
        if c is not None and (reason is None or not reason.startswith("replay")):
            # Spend the counter even when the command is refused: the same
            # bytes must not be tried again.
            self._cmd_counter = c.counter
            store.write_atomic(_CMD_PATH, json.dumps({"counter": c.counter}).encode())
        if reason is not None:
            self.stats["commands_rejected"] += 1
            log("command refused (%s)" % reason)
            return False
        self.stats["commands"] += 1
        return True

    def _run(self, c):
        op = c.opcode
        a = c.args
        log("command %d: %s %r" % (c.counter, c.name, a))
        if op == frame.OP_RESEND:
            n = self.outbox.request(a[0], a[0] + a[1] - 1)
            log("resend: %d bundle(s) queued for seq %d..%d" % (n, a[0], a[0] + a[1] - 1))
        elif op == frame.OP_TIME:
            self.app.set_time(a[0])
        elif op == frame.OP_INTERVAL:
            self.app.set_interval(a[0])
            self.replan()
        elif op == frame.OP_RELAY:
            self.app.set_relay(a[0], a[1])
        else:
            raise ValueError("opcode %d not supported" % op)
