"""The ledger node's HTTP API against its OpenAPI description (ledger_node/openapi.json).

A real LedgerServer on loopback, with an enrolled device, readings, a revoked
device and a witness's cosignature, is fuzzed by schemathesis from the
description it serves at GET /v1/openapi.json: every route, well-formed and
malformed parameters and bodies, with and without tokens. Every answer must
be a documented status with a body of the documented schema and media type,
never a server error; a route that needs a token must refuse a request
without it. A second test sends one known request per documented outcome, so
the 2xx answers that random input rarely reaches (a rotation, a
cosignature, a proof bundle) are held to the description too.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from nacl.signing import SigningKey
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup

from ledger_node import checkpoint as ckpt
from ledger_node import note
from ledger_node.server import LedgerServer
from meter import frame

TOKEN = "openapi-fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_767_225_600
OWNER = "0f1e2d3c4b5a6978"
OPENAPI = Path(__file__).parents[2] / "ledger_node" / "openapi.json"
W_SKEY, W_VKEY = ckpt.generate_cosigner_key("witness.example")
OTHER_SKEY, _ = ckpt.generate_cosigner_key("stranger.example")

# The description's own example DevEUI, so requests built from its examples
# reach a device that exists.
EUI = "70b3d57ed0000001"
EUI_REVOKED = "70b3d57ed0000002"
EUI_SPARE = "70b3d57ed0000003"


class Meter:
    def __init__(self, dev_eui: str, seed: int):
        self.dev_eui = dev_eui
        self.key = SigningKey(bytes([seed]) * 32)
        self.public_key = bytes(self.key.verify_key).hex()

    def bundle(self, *seqs: int) -> str:
        body = frame.encode_body([(s, T0 + 900 * s, 1000 * s, 0, 0) for s in seqs])
        sig = self.key.sign(frame.signed_message(bytes.fromhex(self.dev_eui), body)).signature
        return frame.assemble(body, sig).hex()

    def item(self, *seqs: int) -> dict:
        return {"dev_eui": self.dev_eui, "bundle": self.bundle(*seqs),
                "received_at": T0 + 900 * seqs[-1] + 1.5, "gateway": "gw-1"}

    def enrollment(self) -> dict:
        return {"dev_eui": self.dev_eui, "public_key": self.public_key, "owner": OWNER,
                "community": "north", "meter_model": "SCT013-000", "board": "esp32",
                "ct_rating_a": 60}


M1, M2, M3 = Meter(EUI, 1), Meter(EUI_REVOKED, 2), Meter(EUI_SPARE, 3)
NEW_KEY = bytes(SigningKey(bytes([4]) * 32).verify_key).hex()


def _post(url: str, body) -> requests.Response:
    return requests.post(url, json=body, headers=AUTH, timeout=10)


def _start_ledger(db: Path) -> LedgerServer:
    """A server with two enrolled devices (one revoked since), readings, and
    a checkpoint of size 6 that the witness cosigned."""
    # A long interval: checkpoints are signed by the test (sign_checkpoint),
    # so what exists when does not depend on timing.
    srv = LedgerServer(db, token=TOKEN, witnesses=[W_VKEY], checkpoint_interval_s=3600).start()
    try:
        for m in (M1, M2):
            assert _post(srv.url + "/v1/devices", m.enrollment()).status_code == 201
        r = _post(srv.url + "/v1/bundles", {"bundles": [M1.item(1, 2), M1.item(3, 4),
                                                        M2.item(1)]})
        assert [x["status"] for x in r.json()["results"]] == ["ok"] * 3
        assert _post(srv.url + f"/v1/devices/{EUI_REVOKED}/revoke",
                     {"reason": "decommissioned"}).status_code == 200
        cp = srv.log.sign_checkpoint()
        assert cp is not None and cp.size == 6
        line = ckpt.Cosigner(W_SKEY).cosign(cp, T0)
        assert _post(srv.url + "/v1/cosignatures",
                     {"size": cp.size, "cosignature": line}).status_code == 200
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    srv = _start_ledger(tmp_path_factory.mktemp("fuzz") / "ledger.db")
    yield srv
    srv.stop()


@pytest.fixture
def fresh_ledger(tmp_path):
    srv = _start_ledger(tmp_path / "ledger.db")
    yield srv
    srv.stop()


def _config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": 20260101,
        # Stateful runs chain operations through links the description does
        # not declare; every operation is fuzzed on its own.
        "phases": {"stateful": {"enabled": False}},
    })


@pytest.fixture(scope="module")
def api_schema(ledger):
    # Loaded from the running server: the description it serves is the one under test.
    return schemathesis.openapi.from_url(ledger.url + "/v1/openapi.json", config=_config())


schema = schemathesis.pytest.from_fixture("api_schema")

_DOC = json.loads(OPENAPI.read_text())
_ITEM = jsonschema_rs.validator_for({"$ref": "#/components/schemas/BundleItem",
                                     "components": _DOC["components"]})


def _bundle_items_judged(ctx, response, case):
    """POST /v1/bundles refuses a malformed batch as a whole (4xx) but answers
    each item of a well-formed one, so an item outside the description's
    BundleItem is a `rejected` result in a 200, not a refusal of the request:
    schemathesis's negative_data_rejection can not see that, this check does."""
    if case.operation.path != "/v1/bundles" or case.method != "POST":
        return None
    if response.status_code in (401, 411, 413, 414, 431):
        return None  # refused before the body is read as a batch
    body = case.body
    batch = body.get("bundles") if isinstance(body, dict) else None
    if not isinstance(batch, list) or len(batch) > 1000:
        assert 400 <= response.status_code < 500, (
            f"a body that is not an object with a list `bundles` of at most 1000 items got "
            f"{response.status_code}")
        return None
    if response.status_code != 200:
        return None
    results = response.json()["results"]
    assert len(results) == len(body["bundles"]), "one result per item"
    for i, item in enumerate(body["bundles"]):
        if not _ITEM.is_valid(item):
            assert results[i]["status"] == "rejected", (
                f"item {i} does not fit BundleItem but was admitted: {item!r:.200}")
    return None


_CHECKS = [schemathesis.checks.not_a_server_error,
           schemathesis.checks.status_code_conformance,
           schemathesis.checks.content_type_conformance,
           schemathesis.checks.response_schema_conformance,
           schemathesis.checks.response_headers_conformance,
           schemathesis.checks.negative_data_rejection,
           schemathesis.checks.ignored_auth,
           schemathesis.checks.unsupported_method]


def _checks_for(case):
    if case.operation.path == "/v1/bundles":
        # Negative items are answered per item in a 200 (see _bundle_items_judged).
        return [c for c in _CHECKS if c is not schemathesis.checks.negative_data_rejection] + [
            _bundle_items_judged]
    return _CHECKS


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_route_answers_as_described(case):
    case.call_and_validate(headers=AUTH, checks=_checks_for(case))


def test_the_served_description_is_the_file(ledger):
    r = requests.get(ledger.url + "/v1/openapi.json", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == _DOC


def _known_requests(ledger):
    """(method, path, path parameters, query, body, token, expected status)."""
    cp_size = 6
    good_line = ckpt.Cosigner(W_SKEY).cosign(
        ckpt.Checkpoint.parse(note.split(ledger.log.checkpoint_note(cp_size))[0]), T0 + 1)
    stranger = ckpt.Cosigner(OTHER_SKEY).cosign(
        ckpt.Checkpoint(ledger.log.origin, cp_size, b"\x00" * 32), T0)
    forged = ckpt.Cosigner(W_SKEY).cosign(ckpt.Checkpoint(ledger.log.origin, cp_size,
                                                          b"\x01" * 32), T0)
    dev = {"dev_eui": EUI}
    return [
        ("GET", "/v1/health", {}, {}, None, None, 200),
        ("GET", "/v1/stats", {}, {}, None, None, 200),
        ("GET", "/v1/check", {}, {}, None, TOKEN, 200),
        ("GET", "/v1/check", {}, {}, None, None, 401),
        ("GET", "/v1/stats", {}, {"x": "1"}, None, None, 400),
        ("GET", "/v1/openapi.json", {}, {}, None, None, 200),
        ("GET", "/v1/devices", {}, {}, None, None, 200),
        ("GET", "/v1/devices", {}, {"status": "revoked"}, None, None, 200),
        ("GET", "/v1/devices", {}, {"status": "gone"}, None, None, 400),
        ("POST", "/v1/devices", {}, {}, M3.enrollment(), TOKEN, 201),
        ("POST", "/v1/devices", {}, {}, M3.enrollment(), TOKEN, 200),
        ("POST", "/v1/devices", {}, {}, dict(M3.enrollment(), community="south"), TOKEN, 409),
        ("POST", "/v1/devices", {}, {}, dict(M3.enrollment(), owner="Jane Doe"), TOKEN, 400),
        ("POST", "/v1/devices", {}, {}, M3.enrollment(), None, 401),
        ("GET", "/v1/devices/{dev_eui}", dev, {}, None, None, 200),
        ("GET", "/v1/devices/{dev_eui}", {"dev_eui": "00000000000000ff"}, {}, None, None, 404),
        ("GET", "/v1/devices/{dev_eui}", {"dev_eui": "xyz"}, {}, None, None, 400),
        ("POST", "/v1/devices/{dev_eui}/rotate", {"dev_eui": EUI_SPARE}, {},
         {"public_key": NEW_KEY}, TOKEN, 200),
        ("POST", "/v1/devices/{dev_eui}/rotate", {"dev_eui": EUI_SPARE}, {},
         {"public_key": NEW_KEY}, TOKEN, 409),
        ("POST", "/v1/devices/{dev_eui}/rotate", {"dev_eui": "00000000000000ff"}, {},
         {"public_key": NEW_KEY}, TOKEN, 404),
        ("POST", "/v1/devices/{dev_eui}/revoke", {"dev_eui": EUI_SPARE}, {},
         {"reason": "replaced"}, TOKEN, 200),
        ("POST", "/v1/devices/{dev_eui}/revoke", {"dev_eui": EUI_SPARE}, {}, {}, TOKEN, 409),
        ("POST", "/v1/devices/{dev_eui}/revoke", {"dev_eui": EUI_SPARE}, {},
         {"reason": ["replaced"]}, TOKEN, 400),
        ("POST", "/v1/bundles", {}, {}, {"bundles": [M1.item(5), M1.item(5), M2.item(2)]},
         TOKEN, 200),
        ("POST", "/v1/bundles", {}, {}, {"bundles": [M1.item(6)] * 1001}, TOKEN, 413),
        ("POST", "/v1/bundles", {}, {}, {"bundle": []}, TOKEN, 400),
        ("GET", "/v1/readings", {}, {}, None, None, 200),
        ("GET", "/v1/readings", {}, {"dev_eui": EUI, "from": T0, "to": T0 + 3000, "limit": 1},
         None, None, 200),
        ("GET", "/v1/readings", {}, {"limit": 0}, None, None, 400),
        ("GET", "/v1/checkpoint", {}, {}, None, None, 200),
        ("GET", "/v1/checkpoint", {}, {"size": cp_size}, None, None, 200),
        ("GET", "/v1/checkpoint", {}, {"size": 12345}, None, None, 404),
        ("POST", "/v1/cosignatures", {}, {}, {"size": cp_size, "cosignature": good_line},
         None, 200),
        ("POST", "/v1/cosignatures", {}, {}, {"size": cp_size, "cosignature": stranger},
         None, 403),
        ("POST", "/v1/cosignatures", {}, {}, {"size": cp_size, "cosignature": forged},
         None, 400),
        ("POST", "/v1/cosignatures", {}, {}, {"size": 12345, "cosignature": good_line},
         None, 404),
        ("GET", "/v1/entries", {}, {"start": 0, "end": 3}, None, None, 200),
        ("GET", "/v1/entries", {}, {"start": 0}, None, None, 400),
        ("GET", "/v1/proof/inclusion", {}, {"index": 2, "size": cp_size}, None, None, 200),
        ("GET", "/v1/proof/inclusion", {}, {"dev_eui": EUI, "seq": 3}, None, None, 200),
        ("GET", "/v1/proof/inclusion", {}, {"dev_eui": EUI, "seq": 99}, None, None, 404),
        ("GET", "/v1/proof/consistency", {}, {"from": 2, "to": cp_size}, None, None, 200),
        ("GET", "/v1/proof/consistency", {}, {"from": 7, "to": 2}, None, None, 400),
        ("GET", "/v1/proof-bundle", {}, {"dev_eui": EUI, "seq": 4}, None, None, 200),
        ("GET", "/v1/proof-bundle", {}, {"dev_eui": EUI, "seq": 99}, None, None, 404),
        ("GET", "/v1/proof-bundle", {}, {"dev_eui": EUI}, None, None, 400),
    ]


_RESPONSE_CHECKS = [schemathesis.checks.not_a_server_error,
                    schemathesis.checks.status_code_conformance,
                    schemathesis.checks.content_type_conformance,
                    schemathesis.checks.response_schema_conformance,
                    schemathesis.checks.response_headers_conformance]


def test_each_documented_outcome_matches_the_description(fresh_ledger):
    """One request per outcome, in order (the enrollment before its repeat,
    the rotation before its refusal); each answer is held to the description.
    Every mismatch is listed with its request."""
    ledger = fresh_ledger
    api = schemathesis.openapi.from_url(ledger.url + "/v1/openapi.json", config=_config())
    seen, failures = set(), []
    for method, path, params, query, body, token, want in _known_requests(ledger):
        kw = {"path_parameters": params, "query": query,
              "headers": {"Authorization": f"Bearer {token}"} if token else {}}
        if body is not None:
            kw["body"] = body
        case = api[path][method].Case(**kw)
        shown = json.dumps(body)[:100] if body is not None else ""
        label = f"{method} {path} {params or ''}{query or ''} {shown}"
        response = case.call(base_url=ledger.url)
        if response.status_code != want:
            failures.append(f"{label}: expected {want}, got {response.status_code} "
                            f"{response.text[:300]}")
            continue
        try:
            case.validate_response(response, checks=_RESPONSE_CHECKS)
        except FailureGroup as exc:  # every failed check of the answer, in one group
            failures.append(f"{label}: {exc}")
            continue
        seen.add((method, path, want))
    assert not failures, "\n".join(failures)
    # Every documented 2xx of every operation was reached at least once.
    documented = {(m.upper(), p, int(code)) for p, item in _DOC["paths"].items()
                  for m, o in item.items() for code in o["responses"] if code.startswith("2")}
    assert documented <= seen, sorted(documented - seen)
