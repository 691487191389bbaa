"""`make demo` in small: the demo's own run, summary and exit status."""

import io

import pytest

from tools import demo

pytestmark = pytest.mark.slow


def test_demo_runs_and_summarises(tmp_path):
    out = io.StringIO()
    rc = demo.run(seconds=10, n_meters=3, workdir=tmp_path, speed=10.0, interval_s=10, out=out)
    text = out.getvalue()
    assert rc == 0, text
    assert "ledger consistency check       OK" in text
    assert "gateway outbox drained         yes" in text
    # the forged and malformed uplinks were refused, each under its own reason
    for reason in ("bad_signature", "malformed_json", "truncated", "unknown_device"):
        assert reason in text
    assert "all processes stopped" in text
    for name in ("kitchen-esp32", "solar-esp32", "flat-pico"):
        assert name in text
