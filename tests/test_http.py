"""HTTP on the wire, as clients and proxies speak it to the server: kept-alive and pipelined
requests, chunked and announced bodies, and requests that must be refused without harm to
anyone else."""

from __future__ import annotations

import json
import socket

import pytest
from harness import assert_no_traceback
from test_connect import token

NS = "/excel_restaurant_pos/default"


class Wire:
	"""A raw HTTP/1.1 connection to the server, reading responses as a client does."""

	def __init__(self, port: int):
		self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
		self.file = self.sock.makefile("rb")

	def send(self, data: bytes) -> None:
		self.sock.sendall(data)

	def response(self) -> tuple[int, dict[str, str], bytes]:
		"""The next response's status, headers (lower-case names) and body."""
		status = int(self.file.readline().split()[1])
		headers = {}
		while (line := self.file.readline()) not in (b"\r\n", b""):
			name, _, value = line.decode("latin-1").partition(":")
			headers[name.strip().lower()] = value.strip()
		body = self.file.read(int(headers.get("content-length", 0)))
		return status, headers, body

	def closed_by_server(self) -> bool:
		"""Whether the server ended the connection: an end, or a reset when it closed with
		the client's unread bytes still in its buffer."""
		try:
			return self.file.read() == b""
		except ConnectionResetError:
			return True

	def close(self) -> None:
		self.file.close()
		self.sock.close()


@pytest.fixture
def wire(realtime):
	opened: list[Wire] = []

	def connect(server) -> Wire:
		opened.append(Wire(server.port))
		return opened[-1]

	yield connect
	for each in opened:
		each.close()


def handshake(wire: Wire) -> str:
	"""Open an Engine.IO session over long-polling; its sid."""
	wire.send(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\n\r\n")
	status, _, body = wire.response()
	assert status == 200, body
	return json.loads(body[1:])["sid"]


def post(sid: str, body: bytes, headers: bytes = b"") -> bytes:
	return (
		f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n".encode()
		+ headers + b"\r\n" + body
	)


def poll(sid: str) -> bytes:
	return f"GET /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def test_pipelined_requests_on_a_kept_alive_connection_are_answered_in_order(realtime, wire):
	server = realtime()
	client = wire(server)
	client.send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
	first, second = client.response(), client.response()
	assert first[0] == 200 and json.loads(first[2])["status"] == "ok"
	assert second[0] == 404
	client.send(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	assert client.response()[0] == 200
	assert client.closed_by_server()


def test_an_http_1_0_client_gets_its_answer_and_the_end_of_the_connection(realtime, wire):
	client = wire(realtime())
	client.send(b"GET /health HTTP/1.0\r\n\r\n")
	assert client.response()[0] == 200
	assert client.closed_by_server()


def test_a_client_that_expects_100_continue_gets_it_before_it_sends_the_body(realtime, wire):
	client = wire(realtime())
	sid = handshake(client)
	body = f'40{NS},{{"token":"{token("waiter@example.com")}"}}'.encode()
	client.send(post(sid, b"", f"Expect: 100-continue\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n".encode()))
	assert client.response()[0] == 100
	client.send(body)
	assert client.response()[:3:2] == (200, b"OK")
	client.send(poll(sid))
	status, _, answer = client.response()
	assert status == 200 and answer.startswith(f"40{NS},".encode()) and b'"sid"' in answer


def test_a_chunked_body_reaches_the_app_whole(realtime, wire, request):
	if request.config.getoption("--async-mode") == "gevent":
		pytest.skip("gevent's WSGI server gives a chunked body no CONTENT_LENGTH, so Engine.IO reads none of it")
	client = wire(realtime())
	sid = handshake(client)
	body = f'40{NS},{{"token":"{token("waiter@example.com")}"}}'.encode()
	chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
	client.send(post(sid, chunks, b"Transfer-Encoding: chunked\r\n"))
	assert client.response()[:3:2] == (200, b"OK")
	client.send(poll(sid))
	assert client.response()[2].startswith(f"40{NS},".encode())


def test_requests_that_are_refused_harm_nobody_else(realtime, wire, js, publish, request):
	"""A malformed request, headers beyond any real client's and a body beyond the largest
	message are each answered with the reason, their connections end, and a client in the
	middle of a session keeps it."""
	server = realtime(max_payload=10_000)
	js.connect("legit", server.url + NS, token=token("legit@example.com"), transport="polling")
	malformed, huge_headers, huge_body = wire(server), wire(server), wire(server)
	malformed.send(b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
	huge_headers.send(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Junk: " + b"j" * 100_000 + b"\r\n\r\n")
	huge_body.send(post("unknown", b"4" * 20_000, b"Content-Length: 20000\r\n"))
	assert malformed.response()[0] == 400 and malformed.closed_by_server()
	assert huge_headers.response()[0] in (400, 431) and huge_headers.closed_by_server()
	# eventlet's server refuses the body as soon as it reads its length; on gevent, Engine.IO
	# refuses the unknown session
	assert huge_body.response()[0] == (400 if request.config.getoption("--async-mode") == "gevent" else 413)
	js.emit("legit", "room:join", "kitchen")
	publish.publish_to_room("kitchen", "order:new", {"order_id": "ORD-1"})
	assert js.wait_event("legit", "order:new") == [{"order_id": "ORD-1"}]
	assert server.health()[0] == 200
	assert_no_traceback(server.log())


def test_what_a_client_sends_with_its_upgrade_is_answered_at_once(realtime, wire):
	"""A long-polling client that upgrades sends the upgrade and what it queued meanwhile
	back to back, and the server may read both in one go. The second must be answered
	then, not when the client next sends something (its pong, a ping interval later)."""
	import websocket

	server = realtime(ping_interval=30, ping_timeout=10)
	client = wire(server)
	sid = handshake(client)
	body = f'40{NS},{{"token":"{token("waiter@example.com")}"}}'.encode()
	client.send(post(sid, body, f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n".encode()))
	assert client.response()[0] == 200
	client.send(poll(sid))
	assert client.response()[2].startswith(f"40{NS},".encode())

	ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket&sid={sid}", timeout=5)
	try:
		ws.send("2probe")
		assert ws.recv() == "3probe"
		frames = [websocket.ABNF.create_frame(text, websocket.ABNF.OPCODE_TEXT).format() for text in ("5", f'42{NS},7["room:join","kitchen"]')]
		ws.sock.sendall(b"".join(frames))  # one write: the server reads them together
		answers = []
		while not answers or not answers[-1].startswith(f"43{NS},7"):
			answers.append(ws.recv())  # times out after 5 s, long before the next ping
		assert json.loads(answers[-1][len(f"43{NS},7"):]) == [{"ok": True, "room": "kitchen"}], answers
	finally:
		ws.close()


def test_the_app_sees_each_header_under_its_cgi_name(redis_url):
	"""The environ the server hands Engine.IO (PEP 3333): a header under ``HTTP_`` and its
	name upper-cased with dashes as underscores, however the client spells it; repeated
	headers joined with commas; a name with an underscore dropped, or ``X_Tag`` would pass
	for ``X-Tag`` behind a proxy that sets one; an escaped path decoded. The second
	request, from names already met, is read the same."""
	from excel_restaurant_pos.realtime import httpserver
	from excel_restaurant_pos.realtime.config import load_config

	seen = []

	def app(environ, start_response):
		seen.append({key: value for key, value in environ.items() if key.isupper()})
		start_response("204 No Content", [])
		return []

	config = load_config({}, env={"FRAPPE_REDIS_QUEUE": redis_url, "EXCEL_RESTAURANT_POS_SITES": "site1.local"})
	listener, (ours, theirs) = socket.socket(), socket.socketpair()
	listener.bind(("127.0.0.1", 0))
	connection = httpserver.Connection(httpserver.HttpServer(listener, app, config), ours, ("10.0.0.7", 5000))
	request = (
		b"POST /socket.io/a%20b?EIO=4&x=%20 HTTP/1.1\r\nHost: pos.example\r\nx-tag: one\r\nX-TAG: two\r\n"
		b"X_Tag: spoofed\r\nauthorization: Bearer t\r\ncontent-type: text/plain\r\nContent-Length: 2\r\n\r\nok"
	)
	for _ in range(2):
		connection.parser.feed_data(request)
		assert connection.answer(connection.requests.pop(0))
		assert theirs.recv(4096).startswith(b"HTTP/1.1 204 ")
	expected = {
		"REQUEST_METHOD": "POST", "PATH_INFO": "/socket.io/a b", "QUERY_STRING": "EIO=4&x=%20",
		"SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.7", "REMOTE_PORT": "5000", "SCRIPT_NAME": "",
		"SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(listener.getsockname()[1]), "HTTP_HOST": "pos.example",
		"HTTP_X_TAG": "one,two", "HTTP_AUTHORIZATION": "Bearer t", "CONTENT_TYPE": "text/plain", "CONTENT_LENGTH": "2",
	}
	assert seen == [expected, expected]
	for sock in (listener, ours, theirs):
		sock.close()
