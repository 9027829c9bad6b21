"""The room policy and namespace mapping: pure functions, checked by example and by property.

The properties are the promises clients rely on: nothing a client sends as a room name or a
namespace raises, and a Website User never reaches ``all``, another user's room or a room the
site did not make public.
"""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from excel_restaurant_pos.realtime.rooms import (
	MAX_ROOM_LENGTH,
	auto_rooms,
	check_join,
	namespaces_of_site,
	site_of_namespace,
)

SITES = ("site1.local", "site2.local")
ROOM_ERROR = f"Room must be a non-empty string of at most {MAX_ROOM_LENGTH} characters"
USER_TYPES = ("System User", "Website User")

pytestmark = pytest.mark.filterwarnings("error")


def join(room: object, user_type: str = "Website User", *, user: str = "guest@example.com", public: tuple[str, ...] = (), frappe: bool = True):
	return check_join(user, user_type, room, public_rooms=public, can_ask_frappe=frappe)


# -- examples: Frappe's rooms ----------------------------------------------------------


@pytest.mark.parametrize("user_type", USER_TYPES)
def test_own_user_room_allowed(user_type):
	assert join("user:guest@example.com", user_type).allowed


@pytest.mark.parametrize("user_type", USER_TYPES)
@pytest.mark.parametrize("room", ["user:waiter@example.com", "user:", "user:guest@example.com ", "user:GUEST@example.com"])
def test_other_user_rooms_denied(user_type, room):
	decision = join(room, user_type)

	assert decision.verdict == "deny"
	assert decision.reason == "Cannot join another user's room"


def test_all_only_for_system_users():
	assert join("all", "System User").allowed
	decision = join("all", "Website User", public=("*",))
	assert decision.verdict == "deny"
	assert decision.reason == "Only System Users may join 'all'"


@pytest.mark.parametrize("user_type", [*USER_TYPES, "", "Anything"])
@pytest.mark.parametrize("room", ["website", "task_progress:abc123", "task_progress:"])
def test_open_frappe_rooms_allowed_for_anyone(user_type, room):
	assert join(room, user_type, frappe=False).allowed


@pytest.mark.parametrize(
	("room", "doctype", "docname"),
	[
		("doctype:POS Order", "POS Order", None),
		("doc:POS Order/ORD-001", "POS Order", "ORD-001"),
		("open_doc:ToDo/abc", "ToDo", "abc"),
		("doc:Item/Bag/Large", "Item", "Bag/Large"),
	],
)
@pytest.mark.parametrize("user_type", USER_TYPES)
def test_document_rooms_ask_frappe(room, doctype, docname, user_type):
	decision = join(room, user_type, public=("*",))

	assert decision.verdict == "ask_frappe"
	assert (decision.doctype, decision.docname) == (doctype, docname)
	assert not decision.allowed


@pytest.mark.parametrize("room", ["doctype:ToDo", "doc:ToDo/1", "open_doc:ToDo/1"])
def test_document_rooms_denied_without_frappe_even_for_system_users(room):
	decision = join(room, "System User", frappe=False)

	assert decision.verdict == "deny"
	assert decision.reason == "Document rooms need Frappe to check permissions (auth mode 'frappe')"


@pytest.mark.parametrize(
	("room", "reason"),
	[
		("doc:ToDo", "Room 'doc:ToDo' must name a document as doc:<doctype>/<name>"),
		("doc:ToDo/", "Room 'doc:ToDo/' must name a document as doc:<doctype>/<name>"),
		("open_doc:ToDo", "Room 'open_doc:ToDo' must name a document as open_doc:<doctype>/<name>"),
		("doc:/1", "Room 'doc:/1' names no doctype"),
		("doctype:", "Room 'doctype:' names no doctype"),
	],
)
def test_malformed_document_rooms_denied(room, reason):
	decision = join(room, "System User")

	assert decision.verdict == "deny"
	assert decision.reason == reason


# -- examples: the app's rooms ---------------------------------------------------------


def test_system_users_join_any_app_room():
	assert join("kitchen", "System User").allowed
	assert join("table:12", "System User").allowed


def test_website_users_only_join_public_rooms():
	public = ("menu", "table:*", "promo-??")

	assert join("menu", public=public).allowed
	assert join("table:12", public=public).allowed
	assert join("promo-01", public=public).allowed
	for room in ("kitchen", "Table:12", "menu2", "promo-001", "table"):
		decision = join(room, public=public)
		assert decision.verdict == "deny", room
		assert decision.reason == f"Not allowed to join room '{room}'"


def test_public_rooms_never_open_other_users_rooms_or_all():
	assert not join("user:waiter@example.com", public=("*", "user:*")).allowed
	assert not join("all", public=("all", "*")).allowed


@pytest.mark.parametrize("room", [None, 5, ["kitchen"], {"room": "kitchen"}, b"kitchen", "", "k" * (MAX_ROOM_LENGTH + 1)])
@pytest.mark.parametrize("user_type", USER_TYPES)
def test_not_a_room_name_is_denied_with_the_reason(room, user_type):
	decision = join(room, user_type, public=("*",))

	assert decision.verdict == "deny"
	assert decision.reason == ROOM_ERROR


def test_longest_room_name_allowed():
	assert join("k" * MAX_ROOM_LENGTH, "System User").allowed


def test_auto_rooms():
	assert auto_rooms("waiter@example.com", "System User") == ("user:waiter@example.com", "website", "all")
	assert auto_rooms("guest@example.com", "Website User") == ("user:guest@example.com", "website")


# -- examples: namespaces --------------------------------------------------------------


@pytest.mark.parametrize(
	("namespace", "default_site", "site"),
	[
		("/site1.local", None, "site1.local"),
		("/excel_restaurant_pos/site2.local", None, "site2.local"),
		("/excel_restaurant_pos/default", "site2.local", "site2.local"),
		("/excel_restaurant_pos/default", None, None),
		("/default", "site1.local", None),
		("/", "site1.local", None),
		("", "site1.local", None),
		("/excel_restaurant_pos/", "site1.local", None),
		("/excel_restaurant_pos", "site1.local", None),
		("/unknown.local", "site1.local", None),
		("/excel_restaurant_pos/site1.local/extra", None, None),
		("/site1.local/", None, None),
		("xsite1.local", None, None),
		("/SITE1.LOCAL", None, None),
	],
)
def test_site_of_namespace(namespace, default_site, site):
	assert site_of_namespace(namespace, SITES, default_site) == site


def test_standalone_default_namespace():
	assert site_of_namespace("/excel_restaurant_pos/default", ("default",), "default") == "default"
	assert site_of_namespace("/default", ("default",), "default") == "default"


def test_namespaces_of_site():
	assert namespaces_of_site("site1.local", None, frappe_events=True) == ("/site1.local", "/excel_restaurant_pos/site1.local")
	assert namespaces_of_site("site1.local", None, frappe_events=False) == ("/excel_restaurant_pos/site1.local",)
	assert namespaces_of_site("site1.local", "site1.local", frappe_events=True) == (
		"/site1.local",
		"/excel_restaurant_pos/site1.local",
		"/excel_restaurant_pos/default",
	)
	assert namespaces_of_site("site2.local", "site1.local", frappe_events=False) == ("/excel_restaurant_pos/site2.local",)
	assert namespaces_of_site("default", "default", frappe_events=False) == ("/excel_restaurant_pos/default",)


def test_site_named_default_never_reaches_the_default_sites_clients():
	"""A bench may have a site folder called ``default`` while another site is the default:
	the ``/excel_restaurant_pos/default`` clients belong to the other site."""
	sites = ("default", "site1.local")

	assert namespaces_of_site("default", "site1.local", frappe_events=True) == ("/default",)
	assert namespaces_of_site("default", "site1.local", frappe_events=False) == ()
	assert site_of_namespace("/default", sites, "site1.local") == "default"
	assert site_of_namespace("/excel_restaurant_pos/default", sites, "site1.local") == "site1.local"


# -- properties ------------------------------------------------------------------------

room_names = st.one_of(
	st.text(max_size=300),
	st.sampled_from(["all", "website", "user:", "doc:", "doctype:", "open_doc:", "task_progress:"]).flatmap(
		lambda prefix: st.text(max_size=40).map(lambda rest: prefix + rest)
	),
	st.integers(),
	st.none(),
	st.lists(st.text(max_size=5), max_size=2),
)
patterns = st.lists(st.text(max_size=12) | st.sampled_from(["*", "user:*", "all", "table:*", "?*"]), max_size=4).map(tuple)
users = st.text(min_size=1, max_size=30)
site_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(user=users, user_type=st.sampled_from([*USER_TYPES, "", "Guest"]), room=room_names, public=patterns, frappe=st.booleans())
def test_check_join_never_raises(user, user_type, room, public, frappe):
	decision = check_join(user, user_type, room, public_rooms=public, can_ask_frappe=frappe)

	assert decision.verdict in ("allow", "deny", "ask_frappe")
	if decision.verdict == "deny":
		assert decision.reason
	if decision.verdict == "ask_frappe":
		assert frappe and decision.doctype


@PROPERTY
@given(user=users, user_type=st.sampled_from(USER_TYPES), room=st.one_of(st.just(""), st.text(min_size=MAX_ROOM_LENGTH + 1, max_size=600)), public=patterns)
def test_empty_or_long_names_denied_with_the_reason(user, user_type, room, public):
	decision = check_join(user, user_type, room, public_rooms=public, can_ask_frappe=True)

	assert (decision.verdict, decision.reason) == ("deny", ROOM_ERROR)


@PROPERTY
@given(user=users, room=room_names, public=patterns, frappe=st.booleans())
def test_website_users_stay_out(user, room, public, frappe):
	decision = check_join(user, "Website User", room, public_rooms=public, can_ask_frappe=frappe)

	if not decision.allowed:
		return
	assert isinstance(room, str) and 0 < len(room) <= MAX_ROOM_LENGTH
	assert room != "all"
	if room.startswith("user:"):
		assert room == f"user:{user}"
	else:
		assert room == "website" or room.startswith("task_progress:") or any(fnmatch.fnmatchcase(room, pattern) for pattern in public)
	assert not room.startswith(("doc:", "doctype:", "open_doc:"))


@PROPERTY
@given(namespace=st.text(max_size=60), sites=st.lists(site_names, max_size=4).map(tuple), default_site=st.none() | site_names)
def test_site_of_namespace_never_raises_and_names_a_known_site(namespace, sites, default_site):
	site = site_of_namespace(namespace, sites, default_site if default_site in sites else None)

	assert site is None or site in sites
	if site is not None:
		assert namespace in ("/" + site, "/excel_restaurant_pos/" + site, "/excel_restaurant_pos/default")


@PROPERTY
@given(sites=st.lists(site_names.filter(lambda name: "/" not in name), min_size=1, max_size=4, unique=True), data=st.data())
def test_every_delivery_namespace_maps_back_to_its_own_site(sites, data):
	"""Tenant isolation: a client of a namespace an event is delivered to belongs to the
	event's site."""
	default_site = data.draw(st.none() | st.sampled_from(sites))
	site = data.draw(st.sampled_from(sites))
	frappe_events = data.draw(st.booleans())

	namespaces = namespaces_of_site(site, default_site, frappe_events=frappe_events)

	if frappe_events or site != "default" or default_site in (None, site):
		assert namespaces
	assert len(set(namespaces)) == len(namespaces)
	for namespace in namespaces:
		assert site_of_namespace(namespace, tuple(sites), default_site) == site
	if not frappe_events:
		assert all(namespace.startswith("/excel_restaurant_pos/") for namespace in namespaces)
