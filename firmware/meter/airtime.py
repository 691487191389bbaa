# How many readings go under one signature, and when the radio may speak.
#
# A signature is 64 bytes whatever it covers, so the airtime a meter needs
# each day falls as more readings share one: at SF9 one signed reading per
# frame costs about 49 s a day for 96 readings, three per bundle about 19 s.
# `plan` picks the smallest bundle (the freshest data) whose scheduled traffic
# stays inside a share of the daily budget, leaving the rest for resends and
# link checks. `Budget` then holds the radio to that budget (a token bucket
# refilled at budget/day) and to the sub-band duty cycle (after T on the air,
# T / DC - T off), so a backlog after an outage drains steadily instead of in
# one burst that the network's fair-use policy would punish.

from meter import frame, lorawan

DAY_S = 86400
# Scheduled traffic may use this share of the budget; the rest is headroom
# for resent bundles after lost frames and for link checks.
SCHEDULED_SHARE = 0.75


def typical_bundle_len(n, interval_s):
    """Bytes of a bundle of n readings interval_s apart with a typical load
    (up to 1.6 kWh per interval: a two-byte import delta, no export)."""
    per = 1 + frame._varint_len(interval_s) + 2 + 1
    return frame.HEAD_LEN + (n - 1) * per + frame.SIG_LEN


def frames_for(size, max_payload):
    """How many radio frames a bundle of `size` bytes takes, and the bytes of
    each (fragments carry a small header)."""
    count, piece = frame.fragment_layout(size, max_payload)
    return count, (piece + frame.FRAG_HEAD_LEN if count > 1 else piece)


def bundle_airtime_ms(size, region, dr):
    count, each = frames_for(size, lorawan.max_payload(region, dr))
    return count * lorawan.time_on_air_ms(each, region, dr)


def daily_airtime_s(region, dr, interval_s, n):
    """Seconds on the air per day sending every reading in bundles of n."""
    bundles = DAY_S / interval_s / n
    return bundles * bundle_airtime_ms(typical_bundle_len(n, interval_s), region, dr) / 1000


def plan(region, dr, interval_s, budget_s, n_max=frame.MAX_READINGS):
    """Readings per bundle: the smallest n whose daily airtime fits the
    scheduled share of budget_s and whose frames the duty cycle lets out
    before the next bundle is due (only short intervals come near that);
    n_max when none does (the budget then delays frames and the backlog
    waits in the outbox)."""
    duty = lorawan.DUTY_CYCLE[region]
    for n in range(1, n_max + 1):
        size = typical_bundle_len(n, interval_s)
        if frames_for(size, lorawan.max_payload(region, dr))[0] > frame.MAX_FRAGMENTS:
            return max(1, n - 1)
        closed_ms = bundle_airtime_ms(size, region, dr) / duty
        if daily_airtime_s(region, dr, interval_s, n) <= budget_s * SCHEDULED_SHARE \
                and closed_ms <= n * interval_s * 1000 * SCHEDULED_SHARE:
            return n
    return n_max


class Budget:
    """Airtime account in milliseconds of the meter's own clock.

    Two limits: a token bucket holding at most `burst_ms`, refilled at
    budget_s per day; and the duty cycle (the sub-band is closed for
    T / duty - T after a frame of T). `wait_ms(now_ms, airtime_ms)` says how
    long to hold a frame; `spend(now_ms, airtime_ms)` books it."""

    def __init__(self, budget_s, duty=0.01, burst_s=None):
        self.rate = budget_s / DAY_S  # ms of airtime earned per ms of time
        self.burst_ms = (budget_s / 4 if burst_s is None else burst_s) * 1000
        self.tokens = self.burst_ms
        self.duty = duty
        self.closed_until = 0
        self.last_ms = None
        self.spent_ms = 0

    def _refill(self, now_ms, cap):
        if self.last_ms is not None and now_ms > self.last_ms:
            self.tokens = min(cap, self.tokens + (now_ms - self.last_ms) * self.rate)
        self.last_ms = now_ms

    def wait_ms(self, now_ms, airtime_ms):
        # The bucket may fill past burst_ms up to one frame: a frame longer
        # than the burst (SF12 on a small budget) must still go, in time.
        self._refill(now_ms, max(self.burst_ms, airtime_ms))
        wait = self.closed_until - now_ms
        short = airtime_ms - self.tokens
        if short > 0:
            need = short / self.rate if self.rate > 0 else DAY_S * 1000
            if need > wait:
                wait = need
        return int(wait) if wait > 0 else 0

    def spend(self, now_ms, airtime_ms):
        self._refill(now_ms, max(self.burst_ms, airtime_ms))
        self.tokens -= airtime_ms
        self.spent_ms += airtime_ms
        if self.duty < 1.0:
            self.closed_until = now_ms + int(airtime_ms / self.duty)
