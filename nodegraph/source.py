"""Graph sources: a path, text, bytes or an object becomes a plain JSON document, bounded before it is trusted,
then a :class:`~nodegraph.graph.Graph` with its overrides applied.

A graph is JSON data. Whatever form it comes in, it is reduced here to nested ``dict`` / ``list`` / ``str`` /
``int`` / ``float`` / ``bool`` / ``None`` and then parsed once into a :class:`nodegraph.graph.Graph`. Policy, in
the order it applies (every refusal is an :class:`~nodegraph.errors.Issue`, never an exception):

* **Files** (:func:`load_graph_source`): only regular files are read. The file is opened with ``O_NONBLOCK``
  (a FIFO never blocks the open) and ``fstat``-ed; directories, FIFOs, sockets and devices are refused
  (``bad_json``). A file over ``limits.max_graph_bytes`` is ``too_large`` before any byte is read, and no more
  than that is ever read. A name ending in ``.msgpack`` is decoded as msgpack, anything else as JSON text.
* **Text and bytes**: bytes must be UTF-8 (a BOM is allowed); text over ``max_graph_bytes`` is ``too_large``.
  JSON that nests too deeply for the parser is ``too_deep`` (the parser's RecursionError is caught); an integer
  literal with more than 4,300 digits (Python's int-string limit) is ``too_large``; a key repeated in one
  object is ``duplicate_key`` with its path (JSON and msgpack both; there is no silent last-wins).
* **Documents** (:func:`check_document`, for every form but an already parsed ``Graph``): only JSON values,
  dict keys are strings; a tensor, ndarray, bytes, tuple or any other object is ``bad_graph`` with its path (the
  Python API may still hand tensors as overrides). Nesting deeper than :data:`MAX_DOCUMENT_DEPTH` is
  ``too_deep`` (this also stops reference cycles); more than ``max_graph_bytes`` values in all is
  ``too_large``. The finer limits (``max_nesting`` per literal, loop nesting, expansion) are validation's.
* ``version`` must be the integer ``1`` (``true`` and ``1.0`` are ``bad_version``).
* Overrides (``--set NODE.INPUT=VALUE``, ``overrides={...}``) are applied to the parsed graph here too; a
  ``--set`` value is JSON under the same rules, else a plain string. Graph output names become file names, so
  :func:`output_name_problem` says which cannot be one.

Errors inside the document are placed like validation's: ``nodes.lp.body.nodes.s.inputs.a`` is node ``lp/s``,
port ``a``.
"""

from __future__ import annotations

import difflib
import json
import ntpath
import os
import re
import stat
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import ValidationError as PydanticValidationError

from .errors import GraphValidationError, Issue
from .graph import LOOP_OPTIONS, LOOP_TYPE, SUPPORTED_VERSIONS, Graph, NodeSpec, parse_input_value
from .limits import DEFAULT_LIMITS, Limits
from .registry import Registry

#: Document nesting the parsers (json, pydantic, the checker) handle safely. A graph needs far less: a literal
#: up to ``max_nesting`` deep, and loops, which are limited much sooner (see :mod:`nodegraph.validate`).
MAX_DOCUMENT_DEPTH = 512
INT_MAX_DIGITS = 4300  # Python's default int <-> str conversion limit (sys.get_int_max_str_digits)
_INT_BOUND = 10**INT_MAX_DIGITS
_MAX_ISSUES = 20  # per kind of problem found in one document


def load_graph_source(source: Any, limits: Limits | None = None) -> Any:
    """Accept a Graph, a dict, JSON text/bytes, or a path to a ``.json`` / ``.msgpack`` file.

    A path is read here (see the module docstring); what it holds is returned as bytes (JSON) or as the decoded
    document (msgpack). Raises :class:`GraphValidationError` when the file cannot be used."""
    if not isinstance(source, (str, Path)) or (isinstance(source, str) and source.lstrip().startswith("{")):
        return source  # a Graph, dict, JSON text or bytes; anything else is reported by validation as bad_graph
    limits = limits or DEFAULT_LIMITS
    path = Path(source)
    data = read_graph_file(path, limits)
    if path.suffix == ".msgpack":
        document, issues = decode_msgpack(data, limits)
        if issues:
            raise GraphValidationError(issues)
        return document
    return data


def read_graph_file(path: Path, limits: Limits) -> bytes:
    """The bytes of a regular file, at most ``limits.max_graph_bytes``; raises GraphValidationError otherwise."""
    shown = _short(str(path))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise GraphValidationError([Issue("bad_json", f"cannot read graph file {shown}: {reason}")]) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GraphValidationError([Issue("bad_json", f"cannot read graph file {shown}: it is "
                                              f"{_file_kind(info.st_mode)}, not a regular file")])
        if info.st_size > limits.max_graph_bytes:
            raise GraphValidationError([_too_big(f"graph file {shown} has {info.st_size:,} bytes", limits)])
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(limits.max_graph_bytes + 1)
    except OSError as exc:
        raise GraphValidationError([Issue("bad_json", f"cannot read graph file {shown}: {exc.strerror or exc}")]) \
            from None
    finally:
        os.close(fd)
    if len(data) > limits.max_graph_bytes:  # it grew while being read, or stat does not know (/proc)
        raise GraphValidationError([_too_big(f"graph file {shown} has more than {limits.max_graph_bytes:,} bytes",
                                             limits)])
    return data


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _too_big(what: str, limits: Limits) -> Issue:
    return Issue("too_large", f"{what}; the limit is max_graph_bytes={limits.max_graph_bytes:,}")


# ---------------------------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------------------------


def _pairs_hook(found: list[tuple[dict, list[str]]]) -> Callable[[list[tuple[Any, Any]]], dict]:
    """An ``object_pairs_hook`` that builds the dict and remembers the keys it saw twice."""

    def hook(pairs: list[tuple[Any, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set = set()
            dups = [k for k, _ in pairs if k in seen or seen.add(k)]  # type: ignore[func-returns-value]
            found.append((obj, list(dict.fromkeys(dups))))
        return obj

    return hook


def decode_json(text: str, limits: Limits | None = None) -> tuple[Any, list[Issue]]:
    """Parse JSON text into a document; (None, issues) when it is too big, too deep, malformed or ambiguous."""
    limits = limits or DEFAULT_LIMITS
    if len(text) > limits.max_graph_bytes:
        return None, [_too_big(f"the graph text has {len(text):,} characters", limits)]
    found: list[tuple[dict, list[str]]] = []
    try:
        data = json.loads(text, object_pairs_hook=_pairs_hook(found))
    except json.JSONDecodeError as exc:
        return None, [Issue("bad_json", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")]
    except RecursionError:
        message = f"the JSON nests deeper than the {MAX_DOCUMENT_DEPTH} levels a graph may have"
        return None, [_at_path("too_deep", message, _where(text, deep=True))]
    except ValueError:  # int('9' * 5000): Python refuses to convert integers with over 4,300 digits
        message = f"an integer with more than {INT_MAX_DIGITS:,} digits"
        return None, [_at_path("too_large", message, _where(text, deep=False))]
    return data, _duplicate_issues(data, found)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]|-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?')


def _where(text: str, *, deep: bool) -> list[Any]:
    """The path (keys and indexes) where JSON text first nests deeper than MAX_DOCUMENT_DEPTH (``deep``) or holds
    an integer too long to convert: a linear scan of its tokens, run only when the parser gave up, to say which
    node and port it was."""
    stack: list[list[Any]] = []  # [key or index, expecting a key] per open container
    key = None
    for token in _TOKENS.finditer(text):
        t = token.group()
        if t in "[{":
            if deep and len(stack) >= MAX_DOCUMENT_DEPTH:
                break
            stack.append([0, False] if t == "[" else [None, True])
        elif t in "]}":
            if stack:
                stack.pop()
        elif t == ",":
            if stack and stack[-1][1] is False and isinstance(stack[-1][0], int):
                stack[-1][0] += 1
            elif stack:
                stack[-1][1] = True
        elif t == ":":
            if stack:
                stack[-1][0], stack[-1][1] = key, False
        elif t[0] != '"':
            if not deep and len(t.lstrip("-")) > INT_MAX_DIGITS and t.lstrip("-").isdigit():
                break
        elif stack and stack[-1][1]:
            try:
                key = json.loads(t)
            except ValueError:
                key = t
    else:
        return []
    return [frame[0] for frame in stack]


def decode_msgpack(data: bytes, limits: Limits | None = None) -> tuple[Any, list[Issue]]:
    """Decode a msgpack graph (:func:`nodegraph.serialize.unpackb`) into a document, refusing duplicate keys."""
    from . import serialize

    limits = limits or DEFAULT_LIMITS
    codec = serialize.Limits(max_input_bytes=limits.max_graph_bytes, max_depth=MAX_DOCUMENT_DEPTH)
    found: list[tuple[dict, list[str]]] = []
    try:
        document = serialize.unpackb(data, limits=codec, object_pairs_hook=_pairs_hook(found))
    except serialize.SerializationError as exc:
        code = {"max_depth": "too_deep", None: "bad_json"}.get(exc.limit, "too_large")
        return None, [Issue(code, f"cannot decode msgpack graph: {exc}")]
    return document, _duplicate_issues(document, found)


def _duplicate_issues(document: Any, found: list[tuple[dict, list[str]]]) -> list[Issue]:
    """Place the repeated keys the pairs hook found: walk the document (no recursion) to each such object."""
    wanted = {id(obj): keys for obj, keys in found}
    issues: list[Issue] = []
    stack: list[tuple[Any, Any]] = [(document, None)]  # (value, path as (key, parent) links)
    while stack and wanted and len(issues) < _MAX_ISSUES:
        value, link = stack.pop()
        if isinstance(value, dict):
            for key in wanted.pop(id(value), ()):
                issues.append(_at("duplicate_key", f"key {_short(key)} appears more than once", (key, link)))
            stack.extend((v, (k, link)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (i, link)) for i, v in enumerate(value))
    return issues[:_MAX_ISSUES]


# ---------------------------------------------------------------------------------------------------------
# the document
# ---------------------------------------------------------------------------------------------------------

_SCALARS = (type(None), bool, int, float, str)


def check_document(document: Any, limits: Limits | None = None) -> list[Issue]:
    """Issues for a document that is not plain JSON data, nests too deeply or holds too many values."""
    limits = limits or DEFAULT_LIMITS
    issues: list[Issue] = []
    budget = limits.max_graph_bytes  # every JSON value takes at least one byte of text
    stack: list[tuple[Any, int, Any]] = [(document, 0, None)]  # (value, depth, path as (key, parent) links)
    while stack:
        value, depth, link = stack.pop()
        budget -= 1
        kind = type(value)
        if kind is int and not -_INT_BOUND < value < _INT_BOUND:
            issues.append(_at("too_large", f"an integer with more than {INT_MAX_DIGITS:,} digits", link))
        elif kind in _SCALARS:
            pass
        elif kind is list or kind is dict:
            if depth >= MAX_DOCUMENT_DEPTH:
                return [_at("too_deep", f"the graph nests deeper than {MAX_DOCUMENT_DEPTH} levels", link)]
            if budget - len(value) < 0:
                return [_too_big(f"the graph holds more than {limits.max_graph_bytes:,} values", limits)]
            if kind is list:
                stack.extend((v, depth + 1, (i, link)) for i, v in enumerate(value))
            else:
                for k, v in value.items():
                    if type(k) is not str:
                        issues.append(_at("bad_graph", f"keys must be strings, not {type(k).__name__} "
                                          f"({_short(k)}): a graph is JSON data", link))
                    else:
                        stack.append((v, depth + 1, (k, link)))
        else:
            issues.append(_at("bad_graph", f"a graph is JSON data, but this value is a {_type_name(value)}", link))
        if len(issues) >= _MAX_ISSUES:
            break
    return issues


def _type_name(value: Any) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _at(code: str, message: str, link: Any) -> Issue:
    """An issue at a path given as (key, parent) links."""
    path: list[Any] = []
    while link is not None:
        key, link = link
        path.append(key)
    return _at_path(code, message, path[::-1])


def _at_path(code: str, message: str, path: list[Any]) -> Issue:
    node, port = place(path)
    return Issue(code, f"{path_text(path)}: {message}" if path else message, node, port)


def path_text(path: Any) -> str:
    """``nodes.a.inputs.x``; a long path keeps its head and says how long it is."""
    parts = [_clip(str(p), 40) for p in path]
    if len(parts) > 16:
        parts = [*parts[:12], f"... ({len(parts)} levels)"]
    return ".".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def place(path: Any) -> tuple[str | None, str | None]:
    """(node, port) of a document path: ``nodes.lp.body.nodes.s.inputs.a`` is node ``lp/s``, port ``a``."""
    path = [str(p) for p in path]
    node: list[str] = []
    i = 0
    while i + 1 < len(path) and path[i] == "nodes":
        node.append(path[i + 1])
        i += 2
        if i < len(path) and path[i] == "body":
            i += 1
            continue
        break
    if not node:
        return None, (path[1] if len(path) >= 2 and path[0] == "outputs" else None)
    rest = path[i:]
    return "/".join(node), (rest[1] if len(rest) >= 2 and rest[0] in ("inputs", "outputs") else None)


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int too long for repr, a self-containing list
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------


def parse_graph(data: Any, limits: Limits | None = None) -> tuple[Graph | None, list[Issue]]:
    """Parse JSON text / bytes / a dict into a :class:`Graph`, turning every failure into issues."""
    if isinstance(data, Graph):
        return data, []
    limits = limits or DEFAULT_LIMITS
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > limits.max_graph_bytes:
            return None, [_too_big(f"the graph has {len(data):,} bytes", limits)]
        try:
            data = bytes(data).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            return None, [Issue("bad_json", f"not UTF-8 text: {exc}")]
    if isinstance(data, str):
        data, issues = decode_json(data, limits)
        if data is None or issues:
            return None, issues
    issues = check_document(data, limits)
    if issues:
        return None, issues
    if not isinstance(data, dict):
        return None, [Issue("bad_graph", f"a graph must be a JSON object, got {type(data).__name__}")]
    version = data.get("version", 1)
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        return None, [Issue("bad_version", f"graph version {_short(version)} is not supported",
                            hint=f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")]
    try:
        return Graph.model_validate(data), []
    except PydanticValidationError as exc:
        return None, [_pydantic_issue(e) for e in exc.errors()[:_MAX_ISSUES * 5]]
    except RecursionError:
        return None, [Issue("too_deep", "the graph nests too deeply to parse")]


def _pydantic_issue(err: Any) -> Issue:
    loc = list(err.get("loc", ()))
    node, port = place(loc)
    code = "too_deep" if err.get("type") == "recursion_loop" else "bad_graph"
    return Issue(code, f"{path_text(loc)}: {err.get('msg')}", node=node, port=port)


# ---------------------------------------------------------------------------------------------------------
# overrides and output names
# ---------------------------------------------------------------------------------------------------------


def parse_set(expr: str) -> tuple[str, str, Any]:
    """Parse ``NODE.INPUT=VALUE``; VALUE is JSON if it parses, else a plain string. Raises ValueError."""
    if "=" not in expr:
        raise ValueError(f"--set {_short(expr)}: expected NODE.INPUT=VALUE")
    target, raw = expr.split("=", 1)
    if "." not in target:
        raise ValueError(f"--set {_short(expr)}: expected NODE.INPUT=VALUE (no '.' in {_short(target)})")
    node, name = target.rsplit(".", 1)
    if not node or not name:
        raise ValueError(f"--set {_short(expr)}: empty node or input name")
    value, issues = decode_json(raw)
    if issues and issues[0].code != "bad_json":  # too deep, a huge integer, a repeated key
        raise ValueError(f"--set {_short(expr)}: {issues[0].message}")
    return node, name, (raw if issues else value)


def apply_overrides(graph: Graph, overrides: Mapping[str, Any], registry: Registry) -> tuple[Graph, list[Issue]]:
    """Apply ``{"node.input": value}`` overrides; unknown targets become ``bad_override`` issues."""
    issues: list[Issue] = []
    changes: dict[tuple[str, str], Any] = {}
    for target, value in overrides.items():
        if "." not in target:
            issues.append(Issue("bad_override", f"override {target!r} is not of the form NODE.INPUT"))
            continue
        node, name = target.rsplit(".", 1)
        spec = graph.nodes.get(node)
        if spec is None:
            issues.append(Issue("bad_override", f"no node {node!r} to set {name!r} on", node=node, port=name,
                                hint=_close(node, graph.nodes)))
            continue
        allowed = _input_names(spec, registry)
        if allowed is not None and name not in allowed:
            issues.append(Issue("bad_override", f"node {node!r} ({spec.type}) has no input {name!r}", node=node,
                                port=name, hint=_close(name, allowed)))
            continue
        try:
            parse_input_value(value)
        except PydanticValidationError as exc:
            msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            issues.append(Issue("bad_override", f"override for {target!r} looks like a link or input reference "
                                f"but is malformed ({msgs})", node=node, port=name))
            continue
        changes[(node, name)] = value
    return (graph.with_inputs(changes) if changes else graph), issues


def _input_names(spec: NodeSpec, registry: Registry) -> set[str] | None:
    if spec.type == LOOP_TYPE:
        return set(LOOP_OPTIONS) | set(spec.body.inputs if spec.body else ())
    defn = registry.get(spec.type)
    return None if defn is None else set(defn.inputs)


def _close(name: str, candidates) -> str | None:
    candidates = list(candidates)
    if len(candidates) > 2000 or len(name) > 200:  # a hint is not worth quadratic time on a hostile graph
        return None
    found = difflib.get_close_matches(name, candidates, n=3)
    return f"did you mean {', '.join(repr(f) for f in found)}?" if found else None


def output_name_problem(name: str) -> str | None:
    """Why a graph output name cannot be used as a file name (outputs are written as NAME.png, ...), or None."""
    if name in ("", ".", ".."):
        return "is empty" if not name else f"is {name!r}, a path component"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if ntpath.splitdrive(name)[0]:
        return "starts with a drive"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "holds a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (a lone surrogate)"
    if size > 255:
        return f"has {size} bytes (at most 255)"
    return None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_foreign(data: Any, readers: list, registry: Any, limits: Limits | None = None) -> Any:
    """``data`` converted by the first pack reader that recognises it (another program's graph format), else
    unchanged. A graph already in this engine's format (an object whose ``nodes`` is an object) is never offered
    to a reader; what no reader takes is left for :func:`parse_graph` to report. A reader's failure is a
    :class:`GraphValidationError` (exit 2), a crash in it is reported as one naming the reader."""
    if not readers or isinstance(data, Graph):
        return data
    doc: Any = data
    if isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:8]) == PNG_SIGNATURE:
        doc = bytes(data)
    elif isinstance(data, (bytes, bytearray, memoryview, str)):
        try:
            text = bytes(data).decode("utf-8-sig") if not isinstance(data, str) else data
        except UnicodeDecodeError:
            return data
        doc, issues = decode_json(text, limits)
        if doc is None or issues:
            return data
    if isinstance(doc, dict) and isinstance(doc.get("nodes"), dict):
        return doc  # ours, decoded and checked once here: parse_graph takes the document as it is
    for reader in readers:
        try:
            if not reader.detect(doc):
                continue
            return reader.convert(doc, registry)
        except GraphValidationError:
            raise
        except Exception as exc:  # noqa: BLE001 - a pack's bug must not escape as a traceback
            raise GraphValidationError([Issue("bad_graph", f"the {reader.name} reader failed: "
                                              f"{type(exc).__name__}: {_short(str(exc), 200)}")]) from None
    return data
