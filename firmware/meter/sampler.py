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
    """read_i / read_v: the ADC read methods (bound once, e.g. adc.read_u16 or
    adc.read_uv); shift: right shift applied to each reading; lut: optional
    array mapping each shifted reading to a corrected value (the RP2040's DNL
    correction)."""

    def __init__(self, read_i, read_v, sample_hz, block, timer_id=-1, shift=4, lut=None):
        # sample_hz may be fractional (1e6 / a whole period in microseconds).
        self.read_i = read_i
        self.read_v = read_v
        self.sample_hz = sample_hz
        self.block = block
        self.timer_id = timer_id
        self.shift = shift
        self.lut = lut
        self.buf_i = array("H", bytes(4 * block))
        self.buf_v = array("H", bytes(4 * block)) if read_v is not None else None
        self._w = 0
        self._ready = 0  # bit 0: first half full, bit 1: second half full
        self._next = 0
        self.overruns = 0
        self.dropped = 0  # samples not taken because both halves were full
        self.taken = 0  # samples taken since start (wraps at 2**30)
        self._timer = None
        # Bound once: no allocation per interrupt.
        self._isr_ref = self._isr_lut if lut is not None else self._isr

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
        if w == 0 and self._ready & 1 or w == self.block and self._ready & 2:
            # The half about to be written has not been processed yet: skip
            # this tick rather than overwrite; the metering loop accounts
            # for the gap.
            self.dropped += 1
            return
        sh = self.shift
        self.buf_i[w] = self.read_i() >> sh
        bv = self.buf_v
        rv = self.read_v
        if bv is not None and rv is not None:
            bv[w] = rv() >> sh
        self._advance(w + 1)

    def _isr_lut(self, _t):
        w = self._w
        if w == 0 and self._ready & 1 or w == self.block and self._ready & 2:
            self.dropped += 1
            return
        sh = self.shift
        lut = self.lut
        if lut is None:
            return
        self.buf_i[w] = lut[self.read_i() >> sh]
        bv = self.buf_v
        rv = self.read_v
        if bv is not None and rv is not None:
            bv[w] = lut[rv() >> sh]
        self._advance(w + 1)

    def _advance(self, w):
        self.taken = (self.taken + 1) & 0x3FFFFFFF
        if w == self.block:
            self._ready |= 1
        elif w == 2 * self.block:
            self._ready |= 2
            w = 0
        self._w = w

    def wait_block(self):
        """Block until the next half is full; return its offset in the buffers."""
        bit = 1 << self._next
        n = 0
        limit = self.block * _STALL_FACTOR
        if self._ready & (bit ^ 3):
            # The other half filled too while this one waited: the loop is
            # behind by a whole block.
            self.overruns += 1
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
