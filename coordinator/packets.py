"""What a client's socket.io packet may look like before any handler sees it (no I/O).

python-socketio hands a decoded packet to its handlers as it is: an event whose name is
not a string fails inside the library (a traceback per packet), one named ``connect`` or
``disconnect`` calls the node's own connect or disconnect handler with the client's
arguments, and a binary event may announce more attachments than it will ever send.
``problem`` names what is wrong with a packet, or returns None.

Its data is held to ``inputs.shape_problem``: bounded nesting and number of values, no
NaN or Infinity, no integer beyond msgpack's 64 bits.
"""

from __future__ import annotations

from typing import Any

from socketio import packet as sio_packet

from .inputs import shape_problem

# A socket.io event name the coordinator might ever use; longer ones are garbage.
MAX_EVENT_NAME = 64
MAX_ATTACHMENTS = 16
# Events only the server may raise (python-socketio's reserved names): a client event
# with one of these names would reach the node's own handlers.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "__disconnect_final"})
NAMESPACE = "/"


def problem(pkt: Any) -> str | None:
    """Why a decoded client packet is unacceptable, or None."""
    kind = pkt.packet_type
    if kind not in (
        sio_packet.CONNECT,
        sio_packet.DISCONNECT,
        sio_packet.EVENT,
        sio_packet.ACK,
        sio_packet.BINARY_EVENT,
        sio_packet.BINARY_ACK,
    ):
        return "unknown or unexpected packet type"
    if pkt.namespace not in (None, NAMESPACE):
        return f"unknown namespace {str(pkt.namespace)[:40]!r}"
    if kind in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK) and not (
        0 < pkt.attachment_count <= MAX_ATTACHMENTS
    ):
        return f"a binary packet carries 1 to {MAX_ATTACHMENTS} attachments"
    if kind == sio_packet.CONNECT and pkt.data is not None and not isinstance(pkt.data, dict):
        return "the CONNECT payload (auth) must be an object"
    if kind in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
        data = pkt.data
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            return "an event is a list starting with its name"
        name = data[0]
        if not 0 < len(name) <= MAX_EVENT_NAME or name in RESERVED_EVENTS:
            return f"not an event name a client may send: {name[:MAX_EVENT_NAME]!r}"
    return shape_problem(pkt.data)
