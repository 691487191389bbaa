# The meter's log: a fixed ring of recent lines (for the technician's `log`
# command) and an optional echo to the console.

from micropython import const

_SIZE = const(64)

_ring = [""] * _SIZE
_pos = 0
_count = 0
echo = print


def log(msg):
    global _pos, _count
    _ring[_pos] = msg
    _pos = (_pos + 1) % _SIZE
    _count += 1
    if echo is not None:
        echo(msg)


def recent(n=_SIZE):
    n = min(n, _count, _SIZE)
    return [_ring[(_pos - n + i) % _SIZE] for i in range(n)]
