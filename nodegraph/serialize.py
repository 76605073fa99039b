"""Safe binary codec for nodegraph values: msgpack plus a few ExtTypes. Never pickle.

Used for the cache's disk tier, for sending values between processes, and, through
:func:`dumps_canonical`, for content keys. Decoding never runs code, never builds objects
other than those listed below, and enforces size limits (:class:`Limits`) so that a
hostile or corrupt file can cost at most a bounded amount of memory and time.

Public API
----------
- ``packb(obj, *, limits=None) -> bytes``
- ``unpackb(data, *, limits=None) -> object``
- ``dumps_canonical(obj) -> bytes``: deterministic bytes for hashing.
- ``Limits``: decode limits (frozen dataclass); ``DEFAULT_LIMITS``.
- ``SerializationError(ValueError)``: every decode failure; ``.limit`` names the limit
  that was hit (a ``Limits`` field name) or is ``None`` for malformed input.

Values
------
Supported, and decoded as exactly the same type and value:

=====================  =====================================================
Python                 wire form
=====================  =====================================================
``None``, ``bool``     msgpack nil / bool
``int``                msgpack int if in ``[-2**63, 2**64)``, else ExtType 4
``float``              msgpack float64 (IEEE bits kept, NaN payload included)
``str``                msgpack str (UTF-8)
``bytes``              msgpack bin
``list``               msgpack array
``dict`` (str keys)    msgpack map
``tuple``              msgpack array tagged by ExtType 1 as its first element
``torch.Tensor``       ExtType 2
``numpy.ndarray``      ExtType 3
=====================  =====================================================

Policy at encode time:

- Types are matched exactly. Subclasses of the built-ins (``IntEnum``, ``OrderedDict``,
  namedtuples, numpy scalars such as ``np.float64``), sets, and every other object raise
  ``TypeError`` naming the type, because they would not decode as themselves. (The one
  exception is ``torch.nn.Parameter``, which is encoded as a plain tensor.)
- Dict keys must be ``str``; any other key raises ``TypeError``. (Tuples or ints as keys
  are not supported: keep graph values JSON-like.)
- ``bytearray``/``memoryview`` are refused (they would decode as ``bytes``).
- Tensors: non-contiguous tensors are made contiguous, tensors on other devices are copied
  to CPU, ``requires_grad`` and the autograd graph are dropped. Sparse, quantized, meta
  tensors and unsupported dtypes (complex, uint16..., float8) raise ``TypeError``.
- Nesting deeper than ``limits.max_depth`` (default 128, also catches reference cycles)
  raises ``SerializationError`` (so the encoder never writes a nesting depth that the
  decoder with the same limits refuses; the other limits apply only to decoding). A ``str`` that is not valid UTF-8 (lone surrogates) raises
  ``SerializationError``; a tensor payload over 4 GiB (msgpack's ext limit) too.

ExtType codes
-------------
All multi-byte numbers are little-endian.

====  ================  ============================================================
code  type              payload
====  ================  ============================================================
1     tuple tag         empty. A tuple ``(a, b)`` is the msgpack array
                        ``[ExtType(1, b""), a, b]``; the tag is valid only as the
                        first element of an array (anywhere else it is refused)
2     ``torch.Tensor``  tensor header + raw bytes (below)
3     ``numpy.ndarray`` tensor header + raw bytes (below)
4     big ``int``       signed two's-complement, little-endian, minimal length
====  ================  ============================================================

Any other code (including msgpack's reserved timestamp, -1) is refused on decode.
A tagged array rather than an ExtType holding a nested msgpack document keeps tuples
flat: the items are packed once (no copy of a tensor per tuple level) and decoding
never recurses through the ext hook (each nested decode would put msgpack's whole
parse stack on the C stack again, which can overflow it).

Tensor header::

    u8   format version (1)
    u8   n = length of the dtype name
    n    dtype name, ASCII: float64 float32 float16 bfloat16 int8 int16 int32 int64
         uint8 bool   (bfloat16 only for torch; a numpy bfloat16 is refused)
    u8   ndim
    ndim x i64 dims
    ...  raw data: C-contiguous, little-endian, prod(shape) * itemsize bytes;
         bool is one byte per element, 0 or 1.

Decoding checks: known version and dtype, ``ndim <= max_ndim``, every dim ``>= 0``,
``prod(nonzero dims) * itemsize <= max_tensor_bytes`` (so empty tensors with absurd
dims are refused too), ``prod(shape) * itemsize == len(raw)``, bool bytes in {0, 1}.
A torch payload decodes to a CPU ``torch.Tensor``, a numpy payload to a writable,
aligned, native-endian ``numpy.ndarray``; equal dtype, shape and bits.

Decode limits
-------------
Every limit raises :class:`SerializationError` whose message and ``.limit`` name the
``Limits`` field: total input size (checked first), per-str / per-bytes / per-container
lengths and ext payload lengths (checked by msgpack's C decoder from the headers,
before anything is allocated; a tuple's tag does not count toward ``max_container_len``),
tensor payload bytes and shape consistency (checked in the ext hook before the tensor
is built), big-int size, and nesting depth. Parsing never recurses: msgpack's C decoder
uses a fixed parse stack (1024 levels; deeper input is refused as ``max_depth``, so
``max_depth`` values above ~1000 are capped by it), and the configured ``max_depth``
over the whole value is checked before ``unpackb`` returns. Any other
failure (truncated, trailing bytes, bad UTF-8, reserved bytes, non-str map keys, unknown
ExtType...) is also a ``SerializationError``; no other exception type escapes
``unpackb`` for a bytes-like argument.

Canonical form
--------------
:func:`dumps_canonical` uses the same format with: dict keys sorted (by code point,
which equals UTF-8 byte order), every NaN (Python floats and float tensors) replaced by
the one quiet NaN of its dtype, and nothing else varying: msgpack always picks the
shortest int/str/array header and writes floats as float64 IEEE bits. So equal values
give equal bytes in any process, and ``unpackb(dumps_canonical(x))`` works. Types
count: ``1``, ``1.0`` and ``True`` differ, as do a list and a tuple, a torch tensor and
a numpy array; ``0.0`` and ``-0.0`` differ (their bits differ).
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable

import msgpack
import numpy as np
import torch

__all__ = [
    "DEFAULT_LIMITS",
    "EXT_BIGINT",
    "EXT_NDARRAY",
    "EXT_TENSOR",
    "EXT_TUPLE",
    "Limits",
    "SerializationError",
    "dumps_canonical",
    "packb",
    "unpackb",
]

EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_NDARRAY = 3
EXT_BIGINT = 4

_TENSOR_FORMAT_VERSION = 1
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_MAX_EXT_PAYLOAD = 2**32 - 1  # msgpack ext32 length field
_BIG_ENDIAN_HOST = sys.byteorder == "big"

_GiB = 1024**3


class SerializationError(ValueError):
    """Input that cannot be decoded (malformed, truncated, or over a limit), or a value
    that cannot be encoded for a reason other than its type.

    ``limit`` is the name of the :class:`Limits` field that was exceeded, or ``None``.
    """

    def __init__(self, message: str, *, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class Limits:
    """Decode limits. Every field is an inclusive maximum."""

    max_input_bytes: int = 2 * _GiB
    """Total size of the encoded input."""
    max_tensor_bytes: int = 2 * _GiB
    """Raw payload bytes of one tensor/array."""
    max_container_len: int = 16 * 1024 * 1024
    """Elements of one list/tuple, or entries of one dict."""
    max_str_len: int = 64 * 1024 * 1024
    """Encoded (UTF-8) bytes of one str."""
    max_bytes_len: int = 2 * _GiB
    """Length of one bytes value."""
    max_depth: int = 128
    """Nesting of lists/tuples/dicts; a top-level container is depth 1."""
    max_ndim: int = 64
    """Dimensions of one tensor/array."""
    max_int_bytes: int = 1024
    """Encoded size of one big int (beyond the 64-bit range)."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if type(value) is not int or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative int, got {value!r}")


DEFAULT_LIMITS = Limits()

# dtype name <-> torch dtype / numpy dtype. Order is irrelevant; names are the wire names.
_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_TORCH_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}
_NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name) for name in _TORCH_DTYPES if name != "bfloat16"
}
# looked up by (kind, itemsize): distinct numpy dtype objects (int64 vs longlong) may alias
_NUMPY_NAMES: dict[tuple[str, int], str] = {
    (v.kind, v.itemsize): k for k, v in _NUMPY_DTYPES.items()
}
_ITEMSIZE: dict[str, int] = {
    name: torch.empty((), dtype=dt).element_size() for name, dt in _TORCH_DTYPES.items()
}
_TUPLE_TAG = msgpack.ExtType(EXT_TUPLE, b"")
_CANONICAL_NAN = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000))[0]


# --------------------------------------------------------------------------- encoding


def packb(obj: Any, *, limits: Limits | None = None) -> bytes:
    """Encode ``obj`` (see the module docstring for what is supported).

    Only ``limits.max_depth`` applies at encode time. Raises ``TypeError`` for an
    unsupported type, ``SerializationError`` for a supported type with an unencodable
    value (too deep / cyclic, lone surrogate, tensor over 4 GiB).
    """
    lim = limits or DEFAULT_LIMITS
    return _pack_tree(_Encoder(lim.max_depth, canonical=False).encode(obj, 0))


def dumps_canonical(obj: Any) -> bytes:
    """Deterministic bytes for ``obj``, for content hashing (stable across processes).

    Same format as :func:`packb` with dict keys sorted and NaNs made canonical; see
    "Canonical form" in the module docstring. Same errors as :func:`packb`.
    """
    return _pack_tree(_Encoder(DEFAULT_LIMITS.max_depth, canonical=True).encode(obj, 0))


def _pack_tree(tree: Any) -> bytes:
    try:
        return msgpack.packb(tree, use_bin_type=True, strict_types=True, datetime=False)
    except UnicodeEncodeError as e:
        raise SerializationError(f"str is not valid UTF-8 (lone surrogate?): {e}") from e


class _Encoder:
    """Turns a value into a tree of msgpack-native objects and ExtTypes."""

    def __init__(self, max_depth: int, *, canonical: bool) -> None:
        self.max_depth = max_depth
        self.canonical = canonical

    def encode(self, obj: Any, depth: int) -> Any:
        t = type(obj)
        if obj is None or t is bool or t is str or t is bytes:
            return obj
        if t is int:
            if _INT_MIN <= obj <= _INT_MAX:
                return obj
            return msgpack.ExtType(EXT_BIGINT, _bigint_to_bytes(obj))
        if t is float:
            if self.canonical and obj != obj:
                return _CANONICAL_NAN
            return obj
        if t is list or t is tuple or t is dict:
            depth += 1
            if depth > self.max_depth:
                raise SerializationError(
                    f"value nests deeper than max_depth={self.max_depth} "
                    "(or contains a reference cycle)",
                    limit="max_depth",
                )
            if t is list:
                return [self.encode(x, depth) for x in obj]
            if t is tuple:
                return [_TUPLE_TAG, *(self.encode(x, depth) for x in obj)]
            for k in obj:
                if type(k) is not str:
                    raise TypeError(
                        f"dict keys must be str, got a key of type {_type_name(k)}: {k!r:.80}"
                    )
            keys = sorted(obj) if self.canonical else obj
            return {k: self.encode(obj[k], depth) for k in keys}
        if isinstance(obj, torch.Tensor):
            return msgpack.ExtType(EXT_TENSOR, self._tensor_payload(obj))
        if t is np.ndarray:
            return msgpack.ExtType(EXT_NDARRAY, self._ndarray_payload(obj))
        hint = ""
        if isinstance(obj, np.generic):
            hint = " (numpy scalar: use .item() for a Python scalar or np.asarray(x) for a 0-d array)"
        elif isinstance(obj, np.ndarray):
            hint = " (ndarray subclass: use np.asarray(x))"
        elif isinstance(obj, (bytearray, memoryview)):
            hint = " (use bytes(x))"
        elif isinstance(obj, (int, float, str, bytes, list, tuple, dict)):
            hint = " (subclasses of built-in types are not supported; convert to the base type)"
        raise TypeError(f"cannot serialize object of type {_type_name(obj)}{hint}")

    def _tensor_payload(self, t: torch.Tensor) -> bytes:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            raise TypeError(f"cannot serialize tensor subclass {_type_name(t)}")
        if t.layout != torch.strided:
            raise TypeError(f"cannot serialize a torch.Tensor with layout {t.layout}")
        if t.is_quantized:
            raise TypeError("cannot serialize a quantized torch.Tensor")
        name = _TORCH_NAMES.get(t.dtype)
        if name is None:
            raise TypeError(f"cannot serialize a torch.Tensor of dtype {t.dtype}")
        if t.device.type == "meta":
            raise TypeError("cannot serialize a torch.Tensor on the meta device (it has no data)")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.resolve_conj().resolve_neg().contiguous()
        if self.canonical and t.is_floating_point():
            nan = torch.isnan(t)
            if bool(nan.any()):
                t = torch.where(nan, torch.full((), math.nan, dtype=t.dtype), t)
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return _tensor_bytes(name, tuple(t.shape), raw)

    def _ndarray_payload(self, a: np.ndarray) -> bytes:
        dt = a.dtype
        name = _NUMPY_NAMES.get((dt.kind, dt.itemsize)) if dt.fields is None else None
        if name is None or dt.kind not in "fiub" or dt.subdtype is not None:
            raise TypeError(f"cannot serialize a numpy.ndarray of dtype {a.dtype}")
        dt = _NUMPY_DTYPES[name]  # native byte order
        a = a.astype(dt, order="C", copy=False)
        if self.canonical and dt.kind == "f":
            nan = np.isnan(a)
            if nan.any():
                a = np.where(nan, np.array(math.nan, dtype=dt), a)
        raw = a.reshape(-1).view(np.uint8)
        return _tensor_bytes(name, a.shape, raw)


def _tensor_bytes(name: str, shape: tuple[int, ...], raw: np.ndarray) -> bytes:
    """Header + little-endian raw bytes. ``raw`` is a flat native-endian uint8 view."""
    itemsize = _ITEMSIZE[name]
    if _BIG_ENDIAN_HOST and itemsize > 1:  # pragma: no cover - little-endian CI
        raw = raw.reshape(-1, itemsize)[:, ::-1].reshape(-1)
    if len(shape) > 255:  # pragma: no cover - torch/numpy cap ndim well below this
        raise SerializationError(f"tensor has {len(shape)} dims; the format allows 255")
    name_b = name.encode("ascii")
    header = (
        bytes((_TENSOR_FORMAT_VERSION, len(name_b)))
        + name_b
        + bytes((len(shape),))
        + struct.pack(f"<{len(shape)}q", *shape)
    )
    if len(header) + raw.nbytes > _MAX_EXT_PAYLOAD:
        raise SerializationError(
            f"tensor payload of {raw.nbytes} bytes exceeds msgpack's 4 GiB ExtType limit"
        )
    return b"".join((header, memoryview(np.ascontiguousarray(raw))))


def _bigint_to_bytes(n: int) -> bytes:
    length = (n.bit_length() + 8) // 8  # room for the sign bit
    return n.to_bytes(length, "little", signed=True)


def _type_name(obj: Any) -> str:
    t = type(obj)
    mod = t.__module__
    return t.__qualname__ if mod == "builtins" else f"{mod}.{t.__qualname__}"


# --------------------------------------------------------------------------- decoding

_MSGPACK_LIMIT_NAMES = {
    "max_str_len": "max_str_len",
    "max_bin_len": "max_bytes_len",
    "max_array_len": "max_container_len",
    "max_map_len": "max_container_len",
    "max_ext_len": "max_input_bytes",
}


def unpackb(
    data: bytes | bytearray | memoryview,
    *,
    limits: Limits | None = None,
    object_pairs_hook: Callable[[list[tuple[Any, Any]]], Any] | None = None,
) -> Any:
    """Decode bytes written by :func:`packb` (or :func:`dumps_canonical`).

    Raises :class:`SerializationError` for anything malformed, truncated, unknown or over
    ``limits`` (default :data:`DEFAULT_LIMITS`); ``TypeError`` if ``data`` is not
    bytes-like. ``object_pairs_hook`` (as in :func:`json.loads`) builds each map from its
    ``(key, value)`` pairs, e.g. to refuse a repeated key (graphs do, see
    :mod:`nodegraph.source`); by default a repeated key keeps its last value.
    """
    lim = limits or DEFAULT_LIMITS
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"unpackb expects bytes, got {_type_name(data)}")
    size = memoryview(data).nbytes
    if size > lim.max_input_bytes:
        raise SerializationError(
            f"input of {size} bytes exceeds max_input_bytes={lim.max_input_bytes}",
            limit="max_input_bytes",
        )
    try:
        value = _Decoder(lim, object_pairs_hook).unpack(data)
        _check_tree(value, lim.max_depth)
        return value
    except SerializationError:
        raise
    except Exception as e:  # msgpack errors, UnicodeDecodeError, RecursionError, MemoryError...
        raise _translate(e, lim) from e


def _translate(e: Exception, lim: Limits) -> SerializationError:
    msg = str(e)
    for mp_name, our_name in _MSGPACK_LIMIT_NAMES.items():
        if mp_name in msg:
            count = msg.split(" ", 1)[0]
            return SerializationError(
                f"{count} exceeds {our_name}={getattr(lim, our_name)}", limit=our_name
            )
    if isinstance(e, msgpack.StackError):
        return SerializationError(
            "input nests deeper than msgpack's decoder stack (max_depth)", limit="max_depth"
        )
    if isinstance(e, RecursionError):
        return SerializationError("input nests too deeply (max_depth)", limit="max_depth")
    if isinstance(e, msgpack.ExtraData):
        return SerializationError("trailing bytes after the encoded value")
    if isinstance(e, UnicodeDecodeError):
        return SerializationError(f"str is not valid UTF-8: {msg}")
    return SerializationError(f"malformed input ({type(e).__name__}: {msg or 'no detail'})")


class _TupleTag:
    """Decoded ExtType 1; turned into a tuple by the list hook, refused anywhere else."""

    __slots__ = ()


_DECODED_TUPLE_TAG = _TupleTag()


class _Decoder:
    def __init__(self, lim: Limits, object_pairs_hook: Callable | None = None) -> None:
        self.lim = lim
        cap = min(lim.max_input_bytes, 2**63 - 1)
        self.kwargs = dict(
            raw=False,
            use_list=True,
            strict_map_key=True,
            timestamp=0,
            ext_hook=self.ext_hook,
            list_hook=self.list_hook,
            max_str_len=min(lim.max_str_len, cap),
            max_bin_len=min(lim.max_bytes_len, cap),
            # +1: a tuple's array also holds its tag; list_hook checks the exact count
            max_array_len=min(lim.max_container_len + 1, cap),
            max_map_len=min(lim.max_container_len, cap),
            max_ext_len=cap,
        )
        if object_pairs_hook is not None:
            self.kwargs["object_pairs_hook"] = object_pairs_hook

    def unpack(self, data: Any) -> Any:
        return msgpack.unpackb(data, **self.kwargs)

    def list_hook(self, items: list) -> list | tuple:
        if items and items[0] is _DECODED_TUPLE_TAG:
            n = len(items) - 1
            out: list | tuple = tuple(items[1:])
        else:
            n = len(items)
            out = items
        if n > self.lim.max_container_len:
            raise SerializationError(
                f"{n} exceeds max_container_len={self.lim.max_container_len}",
                limit="max_container_len",
            )
        return out

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TENSOR or code == EXT_NDARRAY:
            return _decode_tensor(code, data, self.lim)
        if code == EXT_TUPLE:
            if data:
                raise SerializationError("tuple tag ExtType must have an empty payload")
            return _DECODED_TUPLE_TAG
        if code == EXT_BIGINT:
            if len(data) == 0:
                raise SerializationError("empty big-int ExtType payload")
            if len(data) > self.lim.max_int_bytes:
                raise SerializationError(
                    f"big int of {len(data)} bytes exceeds max_int_bytes={self.lim.max_int_bytes}",
                    limit="max_int_bytes",
                )
            return int.from_bytes(data, "little", signed=True)
        raise SerializationError(f"unknown ExtType code {code}")


def _decode_tensor(code: int, data: bytes, lim: Limits) -> Any:
    kind = "torch.Tensor" if code == EXT_TENSOR else "numpy.ndarray"
    mv = memoryview(data)
    n = len(mv)
    if n < 3:
        raise SerializationError(f"{kind} payload truncated (header)")
    if mv[0] != _TENSOR_FORMAT_VERSION:
        raise SerializationError(f"{kind} payload has unknown format version {mv[0]}")
    name_len = mv[1]
    pos = 2 + name_len
    if pos + 1 > n:
        raise SerializationError(f"{kind} payload truncated (dtype name)")
    try:
        name = bytes(mv[2:pos]).decode("ascii")
    except UnicodeDecodeError:
        raise SerializationError(f"{kind} dtype name is not ASCII") from None
    if name not in _TORCH_DTYPES:
        raise SerializationError(f"{kind} has unknown dtype {name!r:.40}")
    if code == EXT_NDARRAY and name not in _NUMPY_DTYPES:
        raise SerializationError(
            f"numpy.ndarray payload has dtype {name}, which numpy does not have; "
            "refusing to change it (it can only travel as a torch.Tensor)"
        )
    ndim = mv[pos]
    pos += 1
    if ndim > lim.max_ndim:
        raise SerializationError(
            f"{kind} has {ndim} dims, exceeds max_ndim={lim.max_ndim}", limit="max_ndim"
        )
    if pos + 8 * ndim > n:
        raise SerializationError(f"{kind} payload truncated (shape)")
    shape = struct.unpack_from(f"<{ndim}q", mv, pos)
    pos += 8 * ndim
    itemsize = _ITEMSIZE[name]
    nonzero = itemsize
    for d in shape:
        if d < 0:
            raise SerializationError(f"{kind} has a negative dim in shape {shape}")
        if d:
            nonzero *= d
            if nonzero > lim.max_tensor_bytes:
                raise SerializationError(
                    f"{kind} of shape {shape} and dtype {name} exceeds "
                    f"max_tensor_bytes={lim.max_tensor_bytes}",
                    limit="max_tensor_bytes",
                )
    expected = math.prod(shape) * itemsize
    raw = mv[pos:]
    if len(raw) != expected:
        raise SerializationError(
            f"{kind} of shape {shape} and dtype {name} needs {expected} bytes, "
            f"payload has {len(raw)}"
        )
    if expected == 0:
        if code == EXT_NDARRAY:
            return np.empty(shape, dtype=_NUMPY_DTYPES[name])
        return torch.empty(shape, dtype=_TORCH_DTYPES[name])
    u8 = np.frombuffer(raw, dtype=np.uint8)
    if name == "bool" and int(u8.max()) > 1:
        raise SerializationError(f"{kind} of dtype bool has bytes other than 0 and 1")
    if _BIG_ENDIAN_HOST and itemsize > 1:  # pragma: no cover - little-endian CI
        u8 = u8.reshape(-1, itemsize)[:, ::-1].reshape(-1)
    u8 = u8.copy()  # writable, aligned, owned
    if code == EXT_NDARRAY:
        return u8.view(_NUMPY_DTYPES[name]).reshape(shape)
    return torch.from_numpy(u8).view(_TORCH_DTYPES[name]).reshape(shape)


_LEAF_TYPES = (type(None), bool, int, float, str, bytes, torch.Tensor, np.ndarray)


def _check_tree(value: Any, max_depth: int) -> None:
    """Depth limit, str keys and allowed leaf types over a decoded value (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        obj, depth = pop()
        t = type(obj)
        if t is list or t is tuple or t is dict:
            depth += 1
            if depth > max_depth:
                raise SerializationError(
                    f"input nests deeper than max_depth={max_depth}", limit="max_depth"
                )
            if t is dict:
                for k in obj:
                    if type(k) is not str:
                        raise SerializationError(
                            f"map key of type {type(k).__name__}; only str keys are allowed"
                        )
                items = obj.values()
            else:
                items = obj
            for x in items:
                tx = type(x)
                if tx is list or tx is tuple or tx is dict:
                    push((x, depth))
                elif tx not in _LEAF_TYPES:
                    push((x, depth))
        elif t not in _LEAF_TYPES:
            if t is _TupleTag:
                raise SerializationError(
                    "tuple tag (ExtType 1) outside the first position of an array"
                )
            if isinstance(obj, msgpack.Timestamp):
                raise SerializationError(
                    "unknown ExtType code -1 (msgpack timestamp is not part of this format)"
                )
            raise SerializationError(f"unexpected decoded type {t.__name__}")  # pragma: no cover
