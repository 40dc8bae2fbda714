"""The memory budget: bytes that requests may hold at once, counted where they are held.

Counting images is not enough to bound memory: a 100-megapixel PNG compresses to a few hundred KB
and decodes to gigabytes, and a 12 MP photo holds ~4 MB encoded while a thumbnail holds 40 KB. So
the service accounts for bytes (`CLIPLENS_MEMORY_BUDGET_BYTES`):

- a request's body, from admission to its response (bodies together may hold at most half the
  budget: past that a request is refused with 429 before its body is read),
- each image's encoded bytes, from the end of its load to the end of its decode,
- each image's decoded pixels, predicted from the header before any pixel is allocated, from
  the start of its decode to the end of its preprocess,
- each model-sized tensor, from the end of its preprocess to the end of its forward pass.

Work that would pass the budget waits (first come, first served), inside the request's deadline.
Two things keep that wait from becoming a deadlock: a download starts only while the budget has
room, and a decode is always granted when no other decode is holding memory, so at least one image
moves at all times. The budget can therefore be passed by the downloads already in progress and by
that one decode; a single image whose decode alone would pass the whole budget is `too_large`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from cliplens.vocabulary import ErrorCode, ItemError


@dataclass(eq=False, slots=True)
class _Waiter:
    nbytes: int
    progress: bool
    granted: asyncio.Future[None]


class MemoryBudget:
    """Bytes held by the pipeline, bounded by `limit`; see the module docstring."""

    def __init__(self, limit: int, on_change: Callable[[int], None] = lambda used: None) -> None:
        self.limit = limit
        self.used = 0
        self.decoding = 0
        """Decodes holding memory now (the progress guarantee grants one when this is 0)."""
        self._decodes: deque[_Waiter] = deque()
        self._downloads: deque[_Waiter] = deque()
        """Two queues, decodes served first: a download waiting for room must never hold up the
        decode that would make the room (that order is what keeps the wait free of deadlock)."""
        self._on_change = on_change

    def take(self, nbytes: int) -> None:
        """Count bytes that already exist (a body read, a download finished): no waiting."""
        self.used += nbytes
        self._on_change(self.used)

    def give(self, nbytes: int) -> None:
        """Bytes no longer held; waiting work may go on."""
        self.used -= nbytes
        self._on_change(self.used)
        self._grant()

    async def room(self) -> None:
        """Wait (first come, first served) until the budget is not full, without holding anything."""
        await self._wait(0, progress=False)

    async def reserve_decode(self, nbytes: int) -> None:
        """Hold `nbytes` for one decode; `end_decode` gives them back. Raises `too_large` when one
        image alone needs more than the whole budget."""
        if nbytes > self.limit:
            raise ItemError(
                ErrorCode.TOO_LARGE,
                f"decoding needs ~{nbytes / 2**20:.0f} MiB, more than the memory budget of "
                f"{self.limit / 2**20:.0f} MiB (CLIPLENS_MEMORY_BUDGET_BYTES)",
            )
        await self._wait(nbytes, progress=True)

    def end_decode(self, nbytes: int) -> None:
        self.decoding -= 1
        self.give(nbytes)

    async def _wait(self, nbytes: int, progress: bool) -> None:
        queue = self._decodes if progress else self._downloads
        if not queue and not self._decodes and self._fits(nbytes, progress):
            self._hold(nbytes, progress)
            return
        waiter = _Waiter(nbytes, progress, asyncio.get_running_loop().create_future())
        queue.append(waiter)
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # granted just as the deadline cancelled us: hand it on
                if progress:
                    self.end_decode(nbytes)
                else:
                    self.give(nbytes)
            else:
                queue.remove(waiter)
                self._grant()
            raise

    def _fits(self, nbytes: int, progress: bool) -> bool:
        if progress and self.decoding == 0:
            return True
        return self.used + nbytes <= self.limit if nbytes else self.used < self.limit

    def _grant(self) -> None:
        for queue in (self._decodes, self._downloads):
            while queue:
                head = queue[0]
                if head.granted.done():
                    queue.popleft()
                    continue
                if not self._fits(head.nbytes, head.progress):
                    return  # nothing behind the head of the decode queue may pass it either
                queue.popleft()
                self._hold(head.nbytes, head.progress)
                head.granted.set_result(None)

    def _hold(self, nbytes: int, progress: bool) -> None:
        if progress:
            self.decoding += 1
        self.take(nbytes)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's `malloc_trim(0)`, where the C library has it (musl and macOS do not)."""
    name = ctypes.util.find_library("c")
    library = ctypes.CDLL(name) if name else None
    trim = getattr(library, "malloc_trim", None)
    return None if trim is None else lambda: trim(0)


_TRIM = _malloc_trim()


def return_free_memory() -> None:
    """Hand the heap's free pages back to the system after a burst.

    Decoded photos are large, short-lived buffers; glibc keeps freed heap (and per-thread arenas)
    mapped, so without this the RSS of a process stays near its peak long after the burst (the
    README's limits table has the numbers). Call it from a worker thread when the service goes idle.
    """
    if _TRIM is not None:
        _TRIM()
