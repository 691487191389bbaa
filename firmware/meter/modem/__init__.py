# AT-command LoRaWAN modem drivers behind one interface (probe, dev_eui,
# configure, join, send, downlink, link_check, network_time, stats); see
# docs/modem.md.
#
# Imports are lazy so a board carries in RAM only the driver it uses:
# `make("wioe5", uart)` loads wioe5.py and at.py and nothing else.

KINDS = ("rak3172", "wioe5")


def make(kind, uart, log=None):
    """The driver for modem `kind` ("rak3172" or "wioe5") on `uart`; `log` is
    an optional callable(str) for diagnostics."""
    if kind == "rak3172":
        from .rak3172 import Rak3172
        return Rak3172(uart, log)
    if kind == "wioe5":
        from .wioe5 import WioE5
        return WioE5(uart, log)
    raise ValueError("modem kind %r, want one of %s" % (kind, ", ".join(KINDS)))


def __getattr__(name):
    if name == "Rak3172":
        from .rak3172 import Rak3172
        return Rak3172
    if name == "WioE5":
        from .wioe5 import WioE5
        return WioE5
    if name == "ModemError":
        from .at import ModemError
        return ModemError
    if name == "AtModem":
        from .at import AtModem
        return AtModem
    raise AttributeError("meter.modem has no %r" % name)
