"""systemd's service notifications (sd_notify), without a dependency.

Under a unit with Type=notify, systemd passes a datagram socket in
$NOTIFY_SOCKET: "READY=1" there ends the start (units ordered after the
gateway wait for it), "STOPPING=1" announces a clean stop, "STATUS=..." is
shown by `systemctl status`, and with WatchdogSec= the unit expects
"WATCHDOG=1" at least once per $WATCHDOG_USEC, or systemd kills and restarts
it. Outside systemd every call is a no-op that returns False.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send `state` (newline-separated KEY=VALUE assignments, e.g.
    "READY=1\\nSTATUS=running") to systemd. True when it was sent; False when
    not started by systemd with a notify socket, or when sending failed."""
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None or not state:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", state.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two "WATCHDOG=1" pings: half of $WATCHDOG_USEC, as
    systemd advises, so one late ping is not yet a kill. None when the unit
    has no watchdog (or it is meant for another process: $WATCHDOG_PID)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2e6


def _socket_address(value: str) -> str | bytes | None:
    # "/run/systemd/notify": a path; "@name": the abstract namespace (a
    # leading NUL). Anything else (vsock: addresses of VMs) is not for us.
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None
