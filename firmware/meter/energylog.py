# Energy registers that survive power loss, written often enough that a
# reboot loses less than 1 Wh, and rarely enough that the flash lasts ten
# years.
#
# A ring of fixed 32-byte records on a raw flash region (a block device with
# the extended block protocol: readblocks/writeblocks with offsets and an
# erase ioctl). A record is appended whenever a register has advanced 1 Wh
# since the last one, and at every reading; a flash block is erased only when
# the ring moves into it, so each block is erased once per lap. At boot the
# valid record with the highest counter wins; a record torn by a power cut
# fails its checksum and the one before it is used.
#
# Endurance (docs/metering.md): 16 blocks of 4 KiB hold 2048 records per lap.
# A home using 10 MWh a year appends about 10 million records a year, so each
# block is erased about 4,900 times a year, 49,000 times in ten years:
# half the 100,000 cycles NOR flash is rated for.
#
# Record (big-endian): counter u32, seq u32, import_dwh u32, export_dwh u32,
# carry_imp u16, carry_exp u16 (fractions of 0.1 Wh in 1/65536), check u32
# over the 20 bytes before it, then 8 bytes 0x00 (programmed, never erased).

import struct

from micropython import const

_REC = const(32)
_FMT = ">IIIIHHI"
_FMT_LEN = const(24)
_PAD = b"\x00" * 8
_ERASED = b"\xff" * _REC
_IOCTL_BLK_COUNT = const(4)
_IOCTL_BLK_SIZE = const(5)
_IOCTL_BLK_ERASE = const(6)
_STEP_DWH = const(10)  # 1 Wh


def _check(b):
    # Fletcher-32 over the first 20 bytes: catches torn and partly
    # programmed records (NOR programming only clears bits).
    s1 = 0xFFFF
    s2 = 0xFFFF
    for k in range(0, 20, 2):
        s1 = (s1 + (b[k] << 8 | b[k + 1])) % 0xFFFF
        s2 = (s2 + s1) % 0xFFFF
    return (s2 << 16) | s1


class EnergyLog:
    def __init__(self, bdev):
        self.bdev = bdev
        self.block_size = bdev.ioctl(_IOCTL_BLK_SIZE, 0) or 4096
        self.blocks = bdev.ioctl(_IOCTL_BLK_COUNT, 0)
        self.per_block = self.block_size // _REC
        self.slots = self.per_block * self.blocks
        self._buf = bytearray(_REC)
        self.counter = 0
        self.slot = -1  # slot of the newest valid record
        self.writes = 0
        self.erases = 0
        self._last_imp = 0
        self._last_exp = 0
        self._last_seq = -1

    def _read(self, slot):
        b = self._buf
        self.bdev.readblocks(slot // self.per_block, b, (slot % self.per_block) * _REC)
        return b

    def load(self):
        """The newest valid record as (seq, import_dwh, export_dwh, carry_imp,
        carry_exp), or None for an empty ring."""
        best = None
        for slot in range(self.slots):
            b = self._read(slot)
            if b == _ERASED:
                continue
            cnt, seq, imp, exp, ci, ce, chk = struct.unpack(_FMT, b[:_FMT_LEN])
            if chk != _check(b) or b[_FMT_LEN:] != _PAD:
                continue
            if best is None or cnt > best[0]:
                best = (cnt, slot, seq, imp, exp, ci, ce)
        if best is None:
            return None
        cnt, slot, seq, imp, exp, ci, ce = best
        self.counter = cnt
        self.slot = slot
        self._last_imp = imp
        self._last_exp = exp
        self._last_seq = seq
        return seq, imp, exp, ci / 65536, ce / 65536

    def due(self, seq, registers):
        """A record is due: a register moved 1 Wh, or a new reading closed."""
        return (seq != self._last_seq
                or registers.import_dwh - self._last_imp >= _STEP_DWH
                or registers.export_dwh - self._last_exp >= _STEP_DWH)

    def append(self, seq, registers):
        slot = (self.slot + 1) % self.slots
        if slot % self.per_block and self._read(slot) != _ERASED:
            # Not erased (a torn record from a power cut): leave this block
            # alone, it holds the newest good record, and open the next one.
            slot = (slot // self.per_block + 1) * self.per_block % self.slots
        blk = slot // self.per_block
        off = (slot % self.per_block) * _REC
        if off == 0:
            self.bdev.ioctl(_IOCTL_BLK_ERASE, blk)
            self.erases += 1
        # Below 2**30 for a century of records at one a second: a small int.
        self.counter += 1
        ci = int(registers.carry_imp * 65536) & 0xFFFF
        ce = int(registers.carry_exp * 65536) & 0xFFFF
        b = self._buf
        struct.pack_into(_FMT, b, 0, self.counter, seq, registers.import_dwh,
                         registers.export_dwh, ci, ce, 0)
        struct.pack_into(">I", b, 20, _check(b))
        for k in range(_FMT_LEN, _REC):
            b[k] = 0
        self.bdev.writeblocks(blk, b, off)
        self.slot = slot
        self.writes += 1
        self._last_imp = registers.import_dwh
        self._last_exp = registers.export_dwh
        self._last_seq = seq
