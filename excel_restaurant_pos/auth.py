"""Bearer JWT authentication, shared by Frappe and the realtime server.

:func:`verify_token` is pure (no Frappe, no I/O): the realtime server's ``jwt`` mode and the
Frappe hook below both call it, so a token means the same thing everywhere.

:func:`validate` is the Frappe ``auth_hooks`` entry (see ``hooks.py``). Frappe calls it for
every request after its own checks (session cookie, OAuth bearer tokens, API keys); it turns
``Authorization: Bearer <jwt>`` into a logged-in user, so ``frappe.realtime.get_user_info``
and permission checks answer for that user.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt

ALGORITHM = "HS256"
#: Longer tokens are refused unread: a JWT of a few claims is a few hundred bytes.
MAX_TOKEN_LENGTH = 8192
#: The least privilege: what a token that does not say its user type gets.
DEFAULT_USER_TYPE = "Website User"


class TokenError(Exception):
	"""A token that must be refused; the message is the reason, safe to show the client."""


def bearer_token(header: str | None) -> str | None:
	"""The token of an ``Authorization: Bearer <token>`` header (scheme in any letter case).

	Returns ``None`` for anything else, including a bare ``Bearer``.
	"""
	if not header:
		return None
	scheme, _, token = header.strip().partition(" ")
	token = token.strip()
	if scheme.lower() != "bearer" or not token or " " in token:
		return None
	return token


def looks_like_jwt(token: str) -> bool:
	"""Three dot-separated parts: other bearer schemes (Frappe's OAuth tokens) are not."""
	return token.count(".") == 2


def token_fingerprint(token: str) -> str:
	"""A short, non-reversible name for a token, fit for logs."""
	return hashlib.sha256(token.encode()).hexdigest()[:12]


def token_hash(token: str) -> str:
	"""The SHA-256 hex digest a ``Token Blacklist`` entry is keyed by."""
	return hashlib.sha256(token.encode()).hexdigest()


def unverified_exp(token: str) -> float | None:
	"""The ``exp`` claim of a JWT without checking it, for scheduling expiry warnings."""
	try:
		exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
	except jwt.PyJWTError:
		return None
	return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def verify_token(token: str, secret: str | None, *, leeway: float = 0) -> dict[str, Any]:
	"""Check an HS256 access token and return its claims, with ``user`` always set.

	Rules: HS256 only (``none`` and every other algorithm refused, so an RS256 public key
	can never be used as an HMAC secret); ``exp`` required; ``iat`` and ``nbf`` not in the
	future; ``type`` must be ``access`` when present; the user comes from ``user`` or ``sub``.
	Raises :class:`TokenError` with the reason.
	"""
	if not secret:
		raise TokenError("no JWT secret is configured for this site")
	if not isinstance(token, str) or not token:
		raise TokenError("empty token")
	if len(token) > MAX_TOKEN_LENGTH:
		raise TokenError(f"token longer than {MAX_TOKEN_LENGTH} bytes")
	if not looks_like_jwt(token):
		raise TokenError("malformed token (not a JWT)")
	try:
		header = jwt.get_unverified_header(token)
	except jwt.PyJWTError:
		raise TokenError("malformed token header") from None
	algorithm = header.get("alg")
	if algorithm != ALGORITHM:
		raise TokenError(f"unsupported algorithm {algorithm!r} (only {ALGORITHM})")
	options = {"require": ["exp"], "verify_aud": False}
	try:
		claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options=options, leeway=leeway)
	except jwt.ExpiredSignatureError:
		raise TokenError("token expired") from None
	except jwt.ImmatureSignatureError:
		raise TokenError("token not yet valid") from None
	except jwt.MissingRequiredClaimError as exc:
		raise TokenError(f"token has no {exc.claim!r} claim") from None
	except jwt.InvalidSignatureError:
		raise TokenError("invalid signature") from None
	except jwt.PyJWTError as exc:
		raise TokenError(f"invalid token ({exc})") from None
	issued_at = claims.get("iat")
	if isinstance(issued_at, (int, float)) and issued_at > time.time() + max(leeway, 0):
		# PyJWT before 2.6 accepts a future iat; refuse it the same on every version
		raise TokenError("token not yet valid")
	token_type = claims.get("type")
	if token_type is not None and token_type != "access":
		raise TokenError(f"token type {token_type!r} is not an access token")
	user = claims.get("user") or claims.get("sub")
	if not isinstance(user, str) or not user:
		raise TokenError("token names no user")
	user_type = claims.get("user_type")
	if user_type is not None and not isinstance(user_type, str):
		raise TokenError("user_type claim must be a string")
	return {**claims, "user": user}


def make_token(user: str, secret: str, *, ttl: float = 3600, user_type: str | None = None, **claims: Any) -> str:
	"""Issue an access token: for development, tests and scripts that need one."""
	now = int(time.time())
	payload: dict[str, Any] = {"user": user, "iat": now, "exp": now + int(ttl), "type": "access", **claims}
	if user_type:
		payload["user_type"] = user_type
	return jwt.encode(payload, secret, algorithm=ALGORITHM)


def validate() -> None:
	"""Frappe ``auth_hooks`` entry: log in the user of a valid ``Bearer <jwt>`` header.

	Leaves alone requests Frappe already authenticated and other authorization schemes.
	Raises ``frappe.AuthenticationError`` with the reason for a JWT it refuses.
	"""
	import frappe

	if getattr(frappe.session, "user", None) not in (None, "", "Guest"):
		return
	token = bearer_token(frappe.get_request_header("Authorization"))
	if not token or not looks_like_jwt(token):
		return
	secret = frappe.conf.get("jwt_secret_key")
	if not secret:
		return
	try:
		claims = verify_token(token, secret)
		user = _active_user(frappe, claims["user"])
		_check_not_revoked(frappe, token, user.name, claims.get("iat"))
	except TokenError as exc:
		raise frappe.AuthenticationError(str(exc)) from None

	form_dict = frappe.local.form_dict
	frappe.set_user(user.name)
	frappe.local.form_dict = form_dict
	frappe.session.data.user_type = user.user_type


def _active_user(frappe: Any, name: str) -> Any:
	"""The User record (read from the database, never from the token)."""
	user = frappe.db.get_value("User", name, ["name", "enabled", "user_type"], as_dict=True)
	if not user:
		raise TokenError(f"unknown user {name!r}")
	if not user.enabled:
		raise TokenError(f"user {name!r} is disabled")
	return user


def _check_not_revoked(frappe: Any, token: str, user: str, issued_at: Any) -> None:
	"""Revocation as the original app kept it, where the site has it: a ``Token Blacklist``
	entry named by the token's SHA-256, or ``jwt_revoke_before:<user>`` in the cache."""
	if frappe.db.exists("DocType", "Token Blacklist") and frappe.db.exists("Token Blacklist", token_hash(token)):
		raise TokenError("token revoked")
	revoke_before = frappe.cache().get_value(f"jwt_revoke_before:{user}")
	if revoke_before is not None:
		try:
			revoked = float(issued_at or 0) < float(revoke_before)
		except (TypeError, ValueError):
			revoked = True
		if revoked:
			raise TokenError("token revoked")
