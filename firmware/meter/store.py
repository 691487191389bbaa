# Files on the meter's flash that must survive power loss.
#
# A write goes to a temporary file which is then renamed over the old one:
# on LittleFS (the default filesystem of the ESP32 and rp2 ports) rename is
# atomic, so after a power cut the file holds either the old or the new
# contents, never a torn mix.

import os


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def read(path):
    with open(path, "rb") as f:
        return f.read()
