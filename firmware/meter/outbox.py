# The offline buffer: every signed bundle stays on flash until it has been
# delivered, so a radio link that is down for hours (or days) loses nothing,
# and a power cut never loses a closed reading or reuses a sequence number.
#
# A log of segment files <path>/<counter:08d>.seg on the board's filesystem
# (LittleFS on the ESP32 and the Pico). Records are only ever appended; a
# segment is never rewritten, only deleted whole when the ring is full. A
# record is appended with open("ab"), write, close: LittleFS commits a file's
# new data at close, so a power cut leaves the file as it was before. Other
# filesystems (and flash that fails) can still leave a torn or corrupted
# record: it fails its check, ends that segment for reading, is counted in
# stats["torn_records"], and later records go to a new segment, never after
# the damage.
#
# Record (big-endian): type B ('R' reading, 'B' bundle), length H (of the
# payload), payload, CRC-32 I over type, length and payload.
#   'R' payload (18 bytes): seq I, t_end I, import_dwh I, export_dwh I,
#       flags H; 25 bytes with header and CRC.
#   'B' payload: first_seq I, last_seq I, the signed bundle (opaque bytes,
#       up to 1024); 15 bytes more than the bundle.
# The bundle bytes are another module's (meter/frame.py); this one only knows
# which readings each bundle covers.
#
# A reading is written when it closes and stays "open" until a bundle covers
# it; after a reboot the application re-bundles and signs the open ones. A
# bundle closes every reading up to its last_seq: bundles arrive in seq order,
# so a reading skipped by a gap could never be bundled later.
#
# Sending: a cursor (the last_seq of the last bundle sent in order) lives in
# <path>/cursor, written atomically (meter/store.py) at every send. A power
# cut can lose its last update, which only resends a bundle the receiving end
# drops as a duplicate. Resend requests queue bundles already sent (up to
# _QUEUE of them, RAM only: a request lost to a reboot is asked again); they
# go out before the backlog. A bundle not yet sent is already on its way and
# is not queued twice.
#
# Ring: before an append would take the files over max_bytes, the oldest
# segments are deleted; unsent bundles among them are counted in
# stats["overwritten_bundles"]. A reading is a snapshot of cumulative
# registers, so dropping old bundles loses time resolution, never energy. The
# segment with the newest data, and any segment holding open readings, is
# never deleted.
#
# Capacity (defaults: 4096-byte segments, 262144 bytes), worst case of one
# reading per bundle with 90-byte bundles:
#   per interval  25 (reading) + 105 (bundle) = 130 bytes
#   7 days        7 * 96 = 672 intervals * 130 = 87,360 bytes
#   segments      a record that does not fit ends a segment, wasting at most
#                 104 bytes of 4096, so 87,360 bytes need at most
#                 ceil(87,360 / 3,992) = 22 segments
#   the ring      262,144 / 130 = 2,016 intervals = 21 days before the oldest
#                 bundle is dropped (a 579-byte bundle, frame.MAX_BUNDLE_LEN,
#                 of 32 readings: 32 * 25 + 594 = 1,394 bytes per 8 hours,
#                 62 days)
# On LittleFS (4 KiB blocks) each segment takes a block of its own: measured,
# 7 days take 26 blocks and a full ring (65 segments) 71 blocks, 284 KiB,
# LittleFS's metadata included.
#
# RAM: bundles are not kept in RAM. The index holds seven 32-bit numbers per
# segment (an array, 28 bytes a segment: 1.8 KB for 65 segments); a record is
# read back from its segment file when it is needed. Opening a full outbox
# takes 2.5 KB of heap in all (measured on the unix port, 64-bit).
#
# stats: readings, bundles, segments, bytes describe what is held on flash;
# the others count events since opening: sent (in order), resent (from the
# request queue), requested (bundles queued), unavailable (requests for
# readings older than anything held), overwritten_bundles, torn_records
# (damaged segments found), rejected (calls refused with ValueError),
# queue_full (bundles a full request queue turned away).

import binascii
import os
import struct
from array import array

from meter import store

_R = 0x52  # 'R'
_B = 0x42  # 'B'
_R_FMT = ">IIIIH"
_R_LEN = 18
_HEAD = 3
_CRC = 4
_MAX_DATA = 1024
_B_MIN = 9
_B_MAX = 8 + _MAX_DATA
_U32 = 0xFFFFFFFF
_QUEUE = 32

# Index fields, _W numbers per segment, oldest segment first.
_CNT = 0  # file counter
_SIZE = 1  # file bytes (damaged ones included: they take flash too)
_NB = 2  # bundles
_BF = 3  # first_seq of its first bundle
_BL = 4  # last_seq of its last bundle
_NR = 5  # readings
_RH = 6  # highest reading seq
_W = 7

_END = 0
_TORN = -1


def _read_record(f):
    """The next record of an open segment as (type, payload); (_END, b"")
    at a clean end, (_TORN, b"") where a record is torn or corrupted."""
    head = f.read(_HEAD)
    if not head:
        return _END, b""
    if len(head) < _HEAD:
        return _TORN, b""
    kind = head[0]
    n = head[1] << 8 | head[2]
    if not ((kind == _R and n == _R_LEN) or (kind == _B and _B_MIN <= n <= _B_MAX)):
        return _TORN, b""
    body = f.read(n + _CRC)
    if body is None or len(body) < n + _CRC:
        return _TORN, b""
    payload = body[:n]
    crc = struct.unpack_from(">I", body, n)[0]
    if binascii.crc32(payload, binascii.crc32(head)) & _U32 != crc:
        return _TORN, b""
    return kind, payload


def _u32(name, v):
    if not isinstance(v, int) or v < 0 or v > _U32:
        raise ValueError("%s %r is not a 32-bit unsigned integer" % (name, v))


class Outbox:
    def __init__(self, path="outbox", seg_bytes=4096, max_bytes=262144, log=None):
        if seg_bytes < 64 or max_bytes < 2 * seg_bytes:
            raise ValueError("outbox needs seg_bytes >= 64 and max_bytes >= 2 * seg_bytes")
        self.path = path
        self.seg_bytes = seg_bytes
        self.max_bytes = max_bytes
        self._log = log
        self.stats = {"readings": 0, "bundles": 0, "sent": 0, "resent": 0, "requested": 0,
                      "unavailable": 0, "overwritten_bundles": 0, "torn_records": 0,
                      "segments": 0, "bytes": 0, "rejected": 0, "queue_full": 0}
        self._ix = array("I")
        self._tail_ok = True  # the newest segment ends cleanly: appends may go there
        self._bundle_hi = 0  # last_seq of the newest bundle held
        self._reading_hi = 0
        self._last = 0  # highest seq ever held since opening (never goes back)
        self._total = 0
        self._cursor = 0
        self._queue = []  # (first_seq, last_seq) to resend, oldest first
        self._unsent = -1  # cached count of bundles past the cursor; -1: recount
        self._cache = None  # the last bundle read back: (first_seq, last_seq, data)
        self._next = None  # the first bundle past the cursor, found at cursor _next_at
        self._next_at = -1
        try:
            os.mkdir(path)
        except OSError:
            pass  # already there
        self._load()
        self._trim(0)

    # ------------------------------------------------------------ storage

    def _say(self, msg):
        if self._log is not None:
            self._log(msg)

    def _name(self, counter):
        return "%s/%08d.seg" % (self.path, counter)

    def _each(self, counter, fn):
        """Call fn(kind, payload) on each good record of a segment, in order,
        until fn returns True. Returns _END (the end, or fn stopped), _TORN
        (a torn or corrupted record ends the segment), or None when the
        segment cannot be opened. The file is closed before returning."""
        try:
            f = open(self._name(counter), "rb")
        except OSError:
            return None
        try:
            while True:
                kind, p = _read_record(f)
                if kind <= _END:
                    return kind
                if fn(kind, p):
                    return _END
        finally:
            f.close()

    def _load(self):
        names = []
        for name in os.listdir(self.path):
            if len(name) == 12 and name[8:] == ".seg" and name[:8].isdigit():
                names.append(int(name[:8]))
        names.sort()
        ix = self._ix
        for i in range(len(names)):
            c = names[i]
            nb = bf = bl = nr = rh = 0

            def tally(kind, p):
                nonlocal nb, bf, bl, nr, rh
                if kind == _R:
                    nr += 1
                    rh = struct.unpack_from(">I", p, 0)[0]
                else:
                    first, bl = struct.unpack_from(">II", p, 0)
                    if nb == 0:
                        bf = first
                    nb += 1

            ok = self._each(c, tally) == _END
            try:
                size = os.stat(self._name(c))[6]
            except OSError:
                size = 0
            if not ok:
                self.stats["torn_records"] += 1
                self._say("outbox: segment %d damaged after %d readings, %d bundles"
                          % (c, nr, nb))
            for v in (c, size, nb, bf, bl, nr, rh):
                ix.append(v)
            self._total += size
            if bl > self._bundle_hi:
                self._bundle_hi = bl
            if rh > self._reading_hi:
                self._reading_hi = rh
            if i == len(names) - 1:
                self._tail_ok = ok
        self._last = max(self._bundle_hi, self._reading_hi)
        cpath = self.path + "/cursor"
        if store.exists(cpath):
            try:
                self._cursor = int(store.read(cpath))
            except (OSError, ValueError):
                self._say("outbox: cursor unreadable, sending everything held")
                self._cursor = 0
        # A cursor past every bundle held (the newest ones were lost) would
        # mark the next new bundles as sent.
        if self._cursor > self._bundle_hi:
            self._cursor = self._bundle_hi
        elif self._cursor < 0:
            self._cursor = 0
        self._restat()

    def _restat(self):
        ix = self._ix
        nb = nr = 0
        for i in range(0, len(ix), _W):
            nb += ix[i + _NB]
            nr += ix[i + _NR]
        s = self.stats
        s["readings"] = nr
        s["bundles"] = nb
        s["segments"] = len(ix) // _W
        s["bytes"] = self._total

    def _save_cursor(self):
        store.write_atomic(self.path + "/cursor", ("%d" % self._cursor).encode())

    def _unsent_in(self, i):
        """Bundles of segment i (an index offset) past the cursor."""
        ix = self._ix
        nb = ix[i + _NB]
        if nb == 0 or ix[i + _BL] <= self._cursor:
            return 0
        if ix[i + _BF] > self._cursor:
            return nb
        n = 0
        cur = self._cursor

        def count(kind, p):
            nonlocal n
            if kind == _B and struct.unpack_from(">I", p, 4)[0] > cur:
                n += 1

        self._each(ix[i + _CNT], count)
        return n

    def _trim(self, need):
        """Delete the oldest segments until `need` more bytes fit."""
        ix = self._ix
        while self._total + need > self.max_bytes and len(ix) > _W:
            if ix[_RH] > self._bundle_hi or ix[_RH] >= self._last or ix[_BL] >= self._last:
                # Open readings, or the newest seq held (behind a damaged
                # newer segment): it is what keeps seq from going back.
                break
            lost = self._unsent_in(0)
            c = ix[_CNT]
            try:
                os.remove(self._name(c))
            except OSError:
                pass  # already gone: forget it all the same
            self._total -= ix[_SIZE]
            bl = ix[_BL]
            self._ix = ix = ix[_W:]
            self.stats["overwritten_bundles"] += lost
            if lost:
                self._say("outbox: full, %d unsent bundles up to seq %d dropped" % (lost, bl))
            q = self._queue
            while q and q[0][0] <= bl:
                q.pop(0)
            self._cache = None
            self._next = None
            self._unsent = -1
        self._restat()

    def _append(self, kind, payload):
        head = struct.pack(">BH", kind, len(payload))
        rec = head + payload + struct.pack(
            ">I", binascii.crc32(payload, binascii.crc32(head)) & _U32)
        n = len(rec)
        self._trim(n)
        ix = self._ix
        if not ix:
            c = 1
            fresh = True
        else:
            c = ix[len(ix) - _W + _CNT]
            fresh = not self._tail_ok or ix[len(ix) - _W + _SIZE] + n > self.seg_bytes
            if fresh:
                c += 1
        if fresh:
            for v in (c, 0, 0, 0, 0, 0, 0):
                ix.append(v)
            self._tail_ok = True
        i = len(ix) - _W
        name = self._name(c)
        try:
            with open(name, "ab") as f:
                f.write(rec)
        except OSError:
            # Whatever reached the file may be a torn record: never append
            # after it, and count what it takes.
            self._tail_ok = False
            try:
                size = os.stat(name)[6]
            except OSError:
                size = 0
            self._total += size - ix[i + _SIZE]
            ix[i + _SIZE] = size
            self._restat()
            raise
        ix[i + _SIZE] += n
        self._total += n
        return i

    def _oldest(self):
        """first_seq of the oldest bundle held, -1 without bundles."""
        ix = self._ix
        for i in range(0, len(ix), _W):
            if ix[i + _NB]:
                return ix[i + _BF]
        return -1

    def _find(self, first_seq):
        """The held bundle starting at first_seq as (first, last, data), or None."""
        c = self._cache
        if c is not None and c[0] == first_seq:
            return c
        ix = self._ix
        for i in range(0, len(ix), _W):
            if ix[i + _NB] and ix[i + _BF] <= first_seq <= ix[i + _BL]:
                return self._scan_bundle(ix[i + _CNT], first_seq, -1)
        return None

    def _scan_bundle(self, counter, first_seq, after):
        """In one segment: the bundle starting at first_seq, or (first_seq
        -1) the first one whose last_seq is past `after`."""
        found = None

        def match(kind, p):
            nonlocal found
            if kind == _B:
                first, last = struct.unpack_from(">II", p, 0)
                if first == first_seq or (first_seq < 0 and last > after):
                    found = (first, last, p[8:])
                    return True
            return False

        self._each(counter, match)
        if found is not None:
            self._cache = found
        return found

    # ------------------------------------------------------------ readings and bundles

    def add_reading(self, seq, t_end, import_dwh, export_dwh, flags):
        """A closed reading, on flash when this returns; seq must be above
        last_seq()."""
        try:
            _u32("seq", seq)
            _u32("t_end", t_end)
            _u32("import_dwh", import_dwh)
            _u32("export_dwh", export_dwh)
            if not isinstance(flags, int) or flags < 0 or flags > 0xFFFF:
                raise ValueError("flags %r is not a 16-bit unsigned integer" % (flags,))
            if seq <= self._last:
                raise ValueError("reading seq %d is not after %d" % (seq, self._last))
        except ValueError:
            self.stats["rejected"] += 1
            raise
        i = self._append(_R, struct.pack(_R_FMT, seq, t_end, import_dwh, export_dwh, flags))
        ix = self._ix
        ix[i + _NR] += 1
        ix[i + _RH] = seq
        self._reading_hi = seq
        self._last = seq
        self._restat()

    def open_readings(self):
        """Readings no bundle covers yet, oldest first, as (seq, t_end,
        import_dwh, export_dwh, flags)."""
        out = []
        lo = self._bundle_hi
        ix = self._ix

        def collect(kind, p):
            if kind == _R:
                r = struct.unpack(_R_FMT, p)
                if r[0] > lo:
                    out.append(r)

        for i in range(0, len(ix), _W):
            if ix[i + _RH] > lo:
                self._each(ix[i + _CNT], collect)
        return out

    def add_bundle(self, first_seq, last_seq, data):
        """A signed bundle covering readings first_seq..last_seq, on flash
        when this returns; it must start above the previous bundle."""
        try:
            _u32("first_seq", first_seq)
            _u32("last_seq", last_seq)
            if first_seq < 1 or first_seq > last_seq:
                raise ValueError("bundle seq range %d..%d is empty" % (first_seq, last_seq))
            if first_seq <= self._bundle_hi:
                raise ValueError("bundle %d..%d overlaps or precedes the bundle ending at %d"
                                 % (first_seq, last_seq, self._bundle_hi))
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError("bundle data must be bytes")
            n = len(data)
            if n < 1 or n > _MAX_DATA or n + 8 + _HEAD + _CRC > self.seg_bytes:
                raise ValueError("bundle of %d bytes: 1 to %d fit" % (
                    n, min(_MAX_DATA, self.seg_bytes - 8 - _HEAD - _CRC)))
        except ValueError:
            self.stats["rejected"] += 1
            raise
        i = self._append(_B, struct.pack(">II", first_seq, last_seq) + bytes(data))
        ix = self._ix
        if ix[i + _NB] == 0:
            ix[i + _BF] = first_seq
        ix[i + _NB] += 1
        ix[i + _BL] = last_seq
        self._bundle_hi = last_seq
        if last_seq > self._last:
            self._last = last_seq
        if self._unsent >= 0:
            self._unsent += 1
        self._restat()

    def last_seq(self):
        """The highest seq held (0 when empty): the next one is above it."""
        return self._last

    # ------------------------------------------------------------ sending

    def next_to_send(self):
        """(first_seq, last_seq, data) to transmit next, or None: requested
        resends first, then the oldest bundle past the cursor."""
        q = self._queue
        while q:
            b = self._find(q[0][0])
            if b is not None:
                return b
            q.pop(0)  # lost with a damaged segment
        cur = self._cursor
        if self._next is not None and self._next_at == cur:
            return self._next
        ix = self._ix
        for i in range(0, len(ix), _W):
            if ix[i + _NB] and ix[i + _BL] > cur:
                b = self._scan_bundle(ix[i + _CNT], -1, cur)
                if b is not None:
                    self._next = b
                    self._next_at = cur
                    return b
        return None

    def sent(self, first_seq):
        """The bundle starting at first_seq went out."""
        q = self._queue
        for k in range(len(q)):
            if q[k][0] == first_seq:
                q.pop(k)
                self.stats["resent"] += 1
                return
        b = self._find(first_seq)
        if b is None:
            oldest = self._oldest()
            if oldest < 0 or first_seq < oldest:
                return  # dropped by the ring while it was on the air
            self.stats["rejected"] += 1
            raise ValueError("no bundle starting at seq %d is held" % first_seq)
        self.stats["sent"] += 1
        if b[1] > self._cursor:
            self._cursor = b[1]
            self._unsent = -1
            self._save_cursor()

    def rewind(self, seq):
        """The link was down: bundles ending at seq or later are unsent again."""
        cur = max(seq - 1, self._oldest() - 1, 0)
        if cur < self._cursor:
            self._cursor = cur
            self._unsent = -1
            self._save_cursor()
            # Bundles now unsent go out through the cursor; a queued resend
            # of one of them would send it twice.
            self._queue = [e for e in self._queue if e[1] <= cur]

    def request(self, lo, hi):
        """Queue the bundles already sent that overlap readings lo..hi; returns
        how many were queued."""
        if not isinstance(lo, int) or not isinstance(hi, int) or lo < 0 or lo > hi:
            self.stats["rejected"] += 1
            raise ValueError("resend range %r..%r is not a seq range" % (lo, hi))
        oldest = self._oldest()
        if oldest < 0 or hi < oldest:
            self.stats["unavailable"] += 1
            return 0
        ix = self._ix
        q = self._queue
        cur = self._cursor
        queued = 0

        def enqueue(kind, p):
            nonlocal queued
            if kind != _B:
                return
            first, last = struct.unpack_from(">II", p, 0)
            if last < lo or first > hi or last > cur:
                return
            k = 0
            while k < len(q) and q[k][0] < first:
                k += 1
            if k < len(q) and q[k][0] == first:
                return
            if len(q) >= _QUEUE:
                self.stats["queue_full"] += 1
                return
            q.insert(k, (first, last))
            queued += 1

        for i in range(0, len(ix), _W):
            if not ix[i + _NB] or ix[i + _BF] > hi or ix[i + _BL] < lo:
                continue
            if ix[i + _BF] > cur:
                break  # not sent yet: the cursor will send it
            self._each(ix[i + _CNT], enqueue)
        self.stats["requested"] += queued
        return queued

    def pending(self):
        """Bundles past the cursor plus queued resends."""
        if self._unsent < 0:
            n = 0
            ix = self._ix
            for i in range(0, len(ix), _W):
                n += self._unsent_in(i)
            self._unsent = n
        return self._unsent + len(self._queue)
