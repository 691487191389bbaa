"""Gateway daemon: ChirpStack MQTT uplinks in, verified readings out to the ledger.

See docs/gateway.md.
"""
