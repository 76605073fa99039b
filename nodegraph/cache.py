"""The content-addressed output cache: a memory tier with a byte budget and LRU eviction, and a disk tier.

An entry is one step's outputs (``{output name: value}``) under the step's cache key (:mod:`nodegraph.plan`).

Memory tier policy: entries are charged the bytes of the tensors and arrays they hold (models are charged to
the residency manager instead, see :mod:`nodegraph.devices`, so they count 0 here); when the total passes
``budget_bytes`` the least recently used entries are dropped. An entry larger than the whole budget is not
kept in memory at all. Thread-safe.

Disk tier policy (``cache_dir``): an entry whose values are all tensors is written as ``<key>.safetensors``;
any other entry that :func:`nodegraph.serialize.packb` can encode is written as ``<key>.msgpack``; entries
holding other objects (models, open handles) stay in memory only. Writes are atomic (temporary file + rename),
so a crash never leaves a half-written entry that could be read back. Nothing is ever pickled.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:
        item = self._entries.pop(key, None)
        if item is not None:
            self._bytes -= item[1]


class DiskCache:
    """Entries as safetensors (all-tensor outputs) or msgpack files under one folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.msgpack"

    def get(self, key: str) -> Any:
        st, mp = self._paths(key)
        try:
            if st.exists():
                from safetensors.torch import load_file

                return dict(load_file(str(st)))
            if mp.exists():
                value = unpackb(mp.read_bytes())
                return value if isinstance(value, dict) else MISSING
        except Exception:  # noqa: BLE001 - any damaged entry (safetensors raises its own error type) is a miss;
            return MISSING  # the step runs again and rewrites it
        return MISSING

    def put(self, key: str, outputs: dict[str, Any]) -> bool:
        """Write an entry if it can be stored safely; returns whether it was written."""
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
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return False
        return True

    def __contains__(self, key: str) -> bool:
        st, mp = self._paths(key)
        return st.exists() or mp.exists()


class Cache:
    """Both tiers behind one interface. A disk hit is promoted to memory."""

    def __init__(self, budget_bytes: int = 2 << 30, cache_dir: str | Path | None = None):
        self.memory = MemoryCache(budget_bytes)
        self.disk = DiskCache(cache_dir) if cache_dir is not None else None

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
