"""Safetensors headers and weights: what a checkpoint holds, read before any tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape, byte
range; plus an optional ``__metadata__`` of strings) and the tensor bytes. :func:`read_header` reads only the
header, from a regular file, bounded (:data:`MAX_HEADER_BYTES`), and checks it against the file: every range
inside the data, ranges matching dtype x shape, no overlaps. A truncated download therefore fails here, naming
the file, before anything is loaded. A sharded checkpoint (``*.safetensors.index.json`` with a ``weight_map``)
reads as one header over its shard files, which must sit beside the index.

Pickle-based weight files (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused by name, never opened
(:func:`refuse_pickle`), with the one-line conversion a user can run where they trust the file.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor

from nodegraph.safeio import read_bytes

MAX_HEADER_BYTES = 64 << 20  # an SDXL checkpoint's header is ~200 KB; safetensors itself caps at 100 MB
MAX_INDEX_BYTES = 16 << 20
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
CONVERT_HINT = ("convert it where you trust the file: python -c \"import torch, safetensors.torch as st; "
                "sd = torch.load('IN', map_location='cpu', weights_only=True); "
                "st.save_file(sd.get('state_dict', sd), 'OUT.safetensors')\"")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class WeightsError(ValueError):
    """A weights file that cannot be used: not safetensors, truncated, malformed, or a pickle format."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class Header:
    """The tensors of one checkpoint (one file or the shards of an index): name -> dtype, shape, file."""

    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()

    def shape(self, name: str) -> tuple[int, ...] | None:
        info = self.tensors.get(name)
        return None if info is None else info.shape

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def has_prefix(self, prefix: str) -> bool:
        return any(n.startswith(prefix) for n in self.tensors)

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def refuse_pickle(path: Path) -> None:
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(f"{path.name!r} is a pickle-based weights file ({path.suffix}); only .safetensors is "
                           f"loaded, because unpickling can run arbitrary code; {CONVERT_HINT}")


def read_header(path: Path) -> Header:
    """The header of a ``.safetensors`` file or of a sharded ``.safetensors.index.json``."""
    path = Path(path)
    refuse_pickle(path)
    if path.name.endswith(".index.json"):
        return _read_index(path)
    if not path.name.endswith(".safetensors"):
        raise WeightsError(f"{path.name!r} is not a .safetensors file")
    tensors, metadata = _read_one(path)
    return Header(tensors, metadata, (path,))


def _read_one(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise WeightsError(f"cannot read {path.name!r}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{path.name!r} is not a regular file")
    size = st.st_size
    try:
        with open(path, "rb", buffering=0) as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path.name!r} is truncated or not safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise WeightsError(f"{path.name!r} is truncated or not safetensors (header of {n} bytes in a file "
                                   f"of {size})")
            raw = fh.read(n)
    except OSError as exc:
        raise WeightsError(f"cannot read {path.name!r}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WeightsError(f"{path.name!r} has a malformed safetensors header") from None
    if not isinstance(data, dict):
        raise WeightsError(f"{path.name!r} has a malformed safetensors header")
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    available = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in data.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
                  and all(isinstance(d, int) and d >= 0 for d in shape) and dtype in _DTYPE_BYTES)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise WeightsError(f"{path.name!r} has a malformed header entry")
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * _DTYPE_BYTES[dtype]:
            raise WeightsError(f"{path.name!r}: tensor {_quote(name)} has {end - begin} bytes for shape {list(shape)}")
        if end > available:
            raise WeightsError(f"{path.name!r} is truncated: tensor {_quote(name)} ends at byte {end} of the data "
                               f"but the file holds {available}")
        tensors[name] = TensorInfo(dtype, shape, path)
        spans.append((begin, end))
    spans.sort()
    if any(b < a_end for (_, a_end), (b, _) in zip(spans, spans[1:])):
        raise WeightsError(f"{path.name!r} has overlapping tensors")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_index(path: Path) -> Header:
    try:
        index = json.loads(read_bytes(path, MAX_INDEX_BYTES))
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception:  # noqa: BLE001 - whatever is wrong with it, it is not a usable index
        raise WeightsError(f"{path.name!r} is not a valid safetensors index (a JSON object with a weight_map)") \
            from None
    shards = sorted(set(weight_map.values()))
    tensors: dict[str, TensorInfo] = {}
    files = []
    for shard in shards:
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise WeightsError(f"{path.name!r} names a shard outside its folder")
        shard_path = path.parent / shard
        refuse_pickle(shard_path)
        if not shard_path.exists():
            raise WeightsError(f"{path.name!r} lists shard {shard!r}, which is missing")
        part, _ = _read_one(shard_path)
        tensors.update(part)
        files.append(shard_path)
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise WeightsError(f"{path.name!r}: {len(missing)} tensors of the index are in none of its shards")
    return Header(tensors, {}, tuple(files))


def _quote(name: str) -> str:
    return repr(name) if len(name) < 120 and name.isprintable() else "(unprintable name)"


def load_tensors(header: Header, names: Iterable[str] | None = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The tensors ``names`` (default all) of a checked header, cast to ``dtype`` when given (floating ones)."""
    from safetensors import SafetensorError, safe_open

    wanted = list(header.tensors) if names is None else list(names)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(header.tensors[name].file, []).append(name)
    out: dict[str, Tensor] = {}
    for file, keys in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for key in keys:
                    t = fh.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"cannot read the tensors of {file.name!r}: {exc}") from None
    return out
