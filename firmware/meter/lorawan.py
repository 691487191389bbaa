# LoRaWAN regional facts the meter plans with: which spreading factor and
# bandwidth each uplink data rate uses, the largest application payload it
# carries, and how long a frame stays on the air.
#
# One owner: the firmware (airtime budget, fragmenting), the modem simulator
# and the benchmarks all read these tables. Sources: LoRaWAN Regional
# Parameters RP002-1.0.x (payload sizes for repeater-compatible networks) and
# Semtech AN1200.13 (time on air). Runs on MicroPython and CPython, so no
# `micropython.const`.

# Bytes a LoRaWAN 1.0.x uplink adds to the application payload:
# MHDR 1 + DevAddr 4 + FCtrl 1 + FCnt 2 + FPort 1 + MIC 4 (no FOpts).
OVERHEAD = 13

# Uplink data rate -> (spreading factor, bandwidth in kHz).
DATA_RATES = {
    "EU868": ((12, 125), (11, 125), (10, 125), (9, 125), (8, 125), (7, 125), (7, 250)),
    "US915": ((10, 125), (9, 125), (8, 125), (7, 125), (8, 500)),
}

# Uplink data rate -> largest FRMPayload (bytes).
MAX_PAYLOAD = {
    "EU868": (51, 51, 51, 115, 222, 222, 222),
    "US915": (11, 53, 125, 222, 222),
}

# Sub-band duty cycle of the main EU868 channels: after T seconds on the
# air the sub-band is closed for T / DUTY - T. US915 has no duty cycle
# (dwell time instead), so the meter only keeps its own daily budget there.
DUTY_CYCLE = {"EU868": 0.01, "US915": 1.0}


def check(region, dr):
    """Raise ValueError unless `dr` is an uplink data rate of `region`."""
    rates = DATA_RATES.get(region)
    if rates is None:
        raise ValueError("region %r: known are %s" % (region, ", ".join(sorted(DATA_RATES))))
    if not 0 <= dr < len(rates):
        raise ValueError("%s has uplink data rates 0..%d, not %r" % (region, len(rates) - 1, dr))


def max_payload(region, dr):
    check(region, dr)
    return MAX_PAYLOAD[region][dr]


def time_on_air_ms(payload_len, region, dr, preamble=8, cr=1):
    """Milliseconds on the air for an uplink carrying `payload_len` bytes of
    application payload (the LoRaWAN overhead is added here). Explicit
    header, CRC on, coding rate 4/(4+cr); low data rate optimisation at SF11
    and SF12 on 125 kHz, as the LoRaWAN regional parameters require."""
    check(region, dr)
    sf, bw_khz = DATA_RATES[region][dr]
    t_sym = (1 << sf) / bw_khz  # milliseconds
    de = 1 if (bw_khz == 125 and sf >= 11) else 0
    num = 8 * (payload_len + OVERHEAD) - 4 * sf + 28 + 16
    den = 4 * (sf - 2 * de)
    blocks = (num + den - 1) // den if num > 0 else 0  # ceil for positive ints
    n_payload = 8 + blocks * (cr + 4)
    return (preamble + 4.25 + n_payload) * t_sym
