"""C2SP signed notes (https://c2sp.org/signed-note), byte for byte as Go's
golang.org/x/mod/sumdb/note writes and reads them.

A note is a text ending in a newline, a blank line, and one or more signature
lines "— <key name> base64(key ID (4) || signature)\\n" (U+2014 em dash). The
key ID is SHA-256(name || "\\n" || signature type || public key)[:4]; keys
travel as strings:

    vkey  <name>+<hex8 key ID>+base64(type || public key)
    skey  PRIVATE+KEY+<name>+<hex8 key ID>+base64(type || Ed25519 seed)

This module signs with type 0x01 (Ed25519 over the text). Type 0x04, the
timestamped witness cosignature, is read and written by checkpoint.py with the
same key encoding (`parse_vkey`, `parse_skey`, `key_id`).

Every check that Go's note.Open makes is made here, with a message that says
what is wrong: valid UTF-8 without control characters other than newline, the
text split from the signatures at the last blank line, each signature line
well formed, at most 100 signatures, a signature by a known key that does not
verify rejects the whole note, and a note without any verified known signature
is rejected. Unknown keys are ignored, as the spec requires, so witnesses can
add their lines to a log's note. One rule is stricter than Go: base64 must be
canonical (what every encoder writes), so one signature has one spelling.

Ed25519 goes through PyNaCl (libsodium), the fastest verifier available here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Iterable, NamedTuple

from nacl import bindings
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

ALG_ED25519 = 0x01  # signed-note Ed25519 over the note text
ALG_COSIGNATURE_V1 = 0x04  # c2sp.org/tlog-cosignature, timestamped Ed25519

MAX_SIGNATURES = 100  # Go's limit; the spec asks verifiers to accept at least 16
KEY_ID_SIZE = 4
PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64

EM_DASH = "\u2014"
SIGNATURE_PREFIX = EM_DASH + " "

_ALG_NAMES = {ALG_ED25519: "Ed25519 (0x01)", ALG_COSIGNATURE_V1: "cosignature/v1 Ed25519 (0x04)"}
_HEX8 = re.compile(r"[0-9a-fA-F]{8}\Z")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")
_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


class NoteError(ValueError):
    """A key string, note or signature that is malformed or does not verify."""


class Signature(NamedTuple):
    """One signature line: the key name, the 4-byte key ID and the signature
    bytes that follow the key ID (for type 0x04 these start with the u64
    timestamp)."""

    name: str
    key_id: bytes
    signature: bytes

    @property
    def line(self) -> str:
        return signature_line(self.name, self.key_id, self.signature)


# --- keys -----------------------------------------------------------------


def key_id(name: str, alg: int, public_key: bytes) -> bytes:
    """SHA-256(name || "\\n" || alg || public key)[:4], the ID the spec recommends
    and Go computes (there the public key already starts with its type byte)."""
    return hashlib.sha256(name.encode() + b"\n" + bytes((alg,)) + public_key).digest()[:KEY_ID_SIZE]


def check_name(name: str, what: str = "key name") -> None:
    """Key names are non-empty UTF-8 without Unicode spaces or '+'."""
    if not isinstance(name, str) or not name:
        raise NoteError(f"{what} is empty")
    if "+" in name:
        raise NoteError(f"{what} {name!r} contains '+'")
    if any(c.isspace() for c in name):
        raise NoteError(f"{what} {name!r} contains white space")
    if _CONTROL.search(name):
        raise NoteError(f"{what} {name!r} contains a control character")
    _utf8(name, what)


def encode_vkey(name: str, alg: int, public_key: bytes) -> str:
    check_name(name)
    kid = key_id(name, alg, public_key).hex()
    return f"{name}+{kid}+{encode_base64(bytes((alg,)) + public_key)}"


def encode_skey(name: str, alg: int, seed: bytes) -> str:
    check_name(name)
    if len(seed) != SEED_SIZE:
        raise NoteError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(seed)}")
    public_key = bytes(SigningKey(bytes(seed)).verify_key)
    kid = key_id(name, alg, public_key).hex()
    return f"PRIVATE+KEY+{name}+{kid}+{encode_base64(bytes((alg,)) + seed)}"


def parse_vkey(vkey: str, alg: int = ALG_ED25519) -> tuple[str, bytes, bytes]:
    """(name, key ID, public key) of a verifier key of type `alg`, with the key ID
    checked against the name and key. Raises NoteError naming the fault."""
    if not isinstance(vkey, str):
        raise NoteError(f"a verifier key is a string, got {type(vkey).__name__}")
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key is not <name>+<key ID>+<base64 key>")
    name, hex_id, key64 = parts
    check_name(name, "verifier key name")
    kid = _parse_key_id(hex_id, "verifier key")
    raw = decode_base64(key64, "verifier key")
    public_key = _typed_key(raw, alg, PUBLIC_KEY_SIZE, "verifier key", "public key")
    if key_id(name, alg, public_key) != kid:
        raise NoteError(
            f"verifier key ID {hex_id} does not match the name and public key of {name!r}")
    if not bindings.crypto_core_ed25519_is_valid_point(public_key):
        raise NoteError(f"verifier key of {name!r} is not a valid Ed25519 public key")
    return name, kid, public_key


def parse_skey(skey: str, alg: int = ALG_ED25519) -> tuple[str, bytes, bytes]:
    """(name, key ID, seed) of a signer key of type `alg`; the key ID must be that
    of the public key derived from the seed. Messages never quote the secret."""
    if not isinstance(skey, str):
        raise NoteError(f"a signer key is a string, got {type(skey).__name__}")
    parts = skey.split("+", 4)
    if len(parts) != 5 or parts[0] != "PRIVATE" or parts[1] != "KEY":
        raise NoteError("signer key is not PRIVATE+KEY+<name>+<key ID>+<base64 key>")
    _, _, name, hex_id, key64 = parts
    check_name(name, "signer key name")
    kid = _parse_key_id(hex_id, "signer key")
    raw = decode_base64(key64, f"signer key of {name!r}")  # messages never include the key text
    seed = _typed_key(raw, alg, SEED_SIZE, "signer key", "seed")
    public_key = bytes(SigningKey(seed).verify_key)
    if key_id(name, alg, public_key) != kid:
        raise NoteError(f"signer key ID {hex_id} does not match the name and key of {name!r}")
    return name, kid, seed


def generate_key(name: str) -> tuple[str, str]:
    """A new Ed25519 note key: (skey, vkey). The skey is secret."""
    return generate_typed_key(name, ALG_ED25519)


def generate_typed_key(name: str, alg: int) -> tuple[str, str]:
    """A new Ed25519 key of signature type `alg` (0x01 or 0x04): (skey, vkey)."""
    check_name(name)
    key = SigningKey.generate()
    return encode_skey(name, alg, bytes(key)), encode_vkey(name, alg, bytes(key.verify_key))


# --- signers and verifiers ------------------------------------------------


class PublicKey:
    """One verifier key (vkey) of type `alg`; equal when the vkeys are."""

    alg = ALG_ED25519

    def __init__(self, vkey: str):
        self.name, self.key_id, self.public_key = parse_vkey(vkey, self.alg)

    @property
    def vkey(self) -> str:
        return encode_vkey(self.name, self.alg, self.public_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vkey!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.vkey == self.vkey  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self.vkey)


class Verifier(PublicKey):
    """Verifies Ed25519 (type 0x01) note signatures of one key."""

    def verify(self, text: str, sig: bytes) -> bool:
        """True when `sig` (the bytes after the key ID) signs `text`."""
        return ed25519_verify(self.public_key, text.encode(), sig)


class Signer:
    """Signs note texts with an Ed25519 (type 0x01) key."""

    alg = ALG_ED25519

    def __init__(self, skey: str):
        self.name, self.key_id, seed = parse_skey(skey, self.alg)
        self._key = SigningKey(seed)
        self.public_key = bytes(self._key.verify_key)

    @property
    def vkey(self) -> str:
        return encode_vkey(self.name, self.alg, self.public_key)

    def verifier(self) -> Verifier:
        return Verifier(self.vkey)

    def sign(self, text: str) -> str:
        """The signature line of `text` (a valid note text)."""
        check_text(text)
        return signature_line(self.name, self.key_id, self._key.sign(text.encode()).signature)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vkey!r})"  # the public half only


def ed25519_verify(public_key: bytes, message: bytes, sig: bytes) -> bool:
    if len(sig) != SIGNATURE_SIZE:
        return False
    try:
        bindings.crypto_sign_open(bytes(sig) + message, public_key)
    except BadSignatureError:
        return False
    return True


# --- notes ----------------------------------------------------------------


def signature_line(name: str, kid: bytes, sig: bytes) -> str:
    return f"{SIGNATURE_PREFIX}{name} {encode_base64(bytes(kid) + bytes(sig))}\n"


def check_text(text: str) -> None:
    """A note text: non-empty UTF-8 ending in a newline, no control characters
    but newline."""
    if not isinstance(text, str):
        raise NoteError(f"a note text is a string, got {type(text).__name__}")
    if not text.endswith("\n"):
        raise NoteError("note text does not end with a newline")
    check_chars(text, "note text")


def sign(text: str, *signers) -> str:
    """The note: `text`, a blank line, and one signature line per signer (any
    object with sign(text) -> line, such as Signer or checkpoint.Cosigner)."""
    check_text(text)
    if not signers:
        raise NoteError("a note needs at least one signer")
    if len(signers) > MAX_SIGNATURES:
        raise NoteError(f"{len(signers)} signers, a note has at most {MAX_SIGNATURES} signatures")
    return text + "\n" + "".join(s.sign(text) for s in signers)


def parse_signature_line(line: str) -> Signature:
    """One signature line, with or without its final newline."""
    if line.endswith("\n"):
        line = line[:-1]
    if "\n" in line:
        raise NoteError("a signature line is one line")
    check_chars(line, "signature line")
    if not line.startswith(SIGNATURE_PREFIX):
        raise NoteError(
            f"signature line does not start with an em dash and a space: {_quote(line)}")
    name, sep, b64 = line[len(SIGNATURE_PREFIX):].partition(" ")
    if not sep:
        raise NoteError(
            f"signature line has no space between key name and signature: {_quote(line)}")
    check_name(name, "signature key name")
    raw = decode_base64(b64, f"signature of {name!r}")
    if len(raw) <= KEY_ID_SIZE:
        raise NoteError(
            f"signature of {name!r} is {len(raw)} bytes, shorter than a key ID and a signature")
    return Signature(name, raw[:KEY_ID_SIZE], raw[KEY_ID_SIZE:])


def split(note: str | bytes) -> tuple[str, list[Signature]]:
    """The text and the signature lines of a note, checked for form but not
    verified. Raises NoteError."""
    note = _as_text(note)
    check_chars(note, "note")
    at = note.rfind("\n\n")
    if at < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = note[: at + 1], note[at + 2:]
    if not block:
        raise NoteError("note has no signature lines after its last blank line")
    if not block.endswith("\n"):
        raise NoteError("note does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signatures, at most {MAX_SIGNATURES} are accepted")
    return text, [parse_signature_line(line) for line in lines]


def open_note(note: str | bytes, verifiers: Iterable) -> tuple[str, list[Signature]]:
    """The text of a note and its signatures by known keys, all verified.

    `verifiers` are objects with name, key_id and verify(text, sig) (Verifier,
    checkpoint.CosignatureVerifier). Signatures by unknown keys are ignored;
    the first signature by a known key decides for that key (later ones by the
    same key are ignored, as in Go). Raises NoteError when the note is
    malformed, when a known key's signature does not verify, or when no known
    key signed it."""
    text, sigs = split(note)
    known: dict[tuple[str, bytes], object] = {}
    ambiguous: set[tuple[str, bytes]] = set()
    for v in verifiers:
        k = (v.name, bytes(v.key_id))
        if k in known and getattr(known[k], "vkey", known[k]) != getattr(v, "vkey", v):
            ambiguous.add(k)
        known.setdefault(k, v)
    verified: list[Signature] = []
    seen: set[tuple[str, bytes]] = set()
    for sig in sigs:
        k = (sig.name, sig.key_id)
        if k not in known or k in seen:
            continue
        if k in ambiguous:
            raise NoteError(
                f"ambiguous key {_key_label(*k)}: two verifiers share its name and key ID")
        seen.add(k)
        if not verified_by(known[k], text, sig.signature):
            raise NoteError(f"signature by {_key_label(*k)} does not verify")
        verified.append(sig)
    if not verified:
        signed = ", ".join(_key_label(s.name, s.key_id) for s in sigs)
        raise NoteError(f"note has no signature by a known key (signed by {signed})")
    return text, verified


def verified_by(verifier, text: str, sig: bytes) -> bool:
    """Whether `verifier` accepts `sig` over `text`. Cosignature verifiers answer
    with the timestamp (which may be 0) or None, note verifiers with a bool."""
    result = verifier.verify(text, sig)
    return result is not None and result is not False


# --- helpers --------------------------------------------------------------


def _key_label(name: str, kid: bytes) -> str:
    return f"{name}+{bytes(kid).hex()}"


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_base64(text: str, what: str) -> bytes:
    """Standard padded base64, canonical only (re-encoding gives the same text)."""
    if not text:
        raise NoteError(f"{what} is empty")
    if not _B64.match(text):
        raise NoteError(f"{what} is not standard padded base64 (truncated or stray characters)")
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:  # unreachable after the pattern; kept as a guard
        raise NoteError(f"{what} is not base64: {e}") from None
    if encode_base64(raw) != text:
        raise NoteError(f"{what} is not canonical base64")
    return raw


def _parse_key_id(hex_id: str, what: str) -> bytes:
    if not _HEX8.match(hex_id):
        raise NoteError(f"{what} ID {hex_id!r} is not 8 hex digits")
    return bytes.fromhex(hex_id)


def _typed_key(raw: bytes, alg: int, size: int, what: str, part: str) -> bytes:
    if raw[0] != alg:
        have = _ALG_NAMES.get(raw[0], f"0x{raw[0]:02x}")
        want = _ALG_NAMES.get(alg, f"0x{alg:02x}")
        raise NoteError(f"{what} has signature type {have}, expected {want}")
    key = raw[1:]
    if len(key) != size:
        raise NoteError(f"{what} {part} is {len(key)} bytes, expected {size}")
    return key


def _utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError(f"{what} is not valid UTF-8") from None


def check_chars(text: str, what: str) -> None:
    m = _CONTROL.search(text)
    if m:
        raise NoteError(
            f"{what} contains control character 0x{ord(m.group()):02x} at offset {m.start()}")
    _utf8(text, what)


def _as_text(note: str | bytes) -> str:
    if isinstance(note, (bytes, bytearray, memoryview)):
        try:
            return bytes(note).decode("utf-8")
        except UnicodeDecodeError as e:
            raise NoteError(f"note is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(note, str):
        raise NoteError(f"a note is text, got {type(note).__name__}")
    return note


def _quote(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")
