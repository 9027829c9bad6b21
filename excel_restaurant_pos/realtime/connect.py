"""The connect pipeline: from a handshake to an :class:`Identity`, or a refusal.

namespace → site → token (header, else ``auth`` payload) → origin → verification
(``jwt``: the shared :func:`~excel_restaurant_pos.auth.verify_token`; ``frappe``: one call
to ``get_user_info``) → identity. Each step returns its value or raises :class:`Refused`
with the exact text the client sees as ``connect_error``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from excel_restaurant_pos.auth import DEFAULT_USER_TYPE, TokenError, bearer_token, looks_like_jwt, unverified_exp, verify_token
from excel_restaurant_pos.realtime import metrics, rooms
from excel_restaurant_pos.realtime.config import Config
from excel_restaurant_pos.realtime.frappe_api import FrappeAPI, FrappeError

INVALID_NAMESPACE = "Invalid namespace"
MISSING_TOKEN = "Missing Authorization header. Bearer token required."
BAD_HEADER = "Invalid Authorization header format. Expected format: 'Bearer <token>'"
INVALID_ORIGIN = "Invalid origin"
TOO_MANY_CONNECTIONS = "Too many connections for this user"
#: The verification cache is bounded; past this, expired entries go first, then the oldest.
CACHE_SIZE = 10_000


class Refused(Exception):
	"""A handshake to refuse; ``str(exc)`` is the client-facing reason."""

	def __init__(self, message: str, label: str | None = None):
		super().__init__(message)
		#: The ``result`` label of the connects metric: short and of bounded cardinality.
		self.label = label or message


@dataclasses.dataclass(frozen=True)
class Identity:
	"""Who a connection is. ``token`` is kept to ask Frappe as this user later."""

	site: str
	user: str
	user_type: str
	installed_apps: tuple[str, ...]
	exp: float | None
	token: str = dataclasses.field(repr=False)


def site_for(namespace: str, config: Config) -> str:
	site = rooms.site_of_namespace(namespace, config.sites, config.default_site)
	if site is None:
		raise Refused(INVALID_NAMESPACE, "invalid_namespace")
	return site


def token_from(environ: Mapping[str, Any], auth: Any) -> str:
	"""The Bearer token from the ``Authorization`` header, else from ``auth: {token}``."""
	header = environ.get("HTTP_AUTHORIZATION")
	if header:
		token = bearer_token(header)
		if token is None:
			raise Refused(BAD_HEADER, "bad_header")
		return token
	value = auth.get("token") if isinstance(auth, dict) else None
	if value is None:
		raise Refused(MISSING_TOKEN, "missing_token")
	if not isinstance(value, str) or not value.strip():
		raise Refused(BAD_HEADER, "bad_header")
	value = value.strip()
	token = bearer_token(value) if value.split(" ", 1)[0].lower() == "bearer" else value
	if token is None or " " in token:
		raise Refused(BAD_HEADER, "bad_header")
	return token


def check_origin(environ: Mapping[str, Any], allowed: tuple[str, ...] | None) -> None:
	"""Browsers send ``Origin``; native apps do not, and pass."""
	origin = environ.get("HTTP_ORIGIN")
	if allowed is not None and origin and origin.rstrip("/") not in allowed:
		raise Refused(INVALID_ORIGIN, "invalid_origin")


class Authenticator:
	"""Verifies tokens in the configured mode and remembers successes briefly, so a
	reconnect storm does not become a storm of calls to Frappe."""

	def __init__(self, config: Config, frappe_api: FrappeAPI | None):
		self.config = config
		self.frappe_api = frappe_api
		self._cache: dict[tuple[str, str], tuple[Identity, float]] = {}

	def identify(self, namespace: str, environ: Mapping[str, Any], auth: Any) -> Identity:
		"""The whole pipeline for one handshake."""
		site = site_for(namespace, self.config)
		token = token_from(environ, auth)
		check_origin(environ, self.config.allowed_origins)
		return self.verify(site, token)

	def verify(self, site: str, token: str) -> Identity:
		"""The identity behind ``token`` on ``site``; also used by ``auth:refresh``."""
		now = time.time()
		cached = self._cache.get((site, token))
		if cached and cached[1] > now:
			return cached[0]
		started = time.perf_counter()
		try:
			identity = self._verify_jwt(site, token) if self.config.auth_mode == "jwt" else self._verify_frappe(site, token)
		finally:
			metrics.AUTH_SECONDS.labels(self.config.auth_mode).observe(time.perf_counter() - started)
		self._remember(identity, now)
		return identity

	def _verify_jwt(self, site: str, token: str) -> Identity:
		try:
			claims = verify_token(token, self.config.jwt_secret(site))
		except TokenError as exc:
			raise Refused(f"Unauthorized: {exc}", "unauthorized") from None
		return Identity(site, claims["user"], claims.get("user_type") or DEFAULT_USER_TYPE, (), float(claims["exp"]), token)

	def _verify_frappe(self, site: str, token: str) -> Identity:
		assert self.frappe_api is not None
		try:
			info = self.frappe_api.get_user_info(site, token)
		except FrappeError as exc:
			raise Refused(f"Unauthorized: {exc}", "unauthorized") from None
		apps = info.get("installed_apps")
		return Identity(
			site,
			info["user"],
			info.get("user_type") or DEFAULT_USER_TYPE,
			tuple(apps) if isinstance(apps, list) else (),
			unverified_exp(token) if looks_like_jwt(token) else None,
			token,
		)

	def _remember(self, identity: Identity, now: float) -> None:
		until = now + self.config.auth_cache_seconds
		if identity.exp is not None:
			until = min(until, identity.exp)
		if until <= now:
			return
		if len(self._cache) >= CACHE_SIZE:
			for key in [key for key, (_, valid) in self._cache.items() if valid <= now] or list(self._cache)[: CACHE_SIZE // 10]:
				del self._cache[key]
		self._cache[(identity.site, identity.token)] = (identity, until)
