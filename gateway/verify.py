"""Decide whether an uplink is a genuine, new reading: port, frame, signature,
duplicates.

No I/O: keys come in through a lookup function, and the duplicate memory is
in-process and bounded. The ledger remains the final authority on duplicates
(it answers "duplicate" for a reading it already holds); this memory only
keeps the gateway from queueing the same reading twice when the network
server or the broker delivers it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from Crypto.Signature import eddsa

from gateway.chirpstack import Rejected, Uplink
from meter import frame

KeyLookup = Callable[[str], "bytes | None"]

# Readings a device may deliver out of order and still be recognised as
# repeats. Older ones pass through; the ledger still refuses them if stored.
SEQ_WINDOW = 1024
# ChirpStack deduplication ids remembered (about 100 bytes each).
DEDUP_IDS = 16384


@dataclass(frozen=True)
class Verified:
    dev_eui: str
    seq: int
    frame: bytes  # the exact bytes the meter signed and sent
    deduplication_id: str
    reading: frame.Reading


class _SeqWindow:
    """Which of the last SEQ_WINDOW sequence numbers below the highest seen
    have been accepted (an anti-replay window: one int of bits per device)."""

    __slots__ = ("top", "bits")

    def __init__(self):
        self.top = -1
        self.bits = 0

    def __contains__(self, seq: int) -> bool:
        off = self.top - seq
        return 0 <= off < SEQ_WINDOW and bool(self.bits >> off & 1)

    def add(self, seq: int) -> None:
        if seq > self.top:
            self.bits = ((self.bits << (seq - self.top)) | 1) & ((1 << SEQ_WINDOW) - 1)
            self.top = seq
        elif self.top - seq < SEQ_WINDOW:
            self.bits |= 1 << (self.top - seq)


class Verifier:
    """`verify` checks an uplink without changing any state; `remember`
    records an accepted reading once it is safely stored, so a reading that
    could not be stored is not mistaken for a duplicate when it comes again."""

    def __init__(self, keys: KeyLookup, port: int = frame.PORT_READING):
        self._keys = keys
        self._port = port
        self._schemes: dict[str, tuple[bytes, object]] = {}
        self._seqs: dict[str, _SeqWindow] = {}
        self._dedup: OrderedDict[str, None] = OrderedDict()

    def verify(self, up: Uplink) -> Verified:
        """Raises Rejected with reason duplicate, wrong_port, a frame.FrameError
        reason, unknown_device, bad_key or bad_signature."""
        dev = up.dev_eui
        if up.deduplication_id and up.deduplication_id in self._dedup:
            raise Rejected("duplicate", f"deduplicationId {up.deduplication_id} already seen", dev)
        if up.f_port != self._port:
            raise Rejected("wrong_port", f"fPort {up.f_port}, readings use {self._port}", dev)
        try:
            reading = frame.decode(up.data)
        except frame.FrameError as exc:
            raise Rejected(exc.reason, exc.message, dev) from None
        scheme = self._scheme(dev)
        try:
            scheme.verify(frame.signed_message(bytes.fromhex(dev), reading.body),
                          reading.signature)
        except ValueError:
            raise Rejected("bad_signature", f"signature of seq {reading.seq} does not verify "
                           "against the enrolled key", dev) from None
        if reading.seq in self._seqs.get(dev, ()):
            raise Rejected("duplicate", f"seq {reading.seq} already accepted", dev)
        return Verified(dev, reading.seq, bytes(up.data), up.deduplication_id, reading)

    def remember(self, dev_eui: str, seq: int, deduplication_id: str = "") -> None:
        self._seqs.setdefault(dev_eui, _SeqWindow()).add(seq)
        if deduplication_id:
            self._dedup[deduplication_id] = None
            while len(self._dedup) > DEDUP_IDS:
                self._dedup.popitem(last=False)

    def _scheme(self, dev: str):
        key = self._keys(dev)
        if key is None:
            raise Rejected("unknown_device", f"device {dev} is not enrolled", dev)
        cached = self._schemes.get(dev)
        if cached is not None and cached[0] == key:
            return cached[1]
        # Importing a key costs far more than a verification; the key bytes
        # are part of the cache entry so a re-enrolled key replaces the old.
        try:
            scheme = eddsa.new(eddsa.import_public_key(key), "rfc8032")
        except ValueError as exc:
            raise Rejected("bad_key", f"enrolled key of {dev} is not an Ed25519 "
                           f"public key: {exc}", dev) from None
        self._schemes[dev] = (key, scheme)
        return scheme
