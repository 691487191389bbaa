"""ChirpStack v4 MQTT integration: uplink events in, downlink commands out.

Turns one MQTT message from ChirpStack's JSON marshaler into an `Uplink`, or
raises `Rejected` with a stable reason code, and builds the `command/down`
message that queues a downlink. The message classes are the ones ChirpStack
publishes (`chirpstack_api.integration`); nothing here touches the network,
so every rejection can be exercised without a broker.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from dataclasses import dataclass

from chirpstack_api import integration
from google.protobuf import json_format

# Far above any LoRaWAN uplink event (a 242-byte payload plus metadata from a
# dozen gateways is a few KiB); anything bigger is refused before parsing so a
# rogue publisher cannot make the daemon parse megabytes.
MAX_MESSAGE_BYTES = 64 * 1024

_DEV_EUI = re.compile(r"[0-9a-f]{16}\Z")


class Rejected(Exception):
    """An uplink the gateway will not forward. `reason` is a short stable code
    (a metrics label); the message says what was wrong."""

    def __init__(self, reason: str, message: str, dev_eui: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.dev_eui = dev_eui

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Uplink:
    dev_eui: str  # 16 lowercase hex digits
    application_id: str
    deduplication_id: str  # "" when the network server did not send one
    f_port: int
    f_cnt: int
    data: bytes


def uplink_topic(application_id: str = "+") -> str:
    """The subscription for uplink events of one application (or all: "+")."""
    return f"application/{application_id}/device/+/event/up"


def command_topic(application_id: str, dev_eui: str) -> str:
    """Where ChirpStack takes downlinks to enqueue for one device."""
    return f"application/{application_id}/device/{dev_eui}/command/down"


def command_message(dev_eui: str, f_port: int, data: bytes, confirmed: bool = False,
                    item_id: str | None = None) -> bytes:
    """A `DownlinkCommand` as ChirpStack's JSON integration takes it. The id
    comes back in the `txack` event of the transmission."""
    return json.dumps({"id": item_id or str(uuid.uuid4()), "devEui": dev_eui,
                       "confirmed": confirmed, "fPort": f_port,
                       "data": base64.b64encode(data).decode()}).encode()


def topic_dev_eui(topic: str) -> str | None:
    """The device EUI named by an uplink event topic, lower-cased."""
    parts = topic.split("/")
    if (len(parts) == 6 and parts[0] == "application" and parts[2] == "device"
            and parts[4] == "event" and parts[5] == "up"):
        return parts[3].lower()
    return None


def _strict_b64(value: str) -> bytes:
    # protobuf's JSON parser silently drops characters outside the alphabet;
    # a payload mangled in transit must be refused, not half-decoded.
    padded = value + "=" * (-len(value) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except binascii.Error:
        return base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)


def parse_uplink(topic: str, payload: bytes) -> Uplink:
    """Parse an `.../event/up` message. Raises Rejected with reason one of
    oversized_message, malformed_json, malformed_event, topic_mismatch."""
    topic_eui = topic_dev_eui(topic)
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Rejected("oversized_message", "message is %d bytes, limit %d"
                       % (len(payload), MAX_MESSAGE_BYTES), topic_eui)
    try:
        doc = json.loads(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise Rejected("malformed_json", f"payload is not UTF-8: {exc}", topic_eui) from None
    except (ValueError, RecursionError) as exc:
        raise Rejected("malformed_json", f"payload is not JSON: {exc}", topic_eui) from None
    if not isinstance(doc, dict):
        raise Rejected("malformed_event", "event is a JSON %s, not an object"
                       % type(doc).__name__, topic_eui)
    event = integration.UplinkEvent()
    try:
        json_format.ParseDict(doc, event, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise Rejected("malformed_event", f"not an UplinkEvent: {exc}", topic_eui) from None
    data = event.data
    raw = doc.get("data")
    if isinstance(raw, str):
        try:
            data = _strict_b64(raw)
        except binascii.Error:
            raise Rejected("malformed_event", "data is not valid base64", topic_eui) from None

    dev_eui = event.device_info.dev_eui.lower()
    if not _DEV_EUI.match(dev_eui):
        raise Rejected("malformed_event", "deviceInfo.devEui %r is not 16 hex digits"
                       % event.device_info.dev_eui, topic_eui)
    if topic_eui is None:
        raise Rejected("topic_mismatch", f"topic {topic!r} is not an uplink event topic", dev_eui)
    if topic_eui != dev_eui:
        raise Rejected("topic_mismatch", f"devEui {dev_eui} in the event, {topic_eui} in the topic",
                       topic_eui)
    return Uplink(dev_eui=dev_eui, application_id=event.device_info.application_id,
                  deduplication_id=event.deduplication_id, f_port=event.f_port,
                  f_cnt=event.f_cnt, data=data)
