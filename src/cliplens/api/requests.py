"""The request class of the app: Litestar's, with its body read and decoded within cliplens's rules.

Two things Litestar's `Request` does would otherwise hurt the service:

- JSON nested deeper than the decoder's recursion limit (about a thousand levels; a few kilobytes
  of `[`) raises `RecursionError` out of msgspec, which reaches the edge as a 500. It is the
  client's malformed body, answered 400 `invalid_body` here, where the body is decoded; a
  `RecursionError` anywhere else is still a bug.
- The body is joined from its chunks on the event loop: for a body of a few hundred megabytes of
  data: URIs that copy stops every other request (`/healthz` included) for tens to hundreds of
  milliseconds. `bytes.join` releases the GIL, so here it runs in a worker thread.

What stays on the loop is msgspec's decoding of the body (it holds the GIL): about 1 ms per MB.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from litestar import Request
from litestar.types import Empty

from cliplens.vocabulary import RequestError, RequestErrorCode


class CliplensRequest(Request[Any, Any, Any]):
    """`request_class` of the app (app.py)."""

    __slots__ = ()

    async def body(self) -> bytes:
        """The whole body, joined off the event loop, and kept where Litestar keeps it."""
        if self._body is Empty and self._connection_state.body is Empty:
            chunks = [chunk async for chunk in self.stream()]
            self._body = self._connection_state.body = await asyncio.to_thread(b"".join, chunks)
        return await super().body()

    async def json(self) -> Any:
        """The decoded JSON body; 400 `invalid_body` when it is nested too deeply to decode."""
        try:
            return await super().json()
        except RecursionError:
            raise RequestError(
                RequestErrorCode.INVALID_BODY,
                "the JSON body is nested deeper than the decoder allows "
                f"(about {sys.getrecursionlimit()} levels)",
            ) from None
