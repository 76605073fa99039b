"""Events and cancellation.

The executor publishes :class:`Event` records instead of printing: ``run_started``, ``started``, ``cached``,
``progress``, ``preview``, ``finished``, ``failed``, ``cancelled`` and ``run_finished``. Subscribers are plain
callables; the CLI turns events into progress bars, a server would turn them into websocket messages.
Subscribers are called on the thread that produced the event (a worker thread for ``progress``), so they must be
quick and thread-safe; an exception in a subscriber is swallowed and never breaks a run.

A :class:`CancelToken` is checked between steps and between loop iterations (and whenever a node reports
progress); a cancelled run raises :class:`nodegraph.errors.Cancelled` and keeps what it cached.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

Subscriber = Callable[["Event"], None]


@dataclass(frozen=True)
class Event:
    kind: str
    node: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.perf_counter)


class EventBus:
    def __init__(self, subscribers: list[Subscriber] | None = None):
        self._subscribers: list[Subscriber] = list(subscribers or [])
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Add a subscriber; returns a function that removes it."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, kind: str, node: str | None = None, **data: Any) -> None:
        if not self._subscribers:
            return
        event = Event(kind, node, data)
        for fn in list(self._subscribers):
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not break the run
                pass


class CancelToken:
    """Thread-safe cancellation flag shared between a caller and a running graph."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
