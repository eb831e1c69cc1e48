"""The fleet benchmark's yardstick: a bare paho client echoing requests through the same broker as the agents.

fleet.py times signed pings to the agents; this process, answering on ``bench-echo/res/<id>`` in three ways, shows
what the broker and paho alone cost, and what Nagle's algorithm adds when a reply follows a PUBACK.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections import deque
from typing import Any

ECHO = "bench-echo"  # the yardstick's topics: outside both roots


def no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """TCP_NODELAY on a paho socket (paho leaves Nagle on).

    With Nagle on, a reply written right after the PUBACK of a request waits for the peer's delayed ACK (~40 ms).
    """
    import socket

    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# The yardstick's ways of answering: (reply before paho's PUBACK, TCP_NODELAY). The agent answers after the
# PUBACK (paho acknowledges when on_message returns; the agent replies from a task) with Nagle off (its MQTT
# uplink sets TCP_NODELAY): after-puback-nodelay is its yardstick; after-puback shows what Nagle cost it before.
ECHO_MODES = {"in-callback": (True, False), "after-puback": (False, False), "after-puback-nodelay": (False, True)}


def echo_main(port: int, mode: str) -> None:
    """``fleet_echo.py PORT MODE``: a bare paho client answering on ``bench-echo/res/<id>``.

    ``in-callback`` publishes the reply inside on_message, so it is written before paho's PUBACK of the request;
    the ``after-puback`` modes publish it after ``client.loop()`` returned, when the PUBACK has been written, as
    the agent does. ``-nodelay`` sets TCP_NODELAY; otherwise the socket is as paho makes it (Nagle on).
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    in_callback, nodelay = ECHO_MODES[mode]
    later: deque[str] = deque()
    running = True

    def on_connect(c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            c.subscribe(f"{ECHO}/req/+", qos=1)

    def on_subscribe(*_a: Any) -> None:
        print("subscribed", flush=True)

    def on_message(c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        topic = f"{ECHO}/res/{msg.topic.rsplit('/', 1)[-1]}"
        if in_callback:
            c.publish(topic, b'{"status":"ok"}', qos=1)
        else:
            later.append(topic)

    def on_term(*_a: Any) -> None:
        nonlocal running
        running = False

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-echo-{os.getpid()}")
    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    if nodelay:
        client.on_socket_open = no_delay
    signal.signal(signal.SIGTERM, on_term)
    client.connect("127.0.0.1", port, keepalive=30)
    while running:
        client.loop(0.01)
        while later:
            client.publish(later.popleft(), b'{"status":"ok"}', qos=1)
    client.disconnect()


if __name__ == "__main__":
    echo_main(int(sys.argv[1]), sys.argv[2])
