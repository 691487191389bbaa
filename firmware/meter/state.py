# Metering state that must survive reboots and power loss: the energy
# registers (with their fractional carry) and the last sequence number.

import json

from meter import store
from meter.metering import EnergyRegisters

PATH = "state.json"


class State:
    def __init__(self):
        self.seq = 0
        self.registers = EnergyRegisters()

    def save(self, path=PATH):
        r = self.registers
        store.write_atomic(path, json.dumps({
            "seq": self.seq,
            "import_dwh": r.import_dwh,
            "export_dwh": r.export_dwh,
            "carry_imp": r.carry_imp,
            "carry_exp": r.carry_exp,
        }).encode())

    @classmethod
    def load(cls, path=PATH):
        s = cls()
        if store.exists(path):
            d = json.loads(store.read(path))
            s.seq = d["seq"]
            s.registers = EnergyRegisters(d["import_dwh"], d["export_dwh"],
                                          d["carry_imp"], d["carry_exp"])
        return s
