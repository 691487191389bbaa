"""The offline buffer (meter/outbox.py) in MicroPython: readings and signed bundles survive
reopening and power cuts, the backlog goes out oldest first, resend requests come first, the
ring drops the oldest bundles only when full, and the RAM index stays small.

Expected values come from the data each test writes and from the record format in the module
header (a reading record is 25 bytes, a bundle record 15 bytes more than the bundle), never from
the outbox's own answers."""

import json
import random
import subprocess
import sys

import pytest

from tools import runtime

PRELUDE = """
import json, os, sys
from meter.outbox import Outbox
os.chdir(%r)

def data(first, last, n=90):
    # A bundle's bytes, recognisable by its seq range.
    return bytes((first + last + k) & 0xFF for k in range(n))

def reading(seq):
    return (seq, 1700000000 + 900 * seq, 1000 + 7 * seq, 3 * seq, seq & 0x0F)

def add_readings(o, lo, hi):
    for s in range(lo, hi + 1):
        o.add_reading(*reading(s))

def segs(path="outbox"):
    return sorted(n for n in os.listdir(path) if n.endswith(".seg"))

def drain(o, n=1000):
    # Send everything due, as (first, last) in send order, checking the data.
    out = []
    for _ in range(n):
        b = o.next_to_send()
        if b is None:
            break
        assert bytes(b[2]) == data(b[0], b[1], len(b[2])), b[:2]
        out.append([b[0], b[1]])
        o.sent(b[0])
    return out
"""

R = 25          # reading record: 3 header + 18 payload + 4 CRC
B90 = 15 + 90   # bundle record with 90 bytes of bundle


def reading(seq):
    return [seq, 1700000000 + 900 * seq, 1000 + 7 * seq, 3 * seq, seq & 0x0F]


def run(mpy, tmp_path, body, **kw):
    out = mpy(PRELUDE % str(tmp_path) + body, **kw)
    return json.loads(out.strip().splitlines()[-1])


def test_reopen_restores_open_readings_bundles_and_cursor(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
add_readings(o, 1, 10)
o.add_bundle(1, 4, data(1, 4))
o.add_bundle(5, 8, data(5, 8))
first = o.next_to_send()
o.sent(first[0])
o = Outbox()
nxt = o.next_to_send()
print(json.dumps({"open": [list(x) for x in o.open_readings()], "next": [nxt[0], nxt[1]],
                  "data_ok": bytes(nxt[2]) == data(5, 8), "pending": o.pending(),
                  "last": o.last_seq(), "first": [first[0], first[1]], "stats": o.stats}))
""")
    assert r["first"] == [1, 4]
    assert r["open"] == [reading(s) for s in (9, 10)]
    assert r["next"] == [5, 8] and r["data_ok"]
    assert r["pending"] == 1
    assert r["last"] == 10
    assert r["stats"]["readings"] == 10 and r["stats"]["bundles"] == 2
    assert r["stats"]["bytes"] == 10 * R + 2 * B90
    assert r["stats"]["torn_records"] == 0


def test_a_bundle_closes_its_readings_across_reopen(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
add_readings(o, 1, 3)
before = [list(x) for x in Outbox().open_readings()]
o = Outbox()
o.add_bundle(1, 3, data(1, 3))
after = Outbox().open_readings()
o = Outbox()
add_readings(o, 4, 6)
o.add_bundle(4, 5, data(4, 5))
late = [list(x) for x in Outbox().open_readings()]
print(json.dumps({"before": before, "after": after, "late": late}))
""")
    assert r["before"] == [reading(s) for s in (1, 2, 3)]
    assert r["after"] == []
    assert r["late"] == [reading(6)]


def test_a_torn_tail_loses_only_the_torn_record(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
add_readings(o, 1, 5)
name = "outbox/" + segs()[-1]
raw = open(name, "rb").read()
with open(name, "wb") as f:          # the power went while reading 5 was written
    f.write(raw[:len(raw) - 10])
o = Outbox()
torn = o.stats["torn_records"]
open1 = [x[0] for x in o.open_readings()]
last1 = o.last_seq()
o.add_reading(*reading(5))           # later appends go to a new segment
add_readings(o, 6, 7)
o2 = Outbox()
print(json.dumps({"size": len(raw), "torn": torn, "open1": open1, "last1": last1,
                  "open2": [list(x) for x in o2.open_readings()], "segs": len(segs()),
                  "torn2": o2.stats["torn_records"], "last2": o2.last_seq()}))
""")
    assert r["size"] == 5 * R
    assert r["torn"] == 1
    assert r["open1"] == [1, 2, 3, 4]
    assert r["last1"] == 4
    assert r["segs"] == 2                # never appended after the torn bytes
    assert r["open2"] == [reading(s) for s in range(1, 8)]
    assert r["torn2"] == 1
    assert r["last2"] == 7


def test_garbage_after_the_last_record_is_skipped_and_never_appended_to(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
add_readings(o, 1, 4)
o.add_bundle(1, 4, data(1, 4))
add_readings(o, 5, 6)
with open("outbox/" + segs()[-1], "ab") as f:
    f.write(b"R\\x00\\x12" + b"\\xa5" * 9)   # a header, then a record cut short
o = Outbox()
torn = o.stats["torn_records"]
open1 = [x[0] for x in o.open_readings()]
add_readings(o, 7, 8)
o.add_bundle(5, 8, data(5, 8))
o2 = Outbox()
print(json.dumps({"torn": torn, "open1": open1, "segs": len(segs()),
                  "sent": drain(o2), "open2": o2.open_readings(), "last": o2.last_seq(),
                  "torn2": o2.stats["torn_records"]}))
""")
    assert r["torn"] == 1
    assert r["open1"] == [5, 6]
    assert r["segs"] == 2
    assert r["sent"] == [[1, 4], [5, 8]]
    assert r["open2"] == []
    assert r["last"] == 8
    assert r["torn2"] == 1


def test_a_corrupted_record_in_the_middle_ends_only_its_segment(mpy, tmp_path):
    # 256-byte segments hold 10 readings (250 bytes) each: readings 1-10, 11-20, 21-30.
    r = run(mpy, tmp_path, """
o = Outbox(seg_bytes=256, max_bytes=4096)
add_readings(o, 1, 30)
names = segs()
name = "outbox/" + names[1]
raw = bytearray(open(name, "rb").read())
raw[3 * 25 + 3 + 5] ^= 0x40          # one bit of reading 14's payload
with open(name, "wb") as f:
    f.write(raw)
o = Outbox(seg_bytes=256, max_bytes=4096)
got = [x[0] for x in o.open_readings()]
last = o.last_seq()
add_readings(o, 31, 31)              # the newest segment was intact: it takes more
o2 = Outbox(seg_bytes=256, max_bytes=4096)
print(json.dumps({"names": names, "got": got, "torn": o.stats["torn_records"],
                  "last": last, "segs": len(segs()),
                  "got2": [x[0] for x in o2.open_readings()]}))
""")
    assert len(r["names"]) == 3
    want = list(range(1, 14)) + list(range(21, 31))
    assert r["got"] == want
    assert r["torn"] == 1
    assert r["last"] == 30
    assert r["segs"] == 4                # 21-30 filled its segment: 31 starts a new one
    assert r["got2"] == want + [31]


def test_the_ring_drops_the_oldest_segments_and_counts_unsent_bundles(mpy, tmp_path):
    # 50-byte bundles make 65-byte records: 3 to a 256-byte segment (195 bytes), so a
    # 1024-byte ring holds 5 segments (975 bytes). Each bundle that opens a 6th segment
    # first deletes the oldest: after 30 bundles, segments 6-10 (bundles 16-30) remain.
    r = run(mpy, tmp_path, """
o = Outbox(seg_bytes=256, max_bytes=1024)
for s in range(1, 31):
    o.add_bundle(s, s, data(s, s, 50))
st = dict(o.stats)
o2 = Outbox(seg_bytes=256, max_bytes=1024)
print(json.dumps({"stats": st, "segs": segs(), "sent": drain(o2), "last": o2.last_seq(),
                  "stats2": o2.stats}))
""")
    st = r["stats"]
    assert st["overwritten_bundles"] == 15
    assert st["bundles"] == 15 and st["segments"] == 5 and st["bytes"] == 5 * 3 * 65
    assert r["segs"] == ["%08d.seg" % c for c in range(6, 11)]
    assert r["sent"] == [[s, s] for s in range(16, 31)]
    assert r["last"] == 30
    assert r["stats2"]["overwritten_bundles"] == 0


def test_the_ring_counts_only_unsent_bundles_as_overwritten(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox(seg_bytes=256, max_bytes=1024)
for s in range(1, 16):
    o.add_bundle(s, s, data(s, s, 50))
sent = drain(o, 4)                   # bundles 1-4 went out
for s in range(16, 31):
    o.add_bundle(s, s, data(s, s, 50))
nxt = list(o.next_to_send()[:2])
pending = o.pending()
drain(o)
o.rewind(1)                          # back to the oldest held, no further
print(json.dumps({"sent": sent, "over": o.stats["overwritten_bundles"], "next": nxt,
                  "pending": pending, "cursor": open("outbox/cursor").read(),
                  "again": o.pending()}))
""")
    assert r["sent"] == [[s, s] for s in range(1, 5)]
    assert r["over"] == 15 - 4           # bundles 1-15 dropped, 1-4 of them already sent
    assert r["next"] == [16, 16]
    assert r["pending"] == 15
    assert r["cursor"] == "15" and r["again"] == 15


def test_the_ring_keeps_open_readings(mpy, tmp_path):
    # 60 readings never bundled: 1500 bytes, more than the 1024-byte ring, all kept.
    r = run(mpy, tmp_path, """
o = Outbox(seg_bytes=256, max_bytes=1024)
add_readings(o, 1, 60)
o2 = Outbox(seg_bytes=256, max_bytes=1024)
print(json.dumps({"open": [x[0] for x in o2.open_readings()], "segs": len(segs())}))
""")
    assert r["open"] == list(range(1, 61))
    assert r["segs"] == 6


def test_requests_go_first_oldest_first_without_duplicates(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 11):
    o.add_bundle(s, s, data(s, s))
first = drain(o)
for s in range(11, 13):
    o.add_bundle(s, s, data(s, s))
n1 = o.request(5, 7)
n2 = o.request(3, 6)                 # 5 and 6 are queued already
n3 = o.request(9, 40)                # 11 and 12 are not sent yet: the cursor sends them
pending = o.pending()
order = drain(o)
print(json.dumps({"first": first, "n": [n1, n2, n3], "pending": pending, "order": order,
                  "stats": o.stats, "after": o.pending()}))
""")
    assert r["first"] == [[s, s] for s in range(1, 11)]
    assert r["n"] == [3, 2, 2]
    assert r["pending"] == 7 + 2
    assert r["order"] == [[s, s] for s in (3, 4, 5, 6, 7, 9, 10, 11, 12)]
    assert r["stats"]["requested"] == 7
    assert r["stats"]["resent"] == 7 and r["stats"]["sent"] == 12
    assert r["after"] == 0


def test_request_covers_partly_overlapping_bundles_and_counts_lost_ranges(mpy, tmp_path):
    # Bundles k = 1..30 cover seqs 2k-1..2k, 65-byte records, each sent before the next is
    # added. 3 fit a 256-byte segment and a 1024-byte ring keeps 5 segments: bundles 16-30
    # (seqs 31-60) remain, nothing unsent was dropped.
    r = run(mpy, tmp_path, """
o = Outbox(seg_bytes=256, max_bytes=1024)
for s in range(1, 61, 2):
    o.add_bundle(s, s + 1, data(s, s + 1, 50))
    drain(o)
idle = o.next_to_send()
n_mid = o.request(40, 43)
n_old = o.request(1, 4)
order = drain(o)
n_all = o.request(0, 100)
print(json.dumps({"idle": idle, "n": [n_mid, n_old, n_all], "order": order,
                  "all": [b[0] for b in drain(o)], "stats": o.stats}))
""")
    assert r["idle"] is None
    assert r["n"] == [3, 0, 15]
    assert r["order"] == [[39, 40], [41, 42], [43, 44]]
    assert r["stats"]["unavailable"] == 1
    assert r["all"] == list(range(31, 61, 2))
    assert r["stats"]["overwritten_bundles"] == 0


def test_the_resend_queue_is_bounded(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 41):
    o.add_bundle(s, s, data(s, s))
drain(o)
n = o.request(1, 40)
print(json.dumps({"n": n, "pending": o.pending(), "full": o.stats["queue_full"],
                  "order": [b[0] for b in drain(o)]}))
""")
    assert r["n"] == 32
    assert r["pending"] == 32
    assert r["full"] == 8
    assert r["order"] == list(range(1, 33))


def test_rewind_makes_bundles_unsent_again_and_persists(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 13, 4):            # 1-4, 5-8, 9-12
    o.add_bundle(s, s + 3, data(s, s + 3))
first = drain(o)
o.rewind(6)                          # 5-8 ends at 8 >= 6: unsent again
p1 = o.pending()
o = Outbox()
p2 = o.pending()
again = drain(o)
o.rewind(0)                          # never before the oldest bundle held
p3 = o.pending()
print(json.dumps({"first": first, "p": [p1, p2, p3], "again": again,
                  "all": drain(o)}))
""")
    assert r["first"] == [[1, 4], [5, 8], [9, 12]]
    assert r["p"] == [2, 2, 3]
    assert r["again"] == [[5, 8], [9, 12]]
    assert r["all"] == [[1, 4], [5, 8], [9, 12]]


def test_rewind_drops_queued_resends_the_cursor_will_send(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 7):
    o.add_bundle(s, s, data(s, s))
drain(o)
o.request(2, 5)
o.rewind(4)
print(json.dumps({"pending": o.pending(), "order": drain(o)}))
""")
    # queued 2-5; after the rewind 4-6 go through the cursor, 2-3 stay queued
    assert r["pending"] == 2 + 3
    assert r["order"] == [[2, 2], [3, 3], [4, 4], [5, 5], [6, 6]]


def test_last_seq_after_reopen(mpy, tmp_path):
    r = run(mpy, tmp_path, """
empty = Outbox().last_seq()
o = Outbox()
add_readings(o, 1, 5)
readings_only = Outbox().last_seq()
o = Outbox()
o.add_bundle(1, 5, data(1, 5))
o.add_bundle(8, 9, data(8, 9))       # a bundle past the readings held
past = Outbox().last_seq()
print(json.dumps({"n": [empty, readings_only, past]}))
""")
    assert r["n"] == [0, 5, 9]


def test_the_send_cursor_survives_a_reboot(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 6):
    o.add_bundle(s, s, data(s, s))
sent = drain(o, 3)
cursor = open("outbox/cursor").read()
o = Outbox()
print(json.dumps({"sent": sent, "cursor": cursor, "pending": o.pending(), "rest": drain(o)}))
""")
    assert r["sent"] == [[1, 1], [2, 2], [3, 3]]
    assert r["cursor"] == "3"
    assert r["pending"] == 2
    assert r["rest"] == [[4, 4], [5, 5]]


def test_seven_days_of_single_reading_bundles_fit(mpy, tmp_path):
    # 672 intervals, each a reading and a one-reading 90-byte bundle: 672 * 130 = 87,360
    # bytes, a third of the 262,144-byte ring. The link is down all week.
    r = run(mpy, tmp_path, """
o = Outbox()
for s in range(1, 673):
    o.add_reading(*reading(s))
    o.add_bundle(s, s, data(s, s))
o = Outbox()
oldest = o.next_to_send()
print(json.dumps({"stats": o.stats, "pending": o.pending(), "oldest": list(oldest[:2]),
                  "oldest_ok": bytes(oldest[2]) == data(1, 1), "open": o.open_readings(),
                  "sizes": [os.stat("outbox/" + n)[6] for n in segs()]}))
""", timeout=60)
    st = r["stats"]
    assert st["overwritten_bundles"] == 0 and st["torn_records"] == 0
    assert st["bundles"] == 672 and st["readings"] == 672
    assert st["bytes"] == 672 * (R + B90) == 87_360
    assert sum(r["sizes"]) == 87_360
    assert all(s <= 4096 for s in r["sizes"])
    assert st["segments"] == len(r["sizes"]) <= 22
    assert r["pending"] == 672
    assert r["oldest"] == [1, 1] and r["oldest_ok"]
    assert r["open"] == []


def test_the_index_of_a_full_outbox_stays_small(mpy, tmp_path):
    # Fill the 256 KiB ring past full with 90-byte bundles (2,100 intervals of 130 bytes
    # = 273,000 bytes), then measure what opening it costs in RAM, on a 96 KiB heap.
    r = run(mpy, tmp_path, """
import gc
o = Outbox()
for s in range(1, 2101):
    o.add_reading(*reading(s))
    o.add_bundle(s, s, data(s, s))
over = o.stats["overwritten_bundles"]
o = None
gc.collect()
m0 = gc.mem_alloc()
o = Outbox()
gc.collect()
m1 = gc.mem_alloc()
n = o.pending()
b = o.next_to_send()
print(json.dumps({"ram": m1 - m0, "stats": o.stats, "pending": n, "oldest": b[0], "over": over,
                  "sizes": [os.stat("outbox/" + x)[6] for x in segs()]}))
""", heapsize="96k", timeout=90)
    st = r["stats"]
    held = sum(r["sizes"])
    assert held == st["bytes"] <= 262_144
    assert held > 262_144 - 2 * 4096              # full: at most a segment short of the ring
    # The oldest segment may start with a bundle whose reading went with the one before.
    assert st["bundles"] - st["readings"] in (0, 1)
    assert held == st["readings"] * R + st["bundles"] * B90
    assert r["pending"] == st["bundles"]
    assert r["oldest"] == 2100 - st["bundles"] + 1
    assert r["over"] == 2100 - st["bundles"]      # nothing was sent: every drop counted
    print("outbox index RAM for %d bytes in %d segments: %d bytes"
          % (held, st["segments"], r["ram"]))
    assert r["ram"] < 4096


def test_bad_calls_raise_value_error_are_counted_and_change_nothing(mpy, tmp_path):
    r = run(mpy, tmp_path, """
o = Outbox()
add_readings(o, 1, 4)
o.add_bundle(1, 2, data(1, 2))
errors = []
for call in (lambda: o.add_reading(*reading(4)),      # not after 4
             lambda: o.add_reading(*reading(3)),
             lambda: o.add_reading(5, -1, 0, 0, 0),     # out of range
             lambda: o.add_reading(5, 0, 0, 0, 1 << 16),
             lambda: o.add_bundle(2, 3, data(2, 3)),    # overlaps 1-2
             lambda: o.add_bundle(1, 1, data(1, 1)),    # below it
             lambda: o.add_bundle(4, 3, data(4, 3)),    # empty range
             lambda: o.add_bundle(3, 4, b""),
             lambda: o.add_bundle(3, 4, b"x" * 1025),
             lambda: o.add_bundle(3, 4, "text"),
             lambda: o.request(5, 4),
             lambda: o.sent(3)):                        # no such bundle
    try:
        call()
        errors.append(None)
    except ValueError as e:
        errors.append(str(e))
o.add_bundle(3, 4, data(3, 4))
o.add_reading(*reading(5))
o2 = Outbox()
print(json.dumps({"errors": errors, "rejected": o.stats["rejected"],
                  "bytes": o2.stats["bytes"], "sent": drain(o2),
                  "open": [x[0] for x in o2.open_readings()]}))
""")
    assert all(r["errors"]), r["errors"]
    assert r["rejected"] == 12
    assert r["bytes"] == 5 * R + 2 * B90
    assert r["sent"] == [[1, 2], [3, 4]]
    assert r["open"] == [5]


# ---------------------------------------------------------------- on LittleFS, the boards' filesystem

LFS = """
import gc
from meter.outbox import Outbox

class Dev:
    # Flash as LittleFS sees it on the boards: 4 KiB erase blocks. `budget` programs and
    # erases succeed, then the power goes: half of that program lands and nothing after
    # it. A file the cut left open is closed later by the garbage collector, with the heap
    # locked: the dead device fails without allocating (LittleFS prints that error).
    def __init__(self, data, budget=-1, bs=4096):
        self.data = data
        self.mv = memoryview(data)
        self.bs = bs
        self.budget = budget
        self.ops = 0
        self.dead = OSError(5)
        self.alive = True
    def _spend(self):
        if not self.alive:
            raise self.dead
        if self.budget == 0:
            self.alive = False
            raise self.dead
        self.budget -= 1
        self.ops += 1
    def readblocks(self, b, buf, off=0):
        if not self.alive:
            raise self.dead
        p = b * self.bs + off
        buf[:] = self.mv[p:p + len(buf)]
    def writeblocks(self, b, buf, off=0):
        p = b * self.bs + off
        if self.alive and self.budget == 0:
            n = len(buf) // 2
            self.mv[p:p + n] = buf[:n]
        self._spend()
        self.mv[p:p + len(buf)] = buf
    def ioctl(self, op, arg):
        if op == 4:
            return len(self.data) // self.bs
        if op == 5:
            return self.bs
        if op == 6:
            self._spend()
            p = arg * self.bs
            self.mv[p:p + self.bs] = b"\\xff" * self.bs
            return 0
        return 0

def mount(data, budget=-1):
    dev = Dev(data, budget)
    os.mount(os.VfsLfs2(dev), "/flash")
    os.chdir("/flash")
    return dev

def unmount():
    os.chdir("/")
    os.umount("/flash")

def used():
    st = os.statvfs("/flash")
    return (st[2] - st[3]) * st[0]
"""


def test_power_cuts_on_littlefs_lose_nothing_that_was_durable(mpy, tmp_path):
    """The power goes at every flash program and erase in turn while readings, bundles and
    sends go on; after each cut the outbox reopens, holds every call that had returned (and
    at most the one under way), sends on from the right place, and takes new data."""
    r = run(mpy, tmp_path, LFS + """
KW = {"seg_bytes": 512, "max_bytes": 65536}

def scenario(log):
    # An entry goes into the log only once its call has returned: durable from then on.
    o = Outbox(**KW)
    for s in range(1, 25):
        log.append(("try-r", s))
        o.add_reading(s, s * 900, s, 0, 0)
        log.append(("r", s))
        if s % 4 == 0:
            log.append(("try-b", s - 3, s))
            o.add_bundle(s - 3, s, data(s - 3, s))
            log.append(("b", s - 3, s))
            b = o.next_to_send()
            log.append(("try-sent", b[0], b[1]))
            o.sent(b[0])
            log.append(("sent", b[0], b[1]))

clean = bytearray(b"\\xff" * 4096 * 32)
os.VfsLfs2.mkfs(Dev(clean))
dev = mount(bytearray(clean))
scenario([])
total = dev.ops
unmount()
fails = []
for budget in range(total + 1):
    flash = bytearray(clean)
    mount(flash, budget)
    log = []
    try:
        scenario(log)
    except OSError:
        pass
    try:
        unmount()
    except OSError:
        pass
    mount(flash)
    o = Outbox(**KW)
    done_r = [e[1] for e in log if e[0] == "r"]
    done_b = [(e[1], e[2]) for e in log if e[0] == "b"]
    done_s = [e[2] for e in log if e[0] == "sent"]
    inflight = log[-1] if log and log[-1][0].startswith("try") else ("none",)
    held_r = [x[0] for x in o.open_readings()]
    last = o.last_seq()
    nxt = o.next_to_send()
    o.rewind(0)
    held_b = [tuple(b) for b in drain(o)]
    ok_b = held_b == done_b or (inflight[0] == "try-b" and held_b == done_b + [inflight[1:]])
    hb = held_b[-1][1] if held_b else 0
    want_r = [s for s in done_r if s > hb]
    ok_r = held_r == want_r or (inflight[0] == "try-r" and held_r == want_r + [inflight[1]])
    top = max(done_r + [0])
    ok_last = last == top or (inflight[0] != "none" and last == inflight[-1])
    # Next to send: after the last completed send, or after the one under way.
    ok_cur = False
    for cur in (done_s[-1] if done_s else 0, inflight[-1] if inflight[0] == "try-sent" else -1):
        rest = [b for b in held_b if b[1] > cur]
        if (tuple(nxt[:2]) if nxt else None) == (rest[0] if rest else None):
            ok_cur = True
    o.add_reading(last + 1, 1, 1, 0, 0)
    unmount()
    mount(flash)
    ok_more = Outbox(**KW).last_seq() == last + 1
    unmount()
    if not (ok_b and ok_r and ok_last and ok_cur and ok_more):
        fails.append([budget, ok_b, ok_r, ok_last, ok_cur, ok_more, list(log[-1:])])
print(json.dumps({"cuts": total + 1, "fails": fails}))
""")
    assert r["cuts"] > 100
    assert r["fails"] == []


def test_a_full_filesystem_raises_and_a_smaller_ring_recovers(mpy, tmp_path):
    """A ring configured larger than the filesystem: the append that finds no space raises
    OSError and holds nothing of it; the same outbox keeps working once it may trim."""
    r = run(mpy, tmp_path, LFS + """
flash = bytearray(b"\\xff" * 4096 * 16)    # 64 KiB of LittleFS
os.VfsLfs2.mkfs(Dev(flash))
mount(flash)
o = Outbox()
done = 0
err = None
for s in range(1, 1000):
    try:
        o.add_reading(*reading(s))
        o.add_bundle(s, s, data(s, s))
        done = s
    except OSError as e:
        err = e.errno
        break
same = (o.last_seq(), o.stats["bundles"])
o.max_bytes = 16384                  # what fits: the next append trims
o.add_reading(*reading(o.last_seq() + 1))
unmount()
mount(flash)
o2 = Outbox(max_bytes=16384)
sent = drain(o2)
print(json.dumps({"done": done, "err": err, "same": same, "last": o2.last_seq(),
                  "torn": o2.stats["torn_records"], "sent": sent, "bytes": o2.stats["bytes"],
                  "open": [x[0] for x in o2.open_readings()]}))
""")
    done = r["done"]
    assert r["err"] == 28                # ENOSPC
    # The interval that failed may have kept its reading (its bundle found no space).
    assert r["same"][0] in (done, done + 1) and r["same"][1] == done
    assert r["torn"] == 0
    assert r["last"] == r["same"][0] + 1
    assert r["sent"] and r["sent"][-1] == [done, done]
    assert [s for s, _ in r["sent"]] == list(range(r["sent"][0][0], done + 1))
    assert r["bytes"] <= 16384
    assert r["open"] == list(range(done + 1, r["last"] + 1))


def test_a_full_ring_on_littlefs(mpy, tmp_path):
    """7 days, then the full ring, on a 512 KiB LittleFS with the boards' 4 KiB blocks: the
    blocks taken are the segments plus a few for LittleFS's own metadata."""
    r = run(mpy, tmp_path, LFS + """
flash = bytearray(b"\\xff" * 4096 * 128)
os.VfsLfs2.mkfs(Dev(flash))
mount(flash)
u0 = used()
o = Outbox()
week = None
for s in range(1, 2101):
    o.add_reading(*reading(s))
    o.add_bundle(s, s, data(s, s))
    if s == 672:
        week = [dict(o.stats), used() - u0]
full = [dict(o.stats), used() - u0]
unmount()
mount(flash)
o = Outbox()
print(json.dumps({"week": week, "full": full, "reopen": o.stats,
                  "oldest": list(o.next_to_send()[:2])}))
""", heapsize="2m")
    st, used = r["week"]
    assert st["bytes"] == 672 * (R + B90) and st["overwritten_bundles"] == 0
    assert used <= (st["segments"] + 4) * 4096
    st, used = r["full"]
    assert st["bytes"] <= 262_144
    assert used <= (st["segments"] + 6) * 4096
    print("LittleFS: 7 days %d blocks, full ring %d blocks"
          % (r["week"][1] // 4096, used // 4096))
    assert r["reopen"]["bundles"] == st["bundles"] and r["reopen"]["torn_records"] == 0
    assert r["oldest"] == [2100 - st["bundles"] + 1] * 2


# ---------------------------------------------------------------- CPython and MicroPython alike

SCRIPT = """
import json, os, sys
from meter.outbox import Outbox
os.chdir(sys.argv[1])
ops = json.loads(open("ops.json").read())
kw = {"seg_bytes": 512, "max_bytes": 1 << 20}
o = Outbox(**kw)
out = []
for op in ops:
    k = op[0]
    if k == "reopen":
        o = Outbox(**kw)
    elif k == "reading":
        o.add_reading(op[1], op[1] * 900, op[1] * 11, op[1], 0)
    elif k == "bundle":
        o.add_bundle(op[1], op[2], bytes([op[1] & 0xFF]) * op[3])
    elif k == "send":
        b = o.next_to_send()
        if b is not None:
            o.sent(b[0])
        out.append(None if b is None else [b[0], b[1], len(b[2]), b[2][0]])
    elif k == "request":
        out.append(o.request(op[1], op[2]))
    elif k == "rewind":
        o.rewind(op[1])
    out.append([o.pending(), o.last_seq(), [r[0] for r in o.open_readings()]])
print(json.dumps(out))
"""


def _ops(rng):
    """A random day of operation: readings, bundles over them (sometimes with gaps), sends,
    link losses, resend requests and reboots."""
    ops = []
    seq = 0
    open_lo = 1
    for _ in range(300):
        x = rng.random()
        if x < 0.4:
            seq += 1
            ops.append(["reading", seq])
        elif x < 0.6 and seq >= open_lo:
            lo = rng.randint(open_lo, seq)
            ops.append(["bundle", lo, seq, rng.randint(1, 200)])
            open_lo = seq + 1
        elif x < 0.8:
            ops.append(["send"])
        elif x < 0.87:
            lo = rng.randint(0, seq + 2)
            ops.append(["request", lo, lo + rng.randint(0, 6)])
        elif x < 0.93:
            ops.append(["rewind", rng.randint(0, seq + 1)])
        else:
            ops.append(["reopen"])
    return ops


def _model(ops):
    """What the outbox must answer, from the API's rules alone (no ring: 1 MiB is never
    full here)."""
    readings, bundles, queue = [], [], []
    cursor = 0
    out = []

    def pending():
        return sum(1 for b in bundles if b[1] > cursor) + len(queue)

    for op in ops:
        k = op[0]
        if k == "reopen":
            queue = []
        elif k == "reading":
            readings.append(op[1])
        elif k == "bundle":
            bundles.append((op[1], op[2], op[3]))
        elif k == "send":
            if queue:
                b = queue.pop(0)
            else:
                b = next((b for b in bundles if b[1] > cursor), None)
                if b is not None:
                    cursor = b[1]
            out.append(None if b is None else [b[0], b[1], b[2], b[0] & 0xFF])
        elif k == "request":
            lo, hi = op[1], op[2]
            if not bundles or hi < bundles[0][0]:
                out.append(0)
            else:
                n = 0
                for b in bundles:
                    if b[1] >= lo and b[0] <= hi and b[1] <= cursor and b not in queue \
                            and len(queue) < 32:
                        queue.append(b)
                        n += 1
                queue.sort()
                out.append(n)
        elif k == "rewind":
            oldest = bundles[0][0] if bundles else 0
            cursor = min(cursor, max(op[1] - 1, oldest - 1, 0))
            queue = [b for b in queue if b[1] <= cursor]
        top = max([0] + readings + [b[1] for b in bundles])
        hi = bundles[-1][1] if bundles else 0
        out.append([pending(), top, [s for s in readings if s > hi]])
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cpython_and_micropython_agree_with_the_model(tmp_path, seed):
    ops = _ops(random.Random(seed))
    want = _model(ops)
    results = {}
    for name in ("cpython", "micropython"):
        d = tmp_path / name
        d.mkdir()
        (d / "ops.json").write_text(json.dumps(ops))
        if name == "cpython":
            res = subprocess.run([sys.executable, "-c", SCRIPT, str(d)],
                                 capture_output=True, timeout=60, cwd=runtime.REPO)
        else:
            res = runtime.run_micropython(None, str(d), code=SCRIPT, timeout=60)
        assert res.returncode == 0, res.stderr.decode()
        results[name] = json.loads(res.stdout.decode().strip().splitlines()[-1])
        results[name + "_files"] = {p.name: p.read_bytes()
                                    for p in sorted((d / "outbox").iterdir())}
    assert results["cpython"] == want
    assert results["micropython"] == want
    assert results["cpython_files"] == results["micropython_files"]
