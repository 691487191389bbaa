"""The ledger node: stores meter readings only after verifying every signature again.

Modules: `store` (SQLite), `admission` (what may enter and why not), `check`
(offline consistency check), `signing` (Ed25519), `server` (HTTP API),
`cli` (the `ledger-node` command). docs/ledger.md describes the API.
"""
