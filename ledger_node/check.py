"""Offline consistency check of a ledger database.

Trusts nothing in the file but the frame bytes and the enrolled keys: every
stored frame is decoded again, its signature verified again, the query
columns compared with what the frame says, and each device's readings put in
order by the seq inside the frame to check that seq is unique, cumulative
registers never go backwards and t_end never goes backwards between readings
with a synced clock (the same rules admission enforces). Served as
GET /v1/check and `ledger-node check`.
"""

from __future__ import annotations

from meter import frame

from . import signing
from .store import Store, StoredReading

MAX_PROBLEMS = 1000  # listed in the report; all are counted

_COLUMNS = ("seq", "t_end", "interval_s", "import_dwh", "export_dwh", "irms_ca",
            "vrms_dv", "flags")
_REGISTERS = ("import_dwh", "export_dwh")


class _Report:
    def __init__(self, max_problems: int):
        self.max_problems = max_problems
        self.problems: list[dict] = []
        self.total = 0

    def add(self, kind: str, message: str, dev_eui: str | None = None,
            entry_id: int | None = None, seq: int | None = None) -> None:
        self.total += 1
        if len(self.problems) < self.max_problems:
            self.problems.append({"kind": kind, "dev_eui": dev_eui, "entry_id": entry_id,
                                  "seq": seq, "message": message})


def check_store(store: Store, max_problems: int = MAX_PROBLEMS) -> dict:
    """The consistency report: {"ok", "readings", "devices", "problems",
    "problems_total"}; each problem has kind, dev_eui, entry_id, seq, message."""
    report = _Report(max_problems)
    n_readings = 0
    with store.snapshot() as snap:
        devices = snap.devices()
        keys = {}
        for device in devices:
            try:
                keys[device.dev_eui] = signing.import_public_key(device.public_key)
            except ValueError as exc:
                report.add("bad_key", f"enrolled public key is unusable: {exc}",
                           device.dev_eui)
        enrolled = {d.dev_eui for d in devices}
        group: list[tuple[StoredReading, frame.Reading]] = []
        for row in snap.readings():
            n_readings += 1
            if group and group[-1][0].dev_eui != row.dev_eui:
                _check_order(group, report)
                group = []
            decoded = _check_row(row, keys, enrolled, report)
            if decoded is not None:
                group.append((row, decoded))
        if group:
            _check_order(group, report)
    return {"ok": report.total == 0, "readings": n_readings, "devices": len(devices),
            "problems": report.problems, "problems_total": report.total}


def _check_row(row: StoredReading, keys: dict, enrolled: set, report: _Report):
    where = dict(dev_eui=row.dev_eui, entry_id=row.entry_id, seq=row.seq)
    try:
        reading = frame.decode(row.frame)
    except frame.FrameError as exc:
        report.add("undecodable", f"stored frame does not decode: {exc.reason}: {exc.message}",
                   **where)
        return None
    where["seq"] = reading.seq
    fields = reading.as_dict()
    differ = [c for c in _COLUMNS if getattr(row, c) != fields[c]]
    if differ:
        report.add("column_mismatch", "stored columns differ from the frame: " + ", ".join(
            f"{c}={getattr(row, c)} but frame has {fields[c]}" for c in differ), **where)
    if row.dev_eui not in enrolled:
        report.add("unknown_device", f"reading of {row.dev_eui}, which is not enrolled", **where)
    elif row.dev_eui in keys:
        try:
            dev_eui = bytes.fromhex(row.dev_eui)
            ok = len(dev_eui) == frame.DEV_EUI_LEN and signing.verify_reading(
                keys[row.dev_eui], dev_eui, reading)
        except ValueError:
            ok = False
        if not ok:
            report.add("bad_signature", "signature does not verify with the enrolled key",
                       **where)
    return reading


def _check_order(group: list[tuple[StoredReading, frame.Reading]], report: _Report) -> None:
    group.sort(key=lambda pair: pair[1].seq)
    prev_row, prev = None, None
    synced_row, synced = None, None
    for row, reading in group:
        where = dict(dev_eui=row.dev_eui, entry_id=row.entry_id, seq=reading.seq)
        if prev is not None:
            if reading.seq == prev.seq:
                report.add("duplicate_seq", f"seq {reading.seq} is stored twice (entries "
                                            f"{prev_row.entry_id} and {row.entry_id})", **where)
            for name in _REGISTERS:
                if getattr(reading, name) < getattr(prev, name):
                    report.add("registers_backwards",
                               f"{name} {getattr(reading, name)} is below "
                               f"{getattr(prev, name)} at seq {prev.seq} "
                               f"(entry {prev_row.entry_id})", **where)
        if not reading.flags & frame.FLAG_CLOCK_UNSYNCED:
            if synced is not None and reading.t_end < synced.t_end:
                report.add("time_backwards",
                           f"t_end {reading.t_end} is before {synced.t_end} at seq "
                           f"{synced.seq} (entry {synced_row.entry_id})", **where)
            synced_row, synced = row, reading
        prev_row, prev = row, reading
