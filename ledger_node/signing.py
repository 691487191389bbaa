"""Ed25519 verification of meter bundles, the only place the ledger node calls a crypto library.

Kept apart so the library can be swapped for a faster one (verification is
the ledger's main CPU cost) without touching admission or the check.
"""

from __future__ import annotations

from Crypto.Signature import eddsa

from meter import frame

PUBLIC_KEY_LEN = 32


def import_public_key(raw: bytes):
    """A verifying key from the 32 raw bytes of RFC 8032. Raises ValueError
    when the bytes are not a point on the curve."""
    if len(raw) != PUBLIC_KEY_LEN:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes, got {len(raw)}")
    return eddsa.import_public_key(bytes(raw))


def verify_bundle(key, dev_eui: bytes, bundle: frame.Bundle) -> bool:
    """True when the bundle's signature is the device's over
    frame.signed_message(dev_eui, body)."""
    message = frame.signed_message(dev_eui, bundle.body)
    try:
        eddsa.new(key, "rfc8032").verify(message, bundle.signature)
    except ValueError:
        return False
    return True
