# Raw NOR flash for the simulated boards, kept in a file in the meter's flash
# directory: the block device the firmware's energy log writes to (an
# esp32.Partition on the ESP32, an rp2.Flash region on the Pico).
#
# It behaves like NOR flash, not like a file: erase sets a whole block to
# 0xFF, programming can only clear bits (new = old AND data), and every erase
# is counted per block so endurance can be checked.

import os

BLOCK = 4096


class NorFlash:
    def __init__(self, path, blocks=16, block_size=BLOCK):
        self.path = path
        self.blocks = blocks
        self.block_size = block_size
        size = blocks * block_size
        try:
            st = os.stat(path)
            if st[6] != size:
                raise OSError("size")
        except OSError:
            with open(path, "wb") as f:
                f.write(b"\xff" * size)
        self.erase_counts = [0] * blocks
        self.program_calls = 0
        self.tear_next = False  # the next program stops half way (power cut)

    def _rw(self, pos, data=None, n=0):
        with open(self.path, "r+b") as f:
            f.seek(pos)
            if data is None:
                return f.read(n)
            f.write(data)

    def readblocks(self, block, buf, offset=0):
        data = self._rw(block * self.block_size + offset, n=len(buf))
        for k in range(len(buf)):
            buf[k] = data[k]

    def writeblocks(self, block, buf, offset=0):
        pos = block * self.block_size + offset
        old = self._rw(pos, n=len(buf))
        n = len(buf) // 2 if self.tear_next else len(buf)
        self.tear_next = False
        new = bytes(old[k] & buf[k] if k < n else old[k] for k in range(len(buf)))
        self._rw(pos, new)
        self.program_calls += 1

    def ioctl(self, op, arg):
        if op == 4:
            return self.blocks
        if op == 5:
            return self.block_size
        if op == 6:
            self._rw(arg * self.block_size, b"\xff" * self.block_size)
            self.erase_counts[arg] += 1
            return 0
        return 0


_devices = {}


def device(name="meterlog.bin", blocks=16):
    """One device per file in the current (flash) directory."""
    d = _devices.get(name)
    if d is None:
        d = NorFlash(name, blocks)
        _devices[name] = d
    return d
