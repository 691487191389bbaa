# Raspberry Pi Pico (RP2040) meter board: pin map and ADC facts.
#
# The clamp is biased at mid-scale (1.65 V) with a 15 ohm burden: 120 A rms
# through the SCT013-000 peaks at 1.27 V, inside the 0-3.3 V span with margin.
# The RP2040 ADC has differential non-linearity spikes at codes 512, 1536,
# 2560 and 3584 (erratum RP2040-E11): each of those codes is about
# ADC_DNL_WIDTH LSB wider than the others, which shifts every code above it.
# The sampler corrects each reading through a lookup table (meter/adc.py).
#
# Pacing: a timer interrupt at SAMPLE_HZ. DMA-paced ADC FIFO capture would
# need register-level control of the ADC that machine.ADC does not expose;
# at 4 kHz per channel the interrupt keeps up (docs/metering.md).

from machine import ADC, Pin
from micropython import const

NAME = "pico"

# Pin map (GPIO numbers).
PIN_CT = 26  # ADC0: current clamp
PIN_VT = 27  # ADC1: optional voltage module
PIN_RELAY = 15
PIN_LED = 25
PIN_BUTTON = 14
UART_MODEM = 0
PIN_MODEM_TX = 0
PIN_MODEM_RX = 1
MODEM_BAUD = 115200

# Analog front end (hardware/designs.json, build "pico").
BURDEN_OHM = 15.0
BIAS_V = 1.65

# ADC facts, in the units the sampler stores (DNL-corrected 12-bit codes).
ADC_READ = "u16"
ADC_SHIFT = const(4)
ADC_UNIT_V = 3.3 / 4095
ADC_MID = 2048
ADC_MAX = 4095
ADC_LIN_LO = 8
ADC_LIN_HI = 4087
ADC_NOISE_VAR = 1.08  # codes^2 with the input at the bias (about 1 LSB rms)
ADC_PAIR_US = 4  # current sampled this long before voltage in one interrupt
ADC_DNL_WIDTH = 8  # extra width in LSB of each of the four wide codes
VT_PHASE_DEG = 0.51  # ZMPT101B lead 0.33 deg + its 10 uF / 100 k coupling 0.18 deg at 50 Hz
# The timer period is a whole number of microseconds, and the rate is not a
# multiple of 50 or 60 Hz: the sampling instants drift across the waveform
# instead of locking to it (docs/metering.md).
SAMPLE_PERIOD_US = 249
SAMPLE_HZ = 1000000 / SAMPLE_PERIOD_US  # per channel
TIMER_ID = -1  # virtual (soft) timer


def make_adc(pin):
    return ADC(Pin(pin))

# The last 64 KiB of the 2 MiB flash hold the energy log; the filesystem is
# formatted to end before them at provisioning (hardware/README.md).
ENERGY_FLASH_START = 0x1F0000
ENERGY_FLASH_LEN = 0x10000


def energy_store():
    import rp2
    return rp2.Flash(start=ENERGY_FLASH_START, len=ENERGY_FLASH_LEN)
