# The `rp2` module of the simulated Pico: rp2.Flash(start=, len=) gives the
# raw flash region the meter's energy log lives in.

import sim_flash


def Flash(start=-1, len=-1):
    if len <= 0 or len % sim_flash.BLOCK:
        raise ValueError("Flash region length must be a positive multiple of 4096")
    return sim_flash.device("meterlog.bin", len // sim_flash.BLOCK)
