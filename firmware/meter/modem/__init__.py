# AT-command LoRaWAN modem drivers behind one interface (probe, dev_eui,
# configure, join, send, downlink, stats); see docs/modem.md.
#
# Imports are lazy so a board carries in RAM only the driver it uses:
# `from meter.modem import Rak3172` loads rak3172.py and nothing else.


def __getattr__(name):
    if name == "Rak3172":
        from .rak3172 import Rak3172
        return Rak3172
    if name in ("ModemError", "AtModem"):
        from . import at
        return getattr(at, name)
    raise AttributeError("meter.modem has no %r" % name)
