# ADC helpers shared by the boards: the reading method the sampler binds and
# the RP2040 DNL correction table.

from array import array

# RP2040-E11: codes 512, 1536, 2560 and 3584 are wide.
DNL_CODES = (512, 1536, 2560, 3584)


def reader(adc, kind):
    """The bound read method for the sampler: read_uv (ESP32, eFuse-calibrated
    microvolts) or read_u16."""
    if kind == "uv":
        return adc.read_uv
    return adc.read_u16


def dnl_table(width, bits=12):
    """Map each raw code to the input level it stands for, in ideal LSB.

    A wide code spans width + 1 LSB of input, so every code above it reads
    `width` LSB too low; a wide code itself stands for the middle of its
    span (rounded down)."""
    n = 1 << bits
    lut = array("H", bytes(2 * n))
    shift = 0
    k = 0
    for c in range(n):
        if k < len(DNL_CODES) and c == DNL_CODES[k]:
            lut[c] = c + shift + width // 2
            shift += width
            k += 1
        else:
            lut[c] = c + shift
    return lut
