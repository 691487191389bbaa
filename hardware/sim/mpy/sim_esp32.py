# The `esp32` module of the simulated ESP32 board: the partition the meter's
# energy log lives in ("meterlog", 64 KiB of raw flash).

import sim_flash


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    @staticmethod
    def find(type=TYPE_APP, subtype=0xFF, label=None):
        if type == Partition.TYPE_DATA and label == "meterlog":
            return [sim_flash.device()]
        return []
