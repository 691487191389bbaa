# The meter's configuration: schema, defaults and validation, in one place.
#
# Stored as JSON in config.json on the meter's flash. Every error is
# reported at once, each naming the key and what was wrong, so a technician
# fixes a bad file in one go.

import json

from meter import store

PATH = "config.json"

# key: (default, type, low, high) -- low/high bound numbers; for strings the
# allowed values are listed in CHOICES.
SCHEMA = {
    "board": ("esp32", str, None, None),
    # Reading interval: 15 min by default, 1-60 min in the field; shorter
    # intervals exist for demonstrations and time-compressed simulations.
    "interval_s": (900, int, 1, 3600),
    "mains_hz": (50, int, 45, 65),
    "v_nominal": (230.0, float, 90.0, 270.0),
    "voltage_channel": (False, bool, None, None),
    "ct_model": ("SCT013-000", str, None, None),  # meter/ctmodels.py
    "burden_ohm": (0.0, float, 0.0, 1000.0),  # 0: the board's burden (external-burden models)
    "vt_v_per_v": (383.3, float, 10.0, 2000.0),  # mains volts per volt at the ADC (ZMPT101B trimmed to 0.6 V at 230 V)
    "i_start_a": (0.04, float, 0.0, 5.0),  # starting current: below it, no current and no energy
    "expect_export": (False, bool, None, None),  # False: negative real power flags a reversed clamp
    "window_cycles": (10, int, 2, 50),  # mains cycles per metering window
    "region": ("EU868", str, None, None),
    "dr": (5, int, 0, 15),
    "device_class": ("A", str, None, None),
    "modem": ("rak3172", str, None, None),  # meter/modem: which AT dialect
    "airtime_s_day": (30.0, float, 1.0, 100000.0),  # uplink airtime budget (fair use: 30 s)
    "bundle_max": (32, int, 1, 32),  # most readings under one signature (meter/airtime.py picks)
    "jitter_s": (120, int, 0, 3600),  # random hold of a new bundle so a street does not collide
    "confirm_every": (8, int, 1, 1000),  # every n-th bundle confirmed: the link check
    "time_sync_s": (86400, int, 60, 604800),  # DeviceTimeReq cadence once synced
}

CHOICES = {
    "board": ("esp32", "pico"),
    "ct_model": ("SCT013-000", "SCT013-030", "SCT013-050", "SCT013-100"),
    "region": ("EU868", "US915"),
    "device_class": ("A", "C"),
    "modem": ("rak3172", "wioe5"),
}


class ConfigError(ValueError):
    def __init__(self, errors):
        super().__init__("; ".join(errors))
        self.errors = errors


def validate(raw):
    """Return a complete config dict, or raise ConfigError listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(["config must be a JSON object, got %s" % type(raw).__name__])
    errors = []
    cfg = {}
    for key in raw:
        if key not in SCHEMA:
            errors.append("%s: unknown key" % key)
    for key in SCHEMA:
        default, typ, lo, hi = SCHEMA[key]
        if key not in raw:
            cfg[key] = default
            continue
        v = raw[key]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if typ is int and isinstance(v, bool) or not isinstance(v, typ):
            errors.append("%s: expected %s, got %r" % (key, typ.__name__, v))
            continue
        if lo is not None and (v < lo or v > hi):
            errors.append("%s: %r outside %r..%r" % (key, v, lo, hi))
            continue
        if key in CHOICES and v not in CHOICES[key]:
            errors.append("%s: %r is not one of %s" % (key, v, ", ".join(CHOICES[key])))
            continue
        cfg[key] = v
    if errors:
        raise ConfigError(errors)
    return cfg


def load(path=PATH):
    if not store.exists(path):
        return validate({})
    try:
        raw = json.loads(store.read(path))
    except ValueError as e:
        raise ConfigError(["%s: not valid JSON (%s)" % (path, e)])
    return validate(raw)


def save(cfg, path=PATH):
    store.write_atomic(path, json.dumps(validate(cfg)).encode())
