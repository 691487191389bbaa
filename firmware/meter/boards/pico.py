# Raspberry Pi Pico (RP2040) meter board: pin map and ADC facts.
#
# The RP2040 ADC has differential non-linearity spikes at codes 512, 1536,
# 2560 and 3584 (erratum RP2040-E11); biasing the clamp at mid-scale (code
# 2048) keeps small signals between them.

from machine import ADC, Pin

NAME = "pico"

# Pin map (GPIO numbers).
PIN_CT = 26  # ADC0: current clamp, 22 ohm burden, biased at 1.65 V
PIN_VT = 27  # ADC1: optional voltage module
PIN_RELAY = 15
PIN_LED = 25
PIN_BUTTON = 14
UART_MODEM = 0
PIN_MODEM_TX = 0
PIN_MODEM_RX = 1
MODEM_BAUD = 115200

# ADC facts.
ADC_BITS = 12
ADC_VFS = 3.3
ADC_MID = 2048
SAMPLE_HZ = 4000
TIMER_ID = -1  # virtual (soft) timer
ADC_NOISE_VAR = 1.08  # counts^2 at the input with no signal (see docs/metering.md)


def make_adc(pin):
    return ADC(Pin(pin))
