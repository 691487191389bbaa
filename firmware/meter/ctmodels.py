# Current-transformer models the meter knows: how to turn volts at the ADC
# into amperes at the primary, and each model's measured ratio error and
# phase lead as functions of the primary current (they are not constants:
# a clamp reads low and leads more at small currents).
#
# The numbers are the nominal characterisation of each model; they must
# equal hardware/designs.json, which the simulator uses (a test checks).
# One-point calibration then removes what is left for an individual unit.
#
# table: ((primary amps, ratio error % (reads low), phase lead degrees), ...)

MODELS = {
    # 100 A : 50 mA, burden on the meter's board.
    "SCT013-000": {
        "rated_a": 100.0,
        "turns": 2000.0,
        "v_per_a": 0.0,  # external burden: volts per amp = burden / turns
        "table": ((0.5, 1.4, 3.1), (1.0, 0.8, 3.05), (5.0, 0.5, 2.9), (20.0, 0.4, 2.75),
                  (60.0, 0.45, 2.6), (100.0, 0.6, 2.5), (120.0, 0.8, 2.45)),
    },
    # Voltage-output variants: burden inside, 1 V rms at rated current.
    "SCT013-030": {
        "rated_a": 30.0, "turns": 1800.0, "v_per_a": 1.0 / 30.0,
        "table": ((0.15, 1.6, 3.9), (1.0, 0.9, 3.8), (10.0, 0.6, 3.75), (30.0, 0.8, 3.7),
                  (36.0, 1.0, 3.7)),
    },
    "SCT013-050": {
        "rated_a": 50.0, "turns": 2000.0, "v_per_a": 1.0 / 50.0,
        "table": ((0.25, 1.6, 3.9), (1.0, 1.0, 3.8), (10.0, 0.6, 3.75), (50.0, 0.8, 3.7),
                  (60.0, 1.0, 3.7)),
    },
    "SCT013-100": {
        "rated_a": 100.0, "turns": 2000.0, "v_per_a": 1.0 / 100.0,
        "table": ((0.5, 1.6, 3.9), (1.0, 1.0, 3.85), (10.0, 0.6, 3.8), (100.0, 0.8, 3.7),
                  (120.0, 1.0, 3.7)),
    },
}


def amps_per_volt(model, burden_ohm):
    m = MODELS[model]
    if m["v_per_a"]:
        return 1.0 / m["v_per_a"]
    if not burden_ohm:
        raise ValueError("%s needs a burden resistor (burden_ohm)" % model)
    return m["turns"] / burden_ohm
