# Runs the real firmware in the MicroPython unix port on simulated hardware.
#
#   micropython run_meter.py SIM.json
#
# SIM.json (written by `meter-sim` / the demo; see docs/simulation.md):
#   board         "esp32" | "pico"
#   trace         CSV path (t_s,current_a[,voltage_v])
#   loop          repeat the trace (default false)
#   flash         directory that plays the meter's flash filesystem
#   speed         0 = as fast as possible, else simulated seconds per real second
#   max_sim_s     stop after this much simulated time (0 = at trace end)
#   rtc_epoch     unix time the board's RTC holds at boot
#   true_epoch    unix time it really is at boot (default rtc_epoch): what the
#                 network answers to DeviceTimeReq
#   clock_ppm     the board crystal's error (positive: its clock runs fast)
#   command_key   hex: provision this downlink command key (as the
#                 technician's `provision` does) if the meter has none
#   config        firmware configuration written to flash/config.json
#   hardware      overrides of boards_sim values (tolerances, bias...)
#   modem         null, or {host, port, dev_eui, join_eui, app_key}
#   emit          "json": print each reading as one JSON line on stdout
#   stats         also print a final {"stats": ...} line
#   power_cut     at the end of the trace (or max_sim_s) the power goes:
#                 nothing is saved; prints {"power_cut": registers in RAM}
#   action        "run" (default); "keys": create the device key on first
#                 boot, print {"public_key": hex} and stop (provisioning);
#                 "calibrate": one-point calibration on the trace's load,
#                 with "calibrate": {known_w | known_a, known_v, resistive,
#                 seconds, settle_s}; prints {"calibration": {...}}
#
# Readings go to stdout; the firmware's log goes to stderr.

import sys
import json
import os

import simhw
import sim_machine
import sim_esp32
import sim_rp2
import boards_sim

sys.modules["machine"] = sim_machine
sys.modules["esp32"] = sim_esp32
sys.modules["rp2"] = sim_rp2


def _err(msg):
    sys.stderr.write(msg + "\n")


def main(argv):
    if len(argv) < 2:
        _err("usage: micropython run_meter.py SIM.json")
        sys.exit(2)
    with open(argv[1]) as f:
        sim = json.load(f)
    board = sim["board"]
    hwc = boards_sim.hardware_for(board, sim.get("hardware"))
    trace = simhw.TraceSource(sim["trace"], loop=sim.get("loop", False))
    uid = sim.get("unique_id")
    boards_sim.setup(simhw.hw, hwc, trace, seed=sim.get("seed", 1),
                     rtc_epoch=sim.get("rtc_epoch", 1767225600),
                     unique_id=bytes.fromhex(uid) if uid else None,
                     mains_hz=(sim.get("config") or {}).get("mains_hz", 50))
    simhw.hw.max_sim_s = sim.get("max_sim_s", 0)
    simhw.hw.true_epoch = sim.get("true_epoch", sim.get("rtc_epoch", 1767225600))
    simhw.hw.clock_ppm = sim.get("clock_ppm", 0)
    simhw.clock.speed = float(sim.get("speed", 0))

    modem = sim.get("modem")
    if modem:
        import sim_uart
        from meter.boards import load
        b = load(board)
        sim_uart.attach(b.UART_MODEM, modem["host"], modem["port"], modem["dev_eui"],
                        modem.get("join_eui", "0000000000000000"),
                        modem.get("app_key", "00000000000000000000000000000000"),
                        dialect=modem.get("dialect", "rak3172"))

    flash = sim["flash"]
    try:
        os.mkdir(flash)
    except OSError:
        pass
    os.chdir(flash)

    # Imported only now: the firmware must see the simulated `machine`.
    from meter import config, log as mlog
    from meter.app import App
    import asyncio

    mlog.echo = _err
    if sim.get("action") == "keys":
        # What a technician's `keys` command does at provisioning: make the
        # key on first boot, report only the public half.
        from meter import identity
        ident = identity.load_or_create()
        sys.stdout.write(json.dumps({"public_key": "".join("%02x" % b for b in ident.public)}) + "\n")
        return
    if sim.get("command_key"):
        from meter import identity
        if identity.command_key() is None:
            identity.set_command_key(bytes.fromhex(sim["command_key"]))
    cfg = dict(sim.get("config") or {})
    cfg["board"] = board
    config.save(cfg)

    app = App(config.load(), with_modem=bool(modem))
    if sim.get("action") == "calibrate":
        # What the technician's `cal` command does: a known load runs, the
        # firmware's calibrator watches the metering windows, the result is
        # stored on the meter's flash.
        from meter.calibration import Calibrator
        c = sim["calibrate"]
        cb = Calibrator(app.cal, known_w=c.get("known_w", 0.0), known_a=c.get("known_a", 0.0),
                        known_v=c.get("known_v", 0.0), resistive=c.get("resistive", True))
        settle = c.get("settle_s", 1.0)

        def watch(w):
            if simhw.clock.now_us >= settle * 1000000:
                cb.add(w, app.has_v)
        app.metering.on_window = watch
        simhw.hw.max_sim_s = settle + c.get("seconds", 10.0)
        try:
            asyncio.run(app.run())
        except simhw.TraceEnd:
            pass
        from meter.calibration import CalibrationError
        try:
            cal = cb.result()
        except CalibrationError as e:
            _err("calibration refused: %s" % e)
            sys.exit(1)
        app.apply_calibration(cal)
        sys.stdout.write(json.dumps({"calibration": cal}) + "\n")
        return
    r = app.state.registers
    boot = {"boot": {"seq": app.state.seq, "import_wh": r.import_wh(), "export_wh": r.export_wh()}}
    if sim.get("emit") == "json":
        sys.stdout.write(json.dumps(boot) + "\n")

        def emit(rec):
            sys.stdout.write(json.dumps(rec) + "\n")
        app.observers.append(emit)
    mlog.log("sim: %s meter up, public key %s" % (
        board, "".join("%02x" % b for b in app.identity.public)))
    try:
        asyncio.run(app.run())
    except simhw.TraceEnd:
        if sim.get("power_cut"):
            # The supply is gone: no chance to save anything. Report what
            # the meter held in RAM, for the tests to compare after reboot.
            r = app.state.registers
            sys.stdout.write(json.dumps({"power_cut": {
                "seq": app.state.seq, "import_wh": r.import_wh(),
                "export_wh": r.export_wh()}}) + "\n")
        else:
            app.finish()
    if sim.get("stats"):
        st = dict(app.stats)
        st["sim_s"] = simhw.clock.now_us / 1000000
        st["adc_reads"] = simhw.hw.adc_reads
        st["overruns"] = app.sampler.overruns
        st["samples_dropped"] = app.sampler.dropped
        st["samples_taken"] = app.sampler.taken
        st["cpu_us"] = simhw.hw.cpu_us
        st["irq_late"] = simhw.hw.late_fired
        log = app.state.log
        if log is not None:
            st["log_writes"] = log.writes
            st["log_erases"] = log.erases
        if app.uplink is not None:
            u = app.uplink
            for k, v in u.stats.items():
                st["uplink_" + k] = v
            st["pending"] = u.outbox.pending()
            st["open_readings"] = len(u.open)
            st["bundle_readings"] = u.n_plan
            st["clock_ppm_corr"] = app._ppm
            st["synced"] = app.synced
            st["unix_time"] = app.unix_time()
            st["true_unix"] = simhw.true_unix() if hasattr(simhw, "true_unix") else None
            st["modem"] = dict(app.modem.stats)
        simhw.hw.probe_heap()
        st["heap_live_peak_bytes"] = simhw.hw.heap_live_peak
        sys.stdout.write(json.dumps({"stats": st}) + "\n")


main(sys.argv)
