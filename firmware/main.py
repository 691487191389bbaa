# Entry point on the board: MicroPython runs main.py after boot.py.
from meter.app import main

main()
