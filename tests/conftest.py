"""Fixtures that own real processes: Redis servers, the realtime server, the Frappe stand-in
and the JavaScript client. Each is started on a free loopback port and stopped by PID."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import ASYNC_MODE_ENV, FrappeStandIn, JSClients, RealtimeProcess, RedisServer, free_port  # noqa: E402

def pytest_addoption(parser: pytest.Parser) -> None:
	parser.addoption(
		"--async-mode",
		choices=("eventlet", "gevent"),
		default="eventlet",
		help="the backend of every realtime server the tests start",
	)


def pytest_report_header(config: pytest.Config) -> str:
	return f"realtime servers on {config.getoption('--async-mode')}"


SECRET = "test-secret-of-site-one-0123456789abcdef"
OTHER_SECRET = "test-secret-of-site-two-0123456789abcdef"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
	"""A Redis of the test session's own, on a free port (clean slate, nothing shared)."""
	server = RedisServer(tmp_path_factory.mktemp("redis"))
	server.start()
	yield server
	server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
	"""The session Redis, flushed for each test."""
	redis_server.client().flushall()
	return redis_server.url


@pytest.fixture
def publish(redis_url, monkeypatch):
	"""The publish helpers, configured (as a script outside Frappe would be) for the test Redis."""
	from excel_restaurant_pos.realtime import utils

	monkeypatch.setenv("FRAPPE_REDIS_QUEUE", redis_url)
	utils._standalone_config.cache_clear()
	utils._redis_client.cache_clear()
	yield utils
	utils._standalone_config.cache_clear()
	utils._redis_client.cache_clear()


@pytest.fixture
def own_redis(tmp_path) -> RedisServer:
	"""A Redis this one test may stop and start again."""
	server = RedisServer(tmp_path / "redis")
	server.start()
	yield server
	server.stop()


@pytest.fixture
def realtime(tmp_path, redis_url):
	"""Start realtime servers: ``realtime(**flags)`` returns a running :class:`RealtimeProcess`
	(``setup``: Python its process runs first)."""
	started: list[RealtimeProcess] = []

	def start(*, env: dict | None = None, wait_healthy: bool = True, setup: str = "", **flags) -> RealtimeProcess:
		flags.setdefault("redis_queue", redis_url)
		base_env = {"EXCEL_RESTAURANT_POS_JWT_SECRET": SECRET}
		process = RealtimeProcess(tmp_path, flags, {**base_env, **(env or {})}, setup)
		started.append(process)
		process.start(wait_healthy=wait_healthy)
		return process

	yield start
	for process in started:
		process.kill()


@pytest.fixture
def frappe_standin():
	"""A Frappe API stand-in that verifies tokens with our own ``verify_token``."""
	server = FrappeStandIn(secrets={"site1.local": SECRET, "site2.local": OTHER_SECRET})
	server.start()
	yield server
	server.stop()


@pytest.fixture
def js():
	"""The official JavaScript socket.io-client, driven over stdin/stdout."""
	clients = JSClients(Path(__file__).parent / "js")
	yield clients
	clients.close()


@pytest.fixture(autouse=True)
def _no_bench_discovery(monkeypatch, tmp_path, request):
	"""Tests run outside any bench unless they build one themselves, with servers on the
	backend the run chose."""
	monkeypatch.delenv("FRAPPE_BENCH_PATH", raising=False)
	monkeypatch.chdir(tmp_path)
	for name in list(os.environ):
		if name.startswith("EXCEL_RESTAURANT_POS_") or name in ("FRAPPE_REDIS_QUEUE", "FRAPPE_SITE"):
			monkeypatch.delenv(name)
	monkeypatch.setenv(ASYNC_MODE_ENV, request.config.getoption("--async-mode"))


__all__ = ["free_port", "SECRET", "OTHER_SECRET"]
