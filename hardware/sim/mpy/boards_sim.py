# The simulated boards' hardware, read from hardware/designs.json (the one
# description of the reference meters): pins, clamp model, burden, bias
# network, anti-alias filter, voltage module, ADC model, this unit's
# tolerances and the CPU slowdown. `hardware_for` flattens one build into a
# dict that SIM.json's "hardware" can override key by key; `setup` builds the
# simulated parts from that dict and installs them on the board.

import json
import os
from math import sqrt

import simhw


def _here():
    try:
        f = __file__
    except NameError:  # frozen into the interpreter: no file, use the cwd
        return os.getcwd()
    if not f.startswith("/"):
        f = os.getcwd() + "/" + f
    k = f.rfind("/")
    return f[:k] if k > 0 else "/"


# hardware/sim/mpy/boards_sim.py -> hardware/designs.json. Resolved at import,
# before the harness changes into the flash directory.
DESIGNS_PATH = _here() + "/../../designs.json"

_designs = None


def load_designs(path=None):
    """The parsed designs.json (cached after the first load)."""
    global _designs
    if path is not None:
        with open(path) as f:
            return json.load(f)
    if _designs is None:
        with open(DESIGNS_PATH) as f:
            _designs = json.load(f)
    return _designs


# Keys computed from others: overriding them would contradict their sources.
_DERIVED = ("board", "adc", "ct_v_per_a", "ct_output", "ct_rated_a", "ct_turns", "bias_v")


def _ct_keys(d, name):
    try:
        m = d["ct_models"][name]
    except KeyError:
        raise ValueError("hardware: unknown ct_model %r (designs.json has %s)"
                         % (name, ", ".join(sorted(d["ct_models"]))))
    return {
        "ct_model": name,
        "ct_output": m["output"],
        "ct_rated_a": m["rated_a"],
        "ct_turns": m["turns"],
        "ct_table": m["table"],
        "ct_table_hz": m["table_hz"],
        "ct_knee_pct": m["saturation_knee_pct"],
        "ct_soft_pct": m["saturation_soft_pct"],
    }


def hardware_for(board, overrides=None):
    """One build of designs.json as a flat dict (see docs/simulation.md for the
    keys), with `overrides` applied; unknown keys raise ValueError."""
    d = load_designs()
    try:
        b = d["builds"][board]
    except KeyError:
        raise ValueError("hardware: unknown board %r (designs.json has %s)"
                         % (board, ", ".join(sorted(d["builds"]))))
    overrides = dict(overrides or {})
    mcu = b["mcu"]
    vt = b["vt"]
    vt_module = overrides.pop("vt_module", vt["module"])
    try:
        vmod = d["voltage_modules"][vt_module]
    except KeyError:
        raise ValueError("hardware: unknown vt_module %r (designs.json has %s)"
                         % (vt_module, ", ".join(sorted(d["voltage_modules"]))))
    bias = b["bias"]
    hw = {
        "board": board,
        "adc": mcu["adc"],
        "adc_atten": mcu["adc_atten"],
        "sample_hz": b["sample_hz"],
        "adc_pair_us": b["adc_pair_us"],
        "uart_modem": b["modem"]["uart_id"],
        "modem_baud": b["modem"]["baud"],
        "burden_ohm": b["ct"]["burden_ohm"],
        "bias_v": d["supply_v"] * bias["r_bottom_ohm"] / (bias["r_top_ohm"] + bias["r_bottom_ohm"]),
        "aa_r_ohm": b["anti_alias"]["r_ohm"],
        "aa_c_f": b["anti_alias"]["c_f"],
        "vt_module": vt_module,
        "vt_v_per_v": vmod["trim_v_rms"] / vmod["at_mains_v_rms"],
        "vt_phase_deg": vmod["phase_lead_deg"],
        "vt_table_hz": vmod["table_hz"],
        "vt_couple_r_ohm": vt["couple_r_ohm"],
        "vt_couple_c_f": vt["couple_c_f"],
        "cpu_slowdown": mcu["cpu_slowdown"],
        "noise_lsb": d["adc_models"][mcu["adc"]]["noise_lsb"],
        "dnl_width_lsb": d["adc_models"][mcu["adc"]].get("dnl_width_lsb", 0),
    }
    for k in b["pins"]:
        hw["pin_" + k] = b["pins"][k]
    hw.update(_ct_keys(d, overrides.pop("ct_model", b["ct"]["model"])))
    for k in d["unit"]:
        if k != "about":
            hw[k] = d["unit"][k]
    for k in d["sim"]:
        hw[k] = d["sim"][k]
    for k in overrides:
        if k in _DERIVED:
            raise ValueError("hardware: %r is computed from the design; override its "
                             "sources instead (burden_ohm, ct_model, bias_error_pct, ...)" % k)
        if k not in hw:
            raise ValueError("hardware: unknown key %r" % k)
        hw[k] = overrides[k]
    _derive(hw)
    return hw


def _derive(hw):
    # This unit's volts at the ADC pin per primary ampere.
    if hw["ct_output"] == "voltage":
        v_per_a = load_designs()["ct_models"][hw["ct_model"]]["v_per_a"]
    else:
        v_per_a = hw["burden_ohm"] / hw["ct_turns"] * (1.0 + hw["burden_error_pct"] / 100.0)
    hw["ct_v_per_a"] = v_per_a * (1.0 + hw["ct_gain_error_pct"] / 100.0)


def build_adc(hwc, seed=1):
    """The ADC model of this unit."""
    m = load_designs()["adc_models"][hwc["adc"]]
    ref = 1.0 + hwc["adc_ref_error_pct"] / 100.0
    if m["kind"] == "esp32":
        adc = simhw.Esp32Adc(m, m["vref_mv"] * ref, hwc["adc_offset_mv"],
                             noise_lsb=hwc["noise_lsb"], seed=seed)
    elif m["kind"] == "rp2040":
        vref = m["vref_v"] * ref
        adc = simhw.Rp2040Adc(m, vref, m["offset_lsb"] + hwc["adc_offset_mv"] / 1000.0 * 4096 / vref,
                              noise_lsb=hwc["noise_lsb"], dnl_width=hwc["dnl_width_lsb"], seed=seed)
    else:
        raise ValueError("designs.json: unknown ADC kind %r" % m["kind"])
    if hwc["adc_stuck"] is not None:
        adc = simhw.StuckAdc(adc, int(hwc["adc_stuck"]))
    return adc


def build_pins(hwc, trace, mains_hz=None):
    """pin -> channel for the clamp and the voltage module, on `trace`; sets
    the trace's anti-alias filters and its per-cycle RMS callback."""
    f = mains_hz or hwc["mains_hz"]
    tau_us = hwc["aa_r_ohm"] * hwc["aa_c_f"] * 1000000.0
    trace.set_filters(tau_us, tau_us)
    bias = hwc["bias_v"] * (1.0 + hwc["bias_error_pct"] / 100.0)
    knee_a = hwc["ct_knee_pct"] / 100.0 * hwc["ct_rated_a"] * sqrt(2.0)
    ct = simhw.CtChannel(trace, bias, hwc["ct_v_per_a"], hwc["ct_table"], hwc["ct_table_hz"], f,
                         knee_a, hwc["ct_soft_pct"] / 100.0)
    trace.set_cycle(f, ct.on_cycle)
    vt = simhw.VtChannel(trace, bias, hwc["vt_v_per_v"] * (1.0 + hwc["vt_gain_error_pct"] / 100.0),
                         hwc["vt_phase_deg"], hwc["vt_table_hz"], f,
                         hwc["vt_couple_r_ohm"], hwc["vt_couple_c_f"])
    pins = {hwc["pin_ct"]: ct if hwc["ct_connected"] else simhw.Grounded(trace),
            hwc["pin_vt"]: vt}
    return pins


def setup(hw, hwc, trace, seed=1, rtc_epoch=None, unique_id=None, mains_hz=None):
    """Install this unit on the simulated board `hw` (simhw.hw): ADC, clamp and
    voltage channels on `trace`, the ADC pair delay and the CPU model."""
    adc = build_adc(hwc, seed)
    pins = build_pins(hwc, trace, mains_hz)
    hw.configure(trace, adc, pins, rtc_epoch=rtc_epoch, unique_id=unique_id,
                 cpu_slowdown=hwc["cpu_slowdown"] if hwc["cpu_model"] else 0.0,
                 read_us=int(hwc["adc_pair_us"]))
    # The parts hold what they need; the parsed file would only weigh on the
    # heap the firmware is measured in.
    global _designs
    _designs = None
    return hw
