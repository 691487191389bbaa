"""Decide whether an uplink is something the gateway may keep: frame,
signature, repeated deliveries.

No I/O: keys come in through a lookup function, and the memory of
deduplication ids is in-process and bounded. Whether the readings of a bundle
are new is decided by the accepted sequence numbers (gateway.seqs), which
the daemon keeps durably; the ledger remains the final authority (it is
idempotent on (device, seq)).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from Crypto.Signature import eddsa

from gateway.chirpstack import Rejected, Uplink
from meter import frame

KeyLookup = Callable[[str], "bytes | None"]

# ChirpStack deduplication ids remembered (about 100 bytes each).
DEDUP_IDS = 16384


class Verifier:
    """`check` parses an uplink and `verify_bundle` checks a bundle's
    signature, both without changing any state; `remember` records a
    deduplication id once its uplink is safely stored, so an uplink that
    could not be stored is not mistaken for a repeat when it comes again."""

    def __init__(self, keys: KeyLookup):
        self._keys = keys
        self._schemes: dict[str, tuple[bytes, object]] = {}
        self._dedup: OrderedDict[str, None] = OrderedDict()

    def check(self, up: Uplink) -> "frame.Bundle | frame.Fragment":
        """The decoded frame of a readings uplink (fPort 1; the caller sorts
        out other ports), signature not yet checked. Raises Rejected with
        reason duplicate (deduplication id already stored) or a
        frame.FrameError reason."""
        dev = up.dev_eui
        if up.deduplication_id and up.deduplication_id in self._dedup:
            raise Rejected("duplicate", f"deduplicationId {up.deduplication_id} already seen", dev)
        try:
            return frame.decode_uplink(up.data)
        except frame.FrameError as exc:
            raise Rejected(exc.reason, exc.message, dev) from None

    def has_key(self, dev_eui: str) -> bool:
        return self._keys(dev_eui) is not None

    def verify_bundle(self, dev_eui: str, data: "bytes | frame.Bundle") -> frame.Bundle:
        """Decode (when given bytes) and check the signature over
        frame.signed_message(dev_eui, body). Raises Rejected with a
        frame.FrameError reason, unknown_device, bad_key or bad_signature."""
        if isinstance(data, frame.Bundle):
            bundle = data
        else:
            try:
                bundle = frame.decode_bundle(data)
            except frame.FrameError as exc:
                raise Rejected(exc.reason, exc.message, dev_eui) from None
        key = self._scheme(dev_eui)
        try:
            key.verify(bundle.signature,
                       frame.signed_message(bytes.fromhex(dev_eui), bundle.body))
        except InvalidSignature:
            raise Rejected("bad_signature", f"signature of the bundle of seq {bundle.first_seq}.."
                           f"{bundle.last_seq} does not verify against the enrolled key",
                           dev_eui) from None
        return bundle

    def remember(self, deduplication_id: str) -> None:
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
        # pycryptodome checks that the key is a point of the curve (OpenSSL
        # would only fail each verification); OpenSSL verifies, 2.8 times
        # faster, which is what decides how many uplinks a gateway takes.
        try:
            eddsa.import_public_key(key)
            scheme = Ed25519PublicKey.from_public_bytes(key)
        except ValueError as exc:
            raise Rejected("bad_key", f"enrolled key of {dev} is not an Ed25519 "
                           f"public key: {exc}", dev) from None
        self._schemes[dev] = (key, scheme)
        return scheme
