"""The gateway's configuration file (gateway/config.py): schema, defaults,
every mistake reported at once, secrets from files and the environment, and
the example an operator copies (gateway/deploy/config.example.toml)."""

from __future__ import annotations

import datetime
import inspect
import json
import os
import re
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway import config
from gateway.daemon import Gateway
from tools import runtime

LEDGER = '\n[[ledger]]\nurl = "http://127.0.0.1:8480"\n'
EXAMPLE = runtime.REPO / "gateway" / "deploy" / "config.example.toml"
DOCS = runtime.REPO / "docs" / "gateway.md"


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def errors_of(tmp_path: Path, text: str) -> list[str]:
    cfg, errors = config.check(write(tmp_path, text))
    assert cfg is None and errors
    return errors


def one_error(tmp_path: Path, text: str) -> str:
    errors = errors_of(tmp_path, text)
    assert len(errors) == 1, errors
    return errors[0]


def test_a_minimal_file_takes_the_documented_defaults(tmp_path):
    cfg = config.load(write(tmp_path, 'state_dir = "state"' + LEDGER))
    assert cfg.state_dir == tmp_path / "state"  # relative to the config file's folder
    assert cfg.name is None and cfg.warnings == ()
    m = cfg.mqtt
    assert (m.host, m.port, m.username, m.tls, m.application_id, m.marshaler) == \
        ("127.0.0.1", 1883, None, None, "+", "auto")
    assert (m.keepalive_s, m.reconnect_min_s, m.reconnect_max_s) == (30, 1.0, 30.0)
    assert [(led.url, led.token_file, led.token_env) for led in cfg.ledgers] == \
        [("http://127.0.0.1:8480", None, None)]
    d = cfg.delivery
    assert (d.batch_size, d.backoff_base_s, d.backoff_cap_s, d.timeout_s) == (500, 0.5, 30.0, 10.0)
    assert (d.queue_capacity, d.queue_warn_pct) == (1_000_000, (50, 80, 95))
    assert (cfg.registry.refresh_s, cfg.registry.unknown_gap_s) == (300.0, 10.0)
    dl = cfg.downlink
    assert (dl.via, dl.command_keys, dl.confirmed, dl.ack_timeout_s, dl.max_attempts) == \
        ("mqtt", None, True, 900.0, 3)
    r = cfg.resend
    assert (r.after_s, r.min_interval_s, r.max_per_day, r.attempts, r.fragment_ttl_s) == \
        (2 * 3600, 3600, 4, 6, 48 * 3600)
    assert (cfg.dead_letters.max, cfg.dead_letters.keep_days) == (100_000, 30.0)
    assert cfg.status.listen == "127.0.0.1:8481"
    assert (cfg.log.level, cfg.log.format) == ("INFO", "text")


def test_defaults_agree_with_the_daemon(tmp_path):
    """Where the Gateway constructor has a default, the config's is the same
    (status is the exception: the daemon serves it by default)."""
    kwargs = config.load(write(tmp_path, 'state_dir = "state"' + LEDGER)).gateway_kwargs()
    params = inspect.signature(Gateway.__init__).parameters
    assert set(kwargs) <= set(params), set(kwargs) - set(params)
    own = {"status_port", "ledger_url", "ledgers", "state_dir"}
    differ = {k: (v, params[k].default) for k, v in kwargs.items()
              if k not in own and params[k].default is not inspect.Parameter.empty
              and v != params[k].default}
    assert differ == {}
    assert (kwargs["status_host"], kwargs["status_port"]) == ("127.0.0.1", 8481)


def test_every_mistake_in_a_file_is_reported_at_once(tmp_path):
    text = """
state_dir = "state"
nmae = "pi-1"

[mqtt]
port = 70000
marshaler = "xml"

[[ledger]]
url = "http://127.0.0.1:8480"

[[ledger]]
token_file = "ledger.token"

[delivery]
batch_sze = 100
queue_warn_pct = [95, 50]

[resend]
after_s = 0

[status]
listen = "8481"

[log]
level = "chatty"
"""
    errors = errors_of(tmp_path, text)
    assert sorted(errors) == sorted([
        "nmae: unknown key (did you mean name?)",
        "mqtt.port: 70000 is outside 1..65535",
        'mqtt.marshaler: "xml" is not one of auto, json, protobuf',
        "ledger[1].url: missing (the ledger node's base URL, e.g. http://127.0.0.1:8480)",
        f"ledger[1].token_file: {tmp_path / 'ledger.token'}: cannot read: No such file or "
        f"directory",
        "delivery.batch_sze: unknown key (did you mean batch_size?)",
        "delivery.queue_warn_pct: [95, 50] is not a rising list of percentages in 1..100",
        "resend.after_s: 0 is not a positive number of seconds",
        'status.listen: "8481" is not "host:port" (e.g. "127.0.0.1:8481") or "" for off',
        'log.level: "chatty" is not one of DEBUG, INFO, WARNING, ERROR',
    ])
    with pytest.raises(config.ConfigError) as exc:
        config.load(tmp_path / "gateway.toml")
    assert exc.value.errors == errors and "10 errors" in str(exc.value)


@pytest.mark.parametrize("snippet,key,words", [
    ('[mqtt]\nport = "1883"', "mqtt.port", 'expected a whole number, got "1883" (a string)'),
    ("[mqtt]\nport = 0", "mqtt.port", "0 is outside 1..65535"),
    ("[mqtt]\nkeepalive_s = 2.5", "mqtt.keepalive_s", "expected a whole number, got 2.5"),
    ('[mqtt]\napplication_id = "a/b"', "mqtt.application_id", "without / + #"),
    ('[mqtt]\nstatus_topic = "gw/+/status"', "mqtt.status_topic", "no + or #"),
    ("[mqtt]\nreconnect_min_s = 10\nreconnect_max_s = 5", "mqtt.reconnect_max_s",
     "5 is below mqtt.reconnect_min_s (10)"),
    ('[mqtt]\npassword_env = "HOME"', "mqtt.username", "missing (a password is given"),
    ('[mqtt]\nusername = "u"\npassword = "hunter2"', "mqtt.password",
     "secrets are not written in the config file"),
    ('[mqtt.tls]\ncert_file = "c.pem"', "mqtt.tls.key_file",
     "missing (a client certificate needs both cert_file and key_file"),
    ('[mqtt.tls]\ncafile = "ca.pem"', "mqtt.tls.cafile", "unknown key (did you mean ca_file?)"),
    ("mqtt = 5", "mqtt", "expected a table [mqtt], got 5"),
    ('[mqt]\nport = 1', "mqt", "unknown key (did you mean mqtt?)"),
    ("[delivery]\nbatch_size = 501", "delivery.batch_size", "501 is outside 1..500"),
    ("[delivery]\nbackoff_base_s = 5\nbackoff_cap_s = 1", "delivery.backoff_cap_s",
     "1 is below delivery.backoff_base_s (5)"),
    ("[delivery]\nqueue_capacity = 0", "delivery.queue_capacity", "0 is below the minimum 1"),
    ("[delivery]\nqueue_warn_pct = [50, 101]", "delivery.queue_warn_pct", "1..100"),
    ("[delivery]\ntimeout_s = true", "delivery.timeout_s", "expected a number of seconds"),
    ("[registry]\nrefresh_s = -1", "registry.refresh_s", "not a positive number of seconds"),
    ("[registry]\nrefresh_s = nan", "registry.refresh_s", "not a positive number of seconds"),
    ('[downlink]\nvia = "lora"', "downlink.via", '"lora" is not one of mqtt, grpc'),
    ('[downlink]\nconfirmed = "yes"', "downlink.confirmed", "expected true or false"),
    ("[downlink]\nmax_attempts = 0", "downlink.max_attempts", "0 is outside 1..100"),
    ('[downlink]\nvia = "grpc"\ngrpc_token_env = "HOME"', "downlink.grpc_url",
     "missing (via = \"grpc\" needs ChirpStack's API address"),
    ('[downlink]\nvia = "grpc"\ngrpc_url = "cs:8080"', "downlink.grpc_token_file",
     "missing (via = \"grpc\" needs a ChirpStack API token"),
    ('[downlink]\nvia = "grpc"\ngrpc_url = "cs"\ngrpc_token_env = "HOME"', "downlink.grpc_url",
     '"cs" is not "host:port"'),
    ("[resend]\nmax_per_day = -1", "resend.max_per_day", "-1 is outside 0..1000"),
    ("[resend]\nfragment_ttl_s = 0", "resend.fragment_ttl_s", "not a positive number"),
    ("[dead_letters]\nkeep_days = 0", "dead_letters.keep_days", "not a positive number"),
    ('[dead_letters]\nmax = "lots"', "dead_letters.max", "expected a whole number"),
    ('[status]\nlisten = "127.0.0.1:99999"', "status.listen", "or \"\" for off"),
    ('[log]\nformat = "yaml"', "log.format", '"yaml" is not one of text, json'),
    ('name = ""', "name", "is not 1..200 printable characters"),
])
def test_each_mistake_names_its_key_and_what_is_allowed(tmp_path, snippet, key, words):
    error = one_error(tmp_path, 'state_dir = "state"\n' + snippet + "\n" + LEDGER)
    assert error.startswith(f"{key}: ") and words in error, error


@pytest.mark.parametrize("ledgers,key,words", [
    ("", "ledger", "missing (one or more [[ledger]] tables"),
    ('[ledger]\nurl = "http://a:1"', "ledger", "expected one or more [[ledger]] tables"),
    ('[[ledger]]\nurl = "ftp://a"', "ledger[0].url", "is not an http:// or https:// base URL"),
    ('[[ledger]]\nurl = "http://a:99999"', "ledger[0].url", "base URL"),
    ('[[ledger]]\nurl = "http://a"\n[[ledger]]\nurl = "http://a/"', "ledger[1].url",
     'is already ledger[0]'),
    ('[[ledger]]\nurl = "http://a"\ntoken = "s3cret"', "ledger[0].token",
     "secrets are not written in the config file: name a file holding it with token_file"),
    ('[[ledger]]\nurl = "http://a"\ntoken_env = "1BAD"', "ledger[0].token_env",
     "is not an environment variable name"),
    ('[[ledger]]\nurl = "http://a"\ntoken_env = "A"\ntoken_file = "t"', "ledger[0].token_env",
     "give token_file or token_env, not both"),
    ('[[ledger]]\nurl = "http://a"\n[[ledger]]\nurl = "http://b"\ntokn_file = "t"',
     "ledger[1].tokn_file", "unknown key (did you mean token_file?)"),
])
def test_ledger_tables(tmp_path, ledgers, key, words):
    error = one_error(tmp_path, 'state_dir = "state"\n' + ledgers + "\n")
    assert error.startswith(f"{key}: ") and words in error, error


def test_an_empty_file_lacks_the_two_required_keys(tmp_path):
    assert errors_of(tmp_path, "") == [
        "state_dir: missing (the directory of outbox.sqlite, devices.json and gateway.lock, "
        "e.g. /var/lib/meter-gateway)",
        "ledger: missing (one or more [[ledger]] tables, each with a url)"]


def test_a_file_that_is_not_toml(tmp_path):
    path = write(tmp_path, 'state_dir = "state"\n[mqtt\nport = 1\n')
    cfg, errors = config.check(path)
    assert cfg is None and len(errors) == 1
    assert errors[0].startswith(f"{path}: not valid TOML") and "line 2" in errors[0]
    cfg, errors = config.check(tmp_path / "absent.toml")
    assert errors == [f"{tmp_path / 'absent.toml'}: cannot read: No such file or directory"]


def test_ledger_token_from_a_file(tmp_path):
    secret(tmp_path / "ledger.token", "s3cret-token\n")
    cfg = config.load(write(tmp_path, 'state_dir = "state"\n[[ledger]]\nurl = "http://a:1"\n'
                                      'token_file = "ledger.token"\n'))
    assert cfg.ledgers[0].token_file == tmp_path / "ledger.token"
    assert "s3cret" not in repr(cfg)  # read only when the daemon is built
    assert cfg.gateway_kwargs()["ledgers"] == [("http://a:1", "s3cret-token")]


def test_ledger_token_from_the_environment(tmp_path, monkeypatch):
    text = ('state_dir = "state"\n[[ledger]]\nurl = "http://a:1"\ntoken_env = "GW_TEST_TOKEN"\n'
            '[[ledger]]\nurl = "https://b.example"\n')
    monkeypatch.delenv("GW_TEST_TOKEN", raising=False)
    assert one_error(tmp_path, text) == \
        "ledger[0].token_env: the environment variable GW_TEST_TOKEN is not set (or empty) here"
    monkeypatch.setenv("GW_TEST_TOKEN", "from-env")
    cfg = config.load(tmp_path / "gateway.toml")
    kwargs = cfg.gateway_kwargs()
    assert kwargs["ledgers"] == [("http://a:1", "from-env"), ("https://b.example", None)]
    assert (kwargs["ledger_url"], kwargs["ledger_token"]) == (None, None)
    # Gone between the check and the start: refused, not started without it.
    monkeypatch.delenv("GW_TEST_TOKEN")
    with pytest.raises(config.ConfigError, match=r"ledger\[0\].token: the environment variable"):
        cfg.gateway_kwargs()


@pytest.mark.parametrize("content,words", [
    ("", "is empty"),
    ("\n", "is empty"),
    ("one\ntwo\n", "holds more than one line"),
])
def test_a_secret_file_must_hold_one_line(tmp_path, content, words):
    path = secret(tmp_path / "mqtt.password", content)
    error = one_error(tmp_path, 'state_dir = "state"\n[mqtt]\nusername = "gw"\n'
                                'password_file = "mqtt.password"\n' + LEDGER)
    assert error.startswith(f"mqtt.password_file: {path} {words}"), error


def test_an_unreadable_secret_file(tmp_path):
    path = secret(tmp_path / "ledger.token", "t", mode=0o000)
    if os.access(path, os.R_OK):  # root reads anything: make it a directory instead
        path.unlink()
        path.mkdir()
    error = one_error(tmp_path, 'state_dir = "state"\n[[ledger]]\nurl = "http://a"\n'
                                'token_file = "ledger.token"\n')
    assert error.startswith(f"ledger[0].token_file: {path}: cannot read: ")


def test_mqtt_credentials(tmp_path, monkeypatch):
    secret(tmp_path / "mqtt.password", "pa ss\n")
    cfg = config.load(write(tmp_path, 'state_dir = "state"\n[mqtt]\nusername = "gw"\n'
                                      'password_file = "mqtt.password"\n' + LEDGER))
    kwargs = cfg.gateway_kwargs()
    assert (kwargs["mqtt_username"], kwargs["mqtt_password"]) == ("gw", "pa ss")
    monkeypatch.setenv("GW_TEST_MQTT", "pw-from-env")
    cfg = config.load(write(tmp_path, 'state_dir = "state"\n[mqtt]\nusername = "gw"\n'
                                      'password_env = "GW_TEST_MQTT"\n' + LEDGER))
    assert cfg.gateway_kwargs()["mqtt_password"] == "pw-from-env"


@pytest.mark.parametrize("mode,warned", [(0o600, False), (0o640, False), (0o644, True),
                                         (0o604, True)])
def test_a_secret_file_others_can_read_is_a_warning(tmp_path, mode, warned):
    path = secret(tmp_path / "ledger.token", "t\n", mode)
    cfg, errors = config.check(write(tmp_path, 'state_dir = "state"\n[[ledger]]\n'
                                               'url = "http://a"\ntoken_file = "ledger.token"\n'))
    assert errors == []
    expected = (f"ledger[0].token_file: {path} can be read by other users (mode {mode:04o}); "
                f"chmod 600 it")
    assert list(cfg.warnings) == ([expected] if warned else [])


def test_command_keys_are_checked_entry_by_entry(tmp_path):
    keys = tmp_path / "keys.json"
    text = 'state_dir = "state"\n[downlink]\ncommand_keys = "keys.json"\n' + LEDGER
    assert one_error(tmp_path, text) == \
        f"downlink.command_keys: {keys}: cannot read: No such file or directory"
    secret(keys, '{"70b3d57ed0000a01": "00"}')
    error = one_error(tmp_path, text)
    assert error.startswith(f"downlink.command_keys: {keys}: entry 70b3d57ed0000a01: ")
    secret(keys, "{not json")
    assert one_error(tmp_path, text).startswith(f"downlink.command_keys: {keys}: not JSON")
    secret(keys, json.dumps({"70b3d57ed0000a01": "ab" * 16, "70B3D57ED0000B02": "cd" * 16}),
           mode=0o644)
    cfg = config.load(tmp_path / "gateway.toml")
    assert cfg.command_key_count == 2
    assert cfg.gateway_kwargs()["command_keys"] == str(keys)
    assert [w.split(":")[0] for w in cfg.warnings] == ["downlink.command_keys"]


def test_state_dir_must_be_a_writable_directory(tmp_path):
    (tmp_path / "file").write_text("")
    error = one_error(tmp_path, 'state_dir = "file"' + LEDGER)
    assert error == f"state_dir: {tmp_path / 'file'} is not a directory"
    # One that does not exist yet is fine when it can be created.
    assert config.load(write(tmp_path, 'state_dir = "new/deeper"' + LEDGER)).state_dir == \
        tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def _pem_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path = tmp_path / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = secret(tmp_path / f"{name}.key", "")
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls_files_are_loaded_when_checked(tmp_path):
    ca, _ = _pem_pair(tmp_path, "ca")
    cert, key = _pem_pair(tmp_path, "client")
    _, other_key = _pem_pair(tmp_path, "other")
    text = ('state_dir = "state"\n[mqtt]\nport = 8883\n[mqtt.tls]\nca_file = "ca.pem"\n'
            'cert_file = "client.pem"\nkey_file = "{key}"\n' + LEDGER)
    cfg = config.load(write(tmp_path, text.format(key="client.key")))
    assert cfg.gateway_kwargs()["mqtt_tls"] == {"ca_file": str(ca), "cert_file": str(cert),
                                                "key_file": str(key)}
    assert cfg.warnings == ()
    error = one_error(tmp_path, text.format(key="other.key"))
    assert error.startswith(f"mqtt.tls.cert_file: {cert} with key {other_key}: not a PEM "
                            f"certificate and matching key")
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    errors = errors_of(tmp_path, text.format(key="missing.key"))
    assert [e.split(":")[0] for e in errors] == ["mqtt.tls.ca_file", "mqtt.tls.key_file"]
    assert "not a PEM CA certificate file" in errors[0] and "cannot read" in errors[1]
    # An empty [mqtt.tls] table: TLS with the system's CA certificates.
    cfg = config.load(write(tmp_path, 'state_dir = "state"\n[mqtt.tls]\n' + LEDGER))
    assert cfg.gateway_kwargs()["mqtt_tls"] == {"ca_file": None, "cert_file": None,
                                                "key_file": None}


def test_grpc_settings_are_warned_about_when_downlinks_go_via_mqtt(tmp_path):
    cfg = config.load(write(tmp_path, 'state_dir = "state"\n[downlink]\n'
                                      'grpc_url = "cs:8080"\n' + LEDGER))
    assert cfg.warnings == ("downlink.grpc_url: ignored: downlinks go via mqtt",)
    assert cfg.gateway_kwargs()["grpc_url"] is None


def test_files_false_leaves_files_and_environment_alone(tmp_path):
    text = ('state_dir = "state"\n[downlink]\ncommand_keys = "absent.json"\n'
            '[[ledger]]\nurl = "http://a"\ntoken_env = "GW_TEST_SURELY_UNSET"\n')
    assert len(errors_of(tmp_path, text)) == 2
    cfg = config.load(tmp_path / "gateway.toml", files=False)
    assert cfg.state_dir == tmp_path / "state" and cfg.command_key_count is None


def test_gateway_kwargs_maps_every_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GW_TEST_GRPC", "api-key")
    secret(tmp_path / "l1.token", "t1\n")
    secret(tmp_path / "mqtt.pw", "pw\n")
    secret(tmp_path / "keys.json", "{}")
    text = f"""
name = "pi-7"
state_dir = "{tmp_path / 'st'}"

[mqtt]
host = "broker.lan"
port = 1884
username = "gw"
password_file = "mqtt.pw"
application_id = "app-9"
marshaler = "protobuf"
client_id = "gw-client"
keepalive_s = 45
status_topic = "site/gw/status"
reconnect_min_s = 2
reconnect_max_s = 60

[[ledger]]
url = "http://l1:8480/"
token_file = "l1.token"

[[ledger]]
url = "https://l2.example/base"

[delivery]
batch_size = 50
backoff_base_s = 0.25
backoff_cap_s = 8
timeout_s = 3
queue_capacity = 5000
queue_warn_pct = [10, 90]

[registry]
refresh_s = 60
unknown_gap_s = 2.5

[downlink]
via = "grpc"
command_keys = "keys.json"
confirmed = false
ack_timeout_s = 120
max_attempts = 5
grpc_url = "chirpstack.lan:8080"
grpc_token_env = "GW_TEST_GRPC"
grpc_tls = true

[resend]
after_s = 600
min_interval_s = 300
max_per_day = 2
attempts = 9
fragment_ttl_s = 3600

[dead_letters]
max = 500
keep_days = 7

[status]
listen = "[::1]:9100"

[log]
level = "debug"
format = "json"
"""
    cfg = config.load(write(tmp_path, text))
    assert (cfg.log.level, cfg.log.format) == ("DEBUG", "json")
    assert cfg.status.url == "http://[::1]:9100"
    assert cfg.gateway_kwargs() == {
        "mqtt_host": "broker.lan", "mqtt_port": 1884, "mqtt_username": "gw",
        "mqtt_password": "pw", "mqtt_tls": None, "application_id": "app-9",
        "marshaler": "protobuf", "client_id": "gw-client", "keepalive": 45,
        "status_topic": "site/gw/status", "reconnect_min_s": 2.0, "reconnect_max_s": 60.0,
        "ledger_url": None, "ledger_token": None,
        "ledgers": [("http://l1:8480", "t1"), ("https://l2.example/base", None)],
        "state_dir": str(tmp_path / "st"), "name": "pi-7",
        "batch_size": 50, "backoff_base": 0.25, "backoff_cap": 8.0, "ledger_timeout": 3.0,
        "queue_capacity": 5000, "queue_warn_pct": (10, 90),
        "refresh_interval": 60.0, "unknown_refresh_gap": 2.5,
        "downlink_via": "grpc", "command_keys": str(tmp_path / "keys.json"),
        "downlink_confirmed": False, "downlink_ack_timeout_s": 120.0,
        "downlink_max_attempts": 5, "grpc_url": "chirpstack.lan:8080", "grpc_token": "api-key",
        "grpc_tls": True, "grpc_ca_file": None,
        "resend_after_s": 600.0, "resend_min_interval_s": 300.0, "resend_max_per_day": 2,
        "resend_attempts": 9, "fragment_ttl_s": 3600.0,
        "dead_letter_max": 500, "dead_letter_days": 7.0,
        "status_host": "::1", "status_port": 9100,
    }
    # Status off: no port.
    cfg = config.load(write(tmp_path, 'state_dir = "s"\n[status]\nlisten = ""\n' + LEDGER))
    assert cfg.gateway_kwargs()["status_port"] is None and cfg.status.url is None


def test_to_toml_writes_what_check_reads(tmp_path):
    secret(tmp_path / "t", "tok\n")
    doc = {"state_dir": tmp_path / "s", "name": 'gw "quoted" \\ name',
           "mqtt": {"port": 1999, "tls": {}},
           "ledger": [{"url": "http://a", "token_file": tmp_path / "t"}, {"url": "http://b"}],
           "delivery": {"queue_warn_pct": [20, 40], "backoff_base_s": 0.125},
           "downlink": {"confirmed": False}, "status": {"listen": ""}}
    cfg = config.load(write(tmp_path, config.to_toml(doc)))
    assert cfg.name == 'gw "quoted" \\ name' and cfg.mqtt.port == 1999
    assert cfg.mqtt.tls == config.Tls(None, None, None)
    assert [led.url for led in cfg.ledgers] == ["http://a", "http://b"]
    assert cfg.delivery.queue_warn_pct == (20, 40) and cfg.delivery.backoff_base_s == 0.125
    assert cfg.downlink.confirmed is False and cfg.status.listen == ""


# -- the example an operator copies, and the documentation ------------------------

def _schema_keys() -> list[tuple[str, str]]:
    """(section, key) of every leaf of the schema; section "" is the top level."""
    out = []

    def walk(section: str, table: dict) -> None:
        for key, spec in table.items():
            if isinstance(spec, list):
                walk(key, spec[0])
            elif isinstance(spec, dict):
                walk(f"{section}.{key}" if section else key, spec)
            else:
                out.append((section, key))

    walk("", config.SCHEMA)
    return out


def test_the_example_config_loads(tmp_path):
    """The example with its paths moved into a temporary folder, and the files
    it names created there, passes every check without a warning."""
    etc = tmp_path / "etc"
    etc.mkdir()
    text = EXAMPLE.read_text().replace("/etc/meter-gateway/", f"{etc}/") \
        .replace("/var/lib/meter-gateway", str(tmp_path / "state"))
    assert str(etc) in text and str(tmp_path / "state") in text
    secret(etc / "ledger.token", "token\n", 0o640)
    secret(etc / "command-keys.json", json.dumps({"70b3d57ed0000a01": "00" * 16}))
    cfg, errors = config.check(write(etc, text, "config.toml"))
    assert errors == [] and cfg.warnings == ()
    assert cfg.state_dir == tmp_path / "state" and cfg.command_key_count == 1
    assert [led.url for led in cfg.ledgers] == ["http://127.0.0.1:8480"]
    assert cfg.gateway_kwargs()["ledgers"] == [("http://127.0.0.1:8480", "token")]


def test_the_example_shows_every_key_and_its_default():
    """Every key is in the example; one commented out shows its default
    (keys without a default show an example value)."""
    section = ""
    shown: dict[tuple[str, str], str] = {}
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"(?:# )?\[\[?([a-z_.]+)\]\]?\s*$", line)
        if header:
            section = header.group(1)
            continue
        entry = re.match(r"(?:# )?([a-z_]+) = (.*?)(\s+#.*)?$", line)
        if entry:
            shown.setdefault((section, entry.group(1)), entry.group(2))
    assert set(_schema_keys()) - set(shown) == set()
    checked = 0
    for section, key in _schema_keys():
        table = config.SCHEMA
        for part in filter(None, section.split(".")):
            table = table[part][0] if isinstance(table[part], list) else table[part]
        default = table[key].default
        if default is None or default is config.REQUIRED:
            continue
        value = tomllib.loads(f"v = {shown[section, key]}")["v"]
        assert value == (list(default) if isinstance(default, tuple) else default), \
            f"{section}.{key}: the example shows {shown[section, key]}, the default is {default}"
        checked += 1
    assert checked == 30


def test_the_documentation_lists_every_key():
    docs = DOCS.read_text()
    part = docs[docs.index("## Configuration"):docs.index("## Commands")]
    named = set(re.findall(r"`([a-z_]+)`", part))
    assert {key for _, key in _schema_keys()} - named == set()
    assert {s.split(".")[0] for s, _ in _schema_keys() if s} - \
        set(re.findall(r"`\[\[?([a-z_]+)\]?\]`", part)) == set()
