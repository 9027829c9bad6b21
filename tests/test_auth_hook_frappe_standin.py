"""``excel_restaurant_pos.auth.validate``, the Frappe ``auth_hooks`` entry, against the
``frappe`` stand-in of ``fake_frappe.py`` (which lists the Frappe calls the hook relies on).

What a user of the site sees: a request with a good ``Bearer <jwt>`` runs as the token's user,
with the request's arguments intact and the user type of the User record; a refused token
is an ``AuthenticationError`` (HTTP 401) with the reason; anything else is left to Frappe.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import jwt
import pytest
from fake_frappe import installed

from excel_restaurant_pos.auth import make_token, validate

SECRET = "site-one-secret-0123456789abcdef0123"


@pytest.fixture
def frappe():
	"""A request on site1.local with a JWT secret, two users and arguments in form_dict."""
	with installed("site1.local") as module:
		module.conf["jwt_secret_key"] = SECRET
		module.db.add_user("waiter@example.com", user_type="System User")
		module.db.add_user("guest@example.com", user_type="Website User")
		module.db.add_user("gone@example.com", enabled=0)
		module.local.form_dict = module._dict(doctype="POS Order", name="ORD-001")
		yield module


def token_for(user: str = "waiter@example.com", **claims: Any) -> str:
	now = int(time.time())
	payload = {"user": user, "iat": now, "exp": now + 600, "type": "access", **claims}
	return jwt.encode(payload, SECRET, algorithm="HS256")


def authorize(frappe, value: str) -> None:
	frappe.request_headers["Authorization"] = value


def assert_untouched(frappe) -> None:
	assert frappe.set_user_calls == []
	assert frappe.session.user == "Guest"
	assert frappe.local.form_dict == {"doctype": "POS Order", "name": "ORD-001"}


def refusal(frappe) -> str:
	with pytest.raises(frappe.AuthenticationError) as error:
		validate()
	assert_untouched(frappe)
	return str(error.value)


# -- left to Frappe --------------------------------------------------------------------


def test_request_frappe_already_authenticated_is_left_alone(frappe):
	frappe.session.user = "Administrator"
	frappe.session.data = frappe._dict(user_type="System User")
	authorize(frappe, f"Bearer {token_for('guest@example.com')}")

	validate()

	assert frappe.set_user_calls == []
	assert frappe.session.user == "Administrator"
	assert frappe.session.data.user_type == "System User"
	assert frappe.db.queries == []


@pytest.mark.parametrize(
	"header",
	[None, "", "Basic d2FpdGVyOnNlY3JldA==", "token 0123abcd:4567efgh", "Bearer 0c7f9a1b2d3e4f5a6b7c8d9e", "Bearer", "Bearer a b.c.d"],
)
def test_other_schemes_and_opaque_tokens_are_left_alone(frappe, header):
	if header is not None:
		authorize(frappe, header)

	validate()

	assert_untouched(frappe)
	assert frappe.db.queries == []


def test_site_without_jwt_secret_is_left_alone(frappe):
	del frappe.conf["jwt_secret_key"]
	authorize(frappe, f"Bearer {token_for()}")

	validate()

	assert_untouched(frappe)


# -- accepted --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_valid_token_logs_the_user_in(frappe, scheme):
	authorize(frappe, f"{scheme} {token_for()}")

	validate()

	assert frappe.set_user_calls == ["waiter@example.com"]
	assert frappe.session.user == "waiter@example.com"
	assert frappe.session.data.user_type == "System User"


def test_request_arguments_survive_set_user(frappe):
	"""v15's set_user empties form_dict: without care the request would lose its arguments."""
	authorize(frappe, f"Bearer {token_for()}")

	validate()

	assert frappe.local.form_dict == {"doctype": "POS Order", "name": "ORD-001"}


def test_user_type_comes_from_the_user_record_not_the_token(frappe):
	authorize(frappe, f"Bearer {token_for('guest@example.com', user_type='System User')}")

	validate()

	assert frappe.session.user == "guest@example.com"
	assert frappe.session.data.user_type == "Website User"


def test_user_name_as_stored_in_the_database(frappe):
	authorize(frappe, f"Bearer {token_for('Waiter@Example.COM')}")

	validate()

	assert frappe.set_user_calls == ["waiter@example.com"]


def test_sub_claim_names_the_user(frappe):
	now = int(time.time())
	authorize(frappe, "Bearer " + jwt.encode({"sub": "waiter@example.com", "exp": now + 60}, SECRET, algorithm="HS256"))

	validate()

	assert frappe.session.user == "waiter@example.com"


def test_token_from_make_token_is_accepted(frappe):
	authorize(frappe, f"Bearer {make_token('waiter@example.com', SECRET)}")

	validate()

	assert frappe.session.user == "waiter@example.com"


# -- refused ---------------------------------------------------------------------------


def test_unknown_user_refused(frappe):
	authorize(frappe, f"Bearer {token_for('nobody@example.com')}")

	assert refusal(frappe) == "unknown user 'nobody@example.com'"


def test_disabled_user_refused(frappe):
	authorize(frappe, f"Bearer {token_for('gone@example.com')}")

	assert refusal(frappe) == "user 'gone@example.com' is disabled"


def test_expired_token_refused(frappe):
	now = int(time.time())
	authorize(frappe, f"Bearer {token_for(iat=now - 120, exp=now - 60)}")

	assert refusal(frappe) == "token expired"


def test_bad_signature_refused(frappe):
	authorize(
		frappe, "Bearer " + jwt.encode({"user": "waiter@example.com", "exp": int(time.time()) + 60}, "another-secret-0123456789abcdef0123", algorithm="HS256")
	)

	assert refusal(frappe) == "invalid signature"


def test_refresh_token_refused(frappe):
	authorize(frappe, f"Bearer {token_for(type='refresh')}")

	assert refusal(frappe) == "token type 'refresh' is not an access token"


def test_malformed_jwt_refused(frappe):
	authorize(frappe, "Bearer a.b.c")

	assert refusal(frappe) == "malformed token header"


# -- revocation ------------------------------------------------------------------------


def test_token_blacklist_entry_revokes_the_token(frappe):
	token = token_for()
	frappe.db.doctypes.add("Token Blacklist")
	frappe.db.documents["Token Blacklist"] = {hashlib.sha256(token.encode()).hexdigest()}
	authorize(frappe, f"Bearer {token}")

	assert refusal(frappe) == "token revoked"


def test_token_blacklist_with_other_entries_accepts(frappe):
	frappe.db.doctypes.add("Token Blacklist")
	frappe.db.documents["Token Blacklist"] = {hashlib.sha256(b"another token").hexdigest()}
	authorize(frappe, f"Bearer {token_for()}")

	validate()

	assert frappe.session.user == "waiter@example.com"


def test_site_without_token_blacklist_doctype_is_not_queried_for_it(frappe):
	"""The stand-in raises like a missing table if the hook asked anyway."""
	authorize(frappe, f"Bearer {token_for()}")

	validate()

	assert frappe.session.user == "waiter@example.com"
	assert ("DocType", "Token Blacklist") in frappe.db.queries


def test_token_issued_before_revoke_before_is_refused(frappe):
	now = int(time.time())
	frappe.cache_store.values["jwt_revoke_before:waiter@example.com"] = now - 10
	authorize(frappe, f"Bearer {token_for(iat=now - 60)}")

	assert refusal(frappe) == "token revoked"


def test_token_issued_after_revoke_before_is_accepted(frappe):
	now = int(time.time())
	frappe.cache_store.values["jwt_revoke_before:waiter@example.com"] = str(now - 60)
	authorize(frappe, f"Bearer {token_for(iat=now - 10)}")

	validate()

	assert frappe.session.user == "waiter@example.com"


def test_revoke_before_of_another_user_does_not_apply(frappe):
	now = int(time.time())
	frappe.cache_store.values["jwt_revoke_before:guest@example.com"] = now + 100
	authorize(frappe, f"Bearer {token_for(iat=now - 10)}")

	validate()

	assert frappe.session.user == "waiter@example.com"


def test_token_without_iat_is_revoked_by_revoke_before(frappe):
	frappe.cache_store.values["jwt_revoke_before:waiter@example.com"] = int(time.time()) - 3600
	authorize(frappe, "Bearer " + jwt.encode({"user": "waiter@example.com", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"))

	assert refusal(frappe) == "token revoked"


def test_stand_in_is_only_importable_inside_the_block():
	import sys

	with installed() as module:
		assert sys.modules["frappe"] is module
	assert "frappe" not in sys.modules
