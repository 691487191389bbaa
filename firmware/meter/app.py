# The meter application: wires the board, the sampler, the metering core, the
# energy registers, the device identity and the radio into asyncio tasks.
#
#  metering  - never stops: waits for a block of samples, turns it into power
#              and energy, closes a reading at every interval boundary and
#              hands it to the radio side (stored in the flash outbox first).
#  uplink    - meter/uplink.py: bundles and signs readings (in slices, between
#              blocks), sends them, keeps the clock synced, runs commands.
#
# Time: the sample clock is the meter's time base. Each block of samples is
# exactly `block / sample_hz` seconds, so energy and interval boundaries do
# not depend on how long the CPU took to process them. Wall time starts from
# the RTC, is set from the network (DeviceTimeReq) or a command, corrected for
# the crystal's measured drift between syncs, and kept in seconds since
# 2000-01-01, a small int on the targets until 2034 (unix seconds no longer
# fit in 31 bits).

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
_STEP_S = const(10)  # a clock correction larger than this closes the interval
_DRIFT_MIN_S = const(3600)  # measure drift over at least an hour between syncs
_DRIFT_MAX_PPM = const(500)  # a crystal worse than this is broken, not drifting


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
        self.stats = {"readings": 0, "blocks": 0}
        self.modem = None
        self.uplink = None
        self.relay = None
        self.relay_mode = None
        if with_modem:
            from meter.modem import make
            from meter.outbox import Outbox
            from meter.uplink import Uplink
            uart = machine.UART(b.UART_MODEM, baudrate=b.MODEM_BAUD,
                                tx=machine.Pin(b.PIN_MODEM_TX),
                                rx=machine.Pin(b.PIN_MODEM_RX), timeout=0)
            self.modem = make(cfg["modem"], uart, log=log)
            outbox = Outbox(log=log)
            # No sequence number is ever used twice: the outbox may hold
            # readings newer than the last saved registers.
            if outbox.last_seq() > self.state.seq:
                self.state.seq = outbox.last_seq()
            self.uplink = Uplink(self, self.modem, outbox)
        # Wall clock and the interval being accumulated.
        self.boot_s = rtc_seconds_2000()
        self.wall_s = self.boot_s
        self._sub_us = 0  # sample-clock microseconds into the current second
        self.synced = False
        self._ppm = 0  # measured crystal error, corrected on every block
        self._drift_acc = 0
        self._sync_wall = 0  # wall_s and board seconds at the last sync
        self._sync_board = 0
        self._board_s = 0  # whole seconds of sample clock since boot
        self._board_sub = 0
        self._restart = True  # the next reading is the first since power-up
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
        us = n * period
        self._board_sub += us
        while self._board_sub >= 1000000:
            self._board_sub -= 1000000
            self._board_s += 1
        if self._ppm:
            # Drift correction in whole microseconds, the remainder carried.
            self._drift_acc += us * self._ppm
            q = self._drift_acc // 1000000
            self._drift_acc -= q * 1000000
            us += q
        self._sub_us += us
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
        flags = m.iv_status
        if not self.synced:
            flags |= frame.FLAG_CLOCK_UNSYNCED
        if self.has_v:
            flags |= frame.FLAG_VOLTAGE_MEASURED
        if self._restart:
            flags |= frame.FLAG_RESTART
            self._restart = False
        st.save(self.wall_s)
        if self.uplink is not None:
            self.uplink.on_reading(st.seq, t_end + _UNIX_2000, r.import_dwh, r.export_dwh, flags)
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
            "import_dwh": r.import_dwh,  # what the reading sends: whole 0.1 Wh
            "export_dwh": r.export_dwh,
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

    # ------------------------------------------------------------- clock

    def unix_time(self):
        return self.wall_s + _UNIX_2000

    def board_ms(self):
        """Milliseconds of sample clock since boot: the meter's own time base
        for airtime, duty cycle and backoff (on a board it is real time; in
        the simulator it is simulated time, whatever the host's pace)."""
        return self._board_s * 1000 + self._board_sub // 1000

    def set_time(self, unix):
        """The network (DeviceTimeAns) or a command says it is `unix`. A large
        step closes the running interval at the old time (so no reading spans
        a jump) and starts a new one; successive syncs at least an hour apart
        measure the crystal's drift, corrected from then on."""
        new = unix - _UNIX_2000
        step = new - self.wall_s
        if self.synced and self._board_s - self._sync_board >= _DRIFT_MIN_S:
            # The error accumulated since the last sync is the drift left
            # uncorrected: add it to the correction.
            ppm = self._ppm + step * 1000000 // (self._board_s - self._sync_board)
            self._ppm = max(-_DRIFT_MAX_PPM, min(_DRIFT_MAX_PPM, ppm))
        log("clock: set to %d (step %+d s, drift correction %d ppm)" % (unix, step, self._ppm))
        if step > _STEP_S or step < -_STEP_S:
            if self.wall_s - self._iv_start >= 1:
                self.close_interval(self.wall_s)
            self.wall_s = new
            self._sub_us = 0
            self.synced = True
            self._start_interval(new)
        else:
            self.wall_s = new
            self.synced = True
        self._sync_wall = new
        self._sync_board = self._board_s

    def set_interval(self, interval_s):
        cfg = dict(self.cfg)
        cfg["interval_s"] = interval_s
        try:
            config.save(cfg)
        except config.ConfigError as e:
            raise ValueError(str(e))
        self.cfg["interval_s"] = interval_s

    def set_relay(self, mode, hold_s):
        """Drive the load relay (off, on, auto = on). The safety rules of a
        relay meter (minimum on/off times, maximum shed) live on top of this."""
        if mode not in (frame.RELAY_OFF, frame.RELAY_ON, frame.RELAY_AUTO):
            raise ValueError("relay mode %d" % mode)
        if self.relay is None:
            self.relay = machine.Pin(self.board.PIN_RELAY, machine.Pin.OUT)
        self.relay.value(0 if mode == frame.RELAY_OFF else 1)
        self.relay_mode = mode

    async def run(self):
        tasks = [asyncio.create_task(self.metering_task())]
        if self.uplink is not None:
            tasks.append(asyncio.create_task(self.uplink.run()))
        # The metering task never returns; if it fails, everything stops
        # (a watchdog reset on a board) rather than sending stale registers.
        await tasks[0]


def main():
    app = App()
    log("meter: %s, public key %s" % (app.board.NAME, "".join("%02x" % b for b in app.identity.public)))
    asyncio.run(app.run())
