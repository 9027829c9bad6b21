"""What a new user does with the README: run the server with ``--dev``, connect a
JavaScript client with the printed token, join ``kitchen``, and see ``order:new`` published
from Python with ``publish_to_room``."""

from __future__ import annotations

import re
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

		monkeypatch.setenv("FRAPPE_REDIS_QUEUE", redis_url)
		script = "from excel_restaurant_pos.realtime.utils import publish_to_room; print(publish_to_room('kitchen', 'order:new', {'order_id': 'ORD-001'}))"
		published = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
		assert published.stdout.strip() == "1", published.stderr
		assert js.wait_event("tablet", "order:new") == [{"order_id": "ORD-001"}]
	finally:
		process.terminate()
		assert process.wait(15) == 0
	# the Redis the dev server started went away with it
	wait_for(lambda: not port_open(redis_port), 5, message="the dev Redis to stop")


def port_open(port: int) -> bool:
	try:
		socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
		return True
	except OSError:
		return False
