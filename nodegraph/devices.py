"""Device placement and model residency.

Placement: each step runs on ``node.device`` from the graph if given, else on the engine's default device
(``auto`` resolves to ``cuda`` when available, else ``cpu``). Nodes inside a loop body or a graph-defined node
inherit the enclosing node's device unless they pin their own.

Transfers happen at edges only: before a step runs, tensors among its inputs (also inside lists, tuples and
dicts) that live on another device are copied to the step's device; tensors already there are passed as they
are. Models (``torch.nn.Module``, or wrappers listing their networks in ``__nodegraph_modules__()``) are not
copied at edges: they are made resident through the :class:`ResidencyManager` and pinned while the step runs.

Residency policy: the manager knows every model a run has produced and charges each one its parameter and
buffer bytes on the device it lives on. ``acquire(model, device)`` moves the model there, first offloading
least-recently-used unpinned models from that device to the offload device (CPU) until the newcomer fits the
device's budget. When CPU itself has a budget and is over it, least-recently-used models are dropped: the
manager forgets them and calls their ``on_drop`` callback (the engine evicts the loader's cache entry), so a
later run loads them again on demand. Models in use by a running step are pinned and never moved or dropped.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch


def resolve_device(name: str | None, default: str = "auto") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda`` / ``cuda:N`` and ``mps`` as given, validated.

    Raises RuntimeError or ValueError naming the device for anything else: a malformed name, a device type
    nodes cannot run on (``meta``, ``xla``, ...), or a CUDA / MPS device this machine does not have."""
    if not isinstance(name or default, str):
        raise ValueError(f"a device is a string such as 'cpu' or 'cuda:0', got {type(name or default).__name__}")
    return _resolve((name or default or "auto").strip())


@functools.lru_cache(maxsize=64)
def _resolve(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"device {name!r}: there is one CPU device ('cpu')")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: nodes run on 'cpu', 'cuda', 'cuda:N' or 'mps', not {dev.type!r}")
    return dev


def same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def move_to(value: Any, device: torch.device) -> Any:
    """Copy tensors in ``value`` to ``device`` where they live elsewhere; leave everything else alone.

    Lists, tuples and dicts are always rebuilt, so the caller gets containers of its own (what keeps a node's
    ``append`` from reaching another node's cached value); the tensors inside are shared when already there."""
    if isinstance(value, torch.Tensor):
        return value if same_device(value.device, device) else value.to(device)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


def module_bytes(module: torch.nn.Module) -> int:
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return params + buffers


def module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _dev_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


@dataclass
class _Entry:
    ref: weakref.ref
    nbytes: int
    device: str
    on_drop: list[Callable[[], None]]
    pins: int = 0


class ResidencyManager:
    """Per-device memory budgets for models: load on demand, offload/drop least-recently-used."""

    def __init__(self, budgets: dict[str, int] | None = None, offload_device: str = "cpu",
                 mover: Callable[[torch.nn.Module, torch.device], None] | None = None):
        # Budgets are keyed like devices ("cpu", "cuda:0"); a plain "cuda" means the current CUDA device.
        self._budget_spec = {k: int(v) for k, v in (budgets or {}).items()}
        self.offload_device = torch.device(offload_device)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order, keyed by id(module)
        self._lock = threading.RLock()
        self._mover = mover or (lambda m, d: m.to(d))
        self.moves: list[tuple[str, str, str]] = []  # (module class, from, to), for reports and tests
        self.drops = 0

    @property
    def budgets(self) -> dict[str, int]:
        out = {}
        for key, value in self._budget_spec.items():
            if key == "cuda":
                try:
                    key = f"cuda:{torch.cuda.current_device()}"
                except (RuntimeError, AssertionError):  # no CUDA here: the budget has nothing to apply to
                    pass
            out.setdefault(key, value)
        return out

    # -- bookkeeping -------------------------------------------------------------------------------------
    def register(self, module: torch.nn.Module, on_drop: Callable[[], None] | None = None) -> None:
        with self._lock:
            key = id(module)
            if key in self._entries and self._entries[key].ref() is module:
                if on_drop is not None:  # every holder (e.g. each cache entry) is told when it is dropped
                    self._entries[key].on_drop.append(on_drop)
                return
            self._entries[key] = _Entry(weakref.ref(module), module_bytes(module),
                                        _dev_key(module_device(module)), [on_drop] if on_drop else [])
            self._enforce(self._entries[key].device, keep=key)

    def used(self, device: str | torch.device) -> int:
        dev = _dev_key(torch.device(device))
        with self._lock:
            self._prune()
            return sum(e.nbytes for e in self._entries.values() if e.device == dev)

    def resident(self, device: str | torch.device) -> list[torch.nn.Module]:
        dev = _dev_key(torch.device(device))
        with self._lock:
            self._prune()
            return [m for e in self._entries.values() if e.device == dev and (m := e.ref()) is not None]

    # -- the one operation nodes need --------------------------------------------------------------------
    def acquire(self, module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
        """Make ``module`` resident on ``device`` (offloading others as needed) and mark it recently used."""
        device = torch.device(device)
        with self._lock:
            self.register(module)
            key = id(module)
            entry = self._entries[key]
            target = _dev_key(device)
            if entry.device != target:
                self._make_room(target, entry.nbytes, keep=key)
                self._move(module, entry, device)
            self._entries.move_to_end(key)
            return module

    def pin(self, module: torch.nn.Module) -> None:
        with self._lock:
            self.register(module)
            self._entries[id(module)].pins += 1

    def unpin(self, module: torch.nn.Module) -> None:
        with self._lock:
            entry = self._entries.get(id(module))
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
                self._enforce(entry.device)

    # -- internals ---------------------------------------------------------------------------------------
    def _move(self, module: torch.nn.Module, entry: _Entry, device: torch.device) -> None:
        src = entry.device
        self._mover(module, device)
        entry.device = _dev_key(device)
        self.moves.append((type(module).__name__, src, entry.device))

    def _prune(self) -> None:
        for key in [k for k, e in self._entries.items() if e.ref() is None]:
            del self._entries[key]

    def _make_room(self, device: str, incoming: int, keep: int) -> None:
        budget = self.budgets.get(device)
        if budget is None:
            return
        self._prune()
        for key in list(self._entries):
            if self.used(device) + incoming <= budget:
                return
            entry = self._entries.get(key)
            if entry is None or key == keep or entry.pins or entry.device != device:
                continue
            self._evict(key, entry)

    def _enforce(self, device: str, keep: int | None = None) -> None:
        budget = self.budgets.get(device)
        if budget is None:
            return
        self._prune()
        for key in list(self._entries):
            if self.used(device) <= budget:
                return
            entry = self._entries.get(key)
            if entry is None or key == keep or entry.pins or entry.device != device:
                continue
            self._evict(key, entry)

    def _evict(self, key: int, entry: _Entry) -> None:
        module = entry.ref()
        offload = _dev_key(self.offload_device)
        if module is not None and entry.device != offload:
            self._move(module, entry, self.offload_device)
            self._enforce(offload)
            return
        # Already on the offload device and it is over budget: forget the model; its loader runs again.
        del self._entries[key]
        self.drops += 1
        for callback in entry.on_drop:
            callback()
