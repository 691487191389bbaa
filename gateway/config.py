"""The gateway's configuration file: schema, defaults and checks, in one place.

The daemon reads one TOML file (docs/gateway.md, "Configuration"; the
annotated example an operator starts from is gateway/deploy/config.example.toml).
`check` reads it and reports every mistake at once, each naming the key and
saying what is allowed, so a file is put right in one round instead of one
restart per typo:

    mqtt.port: 70000 is outside 1..65535
    ledger[1].url: missing (the ledger node's base URL, e.g. http://127.0.0.1:8480)
    delivery.batch_sze: unknown key (did you mean batch_size?)

Secrets are never written in the file: it names a file holding one
(token_file, password_file; mode 600 or 640) or an environment variable
(token_env, password_env). They are read when the daemon is built
(`Config.gateway_kwargs`), so a Config can be printed or logged safely.

Relative paths in the file are taken from the directory the file is in.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import ssl
import stat
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gateway.chirpstack import valid_application_id
from gateway.commands import parse_command_keys

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_STATUS_LISTEN = "127.0.0.1:8481"


class ConfigError(ValueError):
    """A configuration that cannot run; `errors` lists every problem found."""

    def __init__(self, path: str | os.PathLike, errors: list[str]):
        self.path = os.fspath(path)
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"{self.path}: {n} error{'s' if n != 1 else ''}:\n"
                         + "\n".join(f"  {e}" for e in self.errors))


class _Bad(Exception):
    """A value that does not pass; the message says what is wrong and what is allowed."""


# -- value checks: each takes the TOML value, returns the value to keep or raises _Bad

def _show(value: Any) -> str:
    """A value as it would be written in TOML, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            pass
    if isinstance(value, dict):
        return "a table"
    return str(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    for types, name in ((str, "a string"), (int, "a whole number"), (float, "a number"),
                        (list, "a list"), (dict, "a table")):
        if isinstance(value, types):
            return name
    return "a date/time"


def _expected(what: str, value: Any) -> _Bad:
    return _Bad(f"expected {what}, got {_show(value)} ({_kind(value)})")


def _whole(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected("a whole number", value)
        if hi is not None and not lo <= value <= hi:
            raise _Bad(f"{value} is outside {lo}..{hi}")
        if value < lo:
            raise _Bad(f"{value} is below the minimum {lo}")
        return value
    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _expected("a number of seconds", value)
    if not 0 < value < math.inf:
        raise _Bad(f"{_show(value)} is not a positive number of seconds")
    return float(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expected("true or false", value)
    return value


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise _Bad(f"{_show(value)} is not one of {', '.join(options)}")
        return value
    return check


def _level(value: Any) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise _Bad(f"{_show(value)} is not one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("a string", value)
    if not 0 < len(value) <= 200 or not value.isprintable():
        raise _Bad(f"{_show(value)} is not 1..200 printable characters")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("a path (a string)", value)
    if not value or "\0" in value:
        raise _Bad(f"{_show(value)} is not a path")
    return value


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _env_name(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("the name of an environment variable", value)
    if not _ENV_NAME.match(value):
        raise _Bad(f"{_show(value)} is not an environment variable name "
                   f"(letters, digits and _, e.g. METER_LEDGER_TOKEN)")
    return value


def _application_id(value: Any) -> str:
    # "+" alone is the one wildcard meant: all applications.
    if not isinstance(value, str):
        raise _expected("a string", value)
    if value != "+" and not valid_application_id(value):
        raise _Bad(f"{_show(value)} is not \"+\" (all applications) or an application id "
                   f"without / + #")
    return value


def _topic(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("an MQTT topic (a string)", value)
    if not 0 < len(value.encode()) <= 1024 or any(c in value for c in "+#\0"):
        raise _Bad(f"{_show(value)} is not an MQTT topic to publish on (1..1024 bytes, "
                   f"no + or #)")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("a URL (a string)", value)
    parts = urllib.parse.urlsplit(value)
    try:
        port_ok = parts.port is None or 0 < parts.port
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok \
            or parts.query or parts.fragment:
        raise _Bad(f"{_show(value)} is not an http:// or https:// base URL "
                   f"(e.g. http://127.0.0.1:8480)")
    return value.rstrip("/")


def split_host_port(value: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6 address]:port"; ValueError when
    it is not one."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(value)
    return host, int(port)


def _host_port(value: Any) -> str:
    if not isinstance(value, str):
        raise _expected("\"host:port\" (a string)", value)
    try:
        split_host_port(value)
    except ValueError:
        raise _Bad(f"{_show(value)} is not \"host:port\" with a port in 1..65535") from None
    return value


def _listen(value: Any) -> str:
    if value == "":
        return value
    try:
        return _host_port(value)
    except _Bad:
        raise _Bad(f"{_show(value)} is not \"host:port\" (e.g. \"127.0.0.1:8481\") "
                   f"or \"\" for off") from None


def _percentages(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise _expected("a list of whole percentages, e.g. [50, 80, 95]", value)
    if any(not 1 <= v <= 100 for v in value) or any(a >= b for a, b in zip(value, value[1:])):
        raise _Bad(f"{_show(value)} is not a rising list of percentages in 1..100")
    return tuple(value)


# -- the schema ---------------------------------------------------------------

REQUIRED = object()
_INVALID = object()  # a value that did not pass: later checks leave it alone


@dataclass(frozen=True)
class Key:
    default: Any
    check: Callable[[Any], Any]
    hint: str = ""  # said when a required key is missing
    path: bool = False  # a file or directory, taken from the config file's folder


SCHEMA: dict[str, Any] = {
    "name": Key(None, _text),
    "state_dir": Key(REQUIRED, _path, "the directory of outbox.sqlite, devices.json and "
                                      "gateway.lock, e.g. /var/lib/meter-gateway", path=True),
    "mqtt": {
        "host": Key("127.0.0.1", _text),
        "port": Key(1883, _whole(1, 65535)),
        "username": Key(None, _text),
        "password_file": Key(None, _path, path=True),
        "password_env": Key(None, _env_name),
        "tls": {
            "ca_file": Key(None, _path, path=True),
            "cert_file": Key(None, _path, path=True),
            "key_file": Key(None, _path, path=True),
        },
        "application_id": Key("+", _application_id),
        "marshaler": Key("auto", _choice("auto", "json", "protobuf")),
        "client_id": Key(None, _text),
        "keepalive_s": Key(30, _whole(5, 65535)),
        "status_topic": Key(None, _topic),
        "reconnect_min_s": Key(1.0, _seconds),
        "reconnect_max_s": Key(30.0, _seconds),
    },
    "ledger": [{  # one or more [[ledger]] tables
        "url": Key(REQUIRED, _url, "the ledger node's base URL, e.g. http://127.0.0.1:8480"),
        "token_file": Key(None, _path, path=True),
        "token_env": Key(None, _env_name),
    }],
    "delivery": {
        "batch_size": Key(500, _whole(1, 500)),
        "backoff_base_s": Key(0.5, _seconds),
        "backoff_cap_s": Key(30.0, _seconds),
        "timeout_s": Key(10.0, _seconds),
        "queue_capacity": Key(1_000_000, _whole(1)),
        "queue_warn_pct": Key((50, 80, 95), _percentages),
    },
    "registry": {
        "refresh_s": Key(300.0, _seconds),
        "unknown_gap_s": Key(10.0, _seconds),
    },
    "downlink": {
        "via": Key("mqtt", _choice("mqtt", "grpc")),
        "command_keys": Key(None, _path, path=True),
        "confirmed": Key(True, _flag),
        "ack_timeout_s": Key(900.0, _seconds),
        "max_attempts": Key(3, _whole(1, 100)),
        "grpc_url": Key(None, _host_port),
        "grpc_token_file": Key(None, _path, path=True),
        "grpc_token_env": Key(None, _env_name),
        "grpc_tls": Key(False, _flag),
        "grpc_ca_file": Key(None, _path, path=True),
    },
    "resend": {
        "after_s": Key(7200.0, _seconds),
        "min_interval_s": Key(3600.0, _seconds),
        "max_per_day": Key(4, _whole(0, 1000)),
        "attempts": Key(6, _whole(1, 1000)),
        "fragment_ttl_s": Key(172800.0, _seconds),
    },
    "dead_letters": {
        "max": Key(100_000, _whole(1)),
        "keep_days": Key(30.0, _seconds),
    },
    "status": {
        "listen": Key(DEFAULT_STATUS_LISTEN, _listen),
    },
    "log": {
        "level": Key("INFO", _level),
        "format": Key("text", _choice("text", "json")),
    },
}


# -- the checked configuration -------------------------------------------------

@dataclass(frozen=True)
class Tls:
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True)
class Mqtt:
    host: str
    port: int
    username: str | None
    password_file: Path | None
    password_env: str | None
    tls: Tls | None  # None: plain TCP; a [mqtt.tls] table, even empty, turns TLS on
    application_id: str
    marshaler: str
    client_id: str | None
    keepalive_s: int
    status_topic: str | None
    reconnect_min_s: float
    reconnect_max_s: float


@dataclass(frozen=True)
class Ledger:
    url: str
    token_file: Path | None
    token_env: str | None


@dataclass(frozen=True)
class Delivery:
    batch_size: int
    backoff_base_s: float
    backoff_cap_s: float
    timeout_s: float
    queue_capacity: int
    queue_warn_pct: tuple[int, ...]


@dataclass(frozen=True)
class Registry:
    refresh_s: float
    unknown_gap_s: float


@dataclass(frozen=True)
class Downlink:
    via: str
    command_keys: Path | None
    confirmed: bool
    ack_timeout_s: float
    max_attempts: int
    grpc_url: str | None
    grpc_token_file: Path | None
    grpc_token_env: str | None
    grpc_tls: bool
    grpc_ca_file: Path | None  # a private CA for the API's certificate


@dataclass(frozen=True)
class Resend:
    after_s: float
    min_interval_s: float
    max_per_day: int
    attempts: int
    fragment_ttl_s: float


@dataclass(frozen=True)
class DeadLetters:
    max: int
    keep_days: float


@dataclass(frozen=True)
class Status:
    listen: str  # "" when off

    @property
    def address(self) -> tuple[str, int] | None:
        return split_host_port(self.listen) if self.listen else None

    @property
    def url(self) -> str | None:
        """Where a client on this host reaches the endpoint."""
        if not self.listen:
            return None
        host, port = split_host_port(self.listen)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(frozen=True)
class Log:
    level: str
    format: str


@dataclass(frozen=True)
class Config:
    path: Path
    name: str | None
    state_dir: Path
    mqtt: Mqtt
    ledgers: tuple[Ledger, ...]
    delivery: Delivery
    registry: Registry
    downlink: Downlink
    resend: Resend
    dead_letters: DeadLetters
    status: Status
    log: Log
    warnings: tuple[str, ...] = ()
    # How many command keys the keys file held when it was checked (None:
    # files were not checked, or there is no keys file).
    command_key_count: int | None = None

    def gateway_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for gateway.daemon.Gateway. The secrets are read
        here, from their files or environment variables (ConfigError when one
        went missing since the check)."""
        m, d, dl, r = self.mqtt, self.delivery, self.downlink, self.resend
        errors: list[str] = []

        def secret(where: str, file: Path | None, env: str | None) -> str | None:
            try:
                return _read_secret(file, env)
            except _Bad as exc:
                errors.append(f"{where}: {exc}")
                return None

        address = self.status.address
        kwargs: dict[str, Any] = {
            "mqtt_host": m.host,
            "mqtt_port": m.port,
            "mqtt_username": m.username,
            "mqtt_password": secret("mqtt.password", m.password_file, m.password_env),
            "mqtt_tls": None if m.tls is None else {
                k: None if v is None else str(v) for k, v in vars(m.tls).items()},
            "application_id": m.application_id,
            "marshaler": m.marshaler,
            "client_id": m.client_id,
            "keepalive": m.keepalive_s,
            "status_topic": m.status_topic,
            "reconnect_min_s": m.reconnect_min_s,
            "reconnect_max_s": m.reconnect_max_s,
            # With `ledgers` the single-ledger arguments are not used.
            "ledger_url": None,
            "ledger_token": None,
            "ledgers": [(led.url, secret(f"ledger[{i}].token", led.token_file, led.token_env))
                        for i, led in enumerate(self.ledgers)],
            "state_dir": str(self.state_dir),
            "name": self.name,
            "batch_size": d.batch_size,
            "backoff_base": d.backoff_base_s,
            "backoff_cap": d.backoff_cap_s,
            "ledger_timeout": d.timeout_s,
            "queue_capacity": d.queue_capacity,
            "queue_warn_pct": d.queue_warn_pct,
            "refresh_interval": self.registry.refresh_s,
            "unknown_refresh_gap": self.registry.unknown_gap_s,
            "downlink_via": dl.via,
            "command_keys": None if dl.command_keys is None else str(dl.command_keys),
            "downlink_confirmed": dl.confirmed,
            "downlink_ack_timeout_s": dl.ack_timeout_s,
            "downlink_max_attempts": dl.max_attempts,
            "grpc_url": dl.grpc_url if dl.via == "grpc" else None,
            "grpc_token": (secret("downlink.grpc_token", dl.grpc_token_file, dl.grpc_token_env)
                           if dl.via == "grpc" else None),
            "grpc_tls": dl.grpc_tls,
            "grpc_ca_file": None if dl.grpc_ca_file is None else str(dl.grpc_ca_file),
            "resend_after_s": r.after_s,
            "resend_min_interval_s": r.min_interval_s,
            "resend_max_per_day": r.max_per_day,
            "resend_attempts": r.attempts,
            "fragment_ttl_s": r.fragment_ttl_s,
            "dead_letter_max": self.dead_letters.max,
            "dead_letter_days": self.dead_letters.keep_days,
            "status_host": address[0] if address else "127.0.0.1",
            "status_port": address[1] if address else None,
        }
        if errors:
            raise ConfigError(self.path, errors)
        return kwargs


# -- reading and checking ------------------------------------------------------

def load(path: str | os.PathLike, *, files: bool = True) -> Config:
    """The checked configuration; ConfigError listing every problem otherwise.
    files=False leaves out the checks of the files and environment variables
    it names (for tools that only need the state directory or the status
    address, run by a user who cannot read the secrets)."""
    cfg, errors = check(path, files=files)
    if cfg is None:
        raise ConfigError(path, errors)
    return cfg


def check(path: str | os.PathLike, *, files: bool = True) -> tuple[Config | None, list[str]]:
    """(Config, []) or (None, every error found). Warnings, which do not stop
    the gateway, are in Config.warnings."""
    return _Checker(Path(path), files).run()


def _valid(*values: Any) -> bool:
    return all(v is not _INVALID for v in values)


def _read_secret(file: Path | None, env: str | None) -> str | None:
    """The secret from its file (one line; the line end is not part of it) or
    environment variable; None when neither is given. _Bad when unreadable."""
    if env is not None:
        value = os.environ.get(env)
        if not value:
            raise _Bad(f"the environment variable {env} is not set (or empty) here")
        return value
    if file is None:
        return None
    try:
        text = file.read_text()
    except UnicodeDecodeError:
        raise _Bad(f"{file} is not text") from None
    except OSError as exc:
        raise _Bad(f"{file}: cannot read: {exc.strerror or exc}") from None
    value = text.rstrip("\r\n")
    if not value:
        raise _Bad(f"{file} is empty")
    if "\n" in value:
        raise _Bad(f"{file} holds more than one line (the secret is the whole file, "
                   f"one line)")
    return value


class _Checker:
    def __init__(self, path: Path, files: bool):
        self.path = path
        self.base = path.absolute().parent
        self.files = files
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.command_key_count: int | None = None

    def error(self, where: str, what: str) -> None:
        self.errors.append(f"{where}: {what}")

    def warn(self, where: str, what: str) -> None:
        self.warnings.append(f"{where}: {what}")

    def run(self) -> tuple[Config | None, list[str]]:
        try:
            with open(self.path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            return None, [f"{self.path}: cannot read: {exc.strerror or exc}"]
        except tomllib.TOMLDecodeError as exc:
            return None, [f"{self.path}: not valid TOML: {exc}"]
        except UnicodeDecodeError:
            return None, [f"{self.path}: not valid TOML: not UTF-8 text"]
        # Every check runs on every value that passed on its own, so one
        # round shows every mistake.
        values = self.table("", doc, SCHEMA)
        self.relations(values)
        if self.files:
            self.check_files(values)
        if self.errors:
            return None, self.errors
        return self.build(values), []

    # -- shape and values

    def table(self, where: str, doc: Any, schema: dict[str, Any]) -> dict[str, Any]:
        """Every key of `schema` with its checked value (or default); errors
        for unknown, missing and bad keys."""
        if not isinstance(doc, dict):
            self.error(where, f"expected a table [{where}], got {_show(doc)} ({_kind(doc)})")
            doc = {}
        out: dict[str, Any] = {}
        for key in doc:
            if key not in schema:
                self.unknown(where, key, schema)
        for key, spec in schema.items():
            at = f"{where}.{key}" if where else key
            if isinstance(spec, list):  # an array of tables, one or more
                out[key] = self.tables(at, doc.get(key), spec[0])
            elif isinstance(spec, dict):  # a sub-table; absent is None
                out[key] = self.table(at, doc[key], spec) if key in doc else (
                    None if where else self.table(at, {}, spec))
            elif key not in doc:
                if spec.default is REQUIRED:
                    self.error(at, f"missing ({spec.hint})")
                out[key] = None if spec.default is REQUIRED else spec.default
            else:
                try:
                    value = spec.check(doc[key])
                except _Bad as exc:
                    self.error(at, str(exc))
                    value = _INVALID
                if spec.path and isinstance(value, str):
                    value = self.base / value
                out[key] = value
        return out

    def tables(self, where: str, doc: Any, schema: dict[str, Any]) -> list[dict[str, Any]]:
        if doc is None:
            self.error(where, f"missing (one or more [[{where}]] tables, each with a url)")
            return []
        if not isinstance(doc, list) or not all(isinstance(t, dict) for t in doc):
            self.error(where, f"expected one or more [[{where}]] tables (double brackets, "
                              f"one per node), got {_kind(doc)}")
            return []
        if not doc:
            self.error(where, f"expected one or more [[{where}]] tables, got none")
        return [self.table(f"{where}[{i}]", t, schema) for i, t in enumerate(doc)]

    def unknown(self, where: str, key: str, schema: dict[str, Any]) -> None:
        at = f"{where}.{key}" if where else key
        if f"{key}_file" in schema:
            self.error(at, f"secrets are not written in the config file: name a file holding "
                           f"it with {key}_file (readable by the gateway only) or an "
                           f"environment variable with {key}_env")
            return
        close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
        if close:
            self.error(at, f"unknown key (did you mean {close[0]}?)")
        else:
            self.error(at, f"unknown key (allowed here: {', '.join(schema)})")

    def relations(self, v: dict[str, Any]) -> None:
        """Checks across keys, where each of them passed on its own."""
        m, d, dl = v["mqtt"], v["delivery"], v["downlink"]
        if _valid(m["reconnect_min_s"], m["reconnect_max_s"]) \
                and m["reconnect_max_s"] < m["reconnect_min_s"]:
            self.error("mqtt.reconnect_max_s", f"{m['reconnect_max_s']:g} is below "
                       f"mqtt.reconnect_min_s ({m['reconnect_min_s']:g})")
        if _valid(d["backoff_base_s"], d["backoff_cap_s"]) \
                and d["backoff_cap_s"] < d["backoff_base_s"]:
            self.error("delivery.backoff_cap_s", f"{d['backoff_cap_s']:g} is below "
                       f"delivery.backoff_base_s ({d['backoff_base_s']:g})")
        self.one_of("mqtt", m, "password_file", "password_env")
        if m["username"] is None and (m["password_file"] is not None
                                      or m["password_env"] is not None):
            self.error("mqtt.username", "missing (a password is given; MQTT sends one only "
                                        "with a user name)")
        tls = m["tls"]
        if tls is not None and (tls["cert_file"] is None) != (tls["key_file"] is None):
            have, lack = ("cert_file", "key_file") if tls["key_file"] is None else \
                ("key_file", "cert_file")
            self.error(f"mqtt.tls.{lack}", f"missing (a client certificate needs both "
                                           f"cert_file and key_file; {have} is given)")
        seen: dict[str, int] = {}
        for i, led in enumerate(v["ledger"]):
            self.one_of(f"ledger[{i}]", led, "token_file", "token_env")
            url = led["url"]
            if isinstance(url, str) and url in seen:
                self.error(f"ledger[{i}].url", f"{_show(url)} is already ledger[{seen[url]}]")
            if isinstance(url, str):
                seen.setdefault(url, i)
        self.one_of("downlink", dl, "grpc_token_file", "grpc_token_env")
        if dl["via"] == "grpc":
            if dl["grpc_url"] is None:
                self.error("downlink.grpc_url", "missing (via = \"grpc\" needs ChirpStack's "
                                                "API address, e.g. \"127.0.0.1:8080\")")
            if dl["grpc_token_file"] is None and dl["grpc_token_env"] is None:
                self.error("downlink.grpc_token_file", "missing (via = \"grpc\" needs a "
                           "ChirpStack API token: grpc_token_file or grpc_token_env)")
            if dl["grpc_ca_file"] is not None and dl["grpc_tls"] is False:
                self.error("downlink.grpc_ca_file", "given, but grpc_tls is false (set "
                                                    "grpc_tls = true to use it)")
        elif dl["via"] == "mqtt":
            for k in ("grpc_url", "grpc_token_file", "grpc_token_env", "grpc_ca_file"):
                if dl[k] is not None:
                    self.warn(f"downlink.{k}", "ignored: downlinks go via mqtt")

    def one_of(self, where: str, table: dict[str, Any], a: str, b: str) -> None:
        if table[a] is not None and table[b] is not None:
            self.error(f"{where}.{b}", f"give {a} or {b}, not both")

    # -- files and environment

    def check_files(self, v: dict[str, Any]) -> None:
        if _valid(v["state_dir"]) and v["state_dir"] is not None:
            self.state_dir(v["state_dir"])
        m, dl = v["mqtt"], v["downlink"]
        self.secret("mqtt", "password_file", "password_env", m)
        if m["tls"] is not None:
            self.tls(m["tls"])
        for i, led in enumerate(v["ledger"]):
            self.secret(f"ledger[{i}]", "token_file", "token_env", led)
        if dl["via"] == "grpc":
            self.secret("downlink", "grpc_token_file", "grpc_token_env", dl)
            if isinstance(dl["grpc_ca_file"], Path):
                self.ca_file("downlink.grpc_ca_file", dl["grpc_ca_file"])
        if dl["command_keys"] is not None and _valid(dl["command_keys"]):
            self.command_keys(dl["command_keys"])

    def state_dir(self, path: Path) -> None:
        where = "state_dir"
        if path.exists():
            if not path.is_dir():
                self.error(where, f"{path} is not a directory")
            elif not os.access(path, os.W_OK | os.X_OK):
                self.error(where, f"{path} is not writable by this user")
            return
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            self.error(where, f"{path} does not exist and cannot be created ({parent} is not "
                              f"writable by this user)")

    def secret(self, where: str, file_key: str, env_key: str, table: dict[str, Any]) -> None:
        file, env = table[file_key], table[env_key]
        if not _valid(file, env) or (file is not None and env is not None):
            return  # reported already
        try:
            _read_secret(file, env)
        except _Bad as exc:
            self.error(f"{where}.{env_key if env is not None else file_key}", str(exc))
            return
        if file is not None:
            self.private(f"{where}.{file_key}", file)

    def private(self, where: str, file: Path) -> None:
        """Warn about a secret other users can read (0640 with the gateway's
        group is fine; 0644 is not)."""
        try:
            mode = file.stat().st_mode
        except OSError:
            return
        if mode & stat.S_IRWXO:
            self.warn(where, f"{file} can be read by other users (mode {stat.S_IMODE(mode):04o});"
                             f" chmod 600 it")

    def readable(self, where: str, file: Path) -> bool:
        try:
            with open(file, "rb") as f:
                f.read(1)
        except OSError as exc:
            self.error(where, f"{file}: cannot read: {exc.strerror or exc}")
            return False
        return True

    def ca_file(self, where: str, file: Path) -> None:
        if self.readable(where, file):
            try:
                ssl.create_default_context().load_verify_locations(cafile=file)
            except (ssl.SSLError, OSError) as exc:
                self.error(where, f"{file}: not a PEM CA certificate file ({exc})")

    def tls(self, t: dict[str, Any]) -> None:
        if isinstance(t["ca_file"], Path):
            self.ca_file("mqtt.tls.ca_file", t["ca_file"])
        ctx = ssl.create_default_context()
        cert, key = t["cert_file"], t["key_file"]
        if isinstance(cert, Path) and isinstance(key, Path):
            cert_ok = self.readable("mqtt.tls.cert_file", cert)
            key_ok = self.readable("mqtt.tls.key_file", key)
            if key_ok:
                self.private("mqtt.tls.key_file", key)
            if cert_ok and key_ok:
                try:
                    ctx.load_cert_chain(cert, key)
                except (ssl.SSLError, OSError) as exc:
                    self.error("mqtt.tls.cert_file", f"{cert} with key {key}: not a PEM "
                                                     f"certificate and matching key ({exc})")

    def command_keys(self, file: Path) -> None:
        where = "downlink.command_keys"
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.error(where, f"{file}: cannot read: {why}")
            return
        try:
            keys = parse_command_keys(json.loads(text))
        except ValueError as exc:  # json.JSONDecodeError is one
            what = f"not JSON: {exc}" if isinstance(exc, json.JSONDecodeError) else str(exc)
            self.error(where, f"{file}: {what}")
            return
        self.command_key_count = len(keys)
        self.private(where, file)

    # -- the result

    def build(self, v: dict[str, Any]) -> Config:
        m = dict(v["mqtt"])
        m["tls"] = None if m["tls"] is None else Tls(**m["tls"])
        return Config(
            path=self.path, name=v["name"], state_dir=v["state_dir"], mqtt=Mqtt(**m),
            ledgers=tuple(Ledger(**t) for t in v["ledger"]),
            delivery=Delivery(**v["delivery"]), registry=Registry(**v["registry"]),
            downlink=Downlink(**v["downlink"]), resend=Resend(**v["resend"]),
            dead_letters=DeadLetters(**v["dead_letters"]), status=Status(**v["status"]),
            log=Log(**v["log"]), warnings=tuple(self.warnings),
            command_key_count=self.command_key_count)


# -- writing ------------------------------------------------------------------

def to_toml(doc: dict[str, Any]) -> str:
    """A config file from a dict shaped like SCHEMA (tables, lists of tables,
    strings, numbers, booleans, lists of numbers): for tools that generate one."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, (Path, str)):
            return json.dumps(str(value), ensure_ascii=False)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(scalar(x) for x in value) + "]"
        raise TypeError(f"cannot write {value!r} to TOML")

    def body(prefix: str, table: dict[str, Any]) -> None:
        nested = []
        for key, value in table.items():
            if value is None:
                continue
            if isinstance(value, dict):
                nested.append(("table", key, value))
            elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
                nested.append(("array", key, value))
            else:
                lines.append(f"{key} = {scalar(value)}")
        for kind, key, value in nested:
            name = f"{prefix}.{key}" if prefix else key
            for t in (value if kind == "array" else [value]):
                lines.append("")
                lines.append(f"[[{name}]]" if kind == "array" else f"[{name}]")
                body(name, t)

    body("", doc)
    return "\n".join(lines).lstrip("\n") + "\n"
