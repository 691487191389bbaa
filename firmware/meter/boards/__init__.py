# Board definitions: one module per board with its pin map and ADC facts.
# `load(name)` imports only the board asked for, so a Pico never loads ESP32
# code (and vice versa).


def load(name):
    if name == "esp32":
        from meter.boards import esp32 as board
    elif name == "pico":
        from meter.boards import pico as board
    else:
        raise ValueError("unknown board %r (expected 'esp32' or 'pico')" % name)
    return board
