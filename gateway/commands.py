"""Per-device command keys: the file the operator gives the gateway, read and checked.

A downlink command (docs/protocol.md, type 8) carries a truncated
HMAC-SHA256 under the meter's 16-byte command key. The keys are written into
the meters at provisioning and held only by the operator's gateway, in a JSON
object {dev_eui_hex: key_hex}. The network server never sees them, so it
cannot forge a relay command although it holds the LoRaWAN session keys.

The file is checked as a whole: one bad entry refuses the file, with a message
naming the entry, so a typo never leaves a meter silently without commands.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path

from meter import frame

log = logging.getLogger(__name__)

_DEV_EUI = re.compile(r"[0-9a-fA-F]{16}\Z")
_KEY = re.compile(r"[0-9a-fA-F]{%d}\Z" % (2 * frame.COMMAND_KEY_LEN))


class CommandError(Exception):
    """A command that was not sent. `reason` is a short stable code (no_key,
    no_application, offline, field, publish); the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_command_keys(doc) -> dict[str, bytes]:
    """{dev_eui (lower-case hex): key bytes} from the parsed JSON; ValueError
    naming the first bad entry."""
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object {{dev_eui: key}}, got {type(doc).__name__}")
    keys: dict[str, bytes] = {}
    for eui, key in doc.items():
        if not _DEV_EUI.match(eui):
            raise ValueError(f"entry {eui!r}: a DevEUI is 16 hex digits")
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"entry {eui}: the command key must be {2 * frame.COMMAND_KEY_LEN} "
                             f"hex digits ({frame.COMMAND_KEY_LEN} bytes)")
        if eui.lower() in keys:
            raise ValueError(f"entry {eui}: DevEUI given twice")
        keys[eui.lower()] = bytes.fromhex(key)
    return keys


def load_command_keys(path: str | os.PathLike) -> dict[str, bytes]:
    """Read and check a keys file; ValueError with the path and what is wrong."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"command keys {path}: cannot read: {exc.strerror or exc}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"command keys {path}: not JSON: {exc}") from None
    try:
        keys = parse_command_keys(doc)
    except ValueError as exc:
        raise ValueError(f"command keys {path}: {exc}") from None
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("command keys %s can be read by other users (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return keys


class CommandKeys:
    """The keys in use, reloaded when the file changes (a newly provisioned
    meter needs no restart). A changed file that does not pass the checks is
    logged and the keys in use stay."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self._keys: dict[str, bytes] = {}
        self._stamp: tuple | None = None
        if self.path is not None:
            self._stamp = self._file_stamp()
            self._keys = load_command_keys(self.path)

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, dev_eui: str) -> bytes | None:
        return self._keys.get(dev_eui)

    def _file_stamp(self) -> tuple | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload_if_changed(self) -> bool:
        """True when new keys were loaded."""
        if self.path is None:
            return False
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            keys = load_command_keys(self.path)
        except ValueError as exc:
            log.error("%s; keeping the %d keys in use", exc, len(self._keys))
            return False
        self._keys = keys  # one assignment: readers see the old or the new map
        log.info("command keys reloaded from %s: %d devices", self.path, len(keys))
        return True
