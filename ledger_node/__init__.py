"""The ledger node: a tamper-evident log of meter readings and the device registry.

Core, pure functions: `merkle` (RFC 6962 hashing and proofs), `note` and
`checkpoint` (C2SP signed notes, checkpoints, cosignatures, the k-of-n policy),
`entries` (the log entry codec and the registry replayed from entries).
Storage and service: `store` (SQLite), `log` (the Merkle log over the store,
signed checkpoints), `admission` (what may enter and why not), `server` (HTTP
API), `witness` (follows a log and cosigns), `export` (proof bundles, whole-log
exports), `verify` (the offline `ledger-verify`), `check` (a store's own
consistency check), `cli` (the `ledger-node` command). docs/ledger.md
describes the formats and the API.
"""
