# The meter application: wires the board, the sampler, the metering core, the
# energy registers, the device identity and the modem into three asyncio
# tasks.
#
#  metering  - never stops: waits for a block of samples, turns it into power
#              and energy, closes a reading at every interval boundary.
#  uplink    - signs closed readings (incrementally, between blocks) and sends
#              them through the modem; keeps them until the modem confirms.
#  modem     - brings the modem up, joins the network, collects downlinks.
#
# Time: the sample clock is the meter's time base. Each block of samples is
# exactly `block / sample_hz` seconds, so energy and interval boundaries do
# not depend on how long the CPU took to process them. Wall time starts from
# the RTC and is kept in seconds since 2000-01-01, a small int on the targets
# until 2034 (unix seconds no longer fit in 31 bits).

import time
from math import sqrt

import asyncio
import machine
from micropython import const

from meter import adc, calibration, config, ctmodels, frame, identity
from meter.boards import load as load_board
from meter.log import log
from meter.metering import Metering
from meter.sampler import Sampler
from meter.state import State

_UNIX_2000 = const(946684800)
_MODEM_POLL_MS = const(200)
_BACKOFF_MAX_MS = const(60000)
_SIGN_SLICE_MS = const(20)  # a tenth of a 10-cycle block at 50 Hz


def rtc_seconds_2000():
    dt = machine.RTC().datetime()  # (year, month, day, weekday, h, m, s, subs)
    t = time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0))
    if time.gmtime(0)[0] != 2000:
        t -= _UNIX_2000
    return t


class App:
    def __init__(self, cfg=None, with_modem=True):
        self.cfg = cfg if cfg is not None else config.load()
        cfg = self.cfg
        b = load_board(cfg["board"])
        self.board = b
        self.has_v = cfg["voltage_channel"]
        adc_i = b.make_adc(b.PIN_CT)
        adc_v = b.make_adc(b.PIN_VT) if self.has_v else None
        lut = adc.dnl_table(b.ADC_DNL_WIDTH) if b.ADC_DNL_WIDTH else None
        # Blocks of about 100 ms: short enough for a responsive loop, long
        # enough that per-block overhead stays small.
        self.block = int(b.SAMPLE_HZ) // 10
        self.sampler = Sampler(adc.reader(adc_i, b.ADC_READ),
                               adc.reader(adc_v, b.ADC_READ) if adc_v is not None else None,
                               b.SAMPLE_HZ, self.block, b.TIMER_ID, b.ADC_SHIFT, lut)
        self.cal = calibration.load()
        self.metering = self._make_metering()
        self.state = State.load(b.energy_store())
        self.identity = identity.load_or_create()
        self.observers = []  # callables(record dict), e.g. the console or the simulator
        self.pending = []  # reading bodies not yet confirmed sent
        self.stats = {"readings": 0, "sent": 0, "send_failed": 0, "dropped": 0,
                      "blocks": 0}
        self.modem = None
        self.dev_eui = None
        self.joined = False
        if with_modem:
            from meter.modem.rak3172 import Rak3172
            uart = machine.UART(b.UART_MODEM, baudrate=b.MODEM_BAUD,
                                tx=machine.Pin(b.PIN_MODEM_TX),
                                rx=machine.Pin(b.PIN_MODEM_RX), timeout=0)
            self.modem = Rak3172(uart, log=log)
        # Wall clock and the interval being accumulated.
        self.boot_s = rtc_seconds_2000()
        self.wall_s = self.boot_s
        self._sub_us = 0  # sample-clock microseconds into the current second
        self._dropped_seen = 0
        self._start_interval(self.wall_s)

    # ------------------------------------------------------------ metering

    def _make_metering(self):
        b = self.board
        cfg = self.cfg
        cal = self.cal
        model = ctmodels.MODELS[cfg["ct_model"]]
        a_per_v = ctmodels.amps_per_volt(cfg["ct_model"], cfg["burden_ohm"] or b.BURDEN_OHM)
        noise = cal["noise_var"] if cal["noise_var"] >= 0.0 else b.ADC_NOISE_VAR
        max_dev = max(b.ADC_MID, b.ADC_MAX - b.ADC_MID) + 4 * b.ADC_DNL_WIDTH
        return Metering(b.SAMPLE_HZ, cfg["mains_hz"], b.ADC_MID, b.ADC_MID,
                        a_per_v * b.ADC_UNIT_V, cfg["vt_v_per_v"] * b.ADC_UNIT_V,
                        cfg["v_nominal"], noise, max_dev, b.ADC_LIN_LO, b.ADC_LIN_HI,
                        ct_table=model["table"], table_hz=50, pair_us=b.ADC_PAIR_US,
                        vt_lead_deg=b.VT_PHASE_DEG, phase_cal_deg=cal["phase_deg"],
                        cycles=cfg["window_cycles"],
                        gain_i=cal["gain_i"], gain_v=cal["gain_v"], i_start=cfg["i_start_a"],
                        expect_export=cfg["expect_export"], i_max=1.25 * model["rated_a"])

    def apply_calibration(self, cal):
        """Store a new calibration and meter with it from the next window on."""
        calibration.save(cal)
        self.cal = cal
        m = self._make_metering()
        old = self.metering
        # Keep the interval being accumulated and the frequency estimate.
        m.iv_t, m.iv_i2, m.iv_v2, m.iv_p, m.iv_s, m.iv_hz, m.iv_status = (
            old.iv_t, old.iv_i2, old.iv_v2, old.iv_p, old.iv_s, old.iv_hz, old.iv_status)
        m.f_est = old.f_est
        self.metering = m

    def _start_interval(self, start):
        iv = self.cfg["interval_s"]
        self._iv_start = start
        self._iv_end = (start // iv + 1) * iv
        r = self.state.registers
        self._iv_e0 = r.import_wh() - r.export_wh()
        self.metering.reset_interval()

    def on_block(self, n):
        """Account one block of n samples (already processed) plus any the
        sampler had to skip: wall time, and energy for the skipped time at the
        latest window's power."""
        period = self.board.SAMPLE_PERIOD_US
        dropped = self.sampler.dropped - self._dropped_seen
        if dropped:
            self._dropped_seen += dropped
            w = self.metering.window
            self.state.registers.add(w.p_w, dropped * period / 1000000)
            n += dropped
        # Whole microseconds of sample clock: exact, and small ints.
        self._sub_us += n * period
        while self._sub_us >= 1000000:
            self._sub_us -= 1000000
            self.wall_s += 1
        self.stats["blocks"] += 1
        self.state.tick(self.wall_s)
        if self.wall_s >= self._iv_end:
            self.close_interval(self._iv_end)

    def close_interval(self, t_end):
        """Snapshot the cumulative registers into a reading frame body."""
        m = self.metering
        t = m.iv_t
        if t <= 0.0:
            return
        st = self.state
        r = st.registers
        st.seq += 1
        irms = sqrt(m.iv_i2 / t)
        vrms = sqrt(m.iv_v2 / t)
        e_net = r.import_wh() - r.export_wh()
        p_w = (e_net - self._iv_e0) * 3600.0 / t
        flags = frame.FLAG_CLOCK_UNSYNCED | m.iv_status
        if self.has_v:
            flags |= frame.FLAG_VOLTAGE_MEASURED
        body = frame.encode_body(
            st.seq, t_end + _UNIX_2000, t_end - self._iv_start, r.import_dwh,
            r.export_dwh, int(irms * 100 + 0.5),
            int(vrms * 10 + 0.5) if self.has_v else 0, flags)
        st.save(self.wall_s)
        if self.modem is not None:
            self.pending.append(body)
        if len(self.pending) > self.cfg["max_pending"]:
            # The registers are cumulative: a dropped reading loses resolution
            # in time, never energy.
            self.pending.pop(0)
            self.stats["dropped"] += 1
        self.stats["readings"] += 1
        record = {
            "seq": st.seq,
            "t_end": t_end + _UNIX_2000,
            "t_s": t_end - self.boot_s,
            "irms_a": irms,
            "p_w": p_w,
            "energy_wh": e_net,
            "import_wh": r.import_wh(),
            "export_wh": r.export_wh(),
            "hz": m.iv_hz / t,
            "flags": frame.flag_names(flags),
        }
        if self.has_v:
            record["vrms_v"] = vrms
            record["pf"] = m.iv_p / m.iv_s if m.iv_s > 0.0 else 1.0
        for cb in self.observers:
            cb(record)
        self._start_interval(t_end)

    def finish(self):
        """Power is going away (or a simulation ends): close the partial
        interval if it spans at least a second, and save the registers."""
        self.sampler.stop()
        if self.wall_s > self._iv_start:
            self.close_interval(self.wall_s)
        else:
            self.state.save(self.wall_s)

    async def metering_task(self):
        s = self.sampler
        regs = self.state.registers
        s.start()
        try:
            while True:
                off = s.wait_block()
                self.metering.process(s.buf_i, s.buf_v, off, self.block, regs)
                s.release()
                self.on_block(self.block)
                await asyncio.sleep_ms(0)
        finally:
            s.stop()

    # ------------------------------------------------------------- uplink

    async def uplink_task(self, m):
        backoff = 1000
        while True:
            if not self.pending or not self.joined:
                await asyncio.sleep_ms(_MODEM_POLL_MS)
                continue
            body = self.pending[0]
            signer = self.identity.signer(frame.signed_message(self.dev_eui, body))
            t0 = time.ticks_ms()
            while not signer.step():
                # Sign in slices well inside one block's time: the timer keeps
                # filling the other half of the buffer meanwhile, and the
                # metering loop takes its block between slices.
                if time.ticks_diff(time.ticks_ms(), t0) >= _SIGN_SLICE_MS:
                    await asyncio.sleep_ms(0)
                    t0 = time.ticks_ms()
            data = frame.assemble(body, signer.signature)
            ok = await m.send(frame.PORT_READING, data, confirmed=self.cfg["confirmed"])
            if ok:
                if self.pending and self.pending[0] is body:
                    self.pending.pop(0)
                self.stats["sent"] += 1
                backoff = 1000
            else:
                self.stats["send_failed"] += 1
                log("uplink: send failed, retry in %d ms" % backoff)
                await asyncio.sleep_ms(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX_MS)

    async def modem_task(self, m):
        backoff = 1000
        while not await m.probe():
            log("modem: no answer, retry in %d ms" % backoff)
            await asyncio.sleep_ms(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_MS)
        self.dev_eui = await m.dev_eui()
        cfg = self.cfg
        await m.configure(region=cfg["region"], dr=cfg["dr"],
                          device_class=cfg["device_class"], confirmed=cfg["confirmed"])
        backoff = 1000
        while not await m.join():
            log("modem: join failed, retry in %d ms" % backoff)
            await asyncio.sleep_ms(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_MS)
        self.joined = True
        log("modem: joined as %s" % "".join("%02x" % b for b in self.dev_eui))
        while True:
            d = m.downlink()
            if d is not None:
                log("downlink: port %d, %d bytes" % (d[0], len(d[1])))
            await asyncio.sleep_ms(_MODEM_POLL_MS)

    async def run(self):
        tasks = [asyncio.create_task(self.metering_task())]
        m = self.modem
        if m is not None:
            tasks.append(asyncio.create_task(self.modem_task(m)))
            tasks.append(asyncio.create_task(self.uplink_task(m)))
        # The metering task never returns; if it fails, everything stops
        # (a watchdog reset on a board) rather than sending stale registers.
        await tasks[0]


def main():
    app = App()
    log("meter: %s, public key %s" % (app.board.NAME, "".join("%02x" % b for b in app.identity.public)))
    asyncio.run(app.run())
