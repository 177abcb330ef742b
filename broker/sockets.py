"""The socket options every peer of the bus sets, in one place: broker, workers and clients."""

from __future__ import annotations

import zmq

from broker import protocol
from broker.auth import ZAP_DOMAIN, CurveKeys

RECONNECT_INTERVAL_MS = 100  # a restarted broker is found again this quickly
HIGH_WATER_MARK = 100_000  # messages queued per peer: a busy peer is never a reason to drop a DONE
# ZeroMQ's own connection heartbeats: a connection whose far end vanished without closing it (a cut
# link) is dropped after this long, which frees its routing identity for the peer's next connection.
CONNECTION_HEARTBEAT_MS = int(protocol.HEARTBEAT_INTERVAL * 1000)
CONNECTION_TIMEOUT_MS = CONNECTION_HEARTBEAT_MS * protocol.HEARTBEAT_LIVENESS


def _configure(socket: zmq.Socket) -> zmq.Socket:
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_SIZE * 2)
    socket.setsockopt(zmq.SNDHWM, HIGH_WATER_MARK)
    socket.setsockopt(zmq.RCVHWM, HIGH_WATER_MARK)
    socket.setsockopt(zmq.HEARTBEAT_IVL, CONNECTION_HEARTBEAT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, CONNECTION_TIMEOUT_MS)
    return socket


def router(context: zmq.Context, curve: CurveKeys | None = None) -> zmq.Socket:
    """The broker's socket, not yet bound. Sends to vanished peers raise instead of vanishing.
    With `curve`, it is a CURVE server: only peers whose keys the ZAP handler admits get in."""
    socket = _configure(context.socket(zmq.ROUTER))
    if curve is not None:
        socket.curve_server = True
        socket.curve_publickey, socket.curve_secretkey = curve.public, curve.secret
        socket.zap_domain = ZAP_DOMAIN.encode()
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    # A peer reconnecting under its identity takes it over at once; with keys, a peer could take over
    # another's that way, so there the identity frees up only when the old connection closes.
    socket.setsockopt(zmq.ROUTER_HANDOVER, int(curve is None))
    return socket


def dealer(context: zmq.Context, address: str, *, immediate: bool = False, identity: bytes | None = None,
           curve: CurveKeys | None = None) -> zmq.Socket:
    """A worker's or client's socket, connected to the broker at `address`.

    `immediate`: queue nothing while the broker is away, so a send to an absent broker fails now
    instead of running later for a caller who was told it failed. `identity`: the routing id the
    broker knows this peer by (default: one ZeroMQ picks per connection). `curve`: this peer's key
    pair and the broker's public key, for a broker that requires CURVE.
    """
    socket = _configure(context.socket(zmq.DEALER))
    if curve is not None:
        if curve.server_public is None:
            raise ValueError("a CURVE client needs the broker's public key")
        socket.curve_serverkey = curve.server_public
        socket.curve_publickey, socket.curve_secretkey = curve.public, curve.secret
    if identity is not None:
        socket.setsockopt(zmq.ROUTING_ID, identity)
    socket.setsockopt(zmq.RECONNECT_IVL, RECONNECT_INTERVAL_MS)
    # A connection attempt lost on a dead link is given up and made afresh, rather than waiting out
    # TCP's growing SYN retries: a host whose link comes back rejoins within seconds.
    socket.setsockopt(zmq.CONNECT_TIMEOUT, CONNECTION_TIMEOUT_MS)
    if immediate:
        socket.setsockopt(zmq.IMMEDIATE, 1)
    socket.connect(address)
    return socket
