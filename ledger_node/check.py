"""Offline consistency check of a ledger database.

Trusts nothing in the file but the bundle bytes and the enrolled keys: every
stored bundle is decoded again and its signature verified again; every
reading must point at a bundle of its device that holds that seq with the
same values; and each device's readings, in seq order, must have unique
seqs, cumulative registers that never go backwards and a t_end that never
goes backwards between readings with a synced clock (the same rules
admission enforces). Served as GET /v1/check and `ledger-node check`.
"""

from __future__ import annotations

from meter import frame

from . import signing
from .store import Store, StoredBundle, StoredReading

MAX_PROBLEMS = 1000  # listed in the report; all are counted

_COLUMNS = ("t_end", "import_dwh", "export_dwh", "flags")
_REGISTERS = ("import_dwh", "export_dwh")


class _Report:
    def __init__(self, max_problems: int):
        self.max_problems = max_problems
        self.problems: list[dict] = []
        self.total = 0

    def add(self, kind: str, message: str, dev_eui: str | None = None,
            entry_id: int | None = None, seq: int | None = None,
            bundle_id: int | None = None) -> None:
        self.total += 1
        if len(self.problems) < self.max_problems:
            self.problems.append({"kind": kind, "dev_eui": dev_eui, "entry_id": entry_id,
                                  "seq": seq, "bundle_id": bundle_id, "message": message})


def check_store(store: Store, max_problems: int = MAX_PROBLEMS) -> dict:
    """The consistency report: {"ok", "bundles", "readings", "devices",
    "problems", "problems_total"}; each problem has kind, dev_eui, entry_id,
    seq, bundle_id, message."""
    report = _Report(max_problems)
    n_readings = n_bundles = 0
    with store.snapshot() as snap:
        devices = {d.dev_eui: d for d in snap.devices()}
        for dev in snap.device_euis():
            device = devices.get(dev)
            key = None
            if device is not None:
                try:
                    key = signing.import_public_key(device.public_key)
                except ValueError as exc:
                    report.add("bad_key", f"enrolled public key is unusable: {exc}", dev)
            stored_ids: set[int] = set()
            proven: dict[int, dict[int, frame.Reading]] = {}  # bundle_id -> seq -> reading
            for b in snap.bundles(dev):
                n_bundles += 1
                stored_ids.add(b.bundle_id)
                decoded = _check_bundle(b, device is not None, key, report)
                if decoded is not None:
                    proven[b.bundle_id] = {r.seq: r for r in decoded.readings}
            checked: list[tuple[StoredReading, object]] = []
            referenced: set[int] = set()
            for row in snap.readings(dev):
                n_readings += 1
                referenced.add(row.bundle_id)
                signed = _check_reading(row, proven, stored_ids, report)
                # The order is judged on the signed values where the bundle
                # proves them; an edited column is a column_mismatch above.
                checked.append((row, signed if signed is not None else row))
            _check_order(checked, report)
            for bundle_id in sorted(stored_ids - referenced):
                report.add("unreferenced_bundle", "no reading refers to this bundle", dev,
                           bundle_id=bundle_id)
    return {"ok": report.total == 0, "bundles": n_bundles, "readings": n_readings,
            "devices": len(devices), "problems": report.problems,
            "problems_total": report.total}


def _check_bundle(b: StoredBundle, enrolled: bool, key, report: _Report):
    where = dict(dev_eui=b.dev_eui, bundle_id=b.bundle_id)
    try:
        bundle = frame.decode_bundle(b.data)
    except frame.FrameError as exc:
        report.add("undecodable", f"stored bundle does not decode: {exc.reason}: {exc.message}",
                   **where)
        return None
    if (b.first_seq, b.last_seq) != (bundle.first_seq, bundle.last_seq):
        report.add("column_mismatch", f"bundle columns say seq {b.first_seq}..{b.last_seq}, the "
                                      f"bundle holds {bundle.first_seq}..{bundle.last_seq}",
                   **where)
    if not enrolled:
        # Its readings are checked against it all the same; nothing can
        # vouch for the bundle itself.
        report.add("unknown_device", f"bundle of {b.dev_eui}, which is not enrolled", **where)
        return bundle
    if key is None:
        return bundle  # bad_key, reported once for the device
    try:
        dev_eui = bytes.fromhex(b.dev_eui)
        ok = len(dev_eui) == frame.DEV_EUI_LEN and signing.verify_bundle(key, dev_eui, bundle)
    except ValueError:
        ok = False
    if not ok:
        report.add("bad_signature", "signature does not verify with the enrolled key", **where)
        return None  # its readings are proven by nothing
    return bundle


def _check_reading(row: StoredReading, proven: dict, stored_ids: set,
                   report: _Report) -> frame.Reading | None:
    """The signed reading that proves this row, or None (problem reported,
    or the bundle's own problem already was)."""
    where = dict(dev_eui=row.dev_eui, entry_id=row.entry_id, seq=row.seq,
                 bundle_id=row.bundle_id)
    if row.bundle_id not in stored_ids:
        report.add("missing_bundle", f"bundle {row.bundle_id} of this reading is not stored "
                                     "for its device", **where)
        return None
    readings = proven.get(row.bundle_id)
    if readings is None:
        return None
    signed = readings.get(row.seq)
    if signed is None:
        report.add("not_in_bundle", f"bundle {row.bundle_id} holds seq "
                                    f"{min(readings)}..{max(readings)}, not {row.seq}", **where)
        return None
    differ = [c for c in _COLUMNS if getattr(row, c) != getattr(signed, c)]
    if differ:
        report.add("column_mismatch", "stored columns differ from the bundle: " + ", ".join(
            f"{c}={getattr(row, c)} but bundle has {getattr(signed, c)}" for c in differ),
            **where)
    return signed


def _check_order(rows: list[tuple[StoredReading, object]], report: _Report) -> None:
    """rows: (stored row, its values) in seq order."""
    prev_row, prev = None, None
    synced_row, synced = None, None
    for row, values in rows:
        where = dict(dev_eui=row.dev_eui, entry_id=row.entry_id, seq=row.seq,
                     bundle_id=row.bundle_id)
        if prev is not None:
            if row.seq == prev_row.seq:
                report.add("duplicate_seq", f"seq {row.seq} is stored twice (entries "
                                            f"{prev_row.entry_id} and {row.entry_id})", **where)
            for name in _REGISTERS:
                if getattr(values, name) < getattr(prev, name):
                    report.add("registers_backwards",
                               f"{name} {getattr(values, name)} is below {getattr(prev, name)} "
                               f"at seq {prev_row.seq} (entry {prev_row.entry_id})", **where)
        if not values.flags & frame.FLAG_CLOCK_UNSYNCED:
            if synced is not None and values.t_end < synced.t_end:
                report.add("time_backwards", f"t_end {values.t_end} is before {synced.t_end} "
                                             f"at seq {synced_row.seq} (entry "
                                             f"{synced_row.entry_id})", **where)
            synced_row, synced = row, values
        prev_row, prev = row, values
