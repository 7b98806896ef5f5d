"""The background queue behind the OpenTelemetry sink and the alert webhook."""

from __future__ import annotations

import threading

from agentguard._worker import BackgroundQueue


def test_items_are_handled_in_order_on_the_named_thread() -> None:
    seen: list[tuple[int, str]] = []
    q: BackgroundQueue[int] = BackgroundQueue(
        lambda i: seen.append((i, threading.current_thread().name)), name="bg-test", max_queue=10
    )
    assert not q.alive  # started by the first item
    assert all(q.put(i) for i in range(5))
    assert q.drain(5)
    assert seen == [(i, "bg-test") for i in range(5)]
    q.stop(5)
    assert not q.alive


def test_a_failing_item_goes_to_on_error_and_the_thread_carries_on() -> None:
    errors: list[str] = []
    done: list[int] = []

    def handle(i: int) -> None:
        if i == 1:
            raise ValueError("bad item")
        done.append(i)

    q: BackgroundQueue[int] = BackgroundQueue(
        handle, name="bg-test", max_queue=10, on_error=lambda e: errors.append(str(e))
    )
    for i in range(3):
        q.put(i)
    assert q.drain(5)
    assert done == [0, 2]
    assert errors == ["bad item"]
    q.stop(5)


def test_a_full_queue_refuses_and_a_blocked_drain_times_out() -> None:
    busy, release = threading.Event(), threading.Event()

    def handle(i: int) -> None:
        busy.set()
        release.wait(5)

    q: BackgroundQueue[int] = BackgroundQueue(handle, name="bg-test", max_queue=2)
    assert q.put(0)
    assert busy.wait(5)  # the thread holds item 0 and waits
    assert q.put(1) and q.put(2)
    assert not q.put(3)  # the queue holds two: refused, not blocked
    assert not q.drain(0.05)
    release.set()
    assert q.drain(5)
    q.stop(5)


def test_stopped_then_used_again_starts_a_new_thread() -> None:
    seen: list[int] = []
    q: BackgroundQueue[int] = BackgroundQueue(seen.append, name="bg-test", max_queue=10)
    q.put(1)
    q.stop(5)
    assert not q.alive
    q.put(2)
    assert q.alive
    assert q.drain(5)
    assert seen == [1, 2]
    q.stop(5)
