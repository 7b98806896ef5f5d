"""A bounded queue handled on a daemon thread: the background half of the OpenTelemetry sink
and of the alert webhook (work that must never run on the caller's thread)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BackgroundQueue"]

T = TypeVar("T")


class BackgroundQueue(Generic[T]):
    """Items put here are handed to ``handle`` one at a time, in order, on a daemon thread.

    The thread starts with the first item (and again after a fork, which does not copy it).
    The queue is bounded: :meth:`put` says ``False`` instead of blocking when it is full, and
    the caller counts the drop. An exception out of ``handle`` goes to ``on_error`` and the
    thread carries on.

    Example:
        >>> seen = []
        >>> q = BackgroundQueue(seen.append, name="example", max_queue=10)
        >>> q.put(1), q.put(2), q.drain(5), seen
        (True, True, True, [1, 2])
        >>> q.stop(5)
        >>> q.alive
        False
    """

    def __init__(
        self,
        handle: Callable[[T], None],
        *,
        name: str,
        max_queue: int,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._handle = handle
        self._on_error = on_error
        self._name = name
        self._queue: queue.Queue[tuple[T] | None] = queue.Queue(max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        """Whether the thread is running (it starts with the first item, ends at :meth:`stop`)."""
        return self._thread is not None and self._thread.is_alive()

    def put(self, item: T) -> bool:
        """Queue ``item`` for the thread; ``False`` (nothing queued) when the queue is full."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        try:
            self._queue.put_nowait((item,))
        except queue.Full:
            return False
        return True

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            try:
                if entry is None:
                    return
                self._handle(entry[0])
            except Exception as exc:  # a handler's bug must not kill the thread
                if self._on_error is None:
                    raise
                self._on_error(exc)
            finally:
                self._queue.task_done()

    def drain(self, timeout: float) -> bool:
        """Wait until every item queued so far was handled; ``False`` after ``timeout``
        seconds with some still waiting."""
        deadline = time.monotonic() + timeout
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                q.all_tasks_done.wait(left)
        return True

    def stop(self, timeout: float) -> None:
        """Handle what is queued (up to ``timeout`` seconds), then end the thread."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self.drain(timeout)
        try:
            self._queue.put_nowait(None)
        except queue.Full:  # the drain timed out with a full queue: the daemon thread stays
            return
        thread.join(timeout)
