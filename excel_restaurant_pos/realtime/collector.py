"""Python's cyclic garbage collector, run on a clock rather than on allocation counts.

Reference counting frees almost everything the server allocates: a poll, a delivery, a
client that leaves. The cyclic collector is for the rest (an exception kept with its
traceback, a websocket in a cycle with its handler), which is a few hundred objects a
minute under reconnect churn. Python runs it on allocation counts: a young collection
every 700 (2,000 from Python 3.12) more objects alive than freed, an older one every ten of
those, a full one every ten older ones. Under long-polling, each request allocates objects
that live until its answer, so the counts are reached dozens of times a second; the older
collections walk every poll under way and every client's objects, and the collector took
a tenth of the CPU of a long-polling client's deliveries and made their latency tail.

Here the young and middle generations are collected once a second. The whole heap is
collected when it has grown by :data:`FULL_GROWTH` since the last full collection (Python's
own rule, on the count of memory blocks Python has allocated, so a heap that only churns
does not count as growing) and at least every :data:`FULL_MAX` seconds, never sooner than
:data:`FULL_EVERY` seconds after the last, and further apart when one is slow (at most
:data:`FULL_SHARE` of the time). A full collection walks every client's objects, 50 ms with
1,000 websocket clients and 0.4 s with 10,000 on the documented machine, while no client
is answered: on a clock every 10 s, that pause came whatever happened. Allocation counts
still start a collection, at :data:`YOUNG_LIMIT`, for a burst that allocates faster than
the clock collects. Garbage in a cycle is freed within a second, or, when it was allocated
long before (a client's objects, were they left in a cycle when the client leaves), once
such garbage has grown the heap by a quarter, or within :data:`FULL_MAX`.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

#: Seconds between collections of the young and middle generations.
INTERVAL = 1.0

#: Seconds, at the least, between full collections.
FULL_EVERY = 10.0

#: Growth of the heap since the last full collection (or since its smallest size after
#: it, when it shrank) at which the next is due.
FULL_GROWTH = 0.25

#: Seconds, at the most, between full collections: for cycles holding large buffers, which
#: grow the heap by few blocks.
FULL_MAX = 600.0

#: The share of the time full collections may take, which spaces slow ones further apart.
FULL_SHARE = 0.01

#: Objects alive beyond those freed at which Python itself starts a young collection.
YOUNG_LIMIT = 100_000


def freeze_start_up_heap() -> None:
	"""Take what start-up built (modules, classes, the server itself: some 65,000 objects,
	all kept for the process's life) out of the cyclic collector's full collections, so
	they walk only what clients and requests allocate: walking them too was a pause of 50
	to 70 ms in which no client is answered. Garbage still around at start-up is collected
	first, so none of it is kept for good."""
	gc.collect()
	gc.freeze()


class Collector:
	"""Collects on a clock (see the module's docstring); :meth:`run` in a green thread.
	``heap`` is the heap's size (the memory blocks Python has allocated)."""

	def __init__(self, sleep: Callable[[float], None], clock: Callable[[], float] = time.monotonic, heap: Callable[[], int] = sys.getallocatedblocks):
		self.sleep = sleep
		self.clock = clock
		self.heap = heap
		self.last_full = clock()
		self.next_full = self.last_full + FULL_EVERY
		#: The heap's size after the last full collection, or its smallest since.
		self.base = heap()

	def run(self) -> None:
		"""Hand the collector's schedule to the clock, for the process's life."""
		gc.set_threshold(YOUNG_LIMIT, *gc.get_threshold()[1:])
		while True:
			self.sleep(INTERVAL)
			self.collect()

	def collect(self) -> None:
		"""One tick: the young and middle generations, and the whole heap when it is due."""
		now, size = self.clock(), self.heap()
		self.base = min(self.base, size)
		grown = size >= self.base * (1 + FULL_GROWTH)
		if now < self.next_full or not (grown or now >= self.last_full + FULL_MAX):
			gc.collect(1)
			return
		gc.collect(2)
		took = self.clock() - now
		self.base, self.last_full = self.heap(), now
		self.next_full = now + took + max(FULL_EVERY, took / FULL_SHARE)
