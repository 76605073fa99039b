"""The content-addressed output cache: a memory tier with a byte budget and LRU eviction, and a disk tier.

An entry is one step's outputs (``{output name: value}``) under the step's cache key (:mod:`nodegraph.plan`).

Memory tier policy: entries are charged the bytes of the tensors and arrays they hold (models are charged to
the residency manager instead, see :mod:`nodegraph.devices`, so they count 0 here); when the total passes
``budget_bytes`` the least recently used entries are dropped. An entry larger than the whole budget is not
kept in memory at all. Thread-safe.

Disk tier policy (``cache_dir``): an entry whose values are all tensors is written as ``<key>.safetensors``;
any other entry that :func:`nodegraph.serialize.packb` can encode is written as ``<key>.msgpack``; entries
holding other objects (models, open handles) stay in memory only. Nothing is ever pickled.

* Writes are atomic (a ``.tmp-<pid>-<random>`` file + rename, :func:`nodegraph.safeio.write_bytes`), so a crash
  never leaves a half-written entry that could be read back. Opening a folder removes the temporaries of
  processes no longer alive and any older than an hour (:func:`nodegraph.safeio.remove_stale_temps`).
* Reads take only regular files (never a link, FIFO or device) no larger than ``limits.max_cache_entry_bytes``;
  anything odd, damaged or oversized is a miss, never an error or a hang: the step runs again and its rewrite
  replaces the odd entry.
* ``budget_bytes`` (None = unbounded) caps the folder's total entry bytes, least recently used first: recency is
  the file's mtime, set on every write and every hit; after a write over the budget the oldest entries are
  deleted until the total fits. An entry larger than the whole budget is not written. Several processes may
  share a folder: an entry vanishing under one (another's eviction) is a miss or is skipped.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .limits import DEFAULT_LIMITS, Limits
from .safeio import read_bytes, remove_stale_temps, write_bytes
from .serialize import SerializationError, packb, unpackb

MISSING = object()


def value_bytes(value: Any) -> int:
    """Bytes held by tensors/arrays inside a value (recursing through lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(value_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(value_bytes(v) for v in value.values())
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    return 0


class MemoryCache:
    """LRU cache of step outputs with a byte budget."""

    def __init__(self, budget_bytes: int = 2 << 30):
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any:
        with self._lock:
            item = self._entries.get(key)
            if item is None:
                return MISSING
            self._entries.move_to_end(key)
            return item[0]

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Store an entry; returns False when it is larger than the whole budget (not kept)."""
        size = value_bytes(outputs)
        with self._lock:
            self._drop(key)
            if size > self.budget_bytes:
                return False
            self._entries[key] = (outputs, size)
            self._bytes += size
            while self._bytes > self.budget_bytes and self._entries:
                oldest = next(iter(self._entries))
                self._drop(oldest)
                self.evictions += 1
            return True

    def evict(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def items(self) -> list[tuple[str, dict[str, Any]]]:
        """A snapshot of ``(key, outputs)`` pairs, least recently used first."""
        with self._lock:
            return [(k, v[0]) for k, v in self._entries.items()]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= item[1]


class DiskCache:
    """Entries as safetensors (all-tensor outputs) or msgpack files under one folder, optionally LRU-bounded."""

    SUFFIXES = (".safetensors", ".msgpack")

    def __init__(self, root: str | Path, budget_bytes: int | None = None, *, limits: Limits | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.max_entry_bytes = (limits or DEFAULT_LIMITS).max_cache_entry_bytes
        self.evictions = 0
        self._lock = threading.Lock()
        remove_stale_temps(self.root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.msgpack"

    def get(self, key: str) -> Any:
        for path in self._paths(key):
            try:
                data = read_bytes(path, self.max_entry_bytes, follow_links=False)
            except FileNotFoundError:
                continue
            except OSError:  # a link, FIFO, device or oversized file: a miss, rewritten by the rerun
                return MISSING
            value = _decode(path.suffix, data)
            if value is not MISSING:
                _touch(path)
            return value
        return MISSING

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Write an entry if it can be stored safely and fits; returns whether it was written."""
        st, mp = self._paths(key)
        if outputs and all(isinstance(v, torch.Tensor) for v in outputs.values()):
            from safetensors.torch import save

            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in outputs.items()}
            data, target = save(tensors), st
        else:
            try:
                data, target = packb(outputs), mp
            except (TypeError, SerializationError, ValueError):
                return False
        if len(data) > self.max_entry_bytes or (self.budget_bytes is not None and len(data) > self.budget_bytes):
            return False
        try:
            write_bytes(self.root, target.name, data, mode=0o600, make_dirs=False)
        except OSError:
            return False
        _touch(target)
        if self.budget_bytes is not None:
            self._enforce_budget(keep=target)
        return True

    def remove(self, key: str) -> None:
        """Delete an entry's files (either format), if any."""
        for path in self._paths(key):
            path.unlink(missing_ok=True)

    def __contains__(self, key: str) -> bool:
        return any(_is_regular(p) for p in self._paths(key))

    def entries(self) -> list[tuple[int, int, Path]]:
        """``(mtime_ns, size, path)`` of every entry file, oldest first."""
        out = []
        try:
            names = os.listdir(self.root)
        except OSError:
            return []
        for name in names:
            if name.startswith(".") or not name.endswith(self.SUFFIXES):
                continue
            path = self.root / name
            try:
                st = os.lstat(path)
            except OSError:
                continue  # evicted meanwhile
            if stat.S_ISREG(st.st_mode):
                out.append((st.st_mtime_ns, st.st_size, path))
        return sorted(out)

    @property
    def bytes_used(self) -> int:
        """Total bytes of the entry files now in the folder (every process's)."""
        return sum(size for _, size, _ in self.entries())

    def _enforce_budget(self, keep: Path) -> None:
        assert self.budget_bytes is not None
        with self._lock:
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            for _, size, path in entries:
                if total <= self.budget_bytes:
                    break
                if path == keep:
                    continue
                try:
                    path.unlink()
                    self.evictions += 1
                except FileNotFoundError:
                    pass  # another process evicted it first
                except OSError:
                    continue
                total -= size


def _decode(suffix: str, data: bytes) -> Any:
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load

            return dict(load(data))
        value = unpackb(data)
        return value if isinstance(value, dict) else MISSING
    except Exception:  # noqa: BLE001 - any damaged entry (safetensors raises its own error type) is a miss;
        return MISSING  # the step runs again and rewrites it


def _touch(path: Path) -> None:
    """Mark an entry as just used (nanosecond mtime: coarse file-system clocks would tie quick writes)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now), follow_symlinks=False)
    except OSError:
        pass  # evicted meanwhile


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class Cache:
    """Both tiers behind one interface. A disk hit is promoted to memory."""

    def __init__(self, budget_bytes: int = 2 << 30, cache_dir: str | Path | None = None,
                 disk_budget: int | None = None, *, limits: Limits | None = None):
        self.memory = MemoryCache(budget_bytes)
        self.disk = DiskCache(cache_dir, disk_budget, limits=limits) if cache_dir is not None else None

    def get(self, key: str) -> tuple[Any, str]:
        """Return ``(outputs, tier)`` with tier ``"memory"``/``"disk"``, or ``(MISSING, "")``."""
        value = self.memory.get(key)
        if value is not MISSING:
            return value, "memory"
        if self.disk is not None:
            value = self.disk.get(key)
            if value is not MISSING:
                self.memory.put(key, value)
                return value, "disk"
        return MISSING, ""

    def put(self, key: str, outputs: dict[str, Any], *, rewrite: bool = False) -> None:
        self.memory.put(key, outputs)
        if self.disk is not None and (rewrite or key not in self.disk):
            self.disk.put(key, outputs)

    def evict(self, key: str) -> None:
        self.memory.evict(key)

    def discard(self, key: str, *, disk: bool = True) -> None:
        """Forget an entry in memory and (``disk=True``) on disk: it may hold a damaged value."""
        self.memory.evict(key)
        if disk and self.disk is not None:
            self.disk.remove(key)
