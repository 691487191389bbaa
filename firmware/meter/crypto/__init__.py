# Cryptography for the meter: SHA-512 (sha512) and Ed25519 signing (ed25519).
# Import the submodule you need; this file stays empty so a board loads only
# what it uses.
