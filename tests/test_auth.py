"""``verify_token`` and ``bearer_token``: the pure half of authentication, without Frappe.

Every refusal is checked by its reason, because that text is what a client sees after
``Unauthorized:``. Tokens the library would refuse to build (``alg: none``, foreign
algorithms) are put together by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from excel_restaurant_pos.auth import (
	MAX_TOKEN_LENGTH,
	TokenError,
	bearer_token,
	looks_like_jwt,
	make_token,
	token_hash,
	unverified_exp,
	verify_token,
)

SECRET = "site-one-secret-0123456789abcdef0123"
OTHER = "site-two-secret-0123456789abcdef0123"


def b64(data: bytes) -> str:
	return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
	return b64(json.dumps(value, separators=(",", ":")).encode())


def craft(header: dict[str, Any], payload: dict[str, Any], key: str | None = None, digest: Any = hashlib.sha256) -> str:
	"""A token with exactly the header given, HMAC-signed with ``key`` (unsigned without)."""
	signing_input = f"{b64json(header)}.{b64json(payload)}"
	signature = b64(hmac.new(key.encode(), signing_input.encode(), digest).digest()) if key else ""
	return f"{signing_input}.{signature}"


def claims(**extra: Any) -> dict[str, Any]:
	now = int(time.time())
	return {"user": "waiter@example.com", "iat": now, "exp": now + 600, **extra}


def hs256(payload: dict[str, Any], key: str = SECRET) -> str:
	return jwt.encode(payload, key, algorithm="HS256")


def refused(token: Any, secret: str | None = SECRET) -> str:
	with pytest.raises(TokenError) as error:
		verify_token(token, secret)
	return str(error.value)


# -- accepted --------------------------------------------------------------------------


def test_good_token_returns_its_claims():
	payload = claims(user_type="System User", type="access")

	result = verify_token(hs256(payload), SECRET)

	assert result["user"] == "waiter@example.com"
	assert result["user_type"] == "System User"
	assert result["exp"] == payload["exp"]


def test_sub_names_the_user_when_user_is_absent():
	payload = claims()
	del payload["user"]
	payload["sub"] = "cook@example.com"

	assert verify_token(hs256(payload), SECRET)["user"] == "cook@example.com"


def test_user_claim_wins_over_sub():
	assert verify_token(hs256(claims(sub="other@example.com")), SECRET)["user"] == "waiter@example.com"


def test_token_without_type_or_iat_is_accepted():
	token = hs256({"user": "waiter@example.com", "exp": int(time.time()) + 60})

	assert verify_token(token, SECRET)["user"] == "waiter@example.com"


def test_make_token_round_trips():
	token = make_token("waiter@example.com", SECRET, ttl=60, user_type="System User", role="waiter")

	result = verify_token(token, SECRET)

	assert result["user"] == "waiter@example.com"
	assert result["type"] == "access"
	assert result["user_type"] == "System User"
	assert result["role"] == "waiter"
	assert unverified_exp(token) == result["exp"]


def test_leeway_accepts_a_just_expired_token():
	token = hs256(claims(exp=int(time.time()) - 5))

	assert verify_token(token, SECRET, leeway=30)["user"] == "waiter@example.com"


# -- refused: time ---------------------------------------------------------------------


def test_expired():
	assert refused(hs256(claims(iat=int(time.time()) - 120, exp=int(time.time()) - 60))) == "token expired"


def test_not_before_in_the_future():
	assert refused(hs256(claims(nbf=int(time.time()) + 300))) == "token not yet valid"


def test_issued_in_the_future():
	assert refused(hs256(claims(iat=int(time.time()) + 300))) == "token not yet valid"


def test_missing_exp():
	payload = claims()
	del payload["exp"]

	assert refused(hs256(payload)) == "token has no 'exp' claim"


def test_exp_that_is_not_a_number():
	assert refused(hs256(claims(exp="tomorrow"))).startswith("invalid token (")


# -- refused: signature and algorithm --------------------------------------------------


def test_tampered_payload_has_a_bad_signature():
	header, _, signature = hs256(claims()).split(".")
	forged = f"{header}.{b64json(claims(user='Administrator'))}.{signature}"

	assert refused(forged) == "invalid signature"


def test_token_of_another_secret():
	assert refused(hs256(claims(), OTHER)) == "invalid signature"


def test_token_of_another_site_is_refused_by_this_sites_secret():
	token = hs256(claims())

	assert verify_token(token, SECRET)["user"] == "waiter@example.com"
	assert refused(token, OTHER) == "invalid signature"


def test_alg_none_unsigned():
	token = craft({"alg": "none", "typ": "JWT"}, claims())

	assert refused(token) == "unsupported algorithm 'none' (only HS256)"


def test_alg_none_with_a_valid_hmac_signature_still_refused():
	token = craft({"alg": "none"}, claims(), key=SECRET)

	assert refused(token) == "unsupported algorithm 'none' (only HS256)"


def test_hs512_refused_even_with_the_right_secret():
	token = craft({"alg": "HS512", "typ": "JWT"}, claims(), key=SECRET, digest=hashlib.sha512)

	assert refused(token) == "unsupported algorithm 'HS512' (only HS256)"


def test_rs256_header_refused():
	token = f"{b64json({'alg': 'RS256', 'typ': 'JWT'})}.{b64json(claims())}.{b64(b'not-really-an-rsa-signature' * 8)}"

	assert refused(token) == "unsupported algorithm 'RS256' (only HS256)"


def test_hs_rs_confusion_header_cannot_choose_the_algorithm():
	"""The classic confusion: an RS256-labelled token whose signature is an HMAC made with
	the key the server holds. The header never picks how the key is used."""
	token = craft({"alg": "RS256", "typ": "JWT"}, claims(), key=SECRET)

	assert refused(token) == "unsupported algorithm 'RS256' (only HS256)"


def test_missing_alg():
	token = craft({"typ": "JWT"}, claims(), key=SECRET)

	assert refused(token) == "unsupported algorithm None (only HS256)"


def test_lowercase_alg_refused():
	token = craft({"alg": "hs256"}, claims(), key=SECRET)

	assert refused(token) == "unsupported algorithm 'hs256' (only HS256)"


# -- refused: claims -------------------------------------------------------------------


def test_refresh_token_refused():
	assert refused(hs256(claims(type="refresh"))) == "token type 'refresh' is not an access token"


def test_access_type_accepted():
	assert verify_token(hs256(claims(type="access")), SECRET)["type"] == "access"


@pytest.mark.parametrize("user_claims", [{}, {"user": ""}, {"user": None}, {"user": 42}, {"user": ["a"]}, {"user": "", "sub": ""}])
def test_no_usable_user_refused(user_claims):
	payload = {"iat": int(time.time()), "exp": int(time.time()) + 60, **user_claims}

	assert refused(hs256(payload)) == "token names no user"


@pytest.mark.parametrize("user_type", [1, ["System User"], {"type": "System User"}, True])
def test_non_string_user_type_refused(user_type):
	assert refused(hs256(claims(user_type=user_type))) == "user_type claim must be a string"


# -- refused: not a token --------------------------------------------------------------


@pytest.mark.parametrize(
	("token", "reason"),
	[
		("", "empty token"),
		(None, "empty token"),
		(b"a.b.c", "empty token"),
		("abc", "malformed token (not a JWT)"),
		("a.b", "malformed token (not a JWT)"),
		("a.b.c.d", "malformed token (not a JWT)"),
		("a.b.c", "malformed token header"),
		("..", "malformed token header"),
		(f"{b64(b'[1]')}.{b64json({})}.x", "malformed token header"),
		("x" * (MAX_TOKEN_LENGTH + 1), f"token longer than {MAX_TOKEN_LENGTH} bytes"),
	],
)
def test_garbage_refused(token, reason):
	assert refused(token) == reason


def test_very_long_but_otherwise_valid_token_refused_unread():
	token = hs256(claims(padding="p" * MAX_TOKEN_LENGTH))

	assert refused(token) == f"token longer than {MAX_TOKEN_LENGTH} bytes"


def test_payload_that_is_not_json():
	signing_input = f"{b64json({'alg': 'HS256'})}.{b64(b'not json')}"
	token = f"{signing_input}.{b64(hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest())}"

	assert refused(token).startswith("invalid token (")


@pytest.mark.parametrize("secret", [None, ""])
def test_no_secret_refuses_every_token(secret):
	assert refused(hs256(claims()), secret) == "no JWT secret is configured for this site"


# -- helpers ---------------------------------------------------------------------------


def test_unverified_exp_of_junk_is_none():
	assert unverified_exp("abc") is None
	assert unverified_exp(hs256({"user": "u"})) is None
	assert unverified_exp(hs256({"user": "u", "exp": True})) is None


def test_token_hash_is_sha256_hex():
	assert token_hash("a.b.c") == hashlib.sha256(b"a.b.c").hexdigest()


def test_looks_like_jwt():
	assert looks_like_jwt(hs256(claims()))
	assert not looks_like_jwt("3f8a9c2d1e0b")  # an OAuth bearer token


# -- bearer_token ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_in_any_case(scheme):
	assert bearer_token(f"{scheme} abc.def.ghi") == "abc.def.ghi"


@pytest.mark.parametrize("header", ["  Bearer abc  ", "Bearer    abc", "Bearer abc\n"])
def test_bearer_with_extra_spaces(header):
	assert bearer_token(header) == "abc"


@pytest.mark.parametrize(
	"header",
	[
		None,
		"",
		"   ",
		"Bearer",
		"Bearer ",
		"bearer    ",
		"Bearer a b",
		"Basic dXNlcjpwYXNz",
		"token api_key:api_secret",
		"Bearerabc",
		"abc.def.ghi",
		"Digest x",
	],
)
def test_not_a_bearer_token(header):
	assert bearer_token(header) is None
