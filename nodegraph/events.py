"""Events and cancellation.

The executor publishes :class:`Event` records instead of printing: ``run_started``, ``started``, ``cached``,
``progress``, ``preview``, ``finished``, ``failed``, ``cancelled`` and ``run_finished``. Subscribers are plain
callables; the CLI turns events into progress bars, a server would turn them into websocket messages.

Events belong to a run: every event carries the ``run_id`` of the run that produced it, and a subscriber given
``subscribe(fn, run_id=...)`` (what ``Engine.run(on_event=...)`` does) receives only that run's events, so two
threads sharing one Engine never see each other's progress. ``subscribe(fn)`` without a run id sees every run
(a server's event stream).
Subscribers are called on the thread that produced the event (a worker thread for ``progress``), so they must be
quick and thread-safe; an exception in a subscriber is swallowed and never breaks a run.

A :class:`CancelToken` is checked between steps and between loop iterations (and whenever a node reports
progress); a cancelled run raises :class:`nodegraph.errors.Cancelled` and keeps what it cached. Inside the
executor each run has a :class:`RunToken` that joins the caller's token, an interrupt (``KeyboardInterrupt``)
and the run's deadline (:attr:`nodegraph.limits.Limits.deadline_s`), and records which of them fired.
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
    run_id: str | None = None


class EventBus:
    def __init__(self, subscribers: list[Subscriber] | None = None):
        self._subscribers: list[tuple[Subscriber, str | None]] = [(fn, None) for fn in subscribers or []]
        self._lock = threading.Lock()

    def subscribe(self, fn: Subscriber, run_id: str | None = None) -> Callable[[], None]:
        """Add a subscriber (for one run's events, or every run's); returns a function that removes it."""
        entry = (fn, run_id)
        with self._lock:
            self._subscribers = [*self._subscribers, entry]  # copy on write: emit iterates without the lock

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = [e for e in self._subscribers if e is not entry]

        return unsubscribe

    def emit(self, kind: str, node: str | None = None, run_id: str | None = None, **data: Any) -> None:
        subscribers = self._subscribers
        if not subscribers:
            return
        event = Event(kind, node, data, run_id=run_id)
        for fn, only in subscribers:
            if only is not None and only != run_id:
                continue
            try:
                fn(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not break the run
                pass

    def emitter(self, run_id: str) -> Callable[..., None]:
        """``emit`` bound to one run: what the executor hands to nodes' contexts."""
        def emit(kind: str, node: str | None = None, **data: Any) -> None:
            if self._subscribers:
                self.emit(kind, node, run_id, **data)

        return emit


class CancelToken:
    """Thread-safe cancellation flag shared between a caller and a running graph."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class RunToken:
    """One run's cancellation: the caller's token, an interrupt, or the deadline; ``reason`` says which fired
    first (``"cancelled"``, ``"interrupted"``, ``"deadline"``)."""

    def __init__(self, user: CancelToken | None = None, deadline_s: float | None = None):
        self.user = user
        self.deadline_s = deadline_s
        self.deadline = time.monotonic() + deadline_s if deadline_s is not None else None
        self.reason: str | None = None
        self._event = threading.Event()

    def cancel(self, reason: str = "cancelled") -> None:
        if self.reason is None:
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        if self._event.is_set():
            return True
        if self.user is not None and self.user.cancelled:
            self.cancel("cancelled")
        elif self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel("deadline")
        return self._event.is_set()

    def message(self, where: str = "") -> str:
        if self.reason == "deadline":
            what = f"the run's deadline of {self.deadline_s:g} s passed"
        else:
            what = "the run was interrupted" if self.reason == "interrupted" else "the run was cancelled"
        return f"{what}{' in node ' + repr(where) if where else ''}"
