# The simulated boards' analog hardware, as fitted on the reference designs
# (hardware/README.md): clamp, burden, bias network, voltage module and ADC.
# The firmware's board modules hold the same nominal values; the simulation
# can be given different ones (component tolerances) to exercise calibration.

# SCT013-000: 100 A : 50 mA (2000 turns) into a 22 ohm burden -> 0.011 V per A.
CT_RATIO = 2000.0
CT_BURDEN_OHM = 22.0
# Voltage module (ZMPT101B style) trimmed to 0.8 V rms at 230 V rms.
VT_V_PER_V = 0.8 / 230.0

BOARDS = {
    "esp32": {
        "pin_ct": 34, "pin_vt": 35,
        "adc_vfs": 3.1, "adc_bits": 12, "noise_lsb": 0.5, "dead_v": 0.1,
        "ct_bias_v": 1.3, "vt_bias_v": 1.3,
    },
    "pico": {
        "pin_ct": 26, "pin_vt": 27,
        "adc_vfs": 3.3, "adc_bits": 12, "noise_lsb": 1.0, "dead_v": 0.0,
        "ct_bias_v": 1.65, "vt_bias_v": 1.65,
    },
}


def hardware_for(board, overrides=None):
    hw = dict(BOARDS[board])
    hw["ct_gain"] = CT_BURDEN_OHM / CT_RATIO
    hw["vt_gain"] = VT_V_PER_V
    if overrides:
        for k in overrides:
            if k not in hw:
                raise ValueError("hardware: unknown key %r" % k)
            hw[k] = overrides[k]
    return hw
