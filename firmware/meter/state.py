# Metering state that must survive reboots and power loss: the energy
# registers (with their fractional carry) and the last sequence number.
#
# Two stores. The energy log (meter/energylog.py, raw flash) takes a record
# every 1 Wh and at every reading, so a power cut loses less than 1 Wh.
# state.json (the filesystem, written atomically) takes the same at every
# reading; it is the only store on a board without a raw flash region, where
# it is also written every 1 Wh but at most once a minute to spare the flash.
# At boot the larger of the two wins, so the registers never go backwards.

import json

from meter import store
from meter.energylog import EnergyLog
from meter.metering import EnergyRegisters

PATH = "state.json"
_JSON_MIN_S = 60


class State:
    def __init__(self, log=None):
        self.seq = 0
        self.registers = EnergyRegisters()
        self.log = log
        self._json_imp = 0
        self._json_exp = 0
        self._json_at = 0

    def _adopt(self, seq, imp, exp, ci, ce):
        r = self.registers
        if (imp, exp) > (r.import_dwh, r.export_dwh) or (
                (imp, exp) == (r.import_dwh, r.export_dwh) and seq > self.seq):
            self.registers = EnergyRegisters(imp, exp, ci, ce)
        if seq > self.seq:
            self.seq = seq

    @classmethod
    def load(cls, bdev=None, path=PATH):
        s = cls(EnergyLog(bdev) if bdev is not None else None)
        if store.exists(path):
            d = json.loads(store.read(path))
            s._adopt(d["seq"], d["import_dwh"], d["export_dwh"], d["carry_imp"], d["carry_exp"])
        if s.log is not None:
            rec = s.log.load()
            if rec is not None:
                s._adopt(*rec)
        r = s.registers
        s._json_imp = r.import_dwh
        s._json_exp = r.export_dwh
        return s

    def save(self, now_s=0, path=PATH):
        """At every reading: both stores."""
        r = self.registers
        store.write_atomic(path, json.dumps({
            "seq": self.seq,
            "import_dwh": r.import_dwh,
            "export_dwh": r.export_dwh,
            "carry_imp": r.carry_imp,
            "carry_exp": r.carry_exp,
        }).encode())
        self._json_imp = r.import_dwh
        self._json_exp = r.export_dwh
        self._json_at = now_s
        if self.log is not None:
            self.log.append(self.seq, r)

    def tick(self, now_s):
        """After every block: keep what a power cut could lose under 1 Wh."""
        r = self.registers
        if self.log is not None:
            if self.log.due(self.seq, r):
                self.log.append(self.seq, r)
        elif (r.import_dwh - self._json_imp >= 10 or r.export_dwh - self._json_exp >= 10) \
                and now_s - self._json_at >= _JSON_MIN_S:
            self.save(now_s)
