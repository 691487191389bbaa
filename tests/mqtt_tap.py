"""A test-side MQTT client on a real broker: it collects what arrives under a
topic filter and publishes at QoS 1, standing in for ChirpStack's MQTT
integration (downlink commands in, integration events out) in the tests.

Tests reach it through the `mqtt_tap` fixture in conftest.py."""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt


class MqttTap:
    """One MQTT connection. With `topic_filter` it subscribes (QoS 1) and keeps
    every message, in arrival order, as (topic, payload) in `messages`;
    `application_id` names the ChirpStack application that `down` and
    `publish_down` address."""

    def __init__(self, port: int, topic_filter: str | None = None, *,
                 application_id: str | None = None, client_id: str | None = None,
                 host: str = "127.0.0.1", timeout: float = 5.0):
        self.application_id = application_id
        self.messages: list[tuple[str, bytes]] = []
        self._taken: set[int] = set()  # indexes of messages handed out by wait()
        self._arrived = threading.Condition()
        self._closed = False
        subacks: list = []
        subscribed = threading.Event()

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            subacks.extend(reason_codes)
            subscribed.set()

        kw = {} if client_id is None else {"client_id": client_id}
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kw)
        c.on_message = self._on_message
        c.on_subscribe = on_subscribe
        c.connect(host, port)
        if topic_filter is not None:
            c.subscribe(topic_filter, qos=1)
        c.loop_start()
        self.client = c
        if topic_filter is not None:
            if not subscribed.wait(timeout):
                self.close()
                raise AssertionError(f"no SUBACK for {topic_filter!r} within {timeout}s")
            if any(rc.is_failure for rc in subacks):
                self.close()
                raise AssertionError(f"broker refused {topic_filter!r}: {subacks}")

    def _on_message(self, client, userdata, msg) -> None:
        with self._arrived:
            self.messages.append((msg.topic, msg.payload))
            self._arrived.notify_all()

    # ------------------------------------------------------------ publishing

    def publish(self, topic: str, payload, timeout: float = 10.0) -> None:
        """Publish at QoS 1 and return once the broker has acknowledged it."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=timeout)
        assert info.is_published(), f"broker did not acknowledge {topic} within {timeout}s"

    def publish_down(self, dev_eui: str, payload) -> None:
        """Publish `payload` as is (a dict or list goes as JSON) on the device's
        command/down topic: for commands that are malformed on purpose."""
        if not isinstance(payload, (bytes, str)):
            payload = json.dumps(payload)
        self.publish(f"application/{self.application_id}/device/{dev_eui}/command/down", payload)

    def down(self, dev_eui: str, f_port: int, data: bytes, confirmed: bool = False) -> str:
        """Queue a downlink as ChirpStack's integration takes it; returns the
        queue item id."""
        item = str(uuid.uuid4())
        self.publish_down(dev_eui, {"devEui": dev_eui, "confirmed": confirmed, "fPort": f_port,
                                    "data": base64.b64encode(data).decode(), "id": item})
        return item

    # ------------------------------------------------------------ collecting

    def of(self, kind: str, n: int, timeout: float = 5.0) -> list[bytes]:
        """Payloads of every `kind` event (up, join, ack, txack ...) so far, once
        there are `n` of them or `timeout` has passed: the caller checks the count."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                got = [p for t, p in self.messages if t.endswith("/event/" + kind)]
                left = deadline - time.monotonic()
                if len(got) >= n or left <= 0:
                    return got
                self._arrived.wait(left)

    def wait(self, kind: str, timeout: float = 5.0) -> tuple[str, bytes]:
        """The oldest `kind` event not yet returned by wait(): (topic, payload).
        Fails the test if none arrives within `timeout`."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for i, (topic, payload) in enumerate(self.messages):
                    if i not in self._taken and topic.endswith("/event/" + kind):
                        self._taken.add(i)
                        return topic, payload
                left = deadline - time.monotonic()
                if left <= 0:
                    rest = [m for i, m in enumerate(self.messages) if i not in self._taken]
                    raise AssertionError(f"no {kind} event within {timeout}s; got {rest}")
                self._arrived.wait(left)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.client.disconnect()  # first, so the network thread ends at once
        self.client.loop_stop()
