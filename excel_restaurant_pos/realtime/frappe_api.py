"""The HTTP client toward Frappe: who a token belongs to, and room permissions.

Every call goes to the configured Frappe URL (never one a client names) with the client's
own ``Authorization: Bearer`` header, so Frappe answers with that user's rights. Calls are
bounded by ``frappe_timeout``; in the server each runs in its own green thread, so a slow
Frappe delays only the client that waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from excel_restaurant_pos.realtime.config import Config

SOCKET_SECRET_KEY = "socketio_auth_secret"
SOCKET_SECRET_TTL = 60.0
#: After a failed read the secret is tried again this soon, not a minute later.
SOCKET_SECRET_RETRY = 2.0
#: Calls to Frappe in flight at once; a connection storm queues here instead of opening a
#: connection to Frappe per client.
MAX_CONCURRENT_CALLS = 64
logger = logging.getLogger(__name__)


class FrappeError(Exception):
	"""Frappe refused or could not be asked; the message is the reason for the client."""


class FrappeAPI:
	def __init__(self, config: Config):
		self.base_url = config.frappe_url
		self.timeout = config.frappe_timeout
		self.redis_url = config.redis_queue
		self.session = requests.Session()
		self.session.trust_env = False  # a proxy from the environment must not see tokens
		self.session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=MAX_CONCURRENT_CALLS))
		self.session.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=MAX_CONCURRENT_CALLS))
		self._calls = threading.BoundedSemaphore(MAX_CONCURRENT_CALLS)
		self._redis: Any = None
		self._secret_lock = threading.Lock()
		self._secret: tuple[str | None, float] = (None, float("-inf"))
		#: Per site: does Frappe have ``frappe.realtime.has_permission``? Learned from answers.
		self._has_permission_method: dict[str, bool] = {}

	def socket_secret(self) -> str | None:
		"""Newest Frappe's ``socketio_auth_secret`` from the queue Redis, re-read every minute.

		One read at a time: the clients of a connection storm wait for that read instead of
		each opening its own Redis connection.
		"""
		with self._secret_lock:
			value, fresh_until = self._secret
			if time.monotonic() < fresh_until:
				return value
			import redis

			try:
				if self._redis is None:
					self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1, socket_timeout=1)
				raw = self._redis.get(SOCKET_SECRET_KEY)
				value = raw.decode() if isinstance(raw, bytes) else raw
				fresh_until = time.monotonic() + SOCKET_SECRET_TTL
			except redis.RedisError as exc:
				logger.warning("cannot read %s from redis (keeping the last value): %s", SOCKET_SECRET_KEY, exc)
				fresh_until = time.monotonic() + SOCKET_SECRET_RETRY
			self._secret = (value, fresh_until)
			return value

	def headers(self, site: str, token: str) -> dict[str, str]:
		headers = {
			"Authorization": f"Bearer {token}",
			"Host": site,
			"X-Frappe-Site-Name": site,
			"Accept": "application/json",
		}
		secret = self.socket_secret()
		if secret:
			headers["X-Frappe-Socket-Secret"] = secret
		return headers

	def call(self, site: str, token: str, method: str, params: dict[str, Any] | None = None) -> requests.Response:
		"""GET ``/api/method/<method>`` as the token's user; ``FrappeError`` when unreachable.

		The whole call, waiting for a free slot included, is bounded by ``frappe_timeout``.
		"""
		started = time.monotonic()
		if not self._calls.acquire(timeout=self.timeout):
			raise FrappeError(f"Frappe did not answer within {self.timeout:g} s")
		try:
			left = max(0.1, self.timeout - (time.monotonic() - started))
			return self.session.get(
				f"{self.base_url}/api/method/{method}",
				params=params,
				headers=self.headers(site, token),
				timeout=(min(left, 3.0), left),
				allow_redirects=False,
			)
		except requests.Timeout:
			raise FrappeError(f"Frappe did not answer within {self.timeout:g} s") from None
		except requests.RequestException as exc:
			raise FrappeError(f"Frappe unreachable ({type(exc).__name__})") from None
		finally:
			self._calls.release()

	def get_user_info(self, site: str, token: str) -> dict[str, Any]:
		"""``frappe.realtime.get_user_info`` for the token: ``{user, user_type, installed_apps}``."""
		response = self.call(site, token, "frappe.realtime.get_user_info")
		if response.status_code != 200:
			raise FrappeError(_error_text(response))
		info = _message(response)
		user = info.get("user") if isinstance(info, dict) else None
		if not isinstance(user, str) or not user or user == "Guest":
			raise FrappeError("Frappe did not accept the token")
		return info

	def can_join(self, site: str, token: str, doctype: str, docname: str | None) -> tuple[bool, str]:
		"""Ask Frappe whether the token's user may read ``doctype`` (or one document).

		Newest Frappe has ``has_permission`` (an empty ``name`` asks about the doctype);
		v14 and v15 have ``can_subscribe_doc`` / ``can_subscribe_doctype``. Which one a site
		has is learned from its answer, never assumed from a version number.
		"""
		if self._has_permission_method.get(site, True):
			response = self.call(site, token, "frappe.realtime.has_permission", {"doctype": doctype, "name": docname or ""})
			if not _method_missing(response):
				self._has_permission_method[site] = True
				return _verdict(response)
			self._has_permission_method[site] = False
		if docname is None:
			response = self.call(site, token, "frappe.realtime.can_subscribe_doctype", {"doctype": doctype})
		else:
			response = self.call(site, token, "frappe.realtime.can_subscribe_doc", {"doctype": doctype, "docname": docname})
		return _verdict(response)


def _message(response: requests.Response) -> Any:
	try:
		body = response.json()
	except ValueError:
		return None
	return body.get("message") if isinstance(body, dict) else None


def _method_missing(response: requests.Response) -> bool:
	"""Frappe's answer for a whitelisted method the site does not have."""
	return response.status_code in (404, 417) and "Failed to get method" in response.text


def _verdict(response: requests.Response) -> tuple[bool, str]:
	if response.status_code == 200 and _message(response):
		return True, ""
	if response.status_code == 200:
		return False, "Permission denied"
	return False, "Permission denied" if response.status_code == 403 else _error_text(response)


def _error_text(response: requests.Response) -> str:
	"""A short reason from a Frappe error answer (its exception text when it gave one)."""
	try:
		body = response.json()
	except ValueError:
		body = None
	exception = body.get("exception") if isinstance(body, dict) else None
	if isinstance(exception, str) and exception.strip():
		return exception.strip().rsplit(": ", 1)[-1][:200]
	return f"Frappe answered HTTP {response.status_code}"
