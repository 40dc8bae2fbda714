"""The memory budget: waits that hold the bound, first come first served, and never deadlock."""

from __future__ import annotations

import asyncio

import pytest

from cliplens.pipeline.budget import MemoryBudget
from cliplens.vocabulary import ErrorCode, ItemError


def run(coroutine: object) -> None:
    asyncio.run(coroutine)  # type: ignore[arg-type]


def test_a_decode_waits_until_its_bytes_fit_and_goes_on_when_they_are_given_back() -> None:
    async def scenario() -> None:
        seen: list[int] = []
        budget = MemoryBudget(100, seen.append)
        await budget.reserve_decode(70)
        second = asyncio.ensure_future(budget.reserve_decode(50))
        await asyncio.sleep(0)
        assert not second.done() and budget.used == 70
        budget.end_decode(70)
        await asyncio.wait_for(second, 1)
        assert budget.used == 50 and budget.decoding == 1 and max(seen) <= 100

    run(scenario())


def test_one_image_larger_than_the_whole_budget_is_too_large_at_once() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        with pytest.raises(ItemError) as raised:
            await budget.reserve_decode(101)
        assert raised.value.code is ErrorCode.TOO_LARGE
        assert budget.used == 0

    run(scenario())


def test_waiting_downloads_never_hold_up_the_decode_that_makes_room() -> None:
    """Encoded bytes fill the budget and a download waits for room: the decodes behind it still
    run (one at a time when nothing fits), so the budget frees itself."""

    async def scenario() -> None:
        budget = MemoryBudget(100)
        budget.take(100)  # encoded bytes of images waiting to decode
        download = asyncio.ensure_future(budget.room())
        await asyncio.sleep(0)
        assert not download.done()
        await asyncio.wait_for(budget.reserve_decode(30), 1)  # nothing else decoding: progress
        blocked = asyncio.ensure_future(budget.reserve_decode(30))
        await asyncio.sleep(0)
        assert not blocked.done(), "a second decode passed a full budget"
        budget.give(100)  # the first image's encoded bytes go after its decode
        budget.end_decode(30)
        await asyncio.wait_for(blocked, 1)
        await asyncio.wait_for(download, 1)
        assert budget.used == 30

    run(scenario())


def test_waiters_are_served_in_order() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        await budget.reserve_decode(100)
        order: list[int] = []

        async def decode(n: int) -> None:
            await budget.reserve_decode(n)
            order.append(n)

        waiters = [asyncio.ensure_future(decode(n)) for n in (60, 10, 20)]
        await asyncio.sleep(0)
        budget.end_decode(100)
        await asyncio.wait_for(asyncio.gather(*waiters), 1)
        assert order == [60, 10, 20]

    run(scenario())


def test_a_waiter_cancelled_at_its_deadline_holds_nothing_and_lets_the_next_one_in() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        await budget.reserve_decode(90)
        late = asyncio.ensure_future(budget.reserve_decode(50))
        after = asyncio.ensure_future(budget.reserve_decode(10))
        await asyncio.sleep(0)
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        await asyncio.wait_for(after, 1)
        assert budget.used == 100 and budget.decoding == 2

    run(scenario())
