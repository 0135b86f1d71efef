"""Bounded admission: slots, FIFO queue, refusals, cancelled waiters."""

from __future__ import annotations

import asyncio

import pytest

from pdx.errors import Overloaded
from proxy.admission import Admission


def test_slots_queue_and_refusal() -> None:
    async def go() -> None:
        a = Admission(max_inflight=2, max_queue=1, queue_timeout_s=30, retry_after_s=2)
        await a.acquire()
        await a.acquire()
        waiter = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        assert a.queued == 1 and a.inflight == 2
        with pytest.raises(Overloaded) as exc:
            await a.acquire()
        assert exc.value.status == 429 and exc.value.retry_after == 2
        a.release()  # handed to the waiter
        await waiter
        assert a.inflight == 2 and a.queued == 0
        a.release()
        a.release()
        assert a.inflight == 0

    asyncio.run(go())


def test_waiters_are_served_in_order() -> None:
    async def go() -> list[int]:
        a = Admission(max_inflight=1, max_queue=10, queue_timeout_s=30)
        await a.acquire()
        order: list[int] = []

        async def take(i: int) -> None:
            await a.acquire()
            order.append(i)

        tasks = [asyncio.create_task(take(i)) for i in range(5)]
        await asyncio.sleep(0)
        for _ in range(5):
            a.release()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(go()) == [0, 1, 2, 3, 4]


def test_queue_timeout_is_503_and_leaves_no_trace() -> None:
    async def go() -> None:
        a = Admission(max_inflight=1, max_queue=5, queue_timeout_s=0.05)
        await a.acquire()
        with pytest.raises(Overloaded) as exc:
            await a.acquire()
        assert exc.value.status == 503
        assert a.queued == 0
        a.release()
        assert a.inflight == 0

    asyncio.run(go())


def test_cancelled_waiter_gives_its_place_up() -> None:
    async def go() -> None:
        a = Admission(max_inflight=1, max_queue=5, queue_timeout_s=30)
        await a.acquire()
        t = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert a.queued == 0
        a.release()
        assert a.inflight == 0
        await a.acquire()  # the slot is free again
        assert a.inflight == 1

    asyncio.run(go())


def test_slot_handed_over_as_the_waiter_is_cancelled_is_passed_on() -> None:
    async def go() -> None:
        a = Admission(max_inflight=1, max_queue=5, queue_timeout_s=30)
        await a.acquire()
        t1 = asyncio.create_task(a.acquire())
        t2 = asyncio.create_task(a.acquire())
        await asyncio.sleep(0)
        a.release()  # t1's future gets the slot...
        t1.cancel()  # ...but t1 is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await t1
        await asyncio.wait_for(t2, 5)  # the slot went on to t2
        assert a.inflight == 1 and a.queued == 0

    asyncio.run(go())
