# Continuous ADC capture into a double buffer.
#
# A periodic timer interrupt takes one sample per tick (current, then voltage
# when the voltage module is fitted) and writes it into one half of a
# preallocated buffer; the metering loop processes the other half. Nothing is
# allocated in the interrupt handler: the buffers, the write index and the
# ready bits are all created here, once.
#
# Waiting uses machine.idle(), which returns at the next interrupt, and is
# bounded by a count of idles so a stalled timer raises instead of hanging.

from array import array

import machine
from micropython import const

_STALL_FACTOR = const(8)  # idles allowed per expected sample before giving up


class SamplerStalled(OSError):
    pass


class Sampler:
    def __init__(self, adc_i, adc_v, sample_hz, block, timer_id=-1):
        self.adc_i = adc_i
        self.adc_v = adc_v
        self.sample_hz = sample_hz
        self.block = block
        self.timer_id = timer_id
        self.buf_i = array("H", bytes(4 * block))
        self.buf_v = array("H", bytes(4 * block)) if adc_v is not None else None
        self._w = 0
        self._ready = 0  # bit 0: first half full, bit 1: second half full
        self._next = 0
        self.overruns = 0
        self._timer = None
        self._isr_ref = self._isr  # bound once: no allocation per interrupt

    def start(self):
        self._w = 0
        self._ready = 0
        self._next = 0
        self._timer = machine.Timer(self.timer_id)
        self._timer.init(mode=machine.Timer.PERIODIC, freq=self.sample_hz,
                         callback=self._isr_ref)

    def stop(self):
        if self._timer is not None:
            self._timer.deinit()
            self._timer = None

    def _isr(self, _t):
        w = self._w
        self.buf_i[w] = self.adc_i.read_u16() >> 4
        if self.adc_v is not None:
            self.buf_v[w] = self.adc_v.read_u16() >> 4
        w += 1
        if w == self.block:
            if self._ready & 1:
                self.overruns += 1
            self._ready |= 1
        elif w == 2 * self.block:
            if self._ready & 2:
                self.overruns += 1
            self._ready |= 2
            w = 0
        self._w = w

    def wait_block(self):
        """Block until the next half is full; return its offset in the buffers."""
        bit = 1 << self._next
        n = 0
        limit = self.block * _STALL_FACTOR
        while not (self._ready & bit):
            machine.idle()
            n += 1
            if n > limit:
                raise SamplerStalled("ADC timer stalled: no block after %d idles" % n)
        return self._next * self.block

    def release(self):
        """The half returned by wait_block() has been processed."""
        bit = 1 << self._next
        state = machine.disable_irq()
        self._ready &= ~bit
        machine.enable_irq(state)
        self._next ^= 1
