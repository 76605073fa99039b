"""Tests for nodegraph.serialize: exact round trips, limits, fuzzing, canonical bytes."""

from __future__ import annotations

import collections
import datetime
import enum
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodegraph.serialize import (
    DEFAULT_LIMITS,
    EXT_BIGINT,
    EXT_NDARRAY,
    EXT_TENSOR,
    EXT_TUPLE,
    Limits,
    SerializationError,
    dumps_canonical,
    packb,
    unpackb,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
]
NUMPY_DTYPES = [
    np.float64,
    np.float32,
    np.float16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.bool_,
]
_INT_VIEW_TORCH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


# --------------------------------------------------------------------------- helpers


def float_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def bits_from(u: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", u))[0]


def torch_bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's raw bits (so NaN payloads compare exactly)."""
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_INT_VIEW_TORCH[t.element_size()])


def assert_same(a, b, path="$"):
    """Exact equality: same types all the way down, floats and tensors bit for bit."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float):
        assert float_bits(a) == float_bits(b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert b.device.type == "cpu" and not b.requires_grad
        assert torch.equal(torch_bits(a.detach().cpu()), torch_bits(b)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.ascontiguousarray(a).tobytes() == b.tobytes(), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def roundtrip(x, **kw):
    y = unpackb(packb(x), **kw)
    assert_same(x, y)
    return y


def tensor_ext(code: int, name: str, shape, raw: bytes, *, version: int = 1) -> bytes:
    """Hand-built tensor ExtType (to test the decoder's header checks)."""
    nb = name.encode()
    header = bytes((version, len(nb))) + nb + bytes((len(shape),)) + struct.pack(f"<{len(shape)}q", *shape)
    return msgpack.packb(msgpack.ExtType(code, header + raw))


def expect_error(data: bytes, limit: str | None = None, match: str | None = None, **kw):
    with pytest.raises(SerializationError, match=match) as info:
        unpackb(data, **kw)
    if limit is not None:
        assert info.value.limit == limit
        assert limit in str(info.value)
    return info.value


def sample_tensor(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 100
        flat = t.view(-1)
        flat[0], flat[1], flat[2], flat[3] = math.nan, math.inf, -math.inf, -0.0
        flat[4] = torch.finfo(dtype).max
        flat[5] = torch.finfo(dtype).tiny / 2  # subnormal
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    flat = t.view(-1)
    flat[0], flat[1] = info.min, info.max
    return t


# --------------------------------------------------------------------------- plain data


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        2**64,
        -(2**63) - 1,
        10**300,
        -(10**300),
        0.1,
        -0.0,
        math.inf,
        -math.inf,
        1e-310,
        "",
        "héllo ✓ 𝄞",
        b"",
        b"\x00\xff" * 100,
        [],
        {},
        (),
        [1, "a", None, [2.5, {"k": [True]}]],
        {"z": 1, "a": 2, "m": {"nested": [1, (2, 3)]}},
        (1, (2, (3, ())), [4, (5,)], {"t": (6, 7)}),
    ],
)
def test_plain_values_round_trip_exactly(value):
    roundtrip(value)


def test_tuple_decodes_as_tuple_not_list():
    assert unpackb(packb((1, 2))) == (1, 2)
    assert type(unpackb(packb((1, 2)))) is tuple
    assert type(unpackb(packb([1, 2]))) is list
    assert packb((1, 2)) != packb([1, 2])


def test_nan_bit_patterns_survive():
    for bits in (0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001, 0x7FF80000DEADBEEF):
        y = unpackb(packb(bits_from(bits)))
        assert math.isnan(y) and float_bits(y) == bits


def test_dict_key_order_is_preserved_by_packb():
    d = {"b": 1, "a": 2, "c": 3}
    assert list(unpackb(packb(d))) == ["b", "a", "c"]


def test_big_int_uses_ext_and_small_int_does_not():
    assert msgpack.unpackb(packb(2**64 - 1)) == 2**64 - 1  # native msgpack
    ext = msgpack.unpackb(packb(2**64))
    assert isinstance(ext, msgpack.ExtType) and ext.code == EXT_BIGINT


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_torch_dtypes_round_trip_bit_exact(dtype):
    t = sample_tensor(dtype)
    y = roundtrip(t)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype
    if dtype.is_floating_point:
        assert torch.isnan(y.view(-1)[0]) and y.view(-1)[3].item() == 0.0
        assert torch.signbit(y.view(-1)[3])  # -0.0 kept


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_numpy_dtypes_round_trip_bit_exact(dtype):
    a = sample_tensor(getattr(torch, np.dtype(dtype).name if dtype is not np.bool_ else "bool")).numpy()
    assert a.dtype == np.dtype(dtype)
    y = roundtrip(a)
    assert type(y) is np.ndarray and y.flags.writeable and y.flags.c_contiguous


@pytest.mark.parametrize("lib", ["torch", "numpy"])
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (1, 1, 1, 1)])
def test_zero_d_and_empty(lib, shape):
    t = torch.full(shape, 7, dtype=torch.int32) if shape else torch.tensor(3.25)
    x = t if lib == "torch" else t.numpy()
    y = roundtrip(x)
    assert tuple(y.shape) == shape


def test_non_contiguous_views_are_made_contiguous():
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    views = [
        base.transpose(0, 2),
        base[:, ::2, 1:],
        base[1],  # storage offset
        torch.arange(3.0).expand(4, 3),  # zero stride
        base.permute(2, 0, 1),
    ]
    for v in views:
        y = roundtrip(v)
        assert torch.equal(y, v) and y.is_contiguous()
    a = np.arange(24, dtype=np.int16).reshape(4, 6)[::-1, ::2]
    assert not a.flags.c_contiguous
    y = roundtrip(a)
    assert np.array_equal(y, a) and y.flags.c_contiguous


def test_big_endian_numpy_array_keeps_values():
    a = np.arange(5, dtype=">f4") / 3
    y = unpackb(packb(a))
    assert y.dtype == np.float32 and y.dtype.isnative
    assert np.array_equal(y, a)


def test_requires_grad_and_parameter_are_dropped():
    w = torch.nn.Parameter(torch.randn(2, 3))
    y = unpackb(packb({"w": w, "g": (w * 2)}))
    assert type(y["w"]) is torch.Tensor and not y["w"].requires_grad
    assert torch.equal(y["w"], w.detach()) and torch.equal(y["g"], w.detach() * 2)


def test_inference_mode_tensor():
    with torch.inference_mode():
        t = torch.ones(3) * 2
    assert torch.equal(unpackb(packb(t)), t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_moved_to_cpu():
    t = torch.randn(4, 4, device="cuda").t()
    y = unpackb(packb(t))
    assert y.device.type == "cpu" and torch.equal(y, t.cpu())


def test_decoded_tensor_owns_writable_memory():
    data = packb(torch.zeros(4))
    y = unpackb(data)
    y += 1  # must not warn/fail or alias the input bytes
    assert torch.equal(unpackb(data), torch.zeros(4))
    a = unpackb(packb(np.zeros(4)))
    a += 1
    assert a.sum() == 4


def test_torch_and_numpy_keep_their_kind():
    t = torch.arange(4)
    y = unpackb(packb([t, t.numpy()]))
    assert type(y[0]) is torch.Tensor and type(y[1]) is np.ndarray


def test_numpy_bfloat16_payload_is_refused_not_converted():
    good = tensor_ext(EXT_TENSOR, "bfloat16", (2,), b"\x80\x3f\x00\x40")
    assert torch.equal(unpackb(good), torch.tensor([1.0, 2.0], dtype=torch.bfloat16))
    err = expect_error(tensor_ext(EXT_NDARRAY, "bfloat16", (2,), b"\x80\x3f\x00\x40"))
    assert "bfloat16" in str(err) and "numpy" in str(err)


def test_nested_structure_with_tensors():
    value = {
        "latent": torch.randn(1, 4, 8, 8),
        "cond": [(torch.randn(2, 77, 8).to(torch.float16), {"pooled": np.ones((2, 8), np.float32)})],
        "meta": {"seed": 2**40, "steps": (1, 2, 3), "name": "x", "blob": b"\x00"},
        "mask": torch.zeros(8, 8, dtype=torch.bool),
    }
    roundtrip(value)


# --------------------------------------------------------------------------- encode errors


class Color(enum.IntEnum):
    RED = 1


Point = collections.namedtuple("Point", "x y")


@pytest.mark.parametrize(
    "value, type_name",
    [
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (object(), "object"),
        (1 + 2j, "complex"),
        (Color.RED, "Color"),
        (collections.OrderedDict(a=1), "OrderedDict"),
        (Point(1, 2), "Point"),
        (np.float32(1.0), "float32"),
        (np.float64(1.0), "float64"),
        (bytearray(b"x"), "bytearray"),
        (datetime.datetime(2020, 1, 1), "datetime"),
        ([1, {"a": [range(3)]}], "range"),
        (np.ma.masked_array([1, 2]), "MaskedArray"),
    ],
)
def test_unsupported_types_raise_type_error_naming_type(value, type_name):
    with pytest.raises(TypeError, match=type_name):
        packb(value)
    with pytest.raises(TypeError, match=type_name):
        dumps_canonical(value)


@pytest.mark.parametrize("key, type_name", [(1, "int"), ((1, 2), "tuple"), (b"k", "bytes"), (None, "NoneType")])
def test_non_str_dict_keys_refused(key, type_name):
    with pytest.raises(TypeError, match=f"dict keys must be str.*{type_name}"):
        packb({"ok": 1, key: 2})


@pytest.mark.parametrize(
    "tensor, what",
    [
        (torch.zeros(2, dtype=torch.complex64), "complex64"),
        (torch.zeros(2, device="meta"), "meta"),
        (torch.zeros(3, 3).to_sparse(), "sparse"),
        (np.zeros(2, dtype=np.complex128), "complex128"),
        (np.zeros(2, dtype=object), "object"),
        (np.zeros(2, dtype=np.uint32), "uint32"),
        (np.zeros(2, dtype=[("a", "i4")]), "dtype"),
    ],
)
def test_unsupported_tensors_raise_type_error(tensor, what):
    with pytest.raises(TypeError, match=what):
        packb(tensor)


def test_cycles_and_deep_nesting_refused_at_encode():
    a: list = []
    a.append(a)
    with pytest.raises(SerializationError) as info:
        packb(a)
    assert info.value.limit == "max_depth"
    deep: list = []
    for _ in range(DEFAULT_LIMITS.max_depth - 1):
        deep = [deep]
    assert unpackb(packb(deep)) == deep  # exactly at the limit: fine
    with pytest.raises(SerializationError, match="max_depth"):
        packb([deep])


def test_lone_surrogate_refused_at_encode():
    with pytest.raises(SerializationError, match="UTF-8"):
        packb({"k": "\udc80"})


# --------------------------------------------------------------------------- decode limits


def test_limits_validate_their_fields():
    with pytest.raises(ValueError):
        Limits(max_depth=-1)
    with pytest.raises(ValueError):
        Limits(max_str_len=1.5)  # type: ignore[arg-type]


def test_limit_max_input_bytes():
    data = packb(list(range(100)))
    assert unpackb(data, limits=Limits(max_input_bytes=len(data))) == list(range(100))
    expect_error(data, "max_input_bytes", limits=Limits(max_input_bytes=len(data) - 1))


def test_limit_max_tensor_bytes():
    t = torch.zeros(64, dtype=torch.float32)  # 256 bytes
    data = packb({"t": t})
    assert torch.equal(unpackb(data, limits=Limits(max_tensor_bytes=256))["t"], t)
    expect_error(data, "max_tensor_bytes", limits=Limits(max_tensor_bytes=255))
    expect_error(packb(t.numpy()), "max_tensor_bytes", limits=Limits(max_tensor_bytes=100))


@pytest.mark.parametrize("value", [list(range(11)), tuple(range(11)), {str(i): i for i in range(11)}])
def test_limit_max_container_len(value):
    data = packb({"x": value})
    assert_same(unpackb(data, limits=Limits(max_container_len=11)), {"x": value})
    err = expect_error(data, "max_container_len", limits=Limits(max_container_len=10))
    assert "max_container_len=10" in str(err)
    expect_error(data, "max_container_len", limits=Limits(max_container_len=9))


def test_limit_max_str_len():
    data = packb(["é" * 5])  # 10 UTF-8 bytes
    assert unpackb(data, limits=Limits(max_str_len=10)) == ["é" * 5]
    expect_error(data, "max_str_len", limits=Limits(max_str_len=9))
    expect_error(packb({"k" * 20: 1}), "max_str_len", limits=Limits(max_str_len=9))  # keys too


def test_limit_max_bytes_len():
    data = packb(b"x" * 10)
    assert unpackb(data, limits=Limits(max_bytes_len=10)) == b"x" * 10
    expect_error(data, "max_bytes_len", limits=Limits(max_bytes_len=9))


@pytest.mark.parametrize("wrap", [lambda x: [x], lambda x: (x,), lambda x: {"k": x}, lambda x: [({"k": x},)]])
def test_limit_max_depth(wrap):
    v = 0
    for _ in range(12):
        v = wrap(v)
    depth = sum(1 for ch in repr(v) if ch in "[({")
    data = packb(v)
    assert_same(unpackb(data, limits=Limits(max_depth=depth)), v)
    expect_error(data, "max_depth", limits=Limits(max_depth=depth - 1))


def test_deep_nesting_beyond_msgpack_stack_is_serialization_error():
    expect_error(b"\x91" * 5000 + b"\xc0", "max_depth")
    tag = msgpack.packb(msgpack.ExtType(EXT_TUPLE, b""))
    expect_error((b"\x92" + tag) * 5000 + b"\xc0", "max_depth")
    # deep tuples decode without recursion (no C-stack blowup), up to msgpack's stack
    value = unpackb((b"\x92" + tag) * 900 + b"\xc0", limits=Limits(max_depth=10_000))
    depth = 0
    while value is not None:
        assert type(value) is tuple and len(value) == 1
        value, depth = value[0], depth + 1
    assert depth == 900


def test_limit_max_ndim():
    t = torch.zeros((1,) * 9)
    data = packb(t)
    assert unpackb(data, limits=Limits(max_ndim=9)).shape == t.shape
    expect_error(data, "max_ndim", limits=Limits(max_ndim=8))


def test_limit_max_int_bytes():
    data = packb(2**200)  # 26 bytes of two's complement
    assert unpackb(data, limits=Limits(max_int_bytes=26)) == 2**200
    expect_error(data, "max_int_bytes", limits=Limits(max_int_bytes=25))


def test_huge_declared_lengths_do_not_allocate():
    # array32 / map32 / str32 / bin32 headers claiming 4 billion entries, no body
    for head in (b"\xdd", b"\xdf", b"\xdb", b"\xc6", b"\xc9"):
        expect_error(head + b"\xff\xff\xff\xff" + (b"\x05" if head == b"\xc9" else b""))


# --------------------------------------------------------------------------- header checks


@pytest.mark.parametrize(
    "payload, match",
    [
        (tensor_ext(EXT_TENSOR, "float32", (2, 3), b"\x00" * 20), "needs 24 bytes"),
        (tensor_ext(EXT_TENSOR, "float32", (2, 3), b"\x00" * 28), "needs 24 bytes"),
        (tensor_ext(EXT_NDARRAY, "int16", (), b"\x00"), "needs 2 bytes"),
        (tensor_ext(EXT_TENSOR, "float32", (-1, 4), b""), "negative"),
        (tensor_ext(EXT_TENSOR, "float32", (-2, -3), b"\x00" * 24), "negative"),
        (tensor_ext(EXT_NDARRAY, "float32", (0, 2**62, 2**62), b""), "max_tensor_bytes"),
        (tensor_ext(EXT_TENSOR, "uint8", (2**40,), b""), "max_tensor_bytes"),
        (tensor_ext(EXT_TENSOR, "int64", (2**31, 2**31, 2**31), b""), "max_tensor_bytes"),
        (tensor_ext(EXT_TENSOR, "complex64", (1,), b"\x00" * 8), "unknown dtype"),
        (tensor_ext(EXT_TENSOR, "float32", (1,), b"\x00" * 4, version=2), "version"),
        (tensor_ext(EXT_TENSOR, "bool", (3,), b"\x00\x01\x02"), "bool"),
        (tensor_ext(EXT_NDARRAY, "bool", (1,), b"\xff"), "bool"),
        (msgpack.packb(msgpack.ExtType(EXT_TENSOR, b"\x01\x07float3")), "truncated"),
        (msgpack.packb(msgpack.ExtType(EXT_TENSOR, b"\x01\x07float32\x02" + b"\x00" * 9)), "truncated"),
        (msgpack.packb(msgpack.ExtType(EXT_NDARRAY, b"")), "truncated"),
        (msgpack.packb(msgpack.ExtType(EXT_TENSOR, b"\x01\x02\xff\xfe\x00")), "ASCII"),
    ],
)
def test_tensor_header_consistency(payload, match):
    expect_error(payload, match=match)


def test_header_is_what_the_docstring_says():
    ext = msgpack.unpackb(packb(torch.arange(6, dtype=torch.int16).reshape(2, 3)))
    assert ext.code == EXT_TENSOR
    assert ext.data == b"\x01\x05int16\x02" + struct.pack("<2q", 2, 3) + struct.pack("<6h", *range(6))
    assert msgpack.unpackb(packb(np.zeros(1))).code == EXT_NDARRAY
    assert msgpack.unpackb(packb((1, (2,)))) == [
        msgpack.ExtType(EXT_TUPLE, b""), 1, [msgpack.ExtType(EXT_TUPLE, b""), 2]
    ]
    assert msgpack.unpackb(packb(())) == [msgpack.ExtType(EXT_TUPLE, b"")]


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize("code", [0, 5, 42, 127, -1, -2, -128])
def test_unknown_ext_codes_refused(code):
    for body in (b"", b"\x00\x00\x00\x00", b"\x00" * 8, b"\x00" * 12):
        data = b"\xc7" + bytes([len(body), code & 0xFF]) + body  # ext8, any code
        err = expect_error(data)
        if code != -1 or len(body) in (4, 8, 12):  # -1 with another length: bad timestamp
            assert f"ExtType code {code}" in str(err)


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),  # reserved byte
        (packb(1) + b"\x00", "trailing"),
        (b"\x92\x01", "malformed"),  # truncated array
        (msgpack.packb({1: 2}), "malformed"),  # int key
        (msgpack.packb({b"k": 2}), "str keys"),  # bytes key
        (b"\xa2\xff\xfe", "UTF-8"),
        (msgpack.packb([msgpack.ExtType(EXT_TUPLE, b"\x90"), 1]), "empty payload"),
        (msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"")), "tuple tag"),
        (msgpack.packb([1, msgpack.ExtType(EXT_TUPLE, b"")]), "tuple tag"),
        (msgpack.packb([msgpack.ExtType(EXT_TUPLE, b""), msgpack.ExtType(EXT_TUPLE, b"")]), "tuple tag"),
        (msgpack.packb({"k": msgpack.ExtType(EXT_TUPLE, b"")}), "tuple tag"),
        (msgpack.packb(msgpack.ExtType(EXT_BIGINT, b"")), "big-int"),
    ],
)
def test_malformed_inputs(data, match):
    expect_error(data, match=match)


def test_non_bytes_argument_is_type_error():
    with pytest.raises(TypeError):
        unpackb("not bytes")  # type: ignore[arg-type]
    assert unpackb(bytearray(packb([1]))) == [1]
    assert unpackb(memoryview(packb([1]))) == [1]


def test_every_truncation_is_serialization_error():
    value = {
        "t": torch.arange(6, dtype=torch.float16).reshape(2, 3),
        "a": (np.ones(3, np.int64), [1, "two", b"3", 2**70]),
        "f": 0.5,
    }
    data = packb(value)
    for cut in range(len(data)):
        with pytest.raises(SerializationError):
            unpackb(data[:cut])
    assert_same(unpackb(data), value)


# --------------------------------------------------------------------------- property tests

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.lists(children, max_size=5).map(tuple)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)


@st.composite
def small_tensors(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * torch.empty((), dtype=dtype).element_size(), max_size=n * 8))
    u8 = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        t = (u8[:n] & 1).to(torch.bool).reshape(shape)
    else:
        size = torch.empty((), dtype=dtype).element_size()
        t = u8[: n * size].clone().view(dtype).reshape(shape)
    if draw(st.booleans()) and dtype != torch.bfloat16:
        return t.numpy()
    return t


values_with_tensors = st.recursive(
    scalars | small_tensors(),
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=12,
)


@FAST
@given(json_like)
def test_property_json_like_round_trip(value):
    roundtrip(value)


@FAST
@given(values_with_tensors)
def test_property_values_with_tensors_round_trip(value):
    roundtrip(value)


def _decode_or_serialization_error(data: bytes, limits: Limits | None = None) -> None:
    try:
        unpackb(data, limits=limits)
    except SerializationError as e:
        # the decoder's own checks or msgpack's (ValueError family) must catch bad input;
        # a wrapped RuntimeError/IndexError/... would mean a check is missing
        assert e.__cause__ is None or isinstance(e.__cause__, ValueError), repr(e.__cause__)
    # any other exception type propagates and fails the test


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_property_random_bytes_only_raise_serialization_error(data):
    _decode_or_serialization_error(data)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"\xc7", b"\xc8", b"\xd4", b"\xd5", b"\xd6", b"\xd7", b"\xd8", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x91", b"\x81", b"\xa1", b"\x00", b"\xff"]) | st.binary(max_size=4), max_size=40))
def test_property_ext_heavy_random_bytes(chunks):
    _decode_or_serialization_error(b"".join(chunks))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values_with_tensors, st.data())
def test_property_mutated_payloads_only_raise_serialization_error(value, data):
    buf = bytearray(packb(value))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[i]
        else:
            del buf[i:]
    _decode_or_serialization_error(bytes(buf))
    _decode_or_serialization_error(bytes(buf), Limits(max_container_len=3, max_str_len=5, max_depth=3, max_tensor_bytes=16))


@FAST
@given(values_with_tensors)
def test_property_decoding_respects_small_limits(value):
    lim = Limits(max_container_len=2, max_str_len=4, max_bytes_len=4, max_depth=2, max_tensor_bytes=8, max_ndim=2)
    try:
        out = unpackb(packb(value), limits=lim)
    except SerializationError as e:
        assert e.limit is not None  # a valid payload can only fail on a limit
        return
    _assert_within(out, lim, 0)


def _assert_within(x, lim: Limits, depth: int) -> None:
    if isinstance(x, (list, tuple, dict)):
        assert depth + 1 <= lim.max_depth and len(x) <= lim.max_container_len
        items = x.values() if isinstance(x, dict) else x
        for k in x if isinstance(x, dict) else ():
            assert len(k.encode()) <= lim.max_str_len
        for y in items:
            _assert_within(y, lim, depth + 1)
    elif isinstance(x, str):
        assert len(x.encode()) <= lim.max_str_len
    elif isinstance(x, bytes):
        assert len(x) <= lim.max_bytes_len
    elif isinstance(x, (torch.Tensor, np.ndarray)):
        nbytes = x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()
        assert nbytes <= lim.max_tensor_bytes and x.ndim <= lim.max_ndim


# --------------------------------------------------------------------------- canonical bytes


def test_canonical_ignores_dict_insertion_order():
    a = {"b": 1, "a": {"y": 2.5, "x": [1, (2, 3)]}, "c": None}
    b = {"c": None, "a": {"x": [1, (2, 3)], "y": 2.5}, "b": 1}
    assert a == b and packb(a) != packb(b)
    assert dumps_canonical(a) == dumps_canonical(b)
    decoded = unpackb(dumps_canonical(a))
    assert decoded == a and list(decoded) == ["a", "b", "c"]


def test_canonical_nan_is_deterministic_and_types_count():
    nans = [bits_from(b) for b in (0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001)]
    assert len({dumps_canonical(n) for n in nans}) == 1
    assert len({packb(n) for n in nans}) == 3  # the wire format keeps the bits
    assert dumps_canonical(1) != dumps_canonical(1.0) != dumps_canonical(True)
    assert dumps_canonical([1, 2]) != dumps_canonical((1, 2))
    assert dumps_canonical(0.1) == dumps_canonical(0.3 - 0.2 + (0.1 - (0.3 - 0.2)))
    assert dumps_canonical(0.1) != dumps_canonical(0.1 + 2**-56)


def test_canonical_tensors_ignore_layout_and_nan_payload():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert dumps_canonical(t) == dumps_canonical(t.t().contiguous().t())
    assert dumps_canonical(t.t()) != dumps_canonical(t)  # different shape
    assert dumps_canonical(t) != dumps_canonical(t.to(torch.float64))
    assert dumps_canonical(t) != dumps_canonical(t.numpy())  # torch vs numpy differ
    n1 = torch.tensor([1.0, math.nan])
    n2 = torch.tensor([1.0, -math.nan])
    n2.view(torch.int32)[1] |= 0x5
    assert not torch.equal(n1.view(torch.int32), n2.view(torch.int32))
    assert dumps_canonical(n1) == dumps_canonical(n2)
    assert dumps_canonical(n1.numpy()) == dumps_canonical(n2.numpy())
    assert dumps_canonical(n1) != dumps_canonical(torch.tensor([1.0, 2.0]))


def test_canonical_golden_bytes():
    """Freeze the format: a change here silently invalidates every on-disk cache key."""
    got = dumps_canonical({"b": 0.1, "a": [1, (2,)], "t": torch.tensor([1, 2], dtype=torch.int8)})
    expected = (
        b"\x83"
        + b"\xa1a\x92\x01\x92\xc7\x00\x01\x02"
        + b"\xa1b\xcb" + struct.pack(">d", 0.1)
        + b"\xa1t\xc7\x11\x02\x01\x04int8\x01" + struct.pack("<q", 2) + b"\x01\x02"
    )
    assert got == expected


def _shuffled(value, rnd):
    if isinstance(value, dict):
        keys = list(value)
        rnd.shuffle(keys)
        return {k: _shuffled(value[k], rnd) for k in keys}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    if isinstance(value, tuple):
        return tuple(_shuffled(v, rnd) for v in value)
    return value


@FAST
@given(values_with_tensors, st.randoms(use_true_random=False))
def test_property_canonical_stable_under_reordering_and_round_trip(value, rnd):
    c = dumps_canonical(value)
    assert dumps_canonical(_shuffled(value, rnd)) == c
    assert dumps_canonical(unpackb(packb(value))) == c
    assert dumps_canonical(unpackb(c)) == c


CANONICAL_PROGRAM = r"""
import hashlib, math, sys, torch, numpy as np
from nodegraph.serialize import dumps_canonical
value = {
    "prompt": "a cat ✓", "cfg": 7.5, "eta": 0.1, "seed": 2**63 + 5, "big": -(10**40),
    "nan": float("nan"), "sizes": (512, 768), "flags": [True, None, b"\x00\x01"],
    "t": torch.linspace(0, 1, 7, dtype=torch.float64).to(torch.bfloat16).reshape(7, 1).t(),
    "a": np.arange(10, dtype=np.int32).reshape(2, 5),
    "z": {"k%d" % i: i * 0.1 for i in range(20)},
}
if sys.argv[1] == "reversed":
    value = dict(reversed(list(value.items())))
    value["z"] = dict(reversed(list(value["z"].items())))
print(hashlib.sha256(dumps_canonical(value)).hexdigest())
"""


def test_canonical_digest_stable_across_processes():
    """Another interpreter (other hash seed, other dict insertion order) gets the same digest."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONHASHSEED"] = "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"
    out = subprocess.run(
        [sys.executable, "-c", CANONICAL_PROGRAM, "reversed"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    there = out.stdout.strip()

    import contextlib
    import io

    buf = io.StringIO()
    saved_argv, sys.argv = sys.argv, ["-c", "forward"]
    try:
        with contextlib.redirect_stdout(buf):
            exec(CANONICAL_PROGRAM, {"__name__": "canonical_here"})
    finally:
        sys.argv = saved_argv
    here = buf.getvalue().strip()
    assert len(here) == 64
    assert there == here
