"""The witness: follows one log over HTTP, checks it, and cosigns its checkpoints.

A witness is what makes a log's signature worth something to people who do
not trust the operator (the proof of authority of the design, done the
transparency-log way): it cosigns a checkpoint only after it has seen for
itself that

- the log's tree only grew: the checkpoint's tree extends the one it
  cosigned last (a consistency proof from the log, checked against the root
  the witness kept), and the log never shows a smaller tree or another root
  for a size already cosigned;
- every new entry is one the rules allow: each is decoded, registry entries
  are replayed into the witness's own `entries.Registry` and every readings
  entry's device signature is verified with the key that registry holds;
- the entries it was served hash to the checkpoint's root (the witness keeps
  its own `merkle.Frontier`).

The first run trusts nothing but the log's key: it starts at size 0 and
verifies every entry from entry 0. Afterwards its state file (the last
cosigned checkpoint, the frontier, the registry) lets it resume where it
stopped without fetching old entries again. The state is written atomically
and before a cosignature leaves the process, so a witness never cosigns two
roots for one size, nor a smaller tree after a bigger one, even across a
crash.

Any inconsistency flags the log for good: the witness keeps the evidence
(the checkpoint it cosigned before, the new signed note, the reason and the
entry if one is to blame), logs it as CRITICAL and cosigns nothing more of
that log until the operator deletes the state. Network failures, 5xx
answers, timeouts and malformed answers are not evidence of anything (anyone
on the path can cause them): they are counted, logged, and retried with
back-off.

    w = Witness("http://ledger:8480", skey, log_vkey, "witness.json")
    w.poll_once()    # "cosigned 42", "up to date", "flagged: ...", "unreachable: ..."
    w.run(stop)      # poll every interval_s until stop is set
    w.status()       # JSON-ready summary, also served by StatusServer

Command line: `ledger-node witness --log URL --key FILE --log-key VKEY --state FILE`
(add_arguments / run_cli).
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from . import checkpoint as ckpt
from . import entries, merkle, note

log = logging.getLogger("ledger_node.witness")

STATE_FORMAT = "ledger-witness/1"
ENTRIES_PAGE = 1000  # the most GET /v1/entries returns at once
MAX_RESPONSE = 32 * 1024 * 1024  # a page of 1000 entries is a few MB of hex
MAX_BACKOFF_S = 60.0
_HASH_HEX = re.compile(r"[0-9a-f]{64}\Z")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*\Z")

EXIT_OK = 0
EXIT_FLAGGED = 1
EXIT_ERROR = 2


class WitnessError(Exception):
    """The witness can not start: bad key, bad URL, unusable or foreign state."""


class _Unreachable(Exception):
    """The log could not be asked (network, timeout, 5xx)."""


class _Malformed(Exception):
    """The log answered something that is not an answer; proves nothing."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Stopped(Exception):
    pass


class _Flag(Exception):
    """The log contradicts itself or its rules."""

    def __init__(self, reason: str, message: str, new_note: str, entry: int | None = None,
                 entry_data: bytes | None = None, checkpoint: ckpt.Checkpoint | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.new_note = new_note
        self.entry = entry
        self.entry_data = entry_data
        self.checkpoint = checkpoint


@dataclass
class _Progress:
    """Entries verified past the cosigned size, kept between polls so a long
    catch-up interrupted by the network goes on where it stopped."""
    frontier: merkle.Frontier
    registry: entries.Registry
    refusal: tuple | None = None  # (index, reason, message, data) of the first bad entry


# -- HTTP ----------------------------------------------------------------------


class _Client:
    """One kept-alive connection to the log (a catch-up is many pages)."""

    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WitnessError(f"log URL {url!r}: expected http(s)://HOST[:PORT][/PATH]")
        try:
            self._port = parts.port
        except ValueError as exc:
            raise WitnessError(f"log URL {url!r}: {exc}") from None
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._base = parts.path.rstrip("/")
        self._timeout = timeout_s
        self._conn: http.client.HTTPConnection | None = None
        self.requests: Counter = Counter()

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=self._timeout)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method: str, path: str, kind: str, body=None) -> tuple[int, bytes]:
        """(status, body). Raises _Unreachable on network failures and 5xx."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"User-Agent": "ledger-node-witness"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = self._connect()
            self.requests[kind] += 1
            try:
                self._conn.request(method, self._base + path, body=data, headers=headers)
                resp = self._conn.getresponse()
                payload = resp.read(MAX_RESPONSE + 1)
                status = resp.status
                if resp.will_close or len(payload) > MAX_RESPONSE:
                    self.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                # A kept-alive connection the server closed while idle (or
                # before a restart): ask once more on a fresh one. Every
                # request the witness makes may be repeated.
                if reused and attempt == 0:
                    continue
                raise _Unreachable(f"{method} {path}: {exc or type(exc).__name__}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise _Unreachable(f"{method} {path}: {exc or type(exc).__name__}") from None
            if len(payload) > MAX_RESPONSE:
                raise _Malformed(kind, f"{method} {path}: answer longer than {MAX_RESPONSE} bytes")
            if status >= 500:
                raise _Unreachable(f"{method} {path}: HTTP {status} {_snippet(payload)}")
            return status, payload
        raise AssertionError("unreachable")  # the loop returns or raises


def _snippet(payload: bytes) -> str:
    text = payload[:200].decode("utf-8", "replace").strip()
    return text if len(payload) <= 200 else text + "..."


def _json(payload: bytes, kind: str, what: str):
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _Malformed(kind, f"{what}: not JSON ({exc})") from None


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- state -----------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename over path, fsync the directory: after a crash
    the file holds the old state or the new one, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Witness:
    """Follows the log at `log_url` signed with `log_vkey` and cosigns its
    checkpoints with `cosigner_skey` (a cosignature/v1 key), keeping its
    state in `state_path`. One Witness per state file: the file is locked."""

    def __init__(self, log_url: str, cosigner_skey: str, log_vkey: str, state_path, *,
                 interval_s: float = 1.0, timeout_s: float = 10, clock=time.time):
        try:
            self.cosigner = ckpt.Cosigner(cosigner_skey)
        except ValueError as exc:
            raise WitnessError(f"witness key: {exc}") from None
        try:
            self.log_verifier = note.Verifier(log_vkey)
        except ValueError as exc:
            raise WitnessError(f"log key: {exc}") from None
        if self.cosigner.public_key == self.log_verifier.public_key:
            raise WitnessError("the witness key is the log's own key; a log can not witness itself")
        self.log_url = log_url.rstrip("/")
        self.origin = self.log_verifier.name
        self.interval_s = interval_s
        self.state_path = Path(state_path)
        self._clock = clock
        self._client = _Client(self.log_url, timeout_s)
        self._policy = ckpt.Policy(self.log_verifier)
        self._mine = self.cosigner.verifier()
        self._poll_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop: threading.Event | None = None
        self.counters: Counter = Counter()
        self._last_poll: dict | None = None
        self._progress: _Progress | None = None
        self._delivered: int | None = None  # size whose cosignature the log acknowledged
        self._lock_fd = self._lock_state()
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        if self._flag:
            log.critical("log %s is flagged (%s: %s); this witness cosigns nothing more of it "
                         "(evidence in %s)", self.origin, self._flag["reason"],
                         self._flag.get("message"), self.state_path)

    # -- state file ----------------------------------------------------------

    def _lock_state(self) -> int:
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WitnessError(f"{lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            # Two witnesses on one state could each cosign a different root
            # for one size: the state is what prevents that.
            raise WitnessError(f"{self.state_path} is in use by another witness") from None
        return fd

    def close(self) -> None:
        """Release the state file and the connection."""
        self._client.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def _load(self) -> None:
        self._size = 0
        self._root = merkle.EMPTY_ROOT
        self._note: str | None = None  # the last cosigned checkpoint as the log signed it
        self._line: str | None = None  # our cosignature of it
        self._cosigned_at: int | None = None
        self._frontier = merkle.Frontier()
        self._registry = entries.Registry()
        self._flag: dict | None = None
        if not self.state_path.exists():
            log.info("no state in %s: verifying log %s from entry 0", self.state_path, self.origin)
            return
        where = str(self.state_path)
        try:
            state = json.loads(self.state_path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise WitnessError(f"{where}: unreadable witness state ({exc}); a witness that "
                               "forgets what it cosigned could cosign a fork, so it does not "
                               "start over by itself: restore the file or delete it") from None
        try:
            self._restore(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise WitnessError(f"{where}: not a valid witness state: {exc}; restore the file or "
                               "delete it to verify the log again from entry 0") from None

    def _restore(self, state) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"format is not {STATE_FORMAT!r}")
        if state["log_key"] != self.log_verifier.vkey:
            raise WitnessError(f"{self.state_path}: the state is for log key {state['log_key']}, "
                               f"not {self.log_verifier.vkey}")
        if state.get("witness_key") != self.cosigner.vkey:
            log.warning("%s was written with witness key %s; cosigning with %s from now on",
                        self.state_path, state.get("witness_key"), self.cosigner.vkey)
        frontier = merkle.Frontier.from_bytes(bytes.fromhex(state["frontier"]))
        registry = entries.Registry.from_json(json.dumps(state["registry"]))
        size, root = state["size"], bytes.fromhex(state["root"])
        if size != frontier.size or root != frontier.root():
            raise ValueError(f"the frontier (size {frontier.size}) does not give size {size} and "
                             "its root")
        if registry.last_index != size - 1:
            raise ValueError(f"the registry was replayed to entry {registry.last_index}, the tree "
                             f"has {size} entries")
        cosigned = state.get("cosigned")
        if cosigned is None:
            if size:
                raise ValueError(f"size {size} without the checkpoint cosigned at it")
        else:
            cp, _ = ckpt.verify_checkpoint(cosigned["note"], self._policy)
            if (cp.size, cp.root) != (size, root):
                raise ValueError("the cosigned checkpoint is not the state's size and root")
            self._note = cosigned["note"]
            self._line = cosigned["cosignature"]
            self._cosigned_at = int(cosigned["at"])
        flag = state.get("flag")
        if flag is not None and not (isinstance(flag, dict)
                                     and isinstance(flag.get("reason"), str)):
            raise ValueError("flag: expected the evidence object")
        self._size, self._root = size, root
        self._frontier, self._registry = frontier, registry
        self._flag = flag
        log.info("resuming log %s at size %d from %s", self.origin, size, self.state_path)

    def _state_doc(self, *, size, root, frontier, registry, cosigned, flag) -> bytes:
        return json.dumps({
            "format": STATE_FORMAT,
            "log": self.log_url,
            "log_key": self.log_verifier.vkey,
            "witness_key": self.cosigner.vkey,
            "size": size,
            "root": root.hex(),
            "cosigned": cosigned,
            "frontier": frontier.to_bytes().hex(),
            "registry": json.loads(registry.to_json()),
            "flag": flag,
        }, indent=1).encode()

    def _cosigned_doc(self) -> dict | None:
        if self._note is None:
            return None
        return {"note": self._note, "cosignature": self._line, "at": self._cosigned_at}

    # -- polling -------------------------------------------------------------------

    def poll_once(self) -> str:
        """Look at the log once; what happened: "cosigned N", "up to date",
        "flagged: <reason>: ...", "unreachable: ...", "malformed: ...",
        "waiting: ..." (no checkpoint yet) or "error: ..." (state not saved)."""
        with self._poll_lock:
            result = self._poll()
            with self._state_lock:
                self._last_poll = {"at": self._clock(), "result": result}
            return result

    def _poll(self) -> str:
        if self._flag is not None:
            return f"flagged: {self._flag['reason']}: {self._flag.get('message')}"
        self.counters["polls"] += 1
        try:
            return self._step()
        except _Flag as flag:
            self._raise_flag(flag)
            return f"flagged: {flag.reason}: {flag.message}"
        except _Unreachable as exc:
            self.counters["unreachable"] += 1
            log.warning("log %s unreachable: %s", self.origin, exc)
            return f"unreachable: {exc}"
        except _Malformed as exc:
            self.counters["malformed"] += 1
            self.counters[f"malformed:{exc.kind}"] += 1
            log.warning("log %s answered something malformed: %s", self.origin, exc)
            return f"malformed: {exc}"
        except _Stopped:
            return "stopped"
        except OSError as exc:  # the state could not be written
            self.counters["state_errors"] += 1
            log.error("witness state %s not saved: %s", self.state_path, exc)
            return f"error: state not saved: {exc}"
        except Exception as exc:  # a fault of ours; the next poll starts clean
            self._progress = None
            self.counters["errors"] += 1
            log.exception("polling log %s failed", self.origin)
            return f"error: {type(exc).__name__}: {exc}"

    def _step(self) -> str:
        status, payload = self._client.request("GET", "/v1/checkpoint", "checkpoint")
        if status == 404:
            doc = _json(payload, "checkpoint", "GET /v1/checkpoint 404")
            if isinstance(doc, dict) and doc.get("error") == "no_checkpoint":
                return "waiting: the log has not signed a checkpoint yet"
        if status != 200:
            raise _Malformed("checkpoint", f"GET /v1/checkpoint: HTTP {status} "
                                           f"{_snippet(payload)}")
        try:
            text = payload.decode("utf-8")
            cp, _ = ckpt.verify_checkpoint(text, self._policy)
        except (UnicodeDecodeError, ValueError) as exc:
            # Without a valid log signature it is nobody's statement.
            raise _Malformed("checkpoint", f"GET /v1/checkpoint: {exc}") from None

        if cp.size < self._size:
            raise _Flag("rollback", f"the log shows a tree of size {cp.size}, smaller than the "
                                    f"size {self._size} cosigned before", text, checkpoint=cp)
        if cp.size == self._size:
            if cp.root != self._root:
                raise _Flag("fork", f"the log signed two roots for size {cp.size}: "
                                    f"{self._root.hex()} (cosigned before) and {cp.root.hex()}",
                            text, checkpoint=cp)
            if self._note is None:  # the empty tree, never cosigned yet
                return self._cosign(cp, text, self._frontier, self._registry)
            return self._redeliver(text)

        self._check_consistency(cp, text)
        progress = self._replay(cp)
        if progress.frontier.root() != cp.root:
            self._progress = None
            bad = progress.refusal
            raise _Flag("root_mismatch",
                        f"entries {self._size}..{cp.size - 1} as the log serves them hash to "
                        f"{progress.frontier.root().hex()}, not to the root {cp.root.hex()} of "
                        f"its checkpoint of size {cp.size}"
                        + (f" (entry {bad[0]} is also refused: {bad[1]}: {bad[2]})" if bad else ""),
                        text, checkpoint=cp)
        if progress.refusal is not None:
            self._progress = None
            index, reason, message, data = progress.refusal
            raise _Flag(reason, f"entry {index}, under the signed root of size {cp.size}: "
                                f"{message}", text, entry=index, entry_data=data, checkpoint=cp)
        return self._cosign(cp, text, progress.frontier, progress.registry)

    def _check_consistency(self, cp: ckpt.Checkpoint, text: str) -> None:
        """The log's proof that its new tree extends the one cosigned before.
        Nothing to prove from the empty tree."""
        if self._size == 0:
            return
        path = f"/v1/proof/consistency?from={self._size}&to={cp.size}"
        status, payload = self._client.request("GET", path, "consistency")
        if status != 200:
            raise _Malformed("consistency", f"GET {path}: HTTP {status} {_snippet(payload)}")
        doc = _json(payload, "consistency", f"GET {path}")
        proof = doc.get("proof") if isinstance(doc, dict) else None
        if (not isinstance(doc, dict) or doc.get("from") != self._size or doc.get("to") != cp.size
                or not isinstance(proof, list)
                or not all(isinstance(h, str) and _HASH_HEX.match(h) for h in proof)):
            raise _Malformed("consistency", f"GET {path}: expected {{\"from\": {self._size}, "
                                            f"\"to\": {cp.size}, \"proof\": [hex hashes]}}")
        try:
            merkle.check_consistency([bytes.fromhex(h) for h in proof], self._size, cp.size,
                                     self._root, cp.root)
        except merkle.ProofError as exc:
            raise _Flag("inconsistent", f"the checkpoint of size {cp.size} does not extend the "
                                        f"one of size {self._size} cosigned before: {exc}",
                        text, checkpoint=cp) from None

    def _replay(self, cp: ckpt.Checkpoint) -> _Progress:
        """Fetch and check the entries up to cp.size (from where the last
        interrupted catch-up stopped, if it is still on the way)."""
        progress = self._progress
        if progress is None or progress.frontier.size > cp.size:
            progress = _Progress(self._frontier.copy(), self._registry.copy())
            self._progress = progress
        start = progress.frontier.size
        began, reported = time.monotonic(), time.monotonic()
        while start < cp.size:
            if self._stop is not None and self._stop.is_set():
                raise _Stopped()
            end = min(cp.size, start + ENTRIES_PAGE)
            page = self._entries(start, end)
            # The whole page is well formed before anything is applied, so a
            # malformed answer leaves the progress as it was.
            for index, data in page:
                progress.frontier.append(merkle.leaf_hash(data))
                if progress.refusal is not None:
                    continue  # the tree still needs every leaf; the verdict is made
                try:
                    progress.registry.apply(entries.decode(data), index)
                except (entries.EntryError, entries.Refused) as exc:
                    progress.refusal = (index, exc.reason, exc.message, data)
            start += len(page)
            self.counters["entries_verified"] += len(page)
            if time.monotonic() - reported > 10:
                reported = time.monotonic()
                log.info("log %s: verified entries up to %d of %d (%.0f/s)", self.origin, start,
                         cp.size, (start - self._size) / (reported - began))
        return progress

    def _entries(self, start: int, end: int) -> list[tuple[int, bytes]]:
        path = f"/v1/entries?start={start}&end={end}"
        status, payload = self._client.request("GET", path, "entries")
        if status != 200:
            raise _Malformed("entries", f"GET {path}: HTTP {status} {_snippet(payload)}")
        doc = _json(payload, "entries", f"GET {path}")
        items = doc.get("entries") if isinstance(doc, dict) else None
        if not isinstance(items, list) or not items or len(items) > end - start:
            raise _Malformed("entries", f"GET {path}: expected {{\"entries\": [...]}} with 1 to "
                                        f"{end - start} entries")
        page = []
        for n, item in enumerate(items):
            if (not isinstance(item, dict) or item.get("index") != start + n
                    or not _is_index(item.get("index")) or not isinstance(item.get("data"), str)
                    or not _HEX.match(item["data"])):
                raise _Malformed("entries", f"GET {path}: item {n} is not "
                                            f"{{\"index\": {start + n}, \"data\": hex}}")
            page.append((start + n, bytes.fromhex(item["data"])))
        self.counters["entries_fetched"] += len(page)
        return page

    # -- cosigning -----------------------------------------------------------------

    def _cosign(self, cp: ckpt.Checkpoint, text: str, frontier: merkle.Frontier,
                registry: entries.Registry) -> str:
        # Timestamps never go back, whatever the clock does.
        at = max(int(self._clock()), self._cosigned_at or 0)
        line = self.cosigner.cosign(cp, at)
        cosigned = {"note": text, "cosignature": line, "at": at}
        # The state is on disk before the cosignature leaves the process: a
        # witness restarted after a crash knows it cosigned this size.
        _write_atomic(self.state_path, self._state_doc(
            size=cp.size, root=cp.root, frontier=frontier, registry=registry,
            cosigned=cosigned, flag=None))
        with self._state_lock:
            self._size, self._root = cp.size, cp.root
            self._note, self._line, self._cosigned_at = text, line, at
            self._frontier, self._registry = frontier, registry
            self._progress = None
            self._delivered = None
        self.counters["cosigned"] += 1
        log.info("cosigned checkpoint %d of %s (root %s)", cp.size, self.origin,
                 cp.root.hex()[:16])
        problem = self._deliver(cp.size, line)
        return f"cosigned {cp.size}" + (f", not delivered yet: {problem}" if problem else "")

    def _redeliver(self, text: str) -> str:
        """The log shows the checkpoint cosigned last: send the cosignature
        again when the log does not show it (lost, or the log restarted)."""
        if self._delivered != self._size:
            try:
                shown = ckpt.cosigned_by(text, [self._mine])
            except ckpt.CheckpointError:
                shown = {}
            if self._mine.name in shown:
                self._delivered = self._size
            else:
                problem = self._deliver(self._size, self._line)
                if problem:
                    return f"up to date, cosignature not delivered yet: {problem}"
        return "up to date"

    def _deliver(self, size: int, line: str) -> str | None:
        """POST the cosignature; None when the log took it, else why not."""
        try:
            status, payload = self._client.request(
                "POST", "/v1/cosignatures", "cosignature", {"size": size, "cosignature": line})
        except _Unreachable as exc:
            self.counters["deliveries_failed"] += 1
            log.warning("cosignature of size %d not delivered: %s; sent again later", size, exc)
            return str(exc)
        if status == 200:
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("status") in ("stored", "duplicate"):
                self._delivered = size
                self.counters["delivered"] += 1
                return None
        self.counters["deliveries_refused"] += 1
        log.warning("log %s refused the cosignature of size %d: HTTP %d %s", self.origin, size,
                    status, _snippet(payload))
        return f"HTTP {status} {_snippet(payload)}"

    # -- flagging ---------------------------------------------------------------------

    def _raise_flag(self, flag: _Flag) -> None:
        evidence = {
            "reason": flag.reason,
            "message": flag.message,
            "at": self._clock(),
            "cosigned_size": self._size if self._note is not None else None,
            "cosigned_note": self._note,
            "note": flag.new_note,
            "entry": flag.entry,
            "entry_data": None if flag.entry_data is None else flag.entry_data.hex(),
            "inclusion": None,
        }
        if flag.entry is not None and flag.checkpoint is not None:
            evidence["inclusion"] = self._inclusion(flag.entry, flag.entry_data, flag.checkpoint)
        with self._state_lock:
            self._flag = evidence
            self._progress = None
        self.counters["flagged"] += 1
        log.critical("log %s FLAGGED (%s): %s; this witness cosigns nothing more of it until "
                     "%s is deleted", self.origin, flag.reason, flag.message, self.state_path)
        try:
            _write_atomic(self.state_path, self._state_doc(
                size=self._size, root=self._root, frontier=self._frontier,
                registry=self._registry, cosigned=self._cosigned_doc(), flag=evidence))
        except OSError as exc:
            # Still flagged in memory: nothing more is cosigned by this process.
            self.counters["state_errors"] += 1
            log.error("the evidence could not be saved to %s: %s", self.state_path, exc)

    def _inclusion(self, index: int, data: bytes, cp: ckpt.Checkpoint) -> list[str] | None:
        """The log's own proof that the refused entry is under its signed root,
        kept with the evidence when it checks (best effort)."""
        path = f"/v1/proof/inclusion?index={index}&size={cp.size}"
        try:
            status, payload = self._client.request("GET", path, "inclusion")
            doc = json.loads(payload) if status == 200 else None
            proof = [bytes.fromhex(h) for h in doc["proof"]]
            merkle.check_inclusion(proof, index, cp.size, merkle.leaf_hash(data), cp.root)
        except (_Unreachable, _Malformed, ValueError, TypeError, KeyError):
            return None
        return [h.hex() for h in proof]

    # -- running -------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Poll every interval_s until stop_event is set; after failures wait
        longer (doubling, at most MAX_BACKOFF_S)."""
        self._stop = stop_event
        failures = 0
        while not stop_event.is_set():
            result = self.poll_once()
            if result.startswith(("unreachable", "malformed", "error")):
                failures += 1
                delay = min(max(MAX_BACKOFF_S, self.interval_s),
                            self.interval_s * 2 ** min(failures, 16))
            else:
                failures = 0
                delay = self.interval_s
            stop_event.wait(delay)

    @property
    def flagged(self) -> dict | None:
        """The evidence when the log is flagged, else None."""
        return self._flag

    def status(self) -> dict:
        """A JSON-ready summary of the state (GET /status)."""
        with self._state_lock:
            progress = self._progress
            return {
                "log": self.log_url,
                "origin": self.origin,
                "log_key": self.log_verifier.vkey,
                "witness": self.cosigner.name,
                "witness_key": self.cosigner.vkey,
                "state": str(self.state_path),
                "cosigned": None if self._note is None else {
                    "size": self._size, "root": self._root.hex(), "at": self._cosigned_at,
                    "delivered": self._delivered == self._size},
                "verified_ahead": None if progress is None else progress.frontier.size,
                "devices": len(self._registry),
                "flagged": self._flag is not None,
                "flag": self._flag,
                "last_poll": self._last_poll,
                # dict() copies in one step: the polling thread may be adding keys.
                "counters": dict(sorted(dict(self.counters).items())),
                "requests": dict(sorted(dict(self._client.requests).items())),
            }


# -- status endpoint ------------------------------------------------------------------


class _StatusHandler(BaseHTTPRequestHandler):
    server_version = "ledger-node-witness/0.1"

    def do_GET(self):
        if self.path.split("?", 1)[0] in ("/status", "/"):
            self._send(200, self.server.witness.status())
        else:
            self._send(404, {"error": "not_found", "message": "only GET /status is served"})

    def _send(self, status: int, payload) -> None:
        data = json.dumps(payload, indent=1).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (ConnectionError, TimeoutError, socket.timeout):
            pass

    def log_message(self, format, *args):
        log.debug("status %s " + format, self.client_address[0], *args)


class StatusServer:
    """GET /status: the witness's state summary, flag evidence included."""

    def __init__(self, witness: Witness, host: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingHTTPServer):
            daemon_threads = True
            address_family = family

        self._httpd = _Server((host, port), _StatusHandler)
        self._httpd.witness = witness
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.2}, daemon=True,
                                        name=f"witness-status-{self.port}")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# -- command line ---------------------------------------------------------------------


def _listen(value: str) -> tuple[str, int]:
    import argparse

    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def add_arguments(parser) -> None:
    """The options of `ledger-node witness`."""
    parser.add_argument("--log", required=True, metavar="URL",
                        help="the log's base URL, e.g. http://ledger.example.org:8480")
    parser.add_argument("--key", required=True, metavar="FILE",
                        help="this witness's signing key (cosignature/v1), as written by "
                             "`ledger-node keygen --witness` or --new-key")
    parser.add_argument("--new-key", metavar="NAME",
                        help="create --key with a new witness key of this name when the file "
                             "does not exist (mode 0600) and print its verifier key")
    parser.add_argument("--log-key", required=True, metavar="VKEY",
                        help="the log's verifier key (or a file holding it); its name is the "
                             "checkpoint origin")
    parser.add_argument("--state", required=True, metavar="FILE",
                        help="where the witness keeps what it verified and cosigned (JSON, "
                             "created on the first run)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="poll the log this often (default 1)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="give up on one request to the log after this long (default 10)")
    parser.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                        help="serve GET /status (JSON) on this address")
    parser.add_argument("--once", action="store_true",
                        help="poll once, print what happened and exit (0 cosigned or up to "
                             "date, 1 flagged, 2 log unreachable or malformed)")


def _witness_key(path: str, new_name: str | None) -> str:
    p = Path(path)
    if new_name and not p.exists():
        skey, vkey = ckpt.generate_cosigner_key(new_name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(skey + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(vkey, flush=True)
        return skey
    try:
        skey = p.read_text().strip()
        cosigner = ckpt.Cosigner(skey)
    except (OSError, ValueError) as exc:
        raise WitnessError(f"{path}: not a witness signing key: {exc}") from None
    if new_name and cosigner.name != new_name:
        raise WitnessError(f"{path} already holds a witness key named {cosigner.name!r}, "
                           f"not {new_name!r}")
    if new_name:
        print(cosigner.vkey, flush=True)
    return skey


def _log_key(value: str) -> str:
    try:
        return note.Verifier(value).vkey
    except ValueError as exc:
        if os.path.isfile(value):
            try:
                return note.Verifier(Path(value).read_text().strip()).vkey
            except (OSError, ValueError) as exc2:
                raise WitnessError(f"--log-key {value}: {exc2}") from None
        raise WitnessError(f"--log-key: {exc}") from None


def run_cli(args) -> int:
    """`ledger-node witness`: 0 when stopped (or --once: cosigned / up to
    date), 1 when the log is flagged, 2 when the witness could not work."""
    try:
        skey = _witness_key(args.key, args.new_key)
        witness = Witness(args.log, skey, _log_key(args.log_key), args.state,
                          interval_s=args.interval, timeout_s=args.timeout)
    except (WitnessError, OSError) as exc:
        print(f"ledger-node witness: {exc}", file=sys.stderr)
        return EXIT_ERROR
    status_server = None
    try:
        if args.once:
            result = witness.poll_once()
            print(result, flush=True)
            if result.startswith("flagged"):
                return EXIT_FLAGGED
            if result.startswith(("cosigned", "up to date", "waiting")):
                return EXIT_OK
            return EXIT_ERROR
        if args.listen:
            try:
                status_server = StatusServer(witness, *args.listen).start()
            except OSError as exc:
                print(f"ledger-node witness: --listen: {exc}", file=sys.stderr)
                return EXIT_ERROR
            print(f"ledger-node witness status on {status_server.url}/status", flush=True)
        print(f"ledger-node witness {witness.cosigner.vkey} following {witness.log_url}",
              flush=True)
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        witness.run(stop)
        return EXIT_FLAGGED if witness.flagged else EXIT_OK
    finally:
        if status_server is not None:
            status_server.stop()
        witness.close()
