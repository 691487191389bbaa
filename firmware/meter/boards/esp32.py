# ESP32 (classic, ESP32-DevKitC) meter board: pin map and ADC facts.
#
# Only ADC1 pins are used: ADC2 is unusable while the radio is on (BRIEF 1).
# At 11 dB attenuation the linear input range is about 150-2450 mV, so the
# clamp signal is biased at about 1.3 V rather than mid-supply, and the burden
# is 12 ohm: 120 A rms through the SCT013-000 then peaks at 1.02 V, inside
# the +-1.15 V the linear range allows around the bias.
#
# Readings are raw 12-bit codes. ADC.read_uv() (the eFuse calibration) returns
# whole millivolts, coarser than the 0.8 mV step and unevenly spaced, which
# costs several per cent at small currents; inside the linear window the raw
# code is linear, and the unit's gain (Vref) is set by one-point calibration
# at installation (docs/metering.md).

from machine import ADC, Pin
from micropython import const

NAME = "esp32"

# Pin map (GPIO numbers).
PIN_CT = 34  # ADC1_CH6: current clamp
PIN_VT = 35  # ADC1_CH7: optional ZMPT101B-style voltage module
PIN_RELAY = 26  # relay driver (active high)
PIN_LED = 2
PIN_BUTTON = 0  # BOOT button: local override
UART_MODEM = 2
PIN_MODEM_TX = 17
PIN_MODEM_RX = 16
MODEM_BAUD = 115200

# Analog front end (hardware/designs.json, build "esp32").
BURDEN_OHM = 12.0
BIAS_V = 1.3

# ADC facts, in raw codes (read_u16() >> 4), ESP-IDF's 11 dB line:
# volts = 142 mV + code * 0.8056 mV at the nominal 1100 mV reference.
ADC_READ = "u16"
ADC_SHIFT = const(4)
ADC_UNIT_V = 0.0008056
ADC_MID = 1437  # the code at the 1.3 V bias
ADC_MAX = 4095
ADC_LIN_LO = 10  # 150 mV: below, the ESP32 ADC bends and reads 0 under ~100 mV
ADC_LIN_HI = 2865  # 2450 mV
ADC_NOISE_VAR = 0.33  # codes^2 at the bias: 0.5 LSB rms noise and the code step
ADC_PAIR_US = 40  # current sampled this long before voltage in one interrupt
ADC_DNL_WIDTH = 0
VT_PHASE_DEG = 0.51  # ZMPT101B lead 0.33 deg + its 10 uF / 100 k coupling 0.18 deg at 50 Hz
# The timer period is a whole number of microseconds, and the rate is not a
# multiple of 50 or 60 Hz: the sampling instants drift across the waveform
# instead of locking to it (docs/metering.md).
SAMPLE_PERIOD_US = 495
SAMPLE_HZ = 1000000 / SAMPLE_PERIOD_US  # per channel
TIMER_ID = 0  # the ESP32 port has no virtual timers


def make_adc(pin):
    adc = ADC(Pin(pin))
    adc.atten(ADC.ATTN_11DB)
    return adc


def energy_store():
    """Raw flash for the energy log: a 64 KiB data partition labelled
    "meterlog" (the partition table in hardware/README.md adds it)."""
    import esp32
    parts = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="meterlog")
    return parts[0] if parts else None
