"""One hardware description: hardware/designs.json, the firmware's board modules and clamp
models, and the generated reference documents (wiring diagrams, bills of materials,
calculations, the README's pin table) all say the same thing."""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tools import hardware_docs

REPO = Path(__file__).resolve().parents[2]
HW = REPO / "hardware"
DESIGNS = json.loads((HW / "designs.json").read_text())
BUILDS = sorted(DESIGNS["builds"])
FW_PIN = {"ct": "PIN_CT", "vt": "PIN_VT", "modem_tx": "PIN_MODEM_TX", "modem_rx": "PIN_MODEM_RX",
          "relay": "PIN_RELAY", "led": "PIN_LED", "button": "PIN_BUTTON"}


def _value(node):
    """A literal, `const(literal)`, or arithmetic on literals (e.g. 1.0 / 30.0)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "const":
        return _value(node.args[0])
    if isinstance(node, ast.BinOp):
        ops = {ast.Div: lambda a, b: a / b, ast.Mult: lambda a, b: a * b,
               ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b}
        return ops[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_value(e) for e in node.elts]
    return ast.literal_eval(node)


def module_constants(path: Path) -> dict:
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = _value(node.value)
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
    return out


def fw_board(board: str) -> dict:
    return module_constants(REPO / "firmware" / "meter" / "boards" / f"{board}.py")


def bias_v(build: dict) -> float:
    b = build["bias"]
    return DESIGNS["supply_v"] * b["r_bottom_ohm"] / (b["r_top_ohm"] + b["r_bottom_ohm"])


# ------------------------------------------------------------ firmware == designs

@pytest.mark.parametrize("board", BUILDS)
def test_firmware_pin_map_equals_the_design(board):
    fw = fw_board(board)
    b = DESIGNS["builds"][board]
    assert {k: fw[name] for k, name in FW_PIN.items()} == b["pins"]
    assert fw["UART_MODEM"] == b["modem"]["uart_id"]
    assert fw["MODEM_BAUD"] == b["modem"]["baud"]


@pytest.mark.parametrize("board", BUILDS)
def test_firmware_analog_constants_equal_the_design(board):
    fw = fw_board(board)
    b = DESIGNS["builds"][board]
    adc = DESIGNS["adc_models"][b["mcu"]["adc"]]
    assert fw["SAMPLE_PERIOD_US"] == b["sample_period_us"]
    assert b["sample_hz"] == 1e6 / b["sample_period_us"]
    assert fw["BURDEN_OHM"] == b["ct"]["burden_ohm"]
    assert fw["BIAS_V"] == pytest.approx(bias_v(b), abs=0.005)
    assert fw["ADC_PAIR_US"] == b["adc_pair_us"]
    assert fw["ADC_DNL_WIDTH"] == adc.get("dnl_width_lsb", 0)


def test_firmware_clamp_models_equal_the_design():
    models = module_constants(REPO / "firmware" / "meter" / "ctmodels.py")["MODELS"]
    assert sorted(models) == sorted(DESIGNS["ct_models"])
    for name, m in DESIGNS["ct_models"].items():
        fw = models[name]
        assert fw["rated_a"] == m["rated_a"], name
        assert fw["turns"] == m["turns"], name
        assert fw["v_per_a"] == pytest.approx(m["v_per_a"], rel=1e-12), name
        assert [list(r) for r in fw["table"]] == m["table"], name


# ----------------------------------------------------------- documents == designs

@pytest.mark.parametrize("board", BUILDS)
def test_wiring_diagram_shows_the_designs_pins(board):
    b = DESIGNS["builds"][board]
    root = ET.parse(HW / "reference" / f"{board}-wiring.svg").getroot()
    shown = {}
    for el in root.iter("{http://www.w3.org/2000/svg}text"):
        sig = el.get("data-signal")
        if sig:
            shown[sig] = (int(el.get("data-pin")), el.text)
    assert set(shown) == set(b["pins"])
    for sig, (pin, text) in shown.items():
        assert pin == b["pins"][sig]
        # The label a person reads names the same pin.
        assert re.search(rf"\b{b['mcu']['pin_prefix']}{pin}\b", text), (sig, text)


def test_readme_pin_table_shows_the_designs_pins():
    text = (HW / "README.md").read_text()
    section = text[text.index(hardware_docs.README_BEGIN):text.index(hardware_docs.README_END)]
    rows = [r for r in section.splitlines() if r.startswith("| ") and "`PIN_" in r]
    assert len(rows) == len(FW_PIN)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        const = re.search(r"`(PIN_\w+)`", cells[0]).group(1)
        sig = next(k for k, v in FW_PIN.items() if v == const)
        for board, cell in zip(DESIGNS["builds"], cells[1:]):
            b = DESIGNS["builds"][board]
            assert cell == f"{b['mcu']['pin_prefix']}{b['pins'][sig]}", (board, const, cell)


@pytest.mark.parametrize("board", BUILDS)
def test_bill_of_materials_lists_the_designs_values(board):
    b = DESIGNS["builds"][board]
    rows = list(csv.DictReader(io.StringIO((HW / "reference" / f"{board}-bom.csv").read_text())))
    by_part = {r["part"]: r for r in rows}
    assert set(rows[0]) == {"part", "quantity", "value", "notes"}
    assert by_part["MCU board"]["value"] == b["mcu"]["part"]
    assert by_part["LoRaWAN modem"]["value"] == b["modem"]["part"]
    assert by_part["Burden resistor"]["value"].startswith(f"{b['ct']['burden_ohm']:g} ohm")
    assert by_part["Anti-alias capacitor"]["quantity"] == "2"  # one per ADC channel


def test_generated_documents_are_up_to_date(tmp_path):
    """Regenerate from designs.json and compare with what is committed."""
    docs = hardware_docs.generate()
    assert set(docs) == {"README.md", "reference/calculations.md"} | {
        f"reference/{b}-{kind}" for b in BUILDS for kind in ("wiring.svg", "bom.csv")}
    for rel, content in docs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
        assert (HW / rel).read_text() == content, f"hardware/{rel}: run python -m tools.hardware_docs"
    res = subprocess.run([sys.executable, "-m", "tools.hardware_docs", "--check"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_generator_refuses_a_firmware_pin_map_that_disagrees(tmp_path):
    boards = tmp_path / "boards"
    shutil.copytree(REPO / "firmware" / "meter" / "boards", boards)
    src = (boards / "pico.py").read_text()
    (boards / "pico.py").write_text(re.sub(r"^PIN_CT = \d+", "PIN_CT = 28", src, flags=re.M))
    with pytest.raises(hardware_docs.DesignError) as e:
        hardware_docs.generate(boards_dir=boards)
    assert "pico: ct is 26 in designs.json, PIN_CT = 28" in str(e.value)


# ------------------------------------------------------------------ the numbers

@pytest.mark.parametrize("board", BUILDS)
def test_120_percent_of_the_rating_stays_inside_the_adc_linear_range(board):
    b = DESIGNS["builds"][board]
    ct = DESIGNS["ct_models"][b["ct"]["model"]]
    adc = DESIGNS["adc_models"][b["mcu"]["adc"]]
    if adc["kind"] == "esp32":
        lo_mv, hi_mv = adc["atten"][b["mcu"]["adc_atten"]]["linear_mv"]
    else:
        lo_mv, hi_mv = adc["linear_mv"]
    peak = 1.2 * ct["rated_a"] * math.sqrt(2) / ct["turns"] * b["ct"]["burden_ohm"]
    vb = bias_v(b)
    assert vb - peak > lo_mv / 1000 + 0.05  # at least 50 mV to spare at each end
    assert vb + peak < hi_mv / 1000 - 0.05
    # The voltage module at +15 % mains stays inside too.
    vm = DESIGNS["voltage_modules"][b["vt"]["module"]]
    vpeak = 230 * 1.15 * math.sqrt(2) * vm["trim_v_rms"] / vm["at_mains_v_rms"]
    assert lo_mv / 1000 < vb - vpeak and vb + vpeak < hi_mv / 1000


def test_calculations_state_the_designs_figures():
    text = (HW / "reference" / "calculations.md").read_text()
    for board in BUILDS:
        b = DESIGNS["builds"][board]
        ct = DESIGNS["ct_models"][b["ct"]["model"]]
        part = text[text.index(f"## {board}:"):]
        part = part[:part.index("\n## ", 4)] if "\n## " in part[4:] else part
        burden = b["ct"]["burden_ohm"]
        assert f"bias = **{bias_v(b):.3f} V**" in part
        assert f"burden **{burden:g} ohm**" in part
        assert f"**{ct['turns'] / burden:.2f} A per volt**" in part
        peak = 1.2 * ct["rated_a"] * math.sqrt(2) / ct["turns"] * burden
        assert f"**{peak:.3f} V peak**" in part
        tau = b["anti_alias"]["r_ohm"] * b["anti_alias"]["c_f"]
        assert f"cut-off **{1 / (2 * math.pi * tau):.0f} Hz**" in part
