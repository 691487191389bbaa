"""Downlinks through ChirpStack's gRPC API, against a real gRPC server on loopback.

The server implements `api.DeviceService` from the chirpstack-api service
definitions (the generated servicer and registration function ChirpStack's
own clients are built from) and answers like ChirpStack does: an unknown or
missing API key is UNAUTHENTICATED, a key whose tenant does not hold the
device PERMISSION_DENIED, an unknown device NOT_FOUND, and a queued item gets
an id chosen by the server.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import threading
import time
import uuid
from concurrent import futures

import grpc
import pytest
from chirpstack_api.api import device_pb2, device_pb2_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.chirpstack_grpc import GrpcDownlink
from gateway.commands import CommandError

TOKEN = "cs-api-key-0f3b9c"
OTHER_TENANT_TOKEN = "cs-api-key-other-tenant"
METER = "70b3d57ed0000001"
OTHER_APP_METER = "70b3d57ed0000002"
BROKEN_METER = "70b3d57ed00000ff"


class DeviceService(device_pb2_grpc.DeviceServiceServicer):
    """The Enqueue call of ChirpStack's DeviceService; records what it queued."""

    def __init__(self):
        self.queued: list[tuple[device_pb2.DeviceQueueItem, str]] = []  # (item, id answered)
        self.release = threading.Event()  # ends a deliberately slow call
        self.slow_s = 0.0

    def Enqueue(self, request, context):
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if auth == f"Bearer {TOKEN}":
            scope = {METER, BROKEN_METER}
        elif auth == f"Bearer {OTHER_TENANT_TOKEN}":
            scope = {OTHER_APP_METER}
        else:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid api key")
        item = request.queue_item
        if item.dev_eui not in {METER, OTHER_APP_METER, BROKEN_METER}:
            context.abort(grpc.StatusCode.NOT_FOUND, "Object does not exist (id: %s)" % item.dev_eui)
        if item.dev_eui not in scope:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "api key has no access to device")
        if item.dev_eui == BROKEN_METER:
            context.abort(grpc.StatusCode.INTERNAL, "database connection lost")
        if self.slow_s:
            self.release.wait(self.slow_s)
        queued = device_pb2.DeviceQueueItem()
        queued.CopyFrom(item)
        answer = str(uuid.uuid4())  # ChirpStack names the item itself
        self.queued.append((queued, answer))
        return device_pb2.EnqueueDeviceQueueItemResponse(id=answer)


def _serve(service: DeviceService, creds: grpc.ServerCredentials | None = None,
           port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    device_pb2_grpc.add_DeviceServiceServicer_to_server(service, server)
    if creds is None:
        port = server.add_insecure_port(f"127.0.0.1:{port}")
    else:
        port = server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    return server, port


@pytest.fixture
def chirpstack():
    service = DeviceService()
    server, port = _serve(service)
    yield service, port
    service.release.set()
    server.stop(0)


@pytest.fixture
def client():
    made = []

    def make(*args, **kwargs) -> GrpcDownlink:
        made.append(GrpcDownlink(*args, **kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _failure(call) -> CommandError:
    with pytest.raises(CommandError) as info:
        call()
    return info.value


def test_enqueued_command_arrives_as_sent(chirpstack, client):
    service, port = chirpstack
    dl = client(f"127.0.0.1:{port}", TOKEN, timeout=2.0)
    item_id = str(uuid.uuid4())
    data = bytes([0x08, 0x01]) + bytes(range(20))
    # 2030-03-17 17:46:40.25 UTC
    answer = dl.enqueue(METER, 2, data, True, item_id, 1_900_000_000.25)

    assert len(service.queued) == 1
    item, server_id = service.queued[0]
    assert item.dev_eui == METER
    assert item.f_port == 2
    assert item.data == data
    assert item.confirmed is True
    assert item.id == item_id
    assert item.HasField("expires_at")
    assert (item.expires_at.seconds, item.expires_at.nanos) == (1_900_000_000, 250_000_000)
    assert item.expires_at.ToDatetime(datetime.timezone.utc) == datetime.datetime(
        2030, 3, 17, 17, 46, 40, 250_000, tzinfo=datetime.timezone.utc)
    # the id ChirpStack chose is the one its txack/ack events will carry
    assert answer == server_id and answer != item_id

    # unconfirmed, no expiry, upper-case EUI as operators sometimes write it
    dl.enqueue(METER.upper(), 223, b"\x01", False, str(uuid.uuid4()), None)
    item, _ = service.queued[1]
    assert item.dev_eui == METER and item.f_port == 223 and item.confirmed is False
    assert not item.HasField("expires_at")


def test_wrong_or_missing_token_is_auth(chirpstack, client):
    service, port = chirpstack
    for token in ("not-the-key", None):
        err = _failure(lambda: client(f"127.0.0.1:{port}", token).enqueue(
            METER, 2, b"\x01", False, str(uuid.uuid4()), None))
        assert err.reason == "auth"
        assert "UNAUTHENTICATED" in err.message and "invalid api key" in err.message
    assert service.queued == []


def test_key_without_the_device_in_scope_is_auth(chirpstack, client):
    service, port = chirpstack
    err = _failure(lambda: client(f"127.0.0.1:{port}", OTHER_TENANT_TOKEN).enqueue(
        METER, 2, b"\x01", False, str(uuid.uuid4()), None))
    assert err.reason == "auth"
    assert "PERMISSION_DENIED" in err.message and METER in err.message
    assert service.queued == []


def test_unknown_device_is_not_found(chirpstack, client):
    service, port = chirpstack
    err = _failure(lambda: client(f"127.0.0.1:{port}", TOKEN).enqueue(
        "0011223344556677", 2, b"\x01", False, str(uuid.uuid4()), None))
    assert err.reason == "not_found"
    assert "NOT_FOUND" in err.message and "0011223344556677" in err.message
    assert service.queued == []


def test_other_server_error_is_publish(chirpstack, client):
    _, port = chirpstack
    err = _failure(lambda: client(f"127.0.0.1:{port}", TOKEN).enqueue(
        BROKEN_METER, 2, b"\x01", False, str(uuid.uuid4()), None))
    assert err.reason == "publish"
    assert "INTERNAL" in err.message and "database connection lost" in err.message


def test_bad_arguments_are_refused_before_sending(chirpstack, client):
    service, port = chirpstack
    dl = client(f"127.0.0.1:{port}", TOKEN)
    cases = [("70b3d57ed000001", 2, b"\x01", str(uuid.uuid4()), None),      # 15 digits
             ("70b3d57ed000000g", 2, b"\x01", str(uuid.uuid4()), None),
             (METER, 0, b"\x01", str(uuid.uuid4()), None),                   # MAC port
             (METER, 224, b"\x01", str(uuid.uuid4()), None),
             (METER, 2, "01", str(uuid.uuid4()), None),
             (METER, 2, b"\x01", "cmd-1", None),
             (METER, 2, b"\x01", str(uuid.uuid4()), float("nan")),
             (METER, 2, b"\x01", str(uuid.uuid4()), -5.0)]
    for eui, port_, data, item_id, expires in cases:
        err = _failure(lambda: dl.enqueue(eui, port_, data, False, item_id, expires))
        assert err.reason == "field", (eui, port_, data, item_id, expires)
    assert service.queued == []


def test_server_down_is_offline_within_timeout(client):
    dl = client(f"127.0.0.1:{_free_port()}", TOKEN, timeout=1.0)
    t0 = time.monotonic()
    err = _failure(lambda: dl.enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None))
    assert time.monotonic() - t0 < 1.5
    assert err.reason == "offline" and "UNAVAILABLE" in err.message


def test_silent_peer_is_offline_at_the_deadline(client):
    # accepts TCP connections and never speaks HTTP/2: only the deadline ends the call
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        dl = client("127.0.0.1:%d" % listener.getsockname()[1], TOKEN, timeout=0.5)
        t0 = time.monotonic()
        err = _failure(lambda: dl.enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None))
        elapsed = time.monotonic() - t0
    assert 0.4 < elapsed < 1.5
    # the call's deadline also bounds the connection attempt: whichever of the
    # two gRPC notices first names the failure
    assert err.reason == "offline"
    assert "DEADLINE_EXCEEDED" in err.message or "SETTINGS frame" in err.message


def test_slow_server_is_offline_at_the_deadline(chirpstack, client):
    service, port = chirpstack
    service.slow_s = 5.0
    dl = client(f"127.0.0.1:{port}", TOKEN, timeout=0.5)
    t0 = time.monotonic()
    err = _failure(lambda: dl.enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None))
    assert time.monotonic() - t0 < 1.5
    assert err.reason == "offline" and "DEADLINE_EXCEEDED" in err.message


def test_chirpstack_coming_back_is_used_again(client):
    port = _free_port()
    dl = client(f"127.0.0.1:{port}", TOKEN, timeout=1.0)
    err = _failure(lambda: dl.enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None))
    assert err.reason == "offline"

    service = DeviceService()
    server, _ = _serve(service, port=port)
    try:
        # the channel reconnects on its own; the caller only retries
        deadline = time.monotonic() + 5.0
        while True:
            try:
                dl.enqueue(METER, 2, b"\x02", False, str(uuid.uuid4()), None)
                break
            except CommandError as exc:
                assert exc.reason == "offline"
                assert time.monotonic() < deadline, "never reconnected"
                time.sleep(0.1)
        assert [item.data for item, _ in service.queued] == [b"\x02"]
    finally:
        server.stop(0)


def test_close_then_enqueue_reopens(chirpstack, client):
    service, port = chirpstack
    dl = client(f"127.0.0.1:{port}", TOKEN)
    dl.enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None)
    dl.close()
    dl.close()
    dl.enqueue(METER, 2, b"\x02", False, str(uuid.uuid4()), None)
    assert [item.data for item, _ in service.queued] == [b"\x01", b"\x02"]


def _self_signed(tmp_path) -> tuple[bytes, bytes, str]:
    """(key PEM, certificate PEM, certificate path) for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chirpstack.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    path = tmp_path / "chirpstack-ca.pem"
    path.write_bytes(cert_pem)
    return key_pem, cert_pem, str(path)


def test_tls_with_self_signed_certificate(tmp_path, client):
    key_pem, cert_pem, ca_file = _self_signed(tmp_path)
    service = DeviceService()
    server, port = _serve(service, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        item_id = str(uuid.uuid4())
        dl = client(f"localhost:{port}", TOKEN, tls=True, timeout=2.0, ca_file=ca_file)
        answer = dl.enqueue(METER, 2, b"\x08\x01", True, item_id, None)
        item, server_id = service.queued[0]
        assert (item.id, item.data, answer) == (item_id, b"\x08\x01", server_id)

        # without that CA the certificate is not trusted, and plaintext gets nowhere
        for kwargs in ({"tls": True}, {"tls": False}):
            err = _failure(lambda: client(f"localhost:{port}", TOKEN, timeout=1.0, **kwargs)
                           .enqueue(METER, 2, b"\x01", False, str(uuid.uuid4()), None))
            assert err.reason == "offline", kwargs
            if kwargs["tls"]:  # the operator sees why in the log
                assert "CERTIFICATE_VERIFY_FAILED" in err.message
        assert len(service.queued) == 1
    finally:
        server.stop(0)


def test_configuration_mistakes_are_refused_at_construction(tmp_path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    for args, kwargs in [(("http://chirpstack:8080", TOKEN), {}),
                         (("chirpstack", TOKEN), {}),
                         (("chirpstack:99999", TOKEN), {}),
                         (("chirpstack:8080", "two words"), {}),
                         (("chirpstack:8080", "  \n"), {}),
                         (("chirpstack:8080", TOKEN), {"timeout": 0}),
                         (("chirpstack:8080", TOKEN), {"ca_file": str(not_pem)}),
                         (("chirpstack:8080", TOKEN), {"tls": True, "ca_file": str(not_pem)}),
                         (("chirpstack:8080", TOKEN),
                          {"tls": True, "ca_file": str(tmp_path / "missing.pem")})]:
        with pytest.raises(ValueError):
            GrpcDownlink(*args, **kwargs)
    # a token read from a file keeps its newline; it is not part of the key
    assert GrpcDownlink("chirpstack:8080", TOKEN + "\n")._metadata == (
        ("authorization", f"Bearer {TOKEN}"),)
