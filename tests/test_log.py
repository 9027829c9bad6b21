"""The event log's entries and offsets, and where a recovered session's replay starts, as
pure functions: what the end-to-end recovery tests rely on, checked over many cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from excel_restaurant_pos.realtime import log
from excel_restaurant_pos.realtime.log import Delivery
from excel_restaurant_pos.realtime.recovery import Recovery, Session


def test_offsets_sort_as_redis_sorts_them_not_as_strings():
	assert log.offset_key("10-0") > log.offset_key("9-5")
	assert log.offset_key("9-10") > log.offset_key("9-9")
	assert log.later("9-5", "10-0") == "10-0"
	assert log.later(None, "1-0") == "1-0" and log.later("1-0", None) == "1-0"


@pytest.mark.parametrize("value", ["1700000000000-0", "0-1"])
def test_what_counts_as_an_offset(value):
	assert log.is_offset(value)


@pytest.mark.parametrize("value", [None, "", "abc", "1-", "-1", "1-2-3", 17, "1 -2", "9" * 21 + "-0", ["1-0"]])
def test_what_a_client_cannot_pass_off_as_an_offset(value):
	assert not log.is_offset(value)


def test_an_entry_round_trips():
	delivery = Delivery("site1.local", "site", "kitchen", "order:updated", {"order_id": "ORD-1"}, skip="sid1")
	fields = {name.encode(): value.encode() for name, value in delivery.fields().items()}
	assert log.decode("site1.local", b"5-1", fields) == Delivery("site1.local", "site", "kitchen", "order:updated", {"order_id": "ORD-1"}, "5-1", "sid1")


@pytest.mark.parametrize(
	("fields", "reason"),
	[
		({"scope": "app", "message": "1"}, "no event name"),
		({"event": "e", "scope": "galaxy", "message": "1"}, "unknown scope 'galaxy'"),
		({"event": "e", "scope": "app", "message": "{nope"}, "message is not JSON"),
		({b"event": b"\xff", "scope": "app"}, "not UTF-8"),
	],
)
def test_a_malformed_entry_is_refused_with_its_reason(fields, reason):
	with pytest.raises(ValueError, match=reason):
		log.decode("s", "1-0", fields)


@st.composite
def histories(draw):
	"""A log of entries 1..n, the ones meant for a session, and what happened to it: created
	at ``c``, sent what was meant for it up to the reader's position ``p``, of which the
	client received the first ``k`` before its transport dropped."""
	n = draw(st.integers(1, 40))
	meant = [draw(st.booleans()) for _ in range(n)]
	c = draw(st.integers(0, n))
	p = draw(st.integers(c, n))
	sent = [i for i in range(c + 1, p + 1) if meant[i - 1]]
	k = draw(st.integers(0, len(sent)))
	received = sent[:k]
	reported = draw(st.none() | st.sampled_from(received)) if received else None
	return n, meant, c, p, sent, received, reported


def offset(i: int) -> str:
	return f"{i}-0"


@given(histories())
def test_a_replay_completes_what_the_client_received_exactly_once(history):
	n, meant, c, p, sent, received, reported = history
	stored = Session(
		"pid", "s", "u", "/ns", set(), created=offset(c), reported=offset(reported) if reported else None,
		last_sent=offset(sent[-1]) if sent else None, position=offset(p),
	)
	start = log.offset_key(Recovery._replay_start(stored, offset(received[-1]) if received else None))
	replayed = [i for i in range(1, n + 1) if meant[i - 1] and log.offset_key(offset(i)) > start]
	assert received + replayed == [i for i in range(c + 1, n + 1) if meant[i - 1]]


@given(histories(), st.integers(0, 40))
def test_a_stale_offset_never_replays_what_the_client_reported_having(history, stale):
	n, meant, c, p, sent, received, reported = history
	if reported is None:
		return
	stored = Session("pid", "s", "u", "/ns", set(), created=offset(c), reported=offset(reported), last_sent=offset(sent[-1]), position=offset(p))
	start = Recovery._replay_start(stored, offset(min(stale, reported)))
	assert log.offset_key(start) >= log.offset_key(offset(reported))
