# ESP32 (classic, e.g. ESP32-DevKitC) meter board: pin map and ADC facts.
#
# Only ADC1 pins are used: ADC2 is unusable while the radio is on (BRIEF 1).
# At 11 dB attenuation the linear input range is about 150-2450 mV, so the
# clamp signal is biased at about 1.3 V rather than mid-supply: that keeps
# about 81 % of the SCT013's rated current inside the linear range.

from machine import ADC, Pin

NAME = "esp32"

# Pin map (GPIO numbers).
PIN_CT = 34  # ADC1_CH6: current clamp, through 22 ohm burden, biased ~1.3 V
PIN_VT = 35  # ADC1_CH7: optional ZMPT101B-style voltage module
PIN_RELAY = 26  # relay driver (active high)
PIN_LED = 2
PIN_BUTTON = 0  # BOOT button: local override
UART_MODEM = 2
PIN_MODEM_TX = 17
PIN_MODEM_RX = 16
MODEM_BAUD = 115200

# ADC facts.
ADC_BITS = 12
ADC_VFS = 3.1  # volts at full scale with 11 dB attenuation (nominal)
ADC_MID = 1717  # code at the 1.3 V bias: where the waveform is centred
SAMPLE_HZ = 2000  # timer-paced, both channels per tick when the VT is fitted
TIMER_ID = 0  # hardware timer 0 (the ESP32 port has no virtual timers)
ADC_NOISE_VAR = 0.33  # counts^2 at the input with no signal (see docs/metering.md)


def make_adc(pin):
    adc = ADC(Pin(pin))
    adc.atten(ADC.ATTN_11DB)
    return adc
