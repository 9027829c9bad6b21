"""A straightforward python-socketio server on eventlet, for the benchmarks.

The same shape as ``benchmarks/reference/server.mjs`` (one wildcard namespace handler, a
connect handler that checks the Bearer token locally or asks Frappe's ``get_user_info``, a
Redis subscriber on ``events`` and ``excel_restaurant_pos_events``, ``room:join`` with an
acknowledgement), written the way python-socketio's documentation writes a server: every
event goes through ``sio.emit``. It shows which figures come from python-socketio and
eventlet themselves and which from the product's own code.

Two capacity settings are raised from eventlet's defaults, so that the storm and idle
scenarios measure the server rather than a refusal: the listen backlog (50) and the WSGI
server's green-thread pool (1,024 connections at most).

    python benchmarks/baseline/server.py --port 9201 --host 127.0.0.1 \\
        --redis-queue redis://127.0.0.1:6379 --auth-mode jwt|frappe [--frappe-url URL]

The HS256 secret comes from EXCEL_RESTAURANT_POS_JWT_SECRET, the sites from
EXCEL_RESTAURANT_POS_SITES (comma-separated, default "default").
"""

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

import eventlet.wsgi  # noqa: E402
import jwt  # noqa: E402
import redis  # noqa: E402
import requests  # noqa: E402
import socketio  # noqa: E402

APP_PREFIX = "/excel_restaurant_pos/"

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=9001)
parser.add_argument("--host", default="0.0.0.0")
parser.add_argument("--redis-queue", default="redis://127.0.0.1:6379")
parser.add_argument("--auth-mode", choices=("jwt", "frappe"), default="jwt")
parser.add_argument("--frappe-url", default="http://127.0.0.1:8000")
parser.add_argument("--websocket-compression", default="false", help="accepted for the runner; eventlet's default applies")
opts = parser.parse_args()
secret = os.environ.get("EXCEL_RESTAURANT_POS_JWT_SECRET", "")
sites = {s.strip() for s in os.environ.get("EXCEL_RESTAURANT_POS_SITES", "default").split(",") if s.strip()}
redis_up = False

sio = socketio.Server(async_mode="eventlet", namespaces="*", cors_allowed_origins="*")


def site_of(namespace):
	name = namespace[len(APP_PREFIX):] if namespace.startswith(APP_PREFIX) else namespace[1:]
	return name if name in sites else None


def token_of(environ, auth):
	header = environ.get("HTTP_AUTHORIZATION", "").strip()
	if header:
		scheme, _, token = header.partition(" ")
		return token.strip() if scheme.lower() == "bearer" and token.strip() else None
	token = (auth or {}).get("token") if isinstance(auth, dict) else None
	return token or None


def identify(site, token):
	if opts.auth_mode == "jwt":
		claims = jwt.decode(token, secret, algorithms=["HS256"])
		if claims.get("type", "access") != "access":
			raise ValueError("wrong token type")
		return {"user": claims.get("user") or claims.get("sub"), "user_type": claims.get("user_type", "Website User")}
	response = requests.get(
		f"{opts.frappe_url}/api/method/frappe.realtime.get_user_info",
		headers={"Authorization": f"Bearer {token}", "X-Frappe-Site-Name": site},
		timeout=5,
	)
	info = (response.json() or {}).get("message") if response.status_code == 200 else None
	if not info or not info.get("user") or info["user"] == "Guest":
		raise ValueError(f"Frappe answered {response.status_code}")
	return info


@sio.on("connect", namespace="*")
def connect(namespace, sid, environ, auth=None):
	site = site_of(namespace)
	if not site:
		raise socketio.exceptions.ConnectionRefusedError("Invalid namespace")
	token = token_of(environ, auth)
	if not token:
		raise socketio.exceptions.ConnectionRefusedError("Missing Authorization header. Bearer token required.")
	try:
		info = identify(site, token)
	except Exception as exc:
		raise socketio.exceptions.ConnectionRefusedError(f"Unauthorized: {exc}") from None
	sio.enter_room(sid, f"user:{info['user']}", namespace=namespace)
	sio.enter_room(sid, "website", namespace=namespace)
	if info.get("user_type") == "System User":
		sio.enter_room(sid, "all", namespace=namespace)


@sio.on("room:join", namespace="*")
def room_join(namespace, sid, room):
	if not isinstance(room, str) or not 0 < len(room) <= 256:
		sio.emit("room:error", {"room": room, "message": "Invalid room"}, to=sid, namespace=namespace)
		return {"ok": False, "room": room, "error": "Invalid room"}
	sio.enter_room(sid, room, namespace=namespace)
	sio.emit("room:joined", {"room": room}, to=sid, namespace=namespace)
	return {"ok": True, "room": room}


@sio.on("room:leave", namespace="*")
def room_leave(namespace, sid, room):
	sio.leave_room(sid, room, namespace=namespace)
	sio.emit("room:left", {"room": room}, to=sid, namespace=namespace)
	return {"ok": True, "room": room}


def bridge():
	global redis_up
	pubsub = redis.Redis.from_url(opts.redis_queue).pubsub(ignore_subscribe_messages=True)
	pubsub.subscribe("events", "excel_restaurant_pos_events")
	redis_up = True
	for item in pubsub.listen():
		try:
			data = json.loads(item["data"])
		except ValueError:
			continue
		namespace = data.get("namespace")
		if not isinstance(namespace, str) or not namespace:
			continue
		if item["channel"] == b"events":
			namespace = f"/{namespace}"  # Frappe v15+: the site's name
		sio.emit(data.get("event"), data.get("message"), to=data.get("room"), namespace=namespace)


def health(environ, start_response):
	if environ.get("PATH_INFO") != "/health":
		start_response("404 Not Found", [("Content-Type", "text/plain")])
		return [b""]
	start_response("200 OK" if redis_up else "503 Service Unavailable", [("Content-Type", "application/json")])
	return [json.dumps({"status": "ok" if redis_up else "degraded"}).encode()]


if __name__ == "__main__":
	# Stop at once, as the reference does: the runner reads the exit status.
	signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
	sio.start_background_task(bridge)
	print(f"baseline server listening on {opts.host}:{opts.port}; redis {opts.redis_queue}; auth {opts.auth_mode}", file=sys.stderr)
	listener = eventlet.listen((opts.host, opts.port), backlog=4096)
	eventlet.wsgi.server(listener, socketio.WSGIApp(sio, health), log_output=False, max_size=20000)
