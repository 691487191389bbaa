"""Gateway daemon: ChirpStack MQTT uplinks in, verified bundles out to the ledger,
resend requests out to meters with missing readings.

See docs/gateway.md.
"""
