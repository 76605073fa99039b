"""The node definition API: a decorator over a typed Python function.

    @node("image.scale", version="1.0.0", category="image", output="image")
    def scale(image: types.Image, factor: Annotated[float, Field(gt=0, le=8)] = 2.0,
              mode: Literal["nearest", "bilinear"] = "bilinear") -> types.Image:
        ...

The signature is the schema: each parameter is an input port (its annotation gives the port type, its
default makes it optional, pydantic ``Field`` metadata gives bounds, enums and descriptions); the return
annotation gives the output type(s). Several outputs are declared with a dict annotation,
``-> {"x": types.Latent(), "denoised": types.Latent()}``, and the function returns a dict or a tuple in that
order. A parameter annotated :class:`Context` is injected by the executor and is not a port.

Literal inputs are validated with pydantic in strict mode, which gives the scalar coercion policy for free:
an int literal is accepted for a float input, a float for an int input is refused, a bool is neither.

Nodes must be pure: the same inputs give the same outputs. Randomness comes from explicit seed inputs. A node
that reads files or other outside state declares ``cache=False`` (always re-run) or a ``fingerprint``
function whose result joins its cache key. A node never changes its inputs in place (they are other nodes'
cached outputs; the executor detects it and fails the node, see :mod:`nodegraph.executor`).

Hooks a node type may declare (all optional, all run at validation, before anything executes):

* ``resolve(literals, ctx) -> object``: find what the literals name (a model folder and its config) once; the
  result is handed to ``refine``/``fingerprint`` and to the running node as ``ctx.resolved``. Raising an error
  with ``code``/``port``/``hint`` attributes reports it as a validation issue on that port.
* ``refine(literals[, ctx]) -> {port: PortType}``: sharpen output types from the literals (a model's space); a
  type given as ``"input:<name>"`` is checked against the type linked into that input (a LoRA file's family
  against the model it is applied to), so the mismatch is a ``type_mismatch`` naming both.
* ``fingerprint(literals, ctx) -> JSON-able``: joins the cache key (file contents, weights' size and mtime).
* ``cost(literals) -> {"pixels": n, "elements": n, "iterations": n}``: what running would allocate, compared
  with the engine's :class:`nodegraph.limits.Limits` (``too_large``).
* ``requires=("open3d", ...)``: importable modules the node needs (``missing_dependency`` when absent).
"""

from __future__ import annotations

import enum
import inspect
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic.fields import FieldInfo

from . import types as T
from .errors import Cancelled

_SEMVER = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")
LITERAL_TYPES = {"Int", "Float", "Bool", "String", "List", "Dict", "Any"}


def parse_semver(text: str) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``; ``"1"`` and ``"1.2"`` are accepted as pins. Raises ValueError."""
    m = _SEMVER.match(str(text))
    if not m:
        raise ValueError(f"not a semantic version: {text!r} (expected MAJOR.MINOR.PATCH)")
    return tuple(int(g or 0) for g in m.groups())  # type: ignore[return-value]


class Context:
    """What a running node may ask of the engine: its id, device, progress, cancellation, file roots."""

    def __init__(
        self,
        node_id: str,
        device: Any,
        *,
        emit: Callable[..., None] | None = None,
        cancel: Any = None,
        input_root: Path | None = None,
        output_root: Path | None = None,
        residency: Any = None,
        models: Any = None,
        limits: Any = None,
        resolved: Any = None,
        run_id: str | None = None,
    ):
        self.node_id = node_id
        self.device = device
        self._emit = emit
        self._cancel = cancel
        self.input_root = input_root
        self.output_root = output_root
        self.residency = residency
        self.models = models  # nodegraph.roots.ModelRoots: where model names resolve
        self.limits = limits  # nodegraph.limits.Limits
        self.resolved = resolved  # what the node type's ``resolve`` hook found at validation (see NodeDef)
        self.run_id = run_id

    def for_node(self, node_id: str, resolved: Any = None) -> "Context":
        """A copy of this context for another node (same roots, limits, run), with its own resolved value."""
        new = object.__new__(Context)
        new.__dict__.update(self.__dict__)
        new.node_id, new.resolved = node_id, resolved
        return new

    def progress(self, done: int, total: int | None = None, message: str = "") -> None:
        """Report progress; also a cancellation point."""
        if self._emit is not None:
            self._emit("progress", self.node_id, done=done, total=total, message=message)
        self.check_cancelled()

    def preview(self, value: Any) -> None:
        """Publish an intermediate value (e.g. a decoded latent) to event subscribers."""
        if self._emit is not None:
            self._emit("preview", self.node_id, value=value)

    def check_cancelled(self) -> None:
        if self._cancel is not None and self._cancel.cancelled:
            token = self._cancel
            reason = getattr(token, "reason", None) or "cancelled"
            message = token.message(self.node_id) if hasattr(token, "message") else f"cancelled in node {self.node_id!r}"
            raise Cancelled(message, reason)

    def resolve_input(self, path: str) -> Path:
        """A path under the input root; ``..`` or absolute paths outside it are refused."""
        return confine(self.input_root, path, "input")

    def resolve_output(self, path: str) -> Path:
        """A path under the output root; ``..`` or absolute paths outside it are refused."""
        return confine(self.output_root, path, "output")

    def model(self, module: Any) -> Any:
        """Make a model resident on this node's device (through the residency manager) and return it."""
        if self.residency is None:
            return module
        return self.residency.acquire(module, self.device)


def takes_two(fn: Callable[..., Any]) -> bool:
    """Whether a hook accepts a second positional argument (``refine(literals, ctx)`` vs ``refine(literals)``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def confine(root: Path | None, path: str, kind: str) -> Path:
    """Resolve ``path`` inside ``root``; raise PermissionError if it escapes."""
    if root is None:
        raise PermissionError(f"no {kind} root is configured; refusing to touch {path!r}")
    root = Path(root).resolve()
    candidate = Path(path)
    full = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if full != root and root not in full.parents:
        raise PermissionError(f"{kind} path {path!r} is outside the {kind} root {str(root)!r}")
    return full


@dataclass(frozen=True)
class InputDef:
    """One input port of a node type."""

    name: str
    type: T.PortType
    required: bool
    default: Any = None
    description: str = ""
    adapter: TypeAdapter | None = None  # validates literals; None for link-only ports
    enum_cls: type | None = None  # an Enum annotation: literals are its values, the function gets members

    @property
    def link_only(self) -> bool:
        return self.adapter is None

    def validate_literal(self, value: Any) -> Any:
        """Validate and coerce a literal; raise ValueError with a readable message."""
        if self.adapter is None:
            raise ValueError(f"expects a link to a {self.type} output, not a literal")
        try:
            return self.adapter.validate_python(value, strict=True)
        except PydanticValidationError as exc:
            msgs = "; ".join(e["msg"] for e in exc.errors())
            raise ValueError(f"bad value {value!r}: {msgs}") from None

    def json_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.to_json(), "required": self.required}
        if not self.required:
            out["default"] = self.default
        if self.description:
            out["description"] = self.description
        if self.adapter is not None:
            try:
                out["schema"] = self.adapter.json_schema()
            except Exception:  # noqa: BLE001 - a schema we cannot express is simply omitted
                pass
        return out


@dataclass
class NodeDef:
    """A registered node type. ``kind`` is ``"python"`` (a function) or ``"graph"`` (a subgraph)."""

    type_id: str
    version: str
    fn: Callable[..., Any] | None
    inputs: dict[str, InputDef]
    outputs: dict[str, T.PortType]
    category: str = "misc"
    description: str = ""
    grad: bool = False
    cache: bool = True
    fingerprint: Callable[[Mapping[str, Any], Context], Any] | None = None
    refine: Callable[..., Mapping[str, T.PortType]] | None = None
    ctx_param: str | None = None
    resolve: Callable[[Mapping[str, Any], Context], Any] | None = None
    cost: Callable[[Mapping[str, Any]], Mapping[str, int]] | None = None
    requires: tuple[str, ...] = ()
    kind: str = "python"
    subgraph: Any = None  # nodegraph.graph.Subgraph for kind == "graph"
    pack: str = "<unregistered>"
    single_output: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._enum_inputs = tuple(n for n, i in self.inputs.items() if i.enum_cls is not None)
        self._output_names = tuple(self.outputs)

    def fast_call(self) -> Callable[[dict[str, Any], Context | None], dict[str, Any]]:
        """A specialised ``call`` for hot loops: skips the checks this node type does not need."""
        fn, ctx_param = self.fn, self.ctx_param
        if self.single_output and not self._enum_inputs:
            name = self._output_names[0]
            if ctx_param is None:
                return lambda kwargs, ctx: {name: fn(**kwargs)}
            return lambda kwargs, ctx: {name: fn(**kwargs, **{ctx_param: ctx})}
        return self.call

    @property
    def major(self) -> int:
        return parse_semver(self.version)[0]

    def call(self, kwargs: dict[str, Any], ctx: Context | None) -> dict[str, Any]:
        """Run the function and return its outputs as a dict keyed by output name."""
        if self.ctx_param is not None:
            kwargs = {**kwargs, self.ctx_param: ctx}
        for name in self._enum_inputs:
            value = kwargs.get(name)
            if value is not None and not isinstance(value, self.inputs[name].enum_cls):
                kwargs[name] = self.inputs[name].enum_cls(value)
        result = self.fn(**kwargs)  # type: ignore[misc]
        return self.wrap_result(result)

    def wrap_result(self, result: Any) -> dict[str, Any]:
        names = self._output_names
        if self.single_output:
            return {names[0]: result}
        if isinstance(result, Mapping):
            missing = set(names) - set(result)
            if missing:
                raise TypeError(f"{self.type_id} returned no value for output(s) {sorted(missing)}")
            return {n: result[n] for n in names}
        if isinstance(result, tuple) and len(result) == len(names):
            return dict(zip(names, result))
        raise TypeError(f"{self.type_id} must return a dict or a {len(names)}-tuple for outputs {names}")

    def schema(self) -> dict[str, Any]:
        """The per-node JSON description (``nodegraph nodes --json``); graph-defined nodes include their subgraph."""
        out = {
            "type": self.type_id,
            "version": self.version,
            "category": self.category,
            "description": self.description,
            "pack": self.pack,
            "kind": self.kind,
            "grad": self.grad,
            "inputs": {n: i.json_schema() for n, i in self.inputs.items()},
            "outputs": {n: t.to_json() for n, t in self.outputs.items()},
        }
        if self.kind == "graph":
            out["graph"] = self.extra.get("definition")
        return out


def _adapter_for(annotation: Any, field_info: FieldInfo | None, ptype: T.PortType) -> TypeAdapter | None:
    if ptype.name not in LITERAL_TYPES:
        return None
    if isinstance(annotation, T.PortType) or annotation is inspect.Parameter.empty:
        annotation = T.PY_TYPES.get(ptype.name, Any)
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        extra = [e for e in extra if not isinstance(e, T.PortType)]
        annotation = typing.Annotated[(base, *extra)] if extra else base
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        # JSON carries the enum's values; the function receives the Enum member (see NodeDef.call).
        annotation = typing.Literal[tuple(m.value for m in annotation)]
    if field_info is not None:
        annotation = typing.Annotated[annotation, field_info]
    return TypeAdapter(annotation)


def _outputs_from(ret: Any, output: str) -> tuple[dict[str, T.PortType], bool]:
    if isinstance(ret, dict):
        if not ret:
            raise TypeError("a dict return annotation must name at least one output")
        return {str(k): T.from_annotation(v) for k, v in ret.items()}, False
    if ret is inspect.Signature.empty:
        return {output: T.Any}, True
    return {output: T.from_annotation(ret)}, True


def define(
    fn: Callable[..., Any],
    type_id: str,
    version: str = "1.0.0",
    *,
    category: str = "misc",
    description: str | None = None,
    output: str = "out",
    grad: bool = False,
    cache: bool = True,
    fingerprint: Callable[[Mapping[str, Any], Context], Any] | None = None,
    refine: Callable[..., Mapping[str, T.PortType]] | None = None,
    resolve: Callable[[Mapping[str, Any], Context], Any] | None = None,
    cost: Callable[[Mapping[str, Any]], Mapping[str, int]] | None = None,
    requires: tuple[str, ...] | list[str] = (),
) -> NodeDef:
    """Build a :class:`NodeDef` from a function (what :func:`node` does)."""
    parse_semver(version)
    sig = inspect.signature(fn, eval_str=True)
    inputs: dict[str, InputDef] = {}
    ctx_param = None
    for name, p in sig.parameters.items():
        if p.annotation is Context:
            ctx_param = name
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{type_id}: *args/**kwargs cannot be ports ({name})")
        field_info = p.default if isinstance(p.default, FieldInfo) else None
        if field_info is not None:
            default = field_info.get_default(call_default_factory=True)
            required = field_info.is_required()
            desc = field_info.description or ""
        else:
            default = None if p.default is p.empty else p.default
            required = p.default is p.empty
            desc = ""
        ann = p.annotation
        if typing.get_origin(ann) is typing.Annotated:
            for extra in typing.get_args(ann)[1:]:
                if isinstance(extra, FieldInfo) and extra.description:
                    desc = desc or extra.description
        ptype = T.from_annotation(ann)
        base = typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Annotated else ann
        enum_cls = base if isinstance(base, type) and issubclass(base, enum.Enum) else None
        if enum_cls is not None and isinstance(default, enum.Enum):
            default = default.value
        inputs[name] = InputDef(name, ptype, required, default, desc, _adapter_for(ann, field_info, ptype), enum_cls)
    outputs, single = _outputs_from(sig.return_annotation, output)
    doc = description if description is not None else inspect.getdoc(fn) or ""
    return NodeDef(
        type_id=type_id,
        version=version,
        fn=fn,
        inputs=inputs,
        outputs=outputs,
        category=category,
        description=doc.strip().splitlines()[0] if doc.strip() else "",
        grad=grad,
        cache=cache,
        fingerprint=fingerprint,
        refine=refine,
        ctx_param=ctx_param,
        resolve=resolve,
        cost=cost,
        requires=tuple(requires),
        single_output=single,
    )


def node(type_id: str, version: str = "1.0.0", **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator marking a function as a node type. The function stays callable as plain Python."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.__node_def__ = define(fn, type_id, version, **options)  # type: ignore[attr-defined]
        return fn

    return wrap

