"""What a client may send: Socket.IO packets checked as the reference server checks them.

python-socketio decodes a client's packet and uses it as it is. A packet that does not
decode, or whose payload it cannot use (an event without its name, an object where an array
belongs, an empty message, a binary placeholder that points nowhere), raised an exception
that Engine.IO logged as an error with its traceback, for every such packet, while the
connection stayed open. The reference server (socket.io-parser v4) closes the connection
instead ("parse error"). :class:`ClientPacket` refuses such a packet as
:class:`MalformedPacket`; the server then closes the connection with one line in the log
(:func:`report`). A long-poll's POST whose body is not even an Engine.IO payload is found
out before Engine.IO decodes it (:func:`polling_body_error`), and closes its session too.
"""

from __future__ import annotations

import io
import logging
from typing import Any

from engineio import payload
from socketio import packet

from excel_restaurant_pos.realtime import metrics

logger = logging.getLogger("excel_restaurant_pos.realtime")

#: Event names the Socket.IO protocol keeps for itself: a client's event by one of these
#: names would reach the server's own connect and disconnect handlers.
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"})
#: Binary attachments one packet may announce, as socket.io-parser's default. Each is a
#: message of up to ``max_payload`` bytes held until the last arrives: without a limit a
#: client could make the server hold as many as it liked.
MAX_ATTACHMENTS = 10


class MalformedPacket(ValueError):
	"""A client sent a message that is not a packet a Socket.IO client may send."""


def payload_error(packet_type: Any, data: Any) -> str | None:
	"""Why ``data`` is not what a client's packet of ``packet_type`` carries, or ``None``.
	As the reference parser has it, an event is an array led by its name and an ack an
	array, and a client never sends CONNECT_ERROR. A CONNECT's payload is left to the
	connect flow, which refuses an ``auth`` that is not an object with a reason the client
	can show."""
	if packet_type in (packet.EVENT, packet.BINARY_EVENT):
		if not (isinstance(data, list) and data and isinstance(data[0], str)):
			return "event payload is not an array led by the event's name"
		return f"reserved event name {data[0]!r}" if data[0] in RESERVED_EVENTS else None
	if packet_type in (packet.ACK, packet.BINARY_ACK):
		return None if isinstance(data, list) else "ack payload is not an array"
	return None if packet_type in (packet.CONNECT, packet.DISCONNECT) else f"packet type {packet_type!r}"


class ClientPacket(packet.Packet):
	"""python-socketio's packet, with a client's packet that does not decode, breaks
	:func:`payload_error`'s rules, announces more than :data:`MAX_ATTACHMENTS` or whose
	attachments do not fit it refused as :class:`MalformedPacket`. The server takes it as
	its serializer (a documented python-socketio option), so it also encodes what is sent."""

	def __init__(self, *args: Any, encoded_packet: str | bytes | None = None, **kwargs: Any):
		if encoded_packet is not None and not encoded_packet:
			raise MalformedPacket("empty packet")  # python-socketio would read it as an event with no payload
		super().__init__(*args, encoded_packet=encoded_packet, **kwargs)

	def decode(self, encoded_packet: str | bytes) -> int:
		try:
			attachments = super().decode(encoded_packet)
		except (ValueError, TypeError) as exc:  # bad JSON, digits or text where bytes were due
			raise MalformedPacket(f"{type(exc).__name__}: {exc}") from None
		error = payload_error(self.packet_type, self.data)
		if error:
			raise MalformedPacket(error)
		if attachments > MAX_ATTACHMENTS:
			raise MalformedPacket(f"{attachments} binary attachments (at most {MAX_ATTACHMENTS})")
		return attachments

	def add_attachment(self, attachment: bytes) -> bool:
		try:
			return super().add_attachment(attachment)
		except (ValueError, TypeError, IndexError, KeyError) as exc:  # a placeholder that points nowhere
			raise MalformedPacket(f"binary attachment: {type(exc).__name__}: {exc}") from None


def from_client(exc: ValueError) -> bool:
	"""Whether ``exc``, raised while python-socketio dispatched a client's message, says the
	message was malformed: ours, or one python-socketio raised itself (a binary packet for a
	namespace the client has not joined), not one a handler it called raised."""
	if isinstance(exc, MalformedPacket):
		return True
	frame = exc.__traceback__
	while frame is not None and frame.tb_next is not None:
		frame = frame.tb_next
	return frame is not None and frame.tb_frame.f_globals.get("__name__", "").startswith("socketio.")


def polling_body_error(environ: dict, max_bytes: int) -> Exception | None:
	"""Why a long-polling POST's body is not an Engine.IO payload, or ``None`` when it is.

	Engine.IO decodes that body inside its socket class, where an error is logged with its
	traceback and the session stays; read and decoded here first, a malformed body is
	handled as a malformed packet is. The body is put back for Engine.IO. One longer than
	``max_bytes`` is left to Engine.IO, which refuses it unread."""
	try:
		length = int(environ.get("CONTENT_LENGTH") or 0)
	except ValueError:
		return None
	if length > max_bytes:
		return None
	body = environ["wsgi.input"].read(length)
	environ["wsgi.input"] = io.BytesIO(body)
	try:
		payload.Payload(encoded_payload=body.decode("utf-8"))
	except (ValueError, KeyError) as exc:  # KeyError: a JSONP body ("d=…") without its d
		return exc
	return None


def report(eio_sid: str, exc: Exception) -> None:
	"""Log and count a malformed message whose connection is being closed; never the
	message itself, which may hold a token."""
	metrics.CLIENT_EVENTS.labels("malformed").inc()
	logger.info("closed eio_sid=%s: malformed packet (%s)", eio_sid, exc)
