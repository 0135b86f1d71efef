"""Eviction policies: the order in which each one gives chunks up, and pinned chunks skipped."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pdx.errors import UnknownName
from pdx.store.eviction import EVICTION_POLICIES, EvictionPolicy, make_policy


def drain(policy: EvictionPolicy, evictable: Callable[[object], bool] = lambda k: True) -> list[object]:
    out = []
    while (k := policy.evict(evictable)) is not None:
        out.append(k)
    return out


def test_registry_names_and_unknown() -> None:
    assert EVICTION_POLICIES.names() == ["lfu", "lru", "s3fifo"]
    with pytest.raises(UnknownName, match="known: lfu, lru, s3fifo"):
        make_policy("arc", 10)


def test_lru_order() -> None:
    p = make_policy("lru", 10)
    for k in "abcd":
        p.insert(k)
    p.touch("a")
    p.touch("c")
    assert drain(p) == ["b", "d", "a", "c"]


def test_lru_remove_and_skip_pinned() -> None:
    p = make_policy("lru", 10)
    for k in "abcd":
        p.insert(k)
    p.remove("b")
    assert len(p) == 3
    assert p.evict(lambda k: k != "a") == "c"
    assert drain(p, lambda k: k != "a") == ["d"]
    assert p.evict(lambda k: False) is None
    assert drain(p) == ["a"]


def test_lfu_order_fewest_reads_then_oldest() -> None:
    p = make_policy("lfu", 10)
    for k in "abcde":
        p.insert(k)
    for k in "aaacce":
        p.touch(k)
    # reads: a=3, c=2, e=1, b=0, d=0 -> b, d (ties oldest first), e, c, a
    assert drain(p) == ["b", "d", "e", "c", "a"]


def test_lfu_counts_age() -> None:
    p = make_policy("lfu", 4)
    for k in "ab":
        p.insert(k)
    for _ in range(3):
        p.touch("a")  # a: 4 reads' worth, b: 1
    p.insert("c")
    p.touch("b")  # the 4th read: counts halve, a=2, b=1, c=1
    p.touch("c")
    p.touch("c")  # c=3 now outranks a, whose reads are old
    assert drain(p) == ["b", "a", "c"]


def test_lfu_without_aging_keeps_the_old_favourite() -> None:
    p = make_policy("lfu", 100)  # 100 reads before counts halve
    for k in "ab":
        p.insert(k)
    for _ in range(3):
        p.touch("a")
    p.touch("b")
    p.touch("b")
    assert drain(p) == ["b", "a"]


def test_lfu_skip_pinned_and_remove() -> None:
    p = make_policy("lfu", 10)
    for k in "abc":
        p.insert(k)
    p.touch("c")
    p.remove("b")
    assert p.evict(lambda k: k != "a") == "c"
    assert p.evict(lambda k: k != "a") is None
    assert drain(p) == ["a"]


def test_s3fifo_one_hit_wonders_leave_first() -> None:
    # capacity 10: the small queue holds 1 before it is evicted from.
    p = make_policy("s3fifo", 10)
    for k in "abcd":
        p.insert(k)
    p.touch("b")  # read on probation: moves to main when it reaches the tail
    assert p.evict(lambda k: True) == "a"
    assert p.evict(lambda k: True) == "c"  # b was promoted, c was not read
    assert p.evict(lambda k: True) == "d"
    assert p.evict(lambda k: True) == "b"  # in main, b's read buys one reinsertion, then it goes
    assert len(p) == 0


def test_s3fifo_ghost_readmits_to_main() -> None:
    p = make_policy("s3fifo", 10)
    for k in "ab":
        p.insert(k)
    assert p.evict(lambda k: True) == "a"  # to the ghost list
    p.insert("a")  # back soon: straight into main
    for k in "xyz":
        p.insert(k)
    # the small queue (b, x, y, z) is over its target: its unread chunks go before main's a
    assert drain(p) == ["b", "x", "y", "z", "a"]


def test_s3fifo_main_reinserts_read_chunks() -> None:
    p = make_policy("s3fifo", 10)
    for k in "abc":
        p.insert(k)
        p.touch(k)
    p.touch("a")
    p.touch("a")
    # All three were read on probation and move to main; there a chunk with
    # reads left goes back to the head with one read fewer: b and c run out
    # first, a (3 reads) last.
    assert drain(p) == ["b", "c", "a"]


def test_s3fifo_scan_does_not_flush_hot_chunks() -> None:
    p = make_policy("s3fifo", 10)
    hot = [f"hot{i}" for i in range(5)]
    for k in hot:
        p.insert(k)
        p.touch(k)
    evicted = []
    for i in range(50):  # a one-pass scan of cold chunks through a full cache
        p.insert(f"cold{i}")
        if len(p) > 10:
            evicted.append(p.evict(lambda k: True))
    assert not set(hot) & set(evicted)


@pytest.mark.parametrize("name", ["lru", "lfu", "s3fifo"])
def test_all_pinned_gives_none(name: str) -> None:
    p = make_policy(name, 4)
    for k in range(4):
        p.insert(k)
        p.touch(k)
    assert p.evict(lambda k: False) is None
    assert len(p) == 4
    assert sorted(drain(p)) == [0, 1, 2, 3]  # type: ignore[type-var]


@pytest.mark.parametrize("name", ["lru", "lfu", "s3fifo"])
def test_pinned_skipped_everything_else_evicted(name: str) -> None:
    p = make_policy(name, 20)
    for k in range(20):
        p.insert(k)
        if k % 3 == 0:
            p.touch(k)
    pinned = {0, 7, 13}
    out = drain(p, lambda k: k not in pinned)
    assert sorted(out) == sorted(set(range(20)) - pinned)  # type: ignore[type-var]
    assert len(p) == 3
