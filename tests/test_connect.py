"""Connecting with the official JavaScript client and python-socketio: tokens from the header
or the ``auth`` payload, over websocket and long-polling, and every refusal text of SPEC §5."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
import socketio
from conftest import OTHER_SECRET, SECRET
from harness import wait_for

from excel_restaurant_pos.auth import make_token

APP_NS = "/excel_restaurant_pos/default"
TRANSPORTS = ["websocket", "polling"]


def token(user: str = "waiter@example.com", secret: str = SECRET, **claims) -> str:
	return make_token(user, secret, user_type=claims.pop("user_type", "System User"), **claims)


def unsigned_token(claims: dict) -> str:
	"""A token with ``alg: none``: no signature at all."""

	def part(obj: dict) -> str:
		return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

	return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("via", ["header", "auth"])
def test_js_client_connects_and_joins_kitchen(realtime, js, transport, via):
	server = realtime()
	reply = js.connect("c1", server.url + APP_NS, token=token(), via=via, transport=transport)
	assert reply["type"] == "connect"
	assert reply["transport"] == transport
	assert js.emit("c1", "room:join", "kitchen") == [{"ok": True, "room": "kitchen"}]
	assert js.wait_event("c1", "room:joined") == [{"room": "kitchen"}]
	pong = js.emit("c1", "ping")[0]
	assert abs(pong["timestamp"] - time.time() * 1000) < 60_000


def test_js_v3_client_connects(realtime, js):
	server = realtime()
	js.send(cmd="connect", id="old", url=server.url + APP_NS, version=3, opts={"transports": ["websocket"], "auth": {"token": token()}, "reconnection": False})
	assert js.wait(lambda item: item.get("id") == "old" and item["type"] in ("connect", "connect_error"))["type"] == "connect"


def test_auth_payload_accepts_bearer_prefix_and_any_scheme_case(realtime, js):
	server = realtime()
	assert js.connect("a", server.url + APP_NS, auth={"token": "Bearer " + token()})["type"] == "connect"
	assert js.connect("b", server.url + APP_NS, headers={"Authorization": "bEaReR " + token()})["type"] == "connect"


@pytest.mark.parametrize(
	("headers", "auth", "message"),
	[
		({}, None, "Missing Authorization header. Bearer token required."),
		({"Authorization": "Bearer"}, None, "Invalid Authorization header format. Expected format: 'Bearer <token>'"),
		({"Authorization": "Basic dXNlcjpwYXNz"}, None, "Invalid Authorization header format. Expected format: 'Bearer <token>'"),
		({"Authorization": "Bearer a b"}, None, "Invalid Authorization header format. Expected format: 'Bearer <token>'"),
		({}, {"token": ""}, "Invalid Authorization header format. Expected format: 'Bearer <token>'"),
		({}, {"token": "Bearer "}, "Invalid Authorization header format. Expected format: 'Bearer <token>'"),
	],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_refusal_texts_for_missing_or_malformed_tokens(realtime, js, transport, headers, auth, message):
	server = realtime()
	reply = js.connect("c", server.url + APP_NS, headers=headers, auth=auth, transport=transport)
	assert reply == {**reply, "type": "connect_error", "message": message}


@pytest.mark.parametrize(
	("bad_token", "reason"),
	[
		(unsigned_token({"user": "Administrator", "exp": int(time.time()) + 600}), "unsupported algorithm 'none' (only HS256)"),
		(token(secret=OTHER_SECRET), "invalid signature"),
		(token(ttl=-30), "token expired"),
		(jwt.encode({"user": "Administrator", "exp": int(time.time()) + 600}, SECRET, algorithm="HS512"), "unsupported algorithm 'HS512' (only HS256)"),
		(jwt.encode({"user": "Administrator"}, SECRET, algorithm="HS256"), "token has no 'exp' claim"),
		(token(type="refresh"), "token type 'refresh' is not an access token"),
		("not-a-jwt", "malformed token (not a JWT)"),
		("x" * 9000, "token longer than 8192 bytes"),
	],
	ids=["alg-none", "other-site-secret", "expired", "hs512", "no-exp", "refresh", "garbage", "oversized"],
)
def test_hostile_tokens_are_refused_with_the_reason(realtime, js, bad_token, reason):
	server = realtime()
	reply = js.connect("c", server.url + APP_NS, token=bad_token)
	assert reply["type"] == "connect_error"
	assert reply["message"] == f"Unauthorized: {reason}"


@pytest.mark.parametrize("namespace", ["/", "/nosuchsite", "/excel_restaurant_pos/nosuchsite", "/excel_restaurant_pos", "/excel_restaurant_pos/"])
def test_unknown_namespaces_are_refused_before_the_token_is_looked_at(realtime, js, namespace):
	server = realtime()
	reply = js.connect("c", server.url + namespace)  # no token at all
	assert reply == {**reply, "type": "connect_error", "message": "Invalid namespace"}


def test_site_namespace_and_default_alias(realtime, js):
	server = realtime(env={"EXCEL_RESTAURANT_POS_SITES": "site1.local,site2.local", "FRAPPE_SITE": "site2.local"})
	for client, namespace in [("a", "/site1.local"), ("b", "/excel_restaurant_pos/site1.local"), ("c", "/excel_restaurant_pos/default"), ("d", "/site2.local")]:
		assert js.connect(client, server.url + namespace, token=token())["type"] == "connect", namespace
	assert js.connect("e", server.url + "/default", token=token())["message"] == "Invalid namespace"


def test_origin_allow_list(realtime, js):
	server = realtime(env={"EXCEL_RESTAURANT_POS_ALLOWED_ORIGINS": "https://pos.example.com"})
	hostile = js.connect("evil", server.url + APP_NS, token=token(), headers={"Origin": "https://evil.example"})
	assert hostile == {**hostile, "type": "connect_error", "message": "Invalid origin"}
	assert js.connect("pos", server.url + APP_NS, token=token(), headers={"Origin": "https://pos.example.com"})["type"] == "connect"
	assert js.connect("native", server.url + APP_NS, token=token())["type"] == "connect"


def test_auto_joined_rooms_follow_frappe_rules(realtime, js, publish):
	server = realtime()
	js.connect("staff", server.url + APP_NS, token=token("cook@example.com"))
	js.connect("guest", server.url + APP_NS, token=token("guest@example.com", user_type="Website User"))
	js.connect("plain", server.url + APP_NS, token=make_token("plain@example.com", SECRET))  # no user_type claim
	for room in ("all", "website", "user:guest@example.com"):
		publish.publish_event("probe", {"room": room}, room, namespace=APP_NS)
	publish.publish_event("done", {}, namespace=APP_NS)  # the whole namespace, after the probes
	for client in ("staff", "guest", "plain"):
		js.wait_event(client, "done")
	rooms_seen = {client: {args[0]["room"] for args in js.received(client, "probe")} for client in ("staff", "guest", "plain")}
	assert rooms_seen == {
		"staff": {"all", "website"},
		"guest": {"website", "user:guest@example.com"},
		"plain": {"website"},
	}


def test_python_socketio_client_connects_and_is_refused_with_the_same_text(realtime):
	server = realtime()
	client = socketio.Client(reconnection=False)
	client.connect(server.url, namespaces=[APP_NS], headers={"Authorization": f"Bearer {token()}"}, transports=["websocket"], wait_timeout=10)
	try:
		assert client.call("room:join", "kitchen", namespace=APP_NS, timeout=10) == {"ok": True, "room": "kitchen"}
	finally:
		client.disconnect()

	refused = socketio.Client(reconnection=False)
	errors = []
	refused.on("connect_error", errors.append, namespace=APP_NS)
	with pytest.raises(socketio.exceptions.ConnectionError):
		refused.connect(server.url, namespaces=[APP_NS], auth={"token": token(ttl=-5)}, wait_timeout=10)
	wait_for(lambda: errors, message="connect_error")
	assert errors[0] == {"message": "Unauthorized: token expired"}


@pytest.mark.parametrize("recover", [False, True])
def test_a_second_connect_is_answered_with_the_existing_sid(realtime, recover):
	"""Clients send CONNECT again after a transport blip (SPEC §16): the same socket answers,
	with its pid when it recovers, and keeps working."""
	import websocket

	server = realtime()
	ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket", timeout=10)
	try:
		assert ws.recv().startswith("0{")
		auth = {"token": token(), **({"recover": True} if recover else {})}
		replies = []
		for _ in range(2):
			ws.send(f"40{APP_NS}," + json.dumps(auth))
			reply = ws.recv()
			assert reply.startswith(f"40{APP_NS},"), reply
			replies.append(json.loads(reply[len(f"40{APP_NS},") :]))
		assert replies[0] == replies[1]
		assert ("pid" in replies[0]) is recover
		ws.send(f"42{APP_NS},1" + json.dumps(["room:join", "kitchen"]))
		answer = ws.recv()
		while not answer.startswith(f"43{APP_NS},1"):
			answer = ws.recv()
		assert json.loads(answer[len(f"43{APP_NS},1") :]) == [{"ok": True, "room": "kitchen"}]
		assert server.health()[1]["clients"] == 1
	finally:
		ws.close()
