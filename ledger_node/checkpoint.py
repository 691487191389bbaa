"""Checkpoints (https://c2sp.org/tlog-checkpoint), witness cosignatures
(https://c2sp.org/tlog-cosignature, cosignature/v1 with Ed25519) and the k-of-n
policy that decides whether a checkpoint is trusted.

A checkpoint is the text of a signed note:

    <origin>\\n<tree size, decimal>\\n<base64 RFC 6962 root>\\n[extension lines]

signed by the log's note key (type 0x01), whose name is the origin. A witness
that has checked the log only grew adds a cosignature line: a note signature of
type 0x04 whose bytes are key ID (4) || timestamp (u64 big-endian) || Ed25519
signature (64) over

    cosignature/v1\\ntime <timestamp, decimal>\\n<checkpoint text>

Witness keys are vkeys of type 0x04 in both the key ID hash and the encoded
key, as the spec defines them; a plain note key (0x01) is refused as a witness
key rather than silently reinterpreted, so a log key can not be configured as
a witness by mistake.

Parsing is canonical: Checkpoint.parse(text).body() == text, so the bytes a
witness cosigns are the bytes the log signed.

Policy file (TOML):

    log = "<log vkey>"          # the log's key; its name is the checkpoint origin
    quorum = 2                  # cosignatures needed from distinct witnesses below
    witnesses = ["<vkey>", "<vkey>"]
"""

from __future__ import annotations

import re
import struct
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nacl.signing import SigningKey

from . import note
from .note import NoteError

HASH_SIZE = 32
MAX_TREE_SIZE = 2**64 - 1
MAX_TIMESTAMP = 2**63 - 1  # the spec's bound on a cosignature timestamp
TIMESTAMP_SIZE = 8
COSIGNATURE_SIZE = TIMESTAMP_SIZE + note.SIGNATURE_SIZE  # after the key ID

_SIZE = re.compile(r"(?:0|[1-9][0-9]*)\Z")
_POLICY_KEYS = ("log", "quorum", "witnesses")


class CheckpointError(ValueError):
    """A checkpoint, cosignature or signed checkpoint that is malformed or not
    trusted; the message says what is wrong."""


class PolicyError(ValueError):
    """A policy that can not be used. `errors` lists every fault as (key, message)."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "policy"):
        self.errors = list(errors)
        self.source = source
        super().__init__("\n".join(f"{source}: {key}: {message}" for key, message in self.errors))


# --- checkpoint body ------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise CheckpointError("checkpoint origin is empty")
        if "\n" in self.origin:
            raise CheckpointError("checkpoint origin contains a newline")
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise CheckpointError(f"checkpoint size {self.size!r} is not an integer in 0..2^64-1")
        if not isinstance(self.root, (bytes, bytearray)) or len(self.root) != HASH_SIZE:
            raise CheckpointError(f"checkpoint root hash is not {HASH_SIZE} bytes")
        object.__setattr__(self, "root", bytes(self.root))
        extensions = tuple(self.extensions)
        for i, line in enumerate(extensions):
            if not isinstance(line, str) or not line or "\n" in line:
                raise CheckpointError(f"checkpoint extension line {i + 1} is empty or not one line")
        object.__setattr__(self, "extensions", extensions)
        try:
            note.check_chars(self.body(), "checkpoint")
        except NoteError as e:
            raise CheckpointError(str(e)) from None

    def body(self) -> str:
        """The note text: origin, size, base64 root and extension lines, each
        ending in a newline."""
        lines = [self.origin, str(self.size), note.encode_base64(self.root), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """The checkpoint of a note text. Refuses anything that would not come
        back byte for byte from body()."""
        if not isinstance(text, str):
            raise CheckpointError(f"a checkpoint is text, got {type(text).__name__}")
        if not text.endswith("\n"):
            raise CheckpointError("checkpoint does not end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise CheckpointError(
                f"checkpoint has {len(lines)} line(s); it needs origin, tree size and root hash")
        origin, size, root64, *extensions = lines
        if not origin:
            raise CheckpointError("checkpoint origin is empty")
        if not _SIZE.match(size):
            raise CheckpointError(
                f"checkpoint tree size {size[:30]!r} is not a decimal number "
                "without sign or leading zeros")
        n = int(size)
        if n > MAX_TREE_SIZE:
            raise CheckpointError(f"checkpoint tree size {size[:30]} is larger than 2^64-1")
        try:
            root = note.decode_base64(root64, "checkpoint root hash")
        except NoteError as e:
            raise CheckpointError(str(e)) from None
        if len(root) != HASH_SIZE:
            raise CheckpointError(
                f"checkpoint root hash is {len(root)} bytes, expected {HASH_SIZE}")
        for i, line in enumerate(extensions):
            if not line:
                raise CheckpointError(f"checkpoint extension line {i + 1} is empty")
        return cls(origin, n, root, tuple(extensions))


# --- cosignatures ---------------------------------------------------------


def cosignature_message(body: str, timestamp: int) -> bytes:
    """The bytes a cosigner signs: header line, time line, checkpoint text."""
    return f"cosignature/v1\ntime {timestamp}\n{body}".encode()


def cosignature_timestamp(sig: bytes) -> int:
    """The timestamp of a cosignature/v1 signature (the bytes after the key ID)."""
    if len(sig) != COSIGNATURE_SIZE:
        raise CheckpointError(
            f"a cosignature is {COSIGNATURE_SIZE} bytes after the key ID, got {len(sig)}")
    (timestamp,) = struct.unpack(">Q", sig[:TIMESTAMP_SIZE])
    if timestamp > MAX_TIMESTAMP:
        raise CheckpointError(f"cosignature timestamp {timestamp} is larger than 2^63-1")
    return timestamp


def generate_cosigner_key(name: str) -> tuple[str, str]:
    """A new witness key of type 0x04: (skey, vkey). The skey is secret."""
    return note.generate_typed_key(name, note.ALG_COSIGNATURE_V1)


class CosignatureVerifier(note.PublicKey):
    """Verifies cosignature/v1 signatures of one witness key (vkey type 0x04)."""

    alg = note.ALG_COSIGNATURE_V1

    def verify(self, body: str, sig: bytes) -> int | None:
        """The timestamp when `sig` (the bytes after the key ID) cosigns the
        checkpoint text `body`, else None."""
        if len(sig) != COSIGNATURE_SIZE:
            return None
        (timestamp,) = struct.unpack(">Q", sig[:TIMESTAMP_SIZE])
        if timestamp > MAX_TIMESTAMP:
            return None
        message = cosignature_message(body, timestamp)
        if not note.ed25519_verify(self.public_key, message, sig[TIMESTAMP_SIZE:]):
            return None
        return timestamp


class Cosigner:
    """A witness's signing key (skey type 0x04)."""

    alg = note.ALG_COSIGNATURE_V1

    def __init__(self, skey: str):
        self.name, self.key_id, seed = note.parse_skey(skey, self.alg)
        self._key = SigningKey(seed)
        self.public_key = bytes(self._key.verify_key)

    @property
    def vkey(self) -> str:
        return note.encode_vkey(self.name, self.alg, self.public_key)

    def verifier(self) -> CosignatureVerifier:
        return CosignatureVerifier(self.vkey)

    def cosign(self, cp: Checkpoint | str, timestamp: int) -> str:
        """The cosignature line of a checkpoint (or its text) at `timestamp`
        (POSIX seconds)."""
        body = cp.body() if isinstance(cp, Checkpoint) else Checkpoint.parse(cp).body()
        if type(timestamp) is not int or not 0 <= timestamp <= MAX_TIMESTAMP:
            raise CheckpointError(
                f"cosignature timestamp {timestamp!r} is not an integer in 0..2^63-1")
        sig = self._key.sign(cosignature_message(body, timestamp)).signature
        return note.signature_line(self.name, self.key_id, struct.pack(">Q", timestamp) + sig)

    def sign(self, text: str) -> str:
        """Cosign now; lets a Cosigner be passed to note.sign."""
        return self.cosign(text, int(time.time()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vkey!r})"


# --- signed checkpoints ---------------------------------------------------


def sign_checkpoint(cp: Checkpoint, log_signer: note.Signer) -> str:
    """The checkpoint note signed by the log. The key's name must be the origin:
    verify_checkpoint refuses anything else."""
    if log_signer.name != cp.origin:
        raise CheckpointError(
            f"log key name {log_signer.name!r} is not the checkpoint origin {cp.origin!r}")
    return note.sign(cp.body(), log_signer)


def add_cosignatures(signed: str, lines: Iterable[str]) -> str:
    """The note with cosignature lines appended. A line from a key that already
    signed the note is left out (the first cosignature of a witness stays), so
    adding is idempotent. Lines are checked for form only; verify them first
    (CosignatureVerifier.verify)."""
    try:
        _, sigs = note.split(signed)
        new = [note.parse_signature_line(line) for line in lines]
    except NoteError as e:
        raise CheckpointError(str(e)) from None
    have = {(s.name, s.key_id) for s in sigs}
    out = [signed if isinstance(signed, str) else bytes(signed).decode()]
    for sig in new:
        if len(sig.signature) != COSIGNATURE_SIZE:
            raise CheckpointError(
                f"line by {sig.name!r} is not a cosignature/v1 signature "
                f"({len(sig.signature)} bytes after the key ID, expected {COSIGNATURE_SIZE})")
        if (sig.name, sig.key_id) in have:
            continue
        have.add((sig.name, sig.key_id))
        out.append(sig.line)
    total = len(sigs) + len(out) - 1
    if total > note.MAX_SIGNATURES:
        raise CheckpointError(
            f"note would have {total} signatures, at most {note.MAX_SIGNATURES}")
    return "".join(out)


def cosigned_by(signed: str, verifiers: Iterable[CosignatureVerifier]) -> dict[str, int]:
    """Witness name -> timestamp for each verifier with a valid cosignature of
    the note's text, in the order of `verifiers` (the first valid line of a
    witness counts). Does not check the log's signature (verify_checkpoint does)."""
    try:
        text, sigs = note.split(signed)
    except NoteError as e:
        raise CheckpointError(f"malformed checkpoint note: {e}") from None
    valid, _ = _cosignatures(text, sigs, verifiers)
    return valid


def _cosignatures(text: str, sigs: list[note.Signature],
                  verifiers: Iterable[CosignatureVerifier]) -> tuple[dict[str, int], list[str]]:
    # A bad line from a known witness does not reject the note (unlike a bad log
    # signature): anyone can append lines to a note in transit, and the quorum,
    # not any single line, decides. It is only reported.
    valid: dict[str, int] = {}
    invalid: list[str] = []
    for v in verifiers:
        mine = [s for s in sigs if s.name == v.name and s.key_id == v.key_id]
        for s in mine:
            timestamp = v.verify(text, s.signature)
            if timestamp is not None:
                valid[v.name] = timestamp
                break
        else:
            if mine:
                invalid.append(v.name)
    return valid, invalid


# --- policy ---------------------------------------------------------------


@dataclass
class Policy:
    """Whom to trust: the log's key, the witnesses, and how many of them must
    have cosigned a checkpoint (0: the log's signature alone)."""

    log: note.Verifier
    witnesses: list[CosignatureVerifier] = field(default_factory=list)
    quorum: int = 0

    def __post_init__(self) -> None:
        self.witnesses = list(self.witnesses)
        errors: list[tuple[str, str]] = []
        if not isinstance(self.log, note.Verifier):
            errors.append(("log", f"must be a note.Verifier, got {type(self.log).__name__}"))
        pairs = []
        for i, w in enumerate(self.witnesses):
            if isinstance(w, CosignatureVerifier):
                pairs.append((f"witnesses[{i}]", w))
            else:
                errors.append((f"witnesses[{i}]",
                               f"must be a CosignatureVerifier, got {type(w).__name__}"))
        log = self.log if isinstance(self.log, note.Verifier) else None
        errors += _policy_errors(log, pairs, self.quorum, len(self.witnesses))
        if errors:
            raise PolicyError(errors)


def _policy_errors(log: note.Verifier | None, witnesses: list[tuple[str, CosignatureVerifier]],
                   quorum: object, listed: int) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    names: dict[str, str] = {}
    keys: dict[bytes, str] = {}
    for where, w in witnesses:
        if w.name in names:
            errors.append((where, f"witness name {w.name!r} is also {names[w.name]}"))
        elif w.public_key in keys:
            errors.append((where, f"same public key as {keys[w.public_key]}: the cosigned message "
                                  "does not include the name, so one key can not be two witnesses"))
        elif log is not None and w.public_key == log.public_key:
            errors.append((where, "is the log's own key; a log can not witness itself"))
        names.setdefault(w.name, where)
        keys.setdefault(w.public_key, where)
    if type(quorum) is not int:
        errors.append(("quorum", f"must be an integer, got {type(quorum).__name__}"))
    elif quorum < 0:
        errors.append(("quorum", f"{quorum} is negative"))
    elif quorum > listed:
        errors.append(("quorum", f"{quorum} is more than the {listed} witness(es) listed"))
    return errors


def parse_policy(text: str, source: str = "policy") -> Policy:
    """The policy in TOML text. Raises PolicyError listing every fault by key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError([("toml", str(e))], source) from None
    errors: list[tuple[str, str]] = []
    for key in data:
        if key not in _POLICY_KEYS:
            errors.append((key, f"unknown key (known: {', '.join(_POLICY_KEYS)})"))

    log = None
    if "log" not in data:
        errors.append(("log", "missing: the log's verifier key"))
    elif not isinstance(data["log"], str):
        errors.append(("log", f"must be a verifier key string, got {_toml_type(data['log'])}"))
    else:
        try:
            log = note.Verifier(data["log"])
        except NoteError as e:
            errors.append(("log", str(e)))

    witnesses: list[tuple[str, CosignatureVerifier]] = []
    raw = data.get("witnesses", [])
    if not isinstance(raw, list):
        errors.append(("witnesses",
                       f"must be a list of verifier key strings, got {_toml_type(raw)}"))
        raw = []
    for i, item in enumerate(raw):
        where = f"witnesses[{i}]"
        if not isinstance(item, str):
            errors.append((where, f"must be a verifier key string, got {_toml_type(item)}"))
            continue
        try:
            witnesses.append((where, CosignatureVerifier(item)))
        except NoteError as e:
            errors.append((where, str(e)))

    if "quorum" not in data:
        errors.append(("quorum", "missing: how many witness cosignatures are needed (0: none)"))
        errors += _policy_errors(log, witnesses, 0, len(raw))
    else:
        errors += _policy_errors(log, witnesses, data["quorum"], len(raw))
    if errors:
        raise PolicyError(errors, source)
    return Policy(log, [w for _, w in witnesses], data["quorum"])  # type: ignore[arg-type]


def load_policy(path: str | Path) -> Policy:
    """The policy in a TOML file. Raises PolicyError naming the file and every fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError([("file", f"can not be read: {e.strerror or e}")], str(path)) from None
    except UnicodeDecodeError:
        raise PolicyError([("file", "is not UTF-8")], str(path)) from None
    return parse_policy(text, str(path))


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


# --- verification ---------------------------------------------------------


def verify_checkpoint(signed: str, policy: Policy) -> tuple[Checkpoint, list[str]]:
    """The checkpoint of a signed note and the names of the policy witnesses
    that cosigned it, when the log's signature verifies, the origin is the
    log's key name and at least `policy.quorum` distinct witnesses cosigned
    this very text. Raises CheckpointError saying which condition failed."""
    try:
        text, sigs = note.split(signed)
    except NoteError as e:
        raise CheckpointError(f"malformed checkpoint note: {e}") from None
    log_label = f"{policy.log.name}+{policy.log.key_id.hex()}"
    try:
        note.open_note(signed, [policy.log])
    except NoteError as e:
        raise CheckpointError(f"not a checkpoint of log {log_label}: {e}") from None
    cp = Checkpoint.parse(text)
    if cp.origin != policy.log.name:
        raise CheckpointError(
            f"checkpoint origin {cp.origin!r} is not the log's key name {policy.log.name!r}")
    valid, invalid = _cosignatures(text, sigs, policy.witnesses)
    if len(valid) < policy.quorum:
        found = ", ".join(valid) or "none"
        detail = f"; cosignatures that do not verify: {', '.join(invalid)}" if invalid else ""
        raise CheckpointError(
            f"checkpoint of size {cp.size} has {len(valid)} valid cosignature(s) from policy "
            f"witnesses, {policy.quorum} needed (cosigned by: {found}{detail})")
    return cp, list(valid)
