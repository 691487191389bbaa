"""The firmware compiles for both targets and type-checks against each board's stubs.

Runs tools/firmware_check.py as CI does (python -m), over the real firmware
tree and over small trees made here to show that failures are caught and
named. Needs `make typecheck-deps` (pinned pyright and stubs).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import firmware_check, runtime

ARCHS = ("xtensawin", "armv6m")


def check(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.firmware_check", *map(str, args)],
                          cwd=runtime.REPO, capture_output=True, text=True, timeout=timeout)


def sources(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def copy_firmware(tmp_path: Path) -> Path:
    root = tmp_path / "firmware"
    shutil.copytree(runtime.FIRMWARE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


# ---------------------------------------------------------------- the real tree


def test_real_firmware_compiles_for_both_architectures(tmp_path):
    res = check("compile", "--out", tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    totals = json.loads(res.stdout)
    srcs = sources(runtime.FIRMWARE)
    assert totals["files"] == len(srcs) > 0
    assert totals["errors"] == []
    for arch in ARCHS:
        outs = [tmp_path / arch / rel.with_suffix(".mpy") for rel in srcs]
        missing = [str(o) for o in outs if not o.is_file() or o.stat().st_size == 0]
        assert not missing, f"{arch}: no output for {missing}"
        # .mpy files start with 'M' and format version 6 (MicroPython 1.23+).
        assert all(o.read_bytes()[:2] == b"M\x06" for o in outs)
        assert totals[arch] == sum(o.stat().st_size for o in outs)


def test_compiled_frame_codec_loads_in_micropython(tmp_path):
    # Bytecode-only .mpy files are architecture-independent, so the unix port
    # can import what was built for the ESP32: proof the output is usable.
    assert check("compile", "--out", tmp_path).returncode == 0
    res = runtime.run_micropython(None, code="from meter import frame\nprint(frame.__file__, frame.MIN_BUNDLE_LEN)",
                                  path=[tmp_path / "xtensawin"])
    assert res.returncode == 0, res.stderr.decode()
    loaded_from, min_len = res.stdout.decode().split()
    assert loaded_from == str(tmp_path / "xtensawin" / "meter" / "frame.mpy")
    assert min_len == "83"  # a one-reading bundle: 19 bytes + the signature


def test_real_firmware_typechecks_against_both_boards():
    res = check("typecheck")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "esp32: " in res.stdout and "rp2: " in res.stdout


# ---------------------------------------------------------------- failures are caught


def test_compile_names_a_file_that_does_not_compile(tmp_path):
    root = copy_firmware(tmp_path)
    (root / "meter" / "broken_probe.py").write_text("def f(:\n    pass\n")
    res = check("compile", "--root", root, "--out", tmp_path / "out")
    assert res.returncode == 1
    for arch in ARCHS:
        assert f"FAIL {arch} meter/broken_probe.py" in res.stderr
    assert "SyntaxError" in res.stderr
    assert not (tmp_path / "out" / "xtensawin" / "meter" / "broken_probe.mpy").exists()


def test_typecheck_names_a_file_with_a_type_error(tmp_path):
    root = copy_firmware(tmp_path)
    (root / "meter" / "typo_probe.py").write_text(
        "import machine\n\n\ndef on(pin: machine.Pin) -> None:\n    pin.valeu(1)\n")
    res = check("typecheck", "--root", root, "--board", "rp2")
    assert res.returncode == 1
    assert 'rp2: meter/typo_probe.py:5:9: error: Cannot access attribute "valeu"' in res.stdout


def test_each_board_sees_only_its_own_stubs(tmp_path):
    root = make_tree(tmp_path / "fw", {
        "meter/__init__.py": "",
        "meter/boards/__init__.py": "",
        "meter/boards/esp32.py": """\
            import esp32


            def die_temperature_raw() -> int:
                return esp32.raw_temperature()
            """,
        "meter/boards/pico.py": """\
            import rp2


            def adc_dma() -> rp2.DMA:
                return rp2.DMA()
            """,
        "meter/common.py": """\
            import time

            import machine
            from micropython import const

            _SETTLE_MS = const(5)


            def pulse(pin: machine.Pin) -> int:
                t0 = time.ticks_ms()
                pin.value(1)
                time.sleep_ms(_SETTLE_MS)
                pin.value(0)
                return time.ticks_diff(time.ticks_ms(), t0)
            """,
    })
    clean = check("typecheck", "--root", root)
    assert clean.returncode == 0, clean.stdout + clean.stderr

    # A shared module reaching for one board's module fails on the other
    # board, even though the project's venv has both boards' stubs installed.
    (root / "meter" / "leak.py").write_text("import rp2\n")
    # typing exists only in the stubs: fine for pyright, an ImportError on a board.
    (root / "meter" / "hints.py").write_text("from typing import Optional\n")
    res = check("typecheck", "--root", root)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert [ln for ln in lines if "leak.py" in ln] == [
        'esp32: meter/leak.py:1:8: error: Import "rp2" could not be resolved [reportMissingImports]']
    assert any(ln.startswith('imports: meter/hints.py:1:1: error: "typing" does not exist')
               for ln in lines)


def test_missing_stubs_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setattr(firmware_check, "STUBS_DIR", tmp_path / "nothing")
    with pytest.raises(firmware_check.SetupError, match="make typecheck-deps"):
        firmware_check.typecheck(runtime.FIRMWARE, ("esp32",))
