"""What a new user does with the README: run the server with ``--dev``, paste the printed
``listen`` and ``publish`` lines, connect a JavaScript client with the printed token, join
``kitchen``, and see ``order:new`` arrive on both, from the command and from Python's
``publish_to_room``."""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
import sys

from harness import free_port, wait_for


def test_dev_server_starts_its_own_redis_and_prints_a_working_token(tmp_path, js, monkeypatch):
	port, redis_port = free_port(), free_port()
	redis_url = f"redis://127.0.0.1:{redis_port}"
	log = tmp_path / "dev.log"
	with open(log, "wb") as out:
		process = subprocess.Popen(
			[sys.executable, "-m", "excel_restaurant_pos.realtime", "--dev", "--port", str(port), "--redis-queue", redis_url],
			cwd=tmp_path,
			stdout=out,
			stderr=subprocess.STDOUT,
		)
	try:
		token = wait_for(lambda: re.search(r"^  (eyJ[\w-]+\.[\w-]+\.[\w-]+)$", log.read_text(), re.M), 20, message="the printed token")[1]
		assert re.search(r'const s = io\("http://127.0.0.1:\d+/excel_restaurant_pos/default"', log.read_text())
		wait_for(lambda: "listening on redis" in log.read_text(), 20, message="the bridge to listen")
		assert js.connect("tablet", f"http://127.0.0.1:{port}/excel_restaurant_pos/default", auth={"token": token})["type"] == "connect"
		assert js.emit("tablet", "room:join", "kitchen") == [{"ok": True, "room": "kitchen"}]

		monkeypatch.setenv("FRAPPE_REDIS_QUEUE", redis_url)  # the shells the README's lines are pasted in
		listen_line, publish_line = (printed(log.read_text(), verb) for verb in ("listen", "publish"))
		listener = subprocess.Popen(listen_line, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
		try:
			wait_for(lambda: "joined kitchen" in listener.stderr.readline(), 20, message="the listener in the kitchen")
			published = subprocess.run(publish_line, capture_output=True, text=True, timeout=30)
			assert published.stdout.strip() == "published order:new to room kitchen on site default; 1 server listening", published.stderr
			assert json.loads(listener.stdout.readline()) == {"event": "order:new", "args": [{"order_id": "ORD-001"}]}
		finally:
			listener.terminate()
			assert listener.wait(15) == 0
		assert js.wait_event("tablet", "order:new") == [{"order_id": "ORD-001"}]

		script = "from excel_restaurant_pos.realtime.utils import publish_to_room; print(publish_to_room('kitchen', 'order:ready', {'order_id': 'ORD-001'}))"
		published = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
		assert published.stdout.strip() == "1", published.stderr
		assert js.wait_event("tablet", "order:ready") == [{"order_id": "ORD-001"}]
	finally:
		process.terminate()
		assert process.wait(15) == 0
	# the Redis the dev server started went away with it
	wait_for(lambda: not port_open(redis_port), 5, message="the dev Redis to stop")


def printed(banner: str, verb: str) -> list[str]:
	"""The command line the banner prints for ``verb``, to run as a shell would."""
	line = re.search(rf"^  python -m excel_restaurant_pos\.realtime {verb} .*$", banner, re.M)[0]
	return [sys.executable, *shlex.split(line)[1:]]


def port_open(port: int) -> bool:
	try:
		socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
		return True
	except OSError:
		return False
