# The device's Ed25519 identity.
#
# The private seed is generated on the meter at first boot from the hardware
# random source and stored on its flash; it is never printed, logged or
# returned by any command. Only the public key leaves the device (for
# enrollment). Signing is incremental so the metering loop keeps running.

import os

from meter import store
from meter.crypto import ed25519

KEY_PATH = "device.key"
# The 16-byte key that authenticates downlink commands for this meter
# (meter/frame.py, "command"). Written at provisioning; like the device key
# it is never printed or returned.
COMMAND_KEY_PATH = "command.key"


class Identity:
    def __init__(self, seed):
        # The expanded key is kept rather than the seed: each signature then
        # costs one fixed-base multiplication instead of two.
        self._key = ed25519.SigningKey(seed)
        self.public = self._key.public

    def __repr__(self):
        return "<Identity %s>" % "".join("%02x" % b for b in self.public)

    def signer(self, msg):
        return self._key.signer(msg)


def load_or_create():
    if store.exists(KEY_PATH):
        seed = store.read(KEY_PATH)
        if len(seed) != 32:
            raise ValueError("%s is %d bytes, expected 32" % (KEY_PATH, len(seed)))
    else:
        seed = os.urandom(32)
        store.write_atomic(KEY_PATH, seed)
    return Identity(seed)


def command_key():
    """The provisioned command key, or None (then every command is refused)."""
    if not store.exists(COMMAND_KEY_PATH):
        return None
    k = store.read(COMMAND_KEY_PATH)
    return k if len(k) == 16 else None


def set_command_key(key):
    if len(key) != 16:
        raise ValueError("command key must be 16 bytes, got %d" % len(key))
    store.write_atomic(COMMAND_KEY_PATH, bytes(key))
