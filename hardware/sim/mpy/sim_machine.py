# A `machine` module for the simulated board: the subset of MicroPython's
# machine API the firmware uses (ADC, Pin, Timer, UART, RTC, WDT, idle,
# unique_id, reset, freq), backed by simhw. The simulation harness installs it
# as sys.modules['machine'] before any firmware module is imported.
#
# Signatures follow the ESP32 and rp2 ports; where the two differ (ADC.atten
# exists only on ESP32) both spellings are accepted.

import simhw
from simhw import hw, clock

try:
    from sim_uart import TcpUart as UART  # noqa: F401  (the modem link)
except ImportError:  # the uart module is optional for pure metering runs
    UART = None


def idle():
    hw.idle()


def unique_id():
    return hw.unique_id


def freq(*args):
    return 240000000


def reset():
    raise SystemExit("machine.reset()")


def soft_reset():
    raise SystemExit("machine.soft_reset()")


def disable_irq():
    return 0


def enable_irq(state=0):
    pass


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 2
    IRQ_RISING = 1

    _levels = {}

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.mode = mode
        if value is not None:
            Pin._levels[id] = 1 if value else 0

    def init(self, mode=-1, pull=-1, value=None):
        if value is not None:
            Pin._levels[self.id] = 1 if value else 0

    def value(self, v=None):
        if v is None:
            return Pin._levels.get(self.id, 0)
        Pin._levels[self.id] = 1 if v else 0

    def __call__(self, v=None):
        return self.value(v)

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=3):
        return None


def _pin_id(pin):
    return pin.id if isinstance(pin, Pin) else pin


class ADC:
    """machine.ADC of the ESP32 and rp2 ports, on the board's simulated ADC.

    ESP32: atten() picks the input range (ATTN_0DB is the port's default),
    read_u16() is the raw conversion scaled to 16 bits, read_uv() the
    eFuse-calibrated microvolts (whole millivolts, as the port returns them).
    rp2: no attenuation; read_u16() is raw * 65535 // 4095; no read_uv()."""

    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    WIDTH_12BIT = 3

    def __init__(self, pin, atten=None):
        self._pin = _pin_id(pin)
        self._atten = atten if atten is not None else 0

    def atten(self, a):
        if not 0 <= a <= 3:
            raise ValueError("invalid attenuation %r" % (a,))
        self._atten = a

    def width(self, w):
        pass

    def read_u16(self):
        c = hw.read_code(self._pin, self._atten)
        if hw.adc_model.u16_scaled:
            return c * 65535 // 4095
        return (c << 4) | (c >> 8)

    def read(self):
        return hw.read_code(self._pin, self._atten)

    def read_uv(self):
        return hw.read_uv(self._pin, self._atten)


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1

    def __init__(self, id=-1, mode=PERIODIC, freq=-1, period=-1, callback=None):
        self._t = simhw.SimTimer(self)
        if callback is not None:
            self.init(mode=mode, freq=freq, period=period, callback=callback)

    def init(self, mode=PERIODIC, freq=-1, period=-1, callback=None):
        if freq > 0:
            period_us = int(1000000 / freq + 0.5)
        elif period > 0:
            period_us = int(period * 1000)
        else:
            raise ValueError("Timer needs freq or period")
        self._t.start(period_us, mode == Timer.PERIODIC, callback)

    def deinit(self):
        self._t.stop()


class RTC:
    def __init__(self, id=0):
        pass

    def datetime(self, dt=None):
        import time
        if dt is not None:
            # (year, month, day, weekday, hours, minutes, seconds, subseconds)
            hw.rtc_epoch = time.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0)) \
                - clock.now_us // 1000000
            return None
        t = time.gmtime(hw.rtc_epoch + clock.now_us // 1000000)
        return (t[0], t[1], t[2], t[6], t[3], t[4], t[5], 0)


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.fed_at_us = clock.now_us

    def feed(self):
        self.fed_at_us = clock.now_us
