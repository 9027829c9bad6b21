"""A minimal stand-in for the ``frappe`` module, for code that runs inside a Frappe site.

It provides only what ``excel_restaurant_pos.auth.validate`` and
``excel_restaurant_pos.realtime.utils.publish_event`` call, behaving as Frappe v15 does:

* ``frappe.session.user`` and ``frappe.session.data`` (an attribute dict, ``user_type``);
* ``frappe.local.site`` and ``frappe.local.form_dict``;
* ``frappe.conf.get(key)`` (``jwt_secret_key``, ``redis_queue``);
* ``frappe.get_request_header(name, default=None)``, case-insensitive like werkzeug's headers;
* ``frappe.db.get_value("User", name, fields, as_dict=True)``: an attribute dict or ``None``
  (names match case-insensitively, as MariaDB does, and come back as stored);
* ``frappe.db.exists(doctype, name)``: ``"DocType"`` answers from the installed doctypes; any
  other doctype must be installed, else it raises as a missing table does;
* ``frappe.cache().get_value(key)``;
* ``frappe.set_user(user)``, which like v15 also empties ``frappe.local.form_dict`` and
  replaces ``frappe.session.data`` with an empty attribute dict;
* ``frappe.AuthenticationError``;
* ``frappe.db.after_commit.add(callback)``; a test calls ``run()`` to commit or ``reset()``
  to roll back;
* ``frappe.log_error(title=..., message=...)``.

Use :func:`installed` to put it in ``sys.modules`` for the length of a test.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any


class _dict(dict):  # noqa: N801 -- Frappe's own name for it
	"""Frappe's attribute dict: ``d.key`` reads ``d["key"]`` (``None`` when absent)."""

	def __getattr__(self, key: str) -> Any:
		return self.get(key)

	def __setattr__(self, key: str, value: Any) -> None:
		self[key] = value


class AuthenticationError(Exception):
	"""Frappe answers it with HTTP 401."""


class TableMissingError(Exception):
	"""What a query on a doctype that is not installed raises."""


class CallbackManager:
	"""``frappe.db.after_commit``: callbacks run on commit, dropped on rollback."""

	def __init__(self) -> None:
		self.callbacks: list[Callable[[], Any]] = []

	def add(self, callback: Callable[[], Any]) -> None:
		self.callbacks.append(callback)

	def run(self) -> list[Any]:
		"""Commit: run each callback once, in order."""
		callbacks, self.callbacks = self.callbacks, []
		return [callback() for callback in callbacks]

	def reset(self) -> None:
		"""Roll back: forget the callbacks."""
		self.callbacks = []


class Database:
	"""The few ``frappe.db`` calls used, over in-memory records."""

	def __init__(self) -> None:
		self.users: dict[str, dict[str, Any]] = {}
		self.doctypes: set[str] = {"DocType", "User"}
		#: Names of existing documents by doctype.
		self.documents: dict[str, set[str]] = {}
		self.after_commit = CallbackManager()
		self.queries: list[tuple[str, str]] = []

	def add_user(self, name: str, *, enabled: int = 1, user_type: str = "System User") -> None:
		self.users[name] = {"name": name, "enabled": enabled, "user_type": user_type}

	def get_value(self, doctype: str, name: str, fields: list[str] | str, as_dict: bool = False) -> Any:
		self.queries.append((doctype, name))
		if doctype != "User":
			raise NotImplementedError(f"the stand-in only reads User, not {doctype}")
		record = next((user for key, user in self.users.items() if key.lower() == str(name).lower()), None)
		if record is None:
			return None
		fields = [fields] if isinstance(fields, str) else fields
		values = _dict({field: record.get(field) for field in fields})
		return values if as_dict else tuple(values.values())

	def exists(self, doctype: str, name: str) -> str | None:
		self.queries.append((doctype, name))
		if doctype == "DocType":
			return name if name in self.doctypes else None
		if doctype not in self.doctypes:
			raise TableMissingError(f"Table 'tab{doctype}' doesn't exist")
		return name if name in self.documents.get(doctype, set()) else None


class Cache:
	"""``frappe.cache()``: the key-value part."""

	def __init__(self) -> None:
		self.values: dict[str, Any] = {}

	def get_value(self, key: str) -> Any:
		return self.values.get(key)


def make_frappe(site: str | None = "site1.local") -> types.ModuleType:
	"""A fresh stand-in ``frappe`` module for a request on ``site`` (``None``: no site)."""
	frappe = types.ModuleType("frappe")
	frappe.__doc__ = "Test stand-in for the parts of Frappe the app calls."
	frappe._dict = _dict
	frappe.AuthenticationError = AuthenticationError
	frappe.session = _dict(user="Guest", sid="Guest", data=_dict())
	frappe.local = types.SimpleNamespace(site=site, form_dict=_dict())
	frappe.conf = _dict()
	frappe.request_headers = {}
	frappe.db = Database()
	frappe.cache_store = Cache()
	frappe.set_user_calls = []
	frappe.errors_logged = []

	def get_request_header(key: str, default: Any = None) -> Any:
		wanted = key.lower()
		return next((value for name, value in frappe.request_headers.items() if name.lower() == wanted), default)

	def set_user(username: str) -> None:
		frappe.set_user_calls.append(username)
		frappe.session.user = username
		frappe.session.sid = username
		frappe.local.form_dict = _dict()
		frappe.session.data = _dict()

	def cache() -> Cache:
		return frappe.cache_store

	def log_error(title: str | None = None, message: str | None = None, **kwargs: Any) -> None:
		frappe.errors_logged.append({"title": title, "message": message, **kwargs})

	frappe.get_request_header = get_request_header
	frappe.set_user = set_user
	frappe.cache = cache
	frappe.log_error = log_error
	return frappe


@contextlib.contextmanager
def installed(site: str | None = "site1.local") -> Iterator[types.ModuleType]:
	"""``import frappe`` gives the stand-in inside the block; whatever was there before
	(usually nothing) is put back afterwards."""
	frappe = make_frappe(site)
	previous = sys.modules.get("frappe")
	sys.modules["frappe"] = frappe
	try:
		yield frappe
	finally:
		if previous is None:
			sys.modules.pop("frappe", None)
		else:
			sys.modules["frappe"] = previous
