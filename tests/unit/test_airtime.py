"""Airtime: the time-on-air formula, the bundle planner and the budget that holds the radio."""

import pytest

from meter import airtime, frame, lorawan


def test_time_on_air_matches_the_field_brief():
    # BRIEF section 4: a 51-byte payload takes about 2.8 s at SF12 and 118 ms at SF7;
    # one 80-byte frame per reading, 96 a day, needs about 49 s at SF9.
    assert lorawan.time_on_air_ms(51, "EU868", 0) == pytest.approx(2793.5, abs=1)
    assert lorawan.time_on_air_ms(51, "EU868", 5) == pytest.approx(118.0, abs=0.1)
    assert 96 * lorawan.time_on_air_ms(80, "EU868", 3) / 1000 == pytest.approx(49.25, abs=0.05)


def test_time_on_air_by_hand_at_sf9():
    # 95-byte payload + 13 = 108 bytes: ceil((864 - 36 + 28 + 16) / 36) = 25 blocks of 5
    # symbols, + 8 = 133 payload symbols, + 12.25 preamble symbols; 4.096 ms a symbol.
    assert lorawan.time_on_air_ms(95, "EU868", 3) == pytest.approx((133 + 12.25) * 4.096)


def test_regions_refuse_unknown_data_rates():
    with pytest.raises(ValueError, match="0..4"):
        lorawan.max_payload("US915", 5)
    with pytest.raises(ValueError, match="region"):
        lorawan.max_payload("XX", 0)


def test_planner_meets_the_bar_at_sf9_and_fits_every_data_rate():
    n = airtime.plan("EU868", 3, 900, 30.0)
    assert airtime.daily_airtime_s("EU868", 3, 900, n) <= 20.0
    assert airtime.daily_airtime_s("EU868", 3, 900, n - 1) > 30.0 * airtime.SCHEDULED_SHARE
    for region, rates in lorawan.DATA_RATES.items():
        for dr in range(len(rates)):
            if lorawan.max_payload(region, dr) < 51:
                continue  # US915 DR0 (11 bytes) is not a meter's data rate
            n = airtime.plan(region, dr, 900, 30.0)
            size = airtime.typical_bundle_len(n, 900)
            count, each = airtime.frames_for(size, lorawan.max_payload(region, dr))
            assert 1 <= n <= frame.MAX_READINGS and count <= frame.MAX_FRAGMENTS
            assert each <= lorawan.max_payload(region, dr)


def test_planned_sizes_agree_with_real_frames():
    readings = [(k + 1, 900 * (k + 1), 2500 * k, 0, 8) for k in range(8)]
    for n in range(1, 9):
        real = len(frame.assemble(frame.encode_body(readings[:n]), bytes(64)))
        assert airtime.typical_bundle_len(n, 900) == real
        frames = frame.fragment(bytes(real), 51) if real > 51 else [bytes(real)]
        count, each = airtime.frames_for(real, 51)
        assert count == len(frames) and each == max(len(f) for f in frames)


def test_budget_holds_a_day_of_eager_sending_to_the_budget_and_duty_cycle():
    b = airtime.Budget(30.0, duty=0.01)
    toa = lorawan.time_on_air_ms(95, "EU868", 3)
    now, sent, last = 0, 0, None
    while now < 86_400_000:
        wait = b.wait_ms(now, toa)
        if wait:
            now += wait
            continue
        if last is not None:
            assert now - last >= toa / 0.01 - 1  # the sub-band stayed closed
        b.spend(now, toa)
        sent, last = sent + 1, now
    # The bucket starts full (a quarter of the budget) and earns the budget over the day.
    assert b.spent_ms <= 30_000 + 7_500 + toa
    assert b.spent_ms >= 30_000


def test_budget_without_tokens_says_how_long_to_wait():
    b = airtime.Budget(10.0, duty=1.0, burst_s=0.0)
    wait = b.wait_ms(0, 100.0)
    assert wait == pytest.approx(100.0 / (10_000 / 86_400_000), rel=1e-3)
    assert b.wait_ms(wait, 100.0) == 0


def test_planner_leaves_the_duty_cycle_room_at_short_intervals():
    # 2-s readings at SF7: one 83-byte frame (118 ms) closes the sub-band for 11.8 s, so a
    # bundle must cover at least that long.
    n = airtime.plan("EU868", 5, 2, 1e6)
    size = airtime.typical_bundle_len(n, 2)
    assert airtime.bundle_airtime_ms(size, "EU868", 5) / 0.01 <= n * 2000
    assert airtime.plan("US915", 3, 2, 1e6) == 1  # no duty cycle there
